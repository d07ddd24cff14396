"""dragon-nb: Dragon's parallel Python model (Pool, DDict, System/Node,
pipelines) on a node runtime that starts behind a notebook kernel or script.

The features load on first use (``dragon_nb.Pool`` imports the pool), so the
runtime's own processes, which import this package too, start quickly.
"""
import importlib

from dragon_nb.runtime import Runtime, get_runtime, start, stop
from dragon_nb.runtime.client import register_entry_module

__version__ = "0.1.0"

# what agents import before they fork, so a new worker costs a fork only
for _module in ("dragon_nb.pool.worker", "dragon_nb.ddict.manager",
                "dragon_nb.pipeline.stage_worker"):
    register_entry_module(_module)

_LAZY = {
    "Pool": "dragon_nb.pool", "PoolBrokenError": "dragon_nb.pool",
    "WorkerLostError": "dragon_nb.pool", "TaskExitError": "dragon_nb.pool",
    "System": "dragon_nb.machine", "Node": "dragon_nb.machine",
    "Pipeline": "dragon_nb.pipeline", "PipelineError": "dragon_nb.pipeline",
    "stage": "dragon_nb.pipeline", "on_node": "dragon_nb.pipeline",
    "DDict": "dragon_nb.ddict", "DDictError": "dragon_nb.ddict",
    "DDictKeyError": "dragon_nb.ddict", "DDictFullError": "dragon_nb.ddict",
    "DDictTimeoutError": "dragon_nb.ddict",
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


def _text_progress_if_wanted():
    from dragon_nb.widgets import text
    if text.wanted():
        from dragon_nb.pool import progress
        progress.add_observer(text.show_call)


_text_progress_if_wanted()


def load_ipython_extension(ipython):
    """``%load_ext dragon_nb``: the same as ``%load_ext kernel_ext``."""
    from kernel_ext import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython):
    from kernel_ext import unload_ipython_extension as unload
    unload(ipython)
