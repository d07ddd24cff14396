"""``Pool``: ``multiprocessing.Pool`` semantics, workers on the runtime's nodes.

Work is pickled in the calling thread (so a bad function or argument fails
right there, naming the culprit, before anything is sent) and handed to the
pool's I/O thread (see ``dispatcher``), which workers pull from directly.
"""
from __future__ import annotations

import itertools
import numbers
import pickle
import threading
import warnings
import weakref
from multiprocessing.pool import CLOSE, INIT, RUN, TERMINATE

from dragon_nb import checks
from dragon_nb.pool import progress as PG
from dragon_nb.pool import results as R
from dragon_nb.pool.dispatcher import Dispatcher
from dragon_nb.pool.state import Chunk, Job
from dragon_nb.pool.worker import APPLY, MAP, STARMAP, func_id
from dragon_nb.runtime.client import Runtime, get_runtime, on_stop, register_entry_module
from dragon_nb.runtime.launch import caller_environment
from dragon_nb.wire import serialization as S

register_entry_module("dragon_nb.pool.worker")

IMAP_WINDOW_CHUNKS = 1024
IMAP_WINDOW_BYTES = 64 << 20
_live = weakref.WeakSet()
_UNSET = object()


def _checked_chunksize(chunksize) -> int:
    """A chunk size as ``checks.positive_int`` sees it, with multiprocessing.Pool's
    error types and words where callers may look for them: a number that is not
    an int (1.5) or is below 1 is a ValueError, anything else a TypeError."""
    try:
        return checks.positive_int("chunksize", chunksize)
    except ValueError:
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}") from None
    except TypeError:
        if isinstance(chunksize, numbers.Real) and not isinstance(chunksize, bool):
            raise ValueError(f"Chunksize must be 1+ and an integer, not {chunksize!r}") from None
        raise


def _chunksize(chunksize, chunk_size, default):
    if chunk_size is not _UNSET and chunk_size is not None:
        if chunksize not in (_UNSET, None) and chunksize != chunk_size:
            raise TypeError("give chunksize= or its alias chunk_size=, not both")
        chunksize = chunk_size
    return default if chunksize is _UNSET else chunksize


def _pickle_failed(e: Exception, what: str, explained: bool = False):
    """Re-raise a pickling failure with a message that names what failed
    (``explained``: ``what`` is already the whole message)."""
    msg = what if explained else f"{what} cannot be pickled to send to the pool workers: {e}"
    if isinstance(e, (TypeError, pickle.PicklingError, AttributeError)):
        try:
            new = type(e)(msg)
        except Exception:
            new = None
        if new is not None:
            raise new from e
    if hasattr(e, "add_note"):
        e.add_note(msg)
    raise e


def _dumps_func(func) -> tuple[str, bytes]:
    if not callable(func):     # the stdlib's words (the message names the value, not "func")
        raise TypeError(f"{func!r} is not callable")
    try:
        blob = S.dumps_function(func)
    except Exception as e:
        why = S.describe_unpicklable(func)
        name = getattr(func, "__qualname__", repr(func))
        _pickle_failed(e, why or f"the function {name!r}", explained=why is not None)
    return func_id(blob), blob


def _dumps_chunk(items, func, offset=0, encoder=None):
    try:
        return encoder.dumps(items) if encoder is not None else S.dumps_work(items)
    except Exception as e:
        culprit = "an argument"
        if isinstance(items, list):
            for i, item in enumerate(items):
                try:
                    S.dumps_work(item)
                except Exception:
                    text = repr(item)
                    text = text if len(text) <= 60 else text[:57] + "..."
                    culprit = f"item {offset + i} of the input ({type(item).__name__}: {text})"
                    break
        name = getattr(func, "__qualname__", repr(func))
        _pickle_failed(e, f"{culprit} for {name}()")


