"""The ``"dragon"`` start method for ``multiprocessing``.

``import dragon_nb`` registers it. After ``set_start_method("dragon")``,
``multiprocessing.Pool`` builds a dragon-nb ``Pool`` and ``cpu_count()``
counts the cores of every node, starting the runtime on first use. Other
multiprocessing objects (Process, Queue, Lock, Manager...) behave as with
``fork``, on this host.

``multiprocessing.Pool`` and ``multiprocessing.cpu_count`` are bound methods
of the default context, copied into the module when it is imported; so the
module attributes are replaced, at ``import dragon_nb``, by functions that
look at the start method on each call. Code that did
``from multiprocessing import Pool`` after ``import dragon_nb`` (the Dragon
idiom: ``import dragon`` comes first) therefore follows ``set_start_method``.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context as mpctx

START_METHOD = "dragon"


class DragonContext(mpctx.ForkContext):
    """A context whose Pool and cpu_count belong to the dragon-nb runtime."""

    _name = START_METHOD

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        from dragon_nb.pool import Pool
        return Pool(processes, initializer, initargs, maxtasksperchild, context=self)

    def cpu_count(self):
        from dragon_nb.runtime import get_runtime
        return get_runtime().cpu_count()


_original_pool = mpctx._default_context.Pool
_original_cpu_count = mpctx._default_context.cpu_count


def _dragon_selected() -> bool:
    return mpctx._default_context.get_start_method(allow_none=True) == START_METHOD


def Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None):
    """``multiprocessing.Pool``: a dragon-nb Pool under the "dragon" start method."""
    if _dragon_selected():
        return _CONTEXT.Pool(processes, initializer, initargs, maxtasksperchild)
    return _original_pool(processes, initializer, initargs, maxtasksperchild)


def cpu_count():
    """``multiprocessing.cpu_count``: cores on all nodes under the "dragon" start method."""
    if _dragon_selected():
        return _CONTEXT.cpu_count()
    return _original_cpu_count()


_CONTEXT = DragonContext()


def install() -> None:
    """Register the start method and route the module-level names (idempotent)."""
    mpctx._concrete_contexts[START_METHOD] = _CONTEXT
    multiprocessing.Pool = Pool
    multiprocessing.cpu_count = cpu_count
