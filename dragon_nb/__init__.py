"""dragon-nb: Dragon's parallel Python model (Pool, DDict, System/Node,
pipelines) on a node runtime that starts behind a notebook kernel or script.

The features load on first use (``dragon_nb.Pool`` imports the pool, the
terminal progress bar is added by the pool's first call), so the runtime's own
processes, which import this package too, start quickly. The errors are those
of ``dragon_nb.errors``, all under ``DragonNbError``.
"""
import importlib

from dragon_nb.runtime import Runtime, get_runtime, start, stop
from dragon_nb.runtime.client import register_entry_module

__version__ = "0.1.0"

# what agents import before they fork, so a new worker costs a fork only
for _module in ("dragon_nb.pool.worker", "dragon_nb.ddict.manager",
                "dragon_nb.pipeline.stage_worker", "dragon_nb.mp.entry", "dragon_nb.mp.host"):
    register_entry_module(_module)

_LAZY = {
    "Pool": "dragon_nb.pool",
    "System": "dragon_nb.machine", "Node": "dragon_nb.machine",
    "Pipeline": "dragon_nb.pipeline", "stage": "dragon_nb.pipeline",
    "on_node": "dragon_nb.pipeline",
    "DDict": "dragon_nb.ddict",
    # every error dragon-nb raises on purpose (one hierarchy, in a module of its own)
    **dict.fromkeys([
        "DragonNbError", "RuntimeStoppedError", "RuntimeRequestError", "RuntimeTimeoutError",
        "RuntimeRunningError",
        "WorkerLostError", "CallCancelledError", "PoolBrokenError", "TaskExitError",
        "PipelineError", "SharedObjectError", "ObjectHostLostError",
        "DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError",
    ], "dragon_nb.errors"),
}
__all__ = ["Runtime", "start", "stop", "get_runtime", "cpu_count", "current_process",
           *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dragon_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def cpu_count() -> int:
    """Cores on all nodes of the current runtime (started on first use)."""
    return get_runtime().cpu_count()


def current_process():
    """``multiprocessing.current_process()``; in a Pool worker, a stable object
    (attributes such as ``stash`` persist between tasks)."""
    import multiprocessing
    return multiprocessing.current_process()

from dragon_nb import mp_compat as _mp_compat

_mp_compat.install()
# The terminal progress bar is not registered here: the pool adds it as its default
# progress observer when its observers are first used (dragon_nb.pool.progress).


def load_ipython_extension(ipython):
    """``%load_ext dragon_nb``: the same as ``%load_ext kernel_ext``."""
    from kernel_ext import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython):
    from kernel_ext import unload_ipython_extension as unload
    unload(ipython)
