"""What ``Pool`` calls return: ``AsyncResult``, ``MapResult`` and the ``imap`` iterators.

They follow ``multiprocessing.pool`` to the letter (``get/wait/ready/successful``,
callbacks run in the pool's I/O thread, fail-fast maps, ``imap`` errors at
the position of the failing chunk), with two additions: a KeyboardInterrupt
while waiting cancels the outstanding work of that call, and the lazy
iterators hold back their input (a bounded window) until results are consumed.
"""
from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
import traceback
from multiprocessing import TimeoutError

_job_ids = itertools.count()


def _run_callback(cb, value):
    try:
        cb(value)
    except Exception:
        print("Exception in a dragon_nb Pool callback:", file=sys.stderr)
        traceback.print_exc()


class ApplyResult:
    """The result of ``apply_async``."""

    def __init__(self, cancel, callback=None, error_callback=None):
        self._job = next(_job_ids)
        self._event = threading.Event()
        self._cancel_job = cancel
        self._callback = callback
        self._error_callback = error_callback
        self._success = None
        self._value = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout=None) -> None:
        try:
            self._event.wait(timeout)
        except KeyboardInterrupt:
            self._cancel_job(self._job)
            raise
        progress = getattr(self, "_progress", None)
        if progress is not None and self._event.is_set():
            progress.close_views()       # the caller has the result: views show it now

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    # -- called by the dispatcher -----------------------------------------------
    def _set(self, idx, ok, value) -> bool:
        """Record chunk ``idx``; True when the job needs nothing more."""
        self._success, self._value = ok, value
        if ok and self._callback:
            _run_callback(self._callback, value)
        if not ok and self._error_callback:
            _run_callback(self._error_callback, value)
        self._event.set()
        return True

    def _fail(self, exc) -> None:
        """The pool cannot finish this job (terminated, broken, worker lost)."""
        if not self.ready():
            self._set(0, False, exc)

    __class_getitem__ = classmethod(lambda cls, item: cls)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: one list, fail-fast."""

    def __init__(self, cancel, nchunks, length, chunksize, callback=None,
                 error_callback=None):
        super().__init__(cancel, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._number_left = nchunks
        if nchunks == 0:
            self._event.set()      # as the stdlib: an empty map is ready, no callback

    def _set(self, idx, ok, value) -> bool:
        self._number_left -= 1
        if self.ready():
            return self._number_left == 0
        if ok:
            cs = self._chunksize
            self._value[idx * cs:(idx + 1) * cs] = value
            if self._number_left == 0:
                if self._callback:
                    _run_callback(self._callback, self._value)
                self._event.set()
                return True
            return False
        self._success = False
        self._value = value
        if self._error_callback:
            _run_callback(self._error_callback, value)
        self._event.set()
        return True


class Window:
    """Bounds the chunks (and bytes) a lazy ``imap`` has taken but not yet delivered."""

    def __init__(self, max_chunks: int, max_bytes: int):
        self.max_chunks, self.max_bytes = max_chunks, max_bytes
        self.chunks = self.bytes = 0
        self.cond = threading.Condition()
        self.closed = False

    def acquire(self, nbytes: int) -> bool:
        with self.cond:
            while (not self.closed and self.chunks > 0 and
                   (self.chunks >= self.max_chunks or self.bytes >= self.max_bytes)):
                self.cond.wait(0.5)
            if self.closed:
                return False
            self.chunks += 1
            self.bytes += nbytes
            return True

    def release(self, nbytes: int, chunks: int = 1) -> None:
        with self.cond:
            self.chunks -= chunks
            self.bytes -= nbytes
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class IMapIterator:
    """Results of ``imap`` in input order; ``next(timeout)`` as in the stdlib."""

    _ordered = True

    def __init__(self, cancel, window: Window | None = None):
        self._job = next(_job_ids)
        self._cancel_job = cancel
        self._cond = threading.Condition(threading.Lock())
        self._chunks: collections.deque = collections.deque()   # (ok, value, nbytes)
        self._current: collections.deque = collections.deque()
        self._index = 0            # chunks delivered into _chunks
        self._length = None        # total chunks, once the input is exhausted
        self._unsorted: dict = {}
        self._sizes: dict = {}
        self._window = window
        self._done = False

    def __iter__(self):
        return self

    def next(self, timeout=None):
        if self._current:
            return self._current.popleft()
        try:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._chunks:
                    if self._length is not None and self._index >= self._length:
                        self._finish()
                        raise StopIteration from None
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError from None
                    self._cond.wait(left)
                ok, value, nbytes = self._chunks.popleft()
                taken = 1
                if ok:      # take every ready chunk up to the next error: one lock, not one each
                    self._current.extend(value)
                    chunks = self._chunks
                    while chunks and chunks[0][0]:
                        _, more, size = chunks.popleft()
                        self._current.extend(more)
                        nbytes += size
                        taken += 1
        except KeyboardInterrupt:
            self.close()
            raise
        if self._window is not None:
            self._window.release(nbytes, taken)
        if not ok:
            raise value
        if not self._current:                   # empty chunks: keep going
            return self.next(timeout)
        return self._current.popleft()

    __next__ = next

    def close(self) -> None:
        """Stop early: cancel what is outstanding and stop reading the input."""
        if not self._done:
            self._finish()
            self._cancel_job(self._job)
            with self._cond:             # nothing more will come: next() ends at once
                self._chunks.clear()
                self._unsorted.clear()
                self._length = self._index
                self._cond.notify_all()

    def _finish(self):
        self._done = True
        if self._window is not None:
            self._window.close()
        progress = getattr(self, "_progress", None)
        if progress is not None:        # the caller has seen the end: settle the views
            progress.close_views()

    def __del__(self):
        try:
            if not self._done:
                self.close()
        except Exception:
            pass

    # -- called by the dispatcher and feeder --------------------------------------
    def _note_size(self, idx, nbytes):
        self._sizes[idx] = nbytes

    def _set_many(self, results) -> bool:
        """Several (idx, ok, value) at once: one lock and one wake-up."""
        done = False
        with self._cond:
            for idx, ok, value in results:
                done = self._set_locked(idx, ok, value)
            self._cond.notify()
        return done

    def _set(self, idx, ok, value) -> bool:
        with self._cond:
            done = self._set_locked(idx, ok, value)
            self._cond.notify()
        return done

    def _set_locked(self, idx, ok, value) -> bool:
        nbytes = self._sizes.pop(idx, 0)
        if self._ordered:
            if idx == self._index:
                self._chunks.append((ok, value, nbytes))
                self._index += 1
                while self._index in self._unsorted:
                    self._chunks.append(self._unsorted.pop(self._index))
                    self._index += 1
            else:
                self._unsorted[idx] = (ok, value, nbytes)
        else:
            self._chunks.append((ok, value, nbytes))
            self._index += 1
        return self._length is not None and self._index >= self._length

    def _set_length(self, length) -> bool:
        with self._cond:
            self._length = length
            if self._index >= length:
                self._cond.notify()
                return True
            return False

    def _fail(self, exc) -> None:
        with self._cond:
            if self._length is None or self._index < self._length:
                self._chunks.append((False, exc, 0))
                self._index += 1
                self._length = self._index
                self._unsorted.clear()
                self._cond.notify()


class IMapUnorderedIterator(IMapIterator):
    """Results of ``imap_unordered``, as they arrive."""

    _ordered = False
