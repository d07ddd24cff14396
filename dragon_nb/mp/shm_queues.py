"""``Queue``, ``JoinableQueue`` and ``SimpleQueue`` in shared memory.

Used instead of ``queues.py``'s when the runtime is on one host (see
``shm.py``): the items are records of a ``Ring``, one segment and four named
semaphores under ``/dev/shm``, which every process of the host opens by name.
A ``put`` copies the pickled item into the segment and a ``get`` copies it out:
no object host and no socket on the way, no system call when nobody waits.
Measured with ``benchmarks/bench_mp.py`` (2 nodes of one host): 64 B one way
and 1 MiB messages are several times the stdlib ``fork`` Queue's rate, where
the hosted queue, a zmq round trip per operation, reached 0.06x and 0.6x.

The semantics are the hosted queue's, so code does not see which it got: items
are pickled in ``put``, in the caller, by cloudpickle (an unpicklable item
raises there, not in a feeder thread that would lose it); a full bounded queue
blocks the putter; ``qsize()`` is exact; there is no feeder thread, so
``join_thread`` and ``cancel_join_thread`` have nothing to wait for. A handle
pickles to the ring's name, so it goes through other queues, into a Process or
Pool, or into a DDict value. The ring is registered with this node's object
host before it is made, which unlinks it with the queue's last handle or when
the runtime stops; a Ctrl-C during ``put`` or ``get`` neither loses nor
duplicates an item (see ``shm_ring.py``).
"""
from __future__ import annotations

import weakref

import cloudpickle

from dragon_nb.errors import SharedObjectError
from dragon_nb.mp import shm
from dragon_nb.mp.link import Shared, wait_timeout
from dragon_nb.mp.shm_ring import Ring


def _dumps(obj) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


_loads = cloudpickle.loads


class _RingHandle(Shared):
    """A handle on one ring, registered with this node's host; ``_ring`` is its
    mapping in this process, closed when the handle goes."""

    _kind = "shm"

    def _make(self, maxsize: int) -> None:
        self._name = shm.new_name()
        self._create({"rings": [self._name]})                 # registered first
        self._open(Ring.create(self._name, maxsize=maxsize))

    def _open(self, ring: Ring) -> None:
        self._ring = ring
        weakref.finalize(self, ring.close)

    def _reopen(self, name: str) -> None:
        self._name = name
        try:
            ring = Ring.open(name)
        except FileNotFoundError:
            raise SharedObjectError(f"{type(self).__name__}: its ring {name!r} is gone (the "
                                    f"queue was removed with its last handle, or its runtime "
                                    f"stopped)") from None
        self._open(ring)


class Queue(_RingHandle):
    """``multiprocessing.Queue`` between the processes of one host."""

    def __init__(self, maxsize: int = 0, *, ctx=None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int, not {maxsize!r}")
        self._maxsize, self._closed = maxsize, False
        self._make(max(maxsize, 0))

    def _getstate(self):
        return (self._name, self._maxsize)

    def _setstate(self, state) -> None:
        name, self._maxsize = state
        self._closed = False
        self._reopen(name)

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        self._check_closed()
        self._ring.put(_dumps(obj), wait_timeout(block, timeout))

    def get(self, block: bool = True, timeout: float | None = None):
        self._check_closed()
        return self._ring.get(wait_timeout(block, timeout), _loads)

    def put_nowait(self, obj) -> None:
        return self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        return self._ring.qsize()

    def empty(self) -> bool:
        return self._ring.empty()

    def full(self) -> bool:
        return self._ring.full()

    def close(self) -> None:
        """This handle puts and gets no more (the queue lives on for the others)."""
        self._closed = True

    def join_thread(self) -> None:
        if not self._closed:
            raise ValueError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: puts are done when ``put`` returns."""

    def __repr__(self):
        return (f"<{type(self).__name__} maxsize={self._maxsize} in shared memory, "
                f"registered on node {self._host.node}>")


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: ``task_done`` and ``join`` from any process."""

    def task_done(self) -> None:
        self._ring.task_done()

    def join(self) -> None:
        self._ring.join(None)


class SimpleQueue(_RingHandle):
    """``multiprocessing.SimpleQueue``: unbounded, ``put``/``get``/``empty``/``close``."""

    def __init__(self, *, ctx=None):
        self._closed = False
        self._make(0)

    def _getstate(self):
        return self._name

    def _setstate(self, state) -> None:
        self._closed = False
        self._reopen(state)

    def _check(self) -> None:
        if self._closed:
            raise OSError("handle is closed")

    def put(self, obj) -> None:
        self._check()
        self._ring.put(_dumps(obj))

    def get(self):
        self._check()
        return self._ring.get(None, _loads)

    def empty(self) -> bool:
        return self._ring.empty()

    def close(self) -> None:
        self._closed = True

    def __repr__(self):
        return f"<SimpleQueue in shared memory, registered on node {self._host.node}>"
