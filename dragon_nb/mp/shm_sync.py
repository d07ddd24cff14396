"""Locks, semaphores, conditions, events and barriers in shared memory.

Used instead of ``synchronize.py``'s when the runtime is on one host (see
``shm.py``). A ``Lock`` is one POSIX named semaphore driven by the stdlib's
own ``SemLock``: ``acquire`` and ``release`` are the C methods, bound to the
handle as the stdlib binds them, so an uncontended acquire+release costs the
same (~0.1 µs here, against ~1 ms through an object host), and waiting,
timeouts and Ctrl-C behave as the stdlib's (an interrupted acquire takes
nothing). ``Condition``, ``Event`` and ``Barrier`` are the stdlib's classes
built on these, with their pickling opened up: any of them goes through a
queue, into a Process or Pool, or into a DDict value, as the hosted ones do.

A process that dies holding a lock leaves it held, as with the stdlib.
"""
from __future__ import annotations

import multiprocessing.synchronize as _std
import struct

from dragon_nb.mp import shm
from dragon_nb.mp.link import Shared


class _SemLock(Shared):
    """A handle on one named semaphore, registered with this node's host."""

    _kind = "shm"
    _sem_kind = shm.SEMAPHORE

    def _make(self, value: int, maxvalue: int) -> None:
        self._name, self._maxvalue = shm.new_name(), maxvalue
        self._create({"paths": [shm.sem_path(self._name)]})    # registered first
        self._semlock = shm.sem_create(self._name, self._sem_kind, value, maxvalue)
        self._bind()

    def _bind(self) -> None:
        self.acquire = self._semlock.acquire
        self.release = self._semlock.release

    def _getstate(self):
        return (self._name, self._maxvalue)

    def _setstate(self, state) -> None:
        self._name, self._maxvalue = state
        self._semlock = shm.sem_open(self._name, self._sem_kind, self._maxvalue,
                                     type(self).__name__)
        self._bind()

    def __enter__(self):
        return self._semlock.__enter__()

    def __exit__(self, *exc):
        return self._semlock.__exit__(*exc)


class Lock(_SemLock):
    """``multiprocessing.Lock``: released by any process or thread, as the stdlib's."""

    def __init__(self, *, ctx=None):
        self._make(1, 1)

    def __repr__(self):
        state = "locked" if self._semlock._is_zero() else "unlocked"
        return f"<{type(self).__name__}({state}) in shared memory>"


class RLock(_SemLock):
    """``multiprocessing.RLock``: its owner (process, thread) may take it again."""

    _sem_kind = shm.RECURSIVE_MUTEX

    def __init__(self, *, ctx=None):
        self._make(1, 1)

    def __repr__(self):
        if self._semlock._is_mine():
            state = f"owned by this thread, {self._semlock._count()} times"
        else:
            state = "locked" if self._semlock._is_zero() else "unlocked"
        return f"<{type(self).__name__}({state}) in shared memory>"


class Semaphore(_SemLock):
    """``multiprocessing.Semaphore``."""

    _bounded = False

    def __init__(self, value: int = 1, *, ctx=None):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"semaphore value must be an int, not {value!r}")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._make(value, value if self._bounded else shm.SEM_VALUE_MAX)

    def get_value(self) -> int:
        return self._semlock._get_value()

    def __repr__(self):
        return f"<{type(self).__name__}(value={self.get_value()}) in shared memory>"


class BoundedSemaphore(Semaphore):
    """``multiprocessing.BoundedSemaphore``: a release past the initial value raises."""

    _bounded = True


class _Context:
    """What the stdlib's Condition, Event and Barrier ask their ``ctx`` for."""
    Lock, RLock, Semaphore = Lock, RLock, Semaphore

    def Condition(self, lock=None):
        return Condition(lock)


_CTX = _Context()


class Condition(_std.Condition):
    """``multiprocessing.Condition`` (the stdlib's, on shared-memory semaphores)."""

    def __init__(self, lock=None, *, ctx=None):
        if lock is not None and not isinstance(lock, _SemLock):
            raise TypeError(f"a Condition in shared memory needs a Lock or RLock of the "
                            f"'dragon' context, not {lock!r}")
        super().__init__(lock, ctx=_CTX)

    def __getstate__(self):
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore)

    def _n_waiting(self) -> int:
        """Waits not woken yet (and a wake-up not taken counts as one)."""
        return (self._sleeping_count.get_value() - self._woken_count.get_value()
                + self._wait_semaphore.get_value())


class Event(_std.Event):
    """``multiprocessing.Event`` (the stdlib's, on shared-memory semaphores)."""

    def __init__(self, *, ctx=None):
        super().__init__(ctx=_CTX)


class Barrier(_std.Barrier):
    """``multiprocessing.Barrier`` (the stdlib's, on shared memory): ``action``
    runs in the process whose ``wait`` completed the barrier."""

    def __init__(self, parties: int, action=None, timeout: float | None = None, *, ctx=None):
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError(f"parties must be an int >= 1, not {parties!r}")
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable, not {action!r}")
        words = shm.Segment(struct.calcsize("i") * 2, "Barrier")
        self.__setstate__((parties, action, timeout, Condition(), words))
        self._state = 0
        self._count = 0


__all__ = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier"]