class Pool:
    """A pool of worker processes spread over the runtime's nodes.

    Same constructor as ``multiprocessing.Pool``, plus ``nodes=`` (node ids to
    place workers on), ``task_retries=`` (how often a task lost with its worker
    runs again, default 1) and ``runtime=`` (defaults to the current one,
    started on first use).
    """

    def __init__(self, processes=None, initializer=None, initargs=(),
                 maxtasksperchild=None, context=None, *, nodes=None, task_retries=1,
                 runtime=None):
        self._state = INIT
        task_retries = checks.non_negative_int("task_retries", task_retries)
        try:
            processes = checks.optional(checks.positive_int, "processes", processes)
        except ValueError:                # multiprocessing.Pool's words: callers look for them
            raise ValueError("Number of processes must be at least 1") from None
        try:
            maxtasksperchild = checks.optional(checks.positive_int, "maxtasksperchild",
                                               maxtasksperchild)
        except (TypeError, ValueError):   # multiprocessing.Pool's error and words
            raise ValueError("maxtasksperchild must be a positive int or None") from None
        checks.callable_or_none("initializer", initializer)
        initargs = checks.arguments("initargs", initargs, "the initializer")
        nodes = checks.node_ids(nodes)
        checks.instance_or_none("runtime", runtime, Runtime, "a dragon_nb.Runtime")
        init_blob = None
        if initializer is not None:
            try:
                S.dumps_inline((initializer, initargs))
            except Exception as e:
                why = S.describe_unpicklable(initializer)
                _pickle_failed(e, why or "the initializer or its initargs",
                               explained=why is not None)
            init_blob = S.dumps_inline((initializer, initargs))
        self._runtime = runtime or get_runtime()
        if processes is None:
            processes = self._runtime.default_workers()
        self._processes = processes
        spec = {**caller_environment(), "initializer": init_blob}
        self._dispatcher = Dispatcher(self._runtime, processes, maxtasksperchild, spec,
                                      nodes=nodes, task_retries=task_retries)
        self._state = RUN
        _live.add(self._dispatcher)
        self._finalizer = weakref.finalize(self, self._dispatcher.terminate)

    # -- what the stdlib's test suite and tools look at ----------------------------
    @property
    def _pool(self):
        return list(self._dispatcher.handles)

    def _repopulate_pool(self):
        self._dispatcher.repopulate()

    @property
    def owner(self) -> str:
        """This pool's id in the runtime's telemetry."""
        return self._dispatcher.owner

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- apply -------------------------------------------------------------------------
    def apply(self, func, args=(), kwds={}):
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        self._check_running()
        fid, blob = _dumps_func(func)
        payload, bufs = _dumps_chunk((tuple(args), dict(kwds)), func)
        result = R.ApplyResult(self._dispatcher.cancel, callback, error_callback)
        job = Job(result._job, APPLY, fid, blob, result, f"apply({_name(func)})")
        self._dispatcher.submit(job, [Chunk(0, payload, bufs, 0)])
        return result

    # -- map ---------------------------------------------------------------------------
    def map(self, func, iterable, chunksize=_UNSET, *, chunk_size=_UNSET, progress=None):
        result = self._map_async(func, iterable, MAP,
                                 _chunksize(chunksize, chunk_size, None), progress=progress)
        try:
            return result.get()
        finally:
            result._progress.close_views()

    def starmap(self, func, iterable, chunksize=_UNSET, *, chunk_size=_UNSET, progress=None):
        result = self._map_async(func, iterable, STARMAP,
                                 _chunksize(chunksize, chunk_size, None), progress=progress)
        try:
            return result.get()
        finally:
            result._progress.close_views()

    def map_async(self, func, iterable, chunksize=_UNSET, callback=None,
                  error_callback=None, *, chunk_size=_UNSET, progress=None):
        return self._map_async(func, iterable, MAP, _chunksize(chunksize, chunk_size, None),
                               callback, error_callback, progress)

    def starmap_async(self, func, iterable, chunksize=_UNSET, callback=None,
                      error_callback=None, *, chunk_size=_UNSET, progress=None):
        return self._map_async(func, iterable, STARMAP,
                               _chunksize(chunksize, chunk_size, None),
                               callback, error_callback, progress)

    def _call_progress(self, name, total, show):
        prog = PG.CallProgress(name, total, self.owner, sorted({h.node for h in self._pool}))
        PG.notify_start(self, prog, show)
        return prog

    def _map_async(self, func, iterable, mode, chunksize=None, callback=None,
                   error_callback=None, progress=None):
        self._check_running()
        fid, blob = _dumps_func(func)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        else:
            chunksize = _checked_chunksize(chunksize)
        if len(iterable) == 0:
            chunksize = 0
        chunks = []
        it = iter(iterable)
        n = 0
        encoder = S.WorkEncoder()
        while chunksize:
            items = list(itertools.islice(it, chunksize))
            if not items:
                break
            payload, bufs = _dumps_chunk(items, func, n, encoder)
            chunks.append(Chunk(len(chunks), payload, bufs, n))
            n += len(items)
        result = R.MapResult(self._dispatcher.cancel, len(chunks), n, chunksize,
                             callback, error_callback)
        verb = "map" if mode == MAP else "starmap"
        name = f"{verb}({_name(func)})"
        job = Job(result._job, mode, fid, blob, result, name,
                  self._call_progress(name, n, progress))
        result._progress = job.progress
        if chunks:
            self._dispatcher.submit(job, chunks)
        else:
            job.progress.finish()
        return result

    # -- imap ----------------------------------------------------------------------------
    def imap(self, func, iterable, chunksize=_UNSET, *, chunk_size=_UNSET, progress=None):
        return self._imap(func, iterable, _chunksize(chunksize, chunk_size, 1),
                          R.IMapIterator, progress)

    def imap_unordered(self, func, iterable, chunksize=_UNSET, *, chunk_size=_UNSET,
                       progress=None):
        return self._imap(func, iterable, _chunksize(chunksize, chunk_size, 1),
                          R.IMapUnorderedIterator, progress)

    def _imap(self, func, iterable, chunksize, cls, progress=None):
        self._check_running()
        chunksize = _checked_chunksize(chunksize)
        fid, blob = _dumps_func(func)
        it = iter(iterable)
        window = R.Window(IMAP_WINDOW_CHUNKS, IMAP_WINDOW_BYTES)
        result = cls(self._dispatcher.cancel, window)
        verb = "imap" if cls is R.IMapIterator else "imap_unordered"
        name = f"{verb}({_name(func)})"
        total = len(iterable) if hasattr(iterable, "__len__") else None
        job = Job(result._job, MAP, fid, blob, result, name,
                  self._call_progress(name, total, progress), weak=True)
        result._progress = job.progress
        self._dispatcher.submit(job, None)
        threading.Thread(target=_feed, args=(self._dispatcher, job, it, chunksize, window, func),
                         name=f"dragon-nb feeder {job.name}", daemon=True).start()
        return result

    # -- lifecycle ------------------------------------------------------------------------
    def close(self):
        if self._state == RUN:
            self._state = CLOSE
            self._dispatcher.close()

    def terminate(self):
        self._state = TERMINATE
        self._dispatcher.terminate()

    def join(self):
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        while not self._dispatcher.finished.wait(0.2):
            pass
        self._dispatcher.thread.join()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        state = {INIT: "INIT", RUN: "RUN", CLOSE: "CLOSE", TERMINATE: "TERMINATE"}.get(
            getattr(self, "_state", INIT), "?")
        return (f"<dragon_nb.Pool state={state} pool_size={getattr(self, '_processes', '?')}>")

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _feed(dispatcher, job, it, chunksize, window, func):
    """Pull the input lazily, at most a window ahead of what the caller consumed."""
    idx = n_items = 0
    encoder = S.WorkEncoder()
    while True:
        try:
            items = list(itertools.islice(it, chunksize))
            if not items:
                if job.progress is not None and job.progress.total is None:
                    job.progress.total = n_items
                dispatcher.end(job.id, idx)
                return
            payload, bufs = _dumps_chunk(items, func, n_items, encoder)
        except BaseException as e:          # the input failed: an error at this position
            dispatcher.feed_error(job.id, idx, e)
            return
        nbytes = len(payload) + sum(memoryview(b).nbytes for b in bufs)
        if not window.acquire(nbytes):
            return                          # cancelled or failed
        job.result._note_size(idx, nbytes)
        dispatcher.feed(job.id, Chunk(idx, payload, bufs, n_items))
        idx += 1
        n_items += len(items)


def _terminate_all(runtime):
    for d in list(_live):
        if d.runtime is runtime and not d.finished.is_set():
            d.terminate()
    for d in list(_live):
        if d.runtime is runtime:
            d.finished.wait(5)


on_stop(_terminate_all)
