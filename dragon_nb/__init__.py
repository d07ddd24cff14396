"""dragon-nb: Dragon's parallel Python model (Pool, DDict, System/Node,
pipelines) on a node runtime that starts behind a notebook kernel or script."""
from dragon_nb.runtime import Runtime, get_runtime, start, stop
from dragon_nb.pool import Pool, PoolBrokenError, WorkerLostError

__version__ = "0.1.0"
__all__ = ["Runtime", "start", "stop", "get_runtime", "Pool", "PoolBrokenError",
           "WorkerLostError"]

from dragon_nb import mp_compat as _mp_compat

_mp_compat.install()
