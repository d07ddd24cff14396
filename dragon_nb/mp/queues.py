"""``Queue``, ``JoinableQueue`` and ``SimpleQueue`` of the "dragon" context.

The items live in an object host, pickled by the putter (cloudpickle: a
lambda or a class from a notebook cell goes too): an object that cannot be
pickled raises in ``put``, in the caller, where the stdlib's feeder thread
would lose it silently. A bounded queue that is full blocks the putter, on
whatever node it runs; ``qsize()`` is exact, there being one copy of the
queue. There is no feeder thread, so ``join_thread`` and
``cancel_join_thread`` have nothing to wait for.
"""
from __future__ import annotations

import queue as _queue

import cloudpickle

from dragon_nb.mp.link import Shared, wait_timeout
from dragon_nb.mp.objects import OK


def _dumps(obj) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


def _loads(data: bytes):
    return cloudpickle.loads(data)


class Queue(Shared):
    """``multiprocessing.Queue`` whose processes may be on any node."""

    _kind = "queue"
    _joinable = False

    def __init__(self, maxsize: int = 0, *, ctx=None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, not {maxsize!r}")
        self._maxsize = maxsize
        self._closed = False
        self._create({"maxsize": maxsize, "joinable": self._joinable})

    def _getstate(self):
        return self._maxsize

    def _setstate(self, state):
        self._maxsize, self._closed = state, False

    def _check_closed(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        self._check_closed()
        data = _dumps(obj)
        status, _ = self._call("put", data, timeout=wait_timeout(block, timeout))
        if status != OK:
            raise _queue.Full

    def get(self, block: bool = True, timeout: float | None = None):
        self._check_closed()
        status, data = self._call("get", timeout=wait_timeout(block, timeout),
                                  undo=lambda item: self._send("unget", item))
        if status != OK:
            raise _queue.Empty
        return _loads(data)

    def put_nowait(self, obj) -> None:
        return self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        return self._value("qsize")

    def empty(self) -> bool:
        return self._value("empty")

    def full(self) -> bool:
        return self._value("full")

    def close(self) -> None:
        """This handle puts and gets no more (the queue lives on for the others)."""
        self._closed = True

    def join_thread(self) -> None:
        if not self._closed:
            raise ValueError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: puts are done when ``put`` returns."""

    def __repr__(self):
        return f"<{type(self).__name__} maxsize={self._maxsize} on node {self._host.node}>"


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: ``task_done`` and ``join`` across nodes."""

    _joinable = True

    def task_done(self) -> None:
        self._value("task_done")

    def join(self) -> None:
        self._call("join")


class SimpleQueue(Shared):
    """``multiprocessing.SimpleQueue``: unbounded, ``put``/``get``/``empty``/``close``."""

    _kind = "queue"

    def __init__(self, *, ctx=None):
        self._closed = False
        self._create({"maxsize": 0, "joinable": False})

    def _setstate(self, state):
        self._closed = False

    def put(self, obj) -> None:
        self._check()
        self._call("put", _dumps(obj))

    def get(self):
        self._check()
        return _loads(self._call("get", undo=lambda item: self._send("unget", item))[1])

    def empty(self) -> bool:
        return self._value("empty")

    def close(self) -> None:
        self._closed = True

    def _check(self):
        if self._closed:
            raise OSError("handle is closed")

    def __repr__(self):
        return f"<SimpleQueue on node {self._host.node}>"
