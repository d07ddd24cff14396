"""Pool: ``multiprocessing.Pool`` on the dragon-nb runtime."""
from dragon_nb.pool.dispatcher import CallCancelledError, PoolBrokenError, WorkerLostError
from dragon_nb.pool.pool import Pool
from dragon_nb.pool.results import ApplyResult, AsyncResult, IMapIterator, MapResult
from dragon_nb.pool.worker import TaskExitError

__all__ = ["Pool", "ApplyResult", "AsyncResult", "MapResult", "IMapIterator",
           "PoolBrokenError", "WorkerLostError", "TaskExitError", "CallCancelledError"]
