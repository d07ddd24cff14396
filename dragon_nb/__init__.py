"""dragon-nb: Dragon's parallel Python model (Pool, DDict, System/Node,
pipelines) on a node runtime that starts behind a notebook kernel or script."""
from dragon_nb.runtime import Runtime, get_runtime, start, stop
from dragon_nb.pool import Pool, PoolBrokenError, WorkerLostError
from dragon_nb.machine import Node, System
from dragon_nb.pipeline import Pipeline, PipelineError, on_node, stage
from dragon_nb.ddict import DDict, DDictError, DDictKeyError, DDictFullError, DDictTimeoutError

__version__ = "0.1.0"
__all__ = ["Runtime", "start", "stop", "get_runtime", "Pool", "PoolBrokenError",
           "WorkerLostError", "System", "Node", "cpu_count", "current_process",
           "DDict", "DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError",
           "Pipeline", "PipelineError", "stage", "on_node"]


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
