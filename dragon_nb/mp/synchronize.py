"""Locks, semaphores, conditions, events and barriers of the "dragon" context.

Each is an object in an object host; acquiring, waiting and notifying are
calls the host answers when they can complete, so a process on any node
blocks on the same lock. Who holds a lock is (process, thread), as with the
stdlib. A process that dies holding a lock leaves it held, as the stdlib's
does; ``owner()`` says who holds it. An acquire interrupted by Ctrl-C after
the host granted it gives the lock back.

A ``Condition`` lives with its lock; a ``Barrier``'s action runs in the
process whose ``wait`` completed the barrier, as ``threading.Barrier``'s does.
"""
from __future__ import annotations

import threading
import time

from dragon_nb.mp.link import Shared, wait_timeout
from dragon_nb.mp.objects import ACTION, BROKEN, OK

import cloudpickle


class _Acquirable(Shared):
    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        status, _ = self._call("acquire", timeout=wait_timeout(block, timeout),
                               undo=lambda _: self._send("release"))
        return status == OK

    def release(self) -> None:
        self._value("release")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class Lock(_Acquirable):
    """``multiprocessing.Lock``."""

    _kind = "lock"
    _recursive = False

    def __init__(self, *, ctx=None):
        self._create({"recursive": self._recursive})

    def owner(self):
        """(client, thread) holding it, or None."""
        return self._value("owner")

    def _is_mine(self) -> bool:
        return self._value("is_mine")

    def _count(self) -> int:
        return self._value("count")

    def __repr__(self):
        return f"<{type(self).__name__}({'locked' if self._count() else 'unlocked'}) " \
               f"on node {self._host.node}>"


class RLock(Lock):
    """``multiprocessing.RLock``."""

    _recursive = True
    _error = RuntimeError         # releasing an RLock one does not hold, as threading's


class Semaphore(_Acquirable):
    """``multiprocessing.Semaphore``."""

    _kind = "semaphore"
    _bounded = False

    def __init__(self, value: int = 1, *, ctx=None):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"semaphore value must be an int, not {value!r}")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self._create({"value": value, "bounded": self._bounded})

    def get_value(self) -> int:
        return self._value("get_value")

    def __repr__(self):
        return f"<{type(self).__name__}(value={self.get_value()}) on node {self._host.node}>"


class BoundedSemaphore(Semaphore):
    """``multiprocessing.BoundedSemaphore``."""

    _bounded = True


class Condition(Shared):
    """``multiprocessing.Condition``, on ``lock`` (a new RLock by default)."""

    _kind = "condition"
    _error = RuntimeError         # waiting or notifying without the lock, as threading's

    def __init__(self, lock=None, *, ctx=None):
        if lock is None:
            lock = RLock()
        if not isinstance(lock, Lock):
            raise TypeError(f"a Condition of the 'dragon' context needs a Lock or RLock of "
                            f"that context, not {lock!r}")
        self._lock = lock
        self._create({"lock": lock._oid}, host=lock._host)

    def _getstate(self):
        return self._lock

    def _setstate(self, state):
        self._lock = state

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self._lock.acquire(block, timeout)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        relocked = []                # the host gave the lock back before the interrupt
        try:
            status, value = self._call("wait", timeout=wait_timeout(True, timeout),
                                       undo=relocked.append)
        except KeyboardInterrupt:
            if not relocked:         # as the stdlib's wait, which re-acquires in a finally
                self._lock.acquire()
            raise
        return bool(value) if status == OK else False

    def wait_for(self, predicate, timeout: float | None = None):
        result = predicate()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not result:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.wait(left)
            result = predicate()
        return result

    def _n_waiting(self) -> int:
        """Waits not notified yet (what the stdlib counts with two semaphores)."""
        return self._value("n_waiting")

    def notify(self, n: int = 1) -> None:
        self._value("notify", n)

    def notify_all(self) -> None:
        self._value("notify_all")

    def __repr__(self):
        return f"<Condition({self._lock!r})>"


class Event(Shared):
    """``multiprocessing.Event``."""

    _kind = "event"

    def __init__(self, *, ctx=None):
        self._create({})

    def is_set(self) -> bool:
        return self._value("is_set")

    def set(self) -> None:
        self._value("set")

    def clear(self) -> None:
        self._value("clear")

    def wait(self, timeout: float | None = None) -> bool:
        status, value = self._call("wait", timeout=wait_timeout(True, timeout))
        return bool(value) if status == OK else False

    def __repr__(self):
        return f"<{type(self).__qualname__} at {id(self):#x} " \
               f"{'set' if self.is_set() else 'unset'}>"


class Barrier(Shared):
    """``multiprocessing.Barrier``: ``parties`` processes meet; ``action`` (any
    picklable callable) runs once per generation before they go on."""

    _kind = "barrier"

    def __init__(self, parties: int, action=None, timeout: float | None = None, *, ctx=None):
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError(f"parties must be an int >= 1, not {parties!r}")
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable, not {action!r}")
        self._action = action
        if action is not None:
            cloudpickle.dumps(action)          # raises here, not in whoever runs it
        self._create({"parties": parties, "action": action is not None, "timeout": timeout})

    def _getstate(self):
        return self._action

    def _setstate(self, state):
        self._action = state

    def wait(self, timeout: float | None = None) -> int:
        status, index = self._call("wait", timeout=wait_timeout(True, timeout))
        if status == ACTION:
            try:
                self._action()
            except BaseException:
                self._call("action_done", False)
                raise
            self._call("action_done", True)
            return index
        if status == BROKEN or status != OK:
            raise threading.BrokenBarrierError
        return index

    def reset(self) -> None:
        self._value("reset")

    def abort(self) -> None:
        self._value("abort")

    @property
    def parties(self) -> int:
        return self._value("parties")

    @property
    def n_waiting(self) -> int:
        return self._value("n_waiting")

    @property
    def broken(self) -> bool:
        return self._value("broken")
