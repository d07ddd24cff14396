"""The ``"dragon"`` start method for ``multiprocessing``.

``import dragon_nb`` registers it. After ``set_start_method("dragon")`` (or
with ``multiprocessing.get_context("dragon")``), a ``Process`` starts on a
node of the runtime, ``Pool`` is a dragon-nb Pool, ``cpu_count()`` counts the
cores of every node, and queues, pipes, locks, events, barriers and shared
values live in the runtime's object hosts (``dragon_nb.mp``), usable from any
of its processes: the runtime starts on first use. ``Manager`` stays the
stdlib's, run on this host.

``multiprocessing.Queue`` and the like are bound methods of the default
context, copied into the module when it is imported; so the module
attributes are replaced, at ``import dragon_nb``, by functions that look at
the start method on each call. Code that did ``from multiprocessing import
Queue`` after ``import dragon_nb`` (the Dragon idiom: ``import dragon``
comes first) therefore follows ``set_start_method``. ``multiprocessing.Process``
is a class that asks the current context for its ``Popen`` at ``start()``, so
it follows by itself.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context as mpctx
import multiprocessing.queues  # noqa: F401  (Dragon scripts annotate with mp.queues.Queue)

START_METHOD = "dragon"


def _mp(module: str, name: str, in_shm: str | None = None):
    """A factory of ``dragon_nb.mp.<module>`` (or of ``<in_shm>`` when the runtime's
    objects live in shared memory, see ``dragon_nb.mp.shm``), imported on first use."""
    def make(self, *args, **kwargs):
        import importlib
        from dragon_nb.mp import shm
        where = in_shm if in_shm is not None and shm.enabled() else module
        return getattr(importlib.import_module(f"dragon_nb.mp.{where}"), name)(*args, **kwargs)
    make.__name__ = name
    make.__doc__ = f"``multiprocessing.{name}`` on the dragon-nb runtime."
    return make


class DragonContext(mpctx.BaseContext):
    """The "dragon" context: processes on the runtime's nodes, objects in its hosts."""

    _name = START_METHOD

    @property
    def Process(self):
        from dragon_nb.mp.process import Process
        return Process

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        from dragon_nb.pool import Pool
        return Pool(processes, initializer, initargs, maxtasksperchild, context=self)

    def cpu_count(self):
        from dragon_nb.runtime import get_runtime
        return get_runtime().cpu_count()

    def get_start_method(self, allow_none=False):
        return self._name

    def Manager(self):
        """The stdlib's manager, its server forked on this host."""
        return mpctx._concrete_contexts["fork"].Manager()

    Queue = _mp("queues", "Queue", "shm_queues")
    JoinableQueue = _mp("queues", "JoinableQueue", "shm_queues")
    SimpleQueue = _mp("queues", "SimpleQueue", "shm_queues")
    Pipe = _mp("connection", "Pipe")
    Lock = _mp("synchronize", "Lock", "shm_sync")
    RLock = _mp("synchronize", "RLock", "shm_sync")
    Semaphore = _mp("synchronize", "Semaphore", "shm_sync")
    BoundedSemaphore = _mp("synchronize", "BoundedSemaphore", "shm_sync")
    Condition = _mp("synchronize", "Condition", "shm_sync")
    Event = _mp("synchronize", "Event", "shm_sync")
    Barrier = _mp("synchronize", "Barrier", "shm_sync")
    Value = _mp("sharedctypes", "Value", "shm_ctypes")
    Array = _mp("sharedctypes", "Array", "shm_ctypes")
    RawValue = _mp("sharedctypes", "RawValue", "shm_ctypes")
    RawArray = _mp("sharedctypes", "RawArray", "shm_ctypes")


# the names routed by start method: every factory of the context that dragon-nb has
ROUTED = ("Pool", "cpu_count", "Queue", "JoinableQueue", "SimpleQueue", "Pipe", "Lock",
          "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier",
          "Value", "Array", "RawValue", "RawArray", "Manager")

_CONTEXT = DragonContext()
_originals: dict = {}
stdlib_wait = None            # multiprocessing.connection.wait as the stdlib has it


def select_here() -> None:
    """In a process of the runtime: its start method is "dragon", as its caller's."""
    mpctx._default_context._actual_context = _CONTEXT


def _dragon_selected() -> bool:
    return mpctx._default_context.get_start_method(allow_none=True) == START_METHOD


def _routed(name: str):
    original = _originals[name]

    @functools.wraps(original)
    def call(*args, **kwargs):
        if _dragon_selected():
            return getattr(_CONTEXT, name)(*args, **kwargs)
        return original(*args, **kwargs)
    return call


def _wait(object_list, timeout=None):
    """``multiprocessing.connection.wait``, which also takes dragon-nb pipe ends."""
    from dragon_nb.mp import connection
    return connection.wait(object_list, timeout)


def install() -> None:
    """Register the start method and route the module-level names (idempotent)."""
    import multiprocessing.connection as mpconn
    global stdlib_wait
    mpctx._concrete_contexts[START_METHOD] = _CONTEXT
    for name in ROUTED:
        if name not in _originals:
            _originals[name] = getattr(mpctx._default_context, name)
        setattr(multiprocessing, name, _routed(name))
    if mpconn.wait is not _wait:
        stdlib_wait = mpconn.wait
        mpconn.wait = _wait
