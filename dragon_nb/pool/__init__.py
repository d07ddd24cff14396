"""Pool: ``multiprocessing.Pool`` on the dragon-nb runtime."""
from dragon_nb.errors import CallCancelledError, PoolBrokenError, TaskExitError, WorkerLostError
from dragon_nb.pool.pool import Pool
from dragon_nb.pool.results import ApplyResult, AsyncResult, IMapIterator, MapResult

__all__ = ["Pool", "ApplyResult", "AsyncResult", "MapResult", "IMapIterator",
           "PoolBrokenError", "WorkerLostError", "TaskExitError", "CallCancelledError"]
