"""``Pipe`` of the "dragon" context: two ends that may be on any nodes.

Each direction is a queue in an object host; an end holds the queue it reads
and the one it writes. ``send_bytes``/``recv_bytes`` carry bytes as they are,
``send``/``recv`` pickle (cloudpickle). ``close()`` ends this handle only, as
closing one process's copy of a pipe's descriptor does.
"""
from __future__ import annotations

import multiprocessing
import time

import cloudpickle

from dragon_nb.mp.link import Shared
from dragon_nb.mp.objects import OK


class _Direction(Shared):
    """One way of a pipe: a queue of messages."""

    _kind = "queue"

    def __init__(self, host=None):
        self._create({"maxsize": 0, "joinable": False}, host=host)


class Connection:
    """``multiprocessing.connection.Connection`` over the runtime."""

    def __init__(self, inbox: _Direction | None, outbox: _Direction | None):
        self._in, self._out = inbox, outbox
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def readable(self) -> bool:
        return self._in is not None

    @property
    def writable(self) -> bool:
        return self._out is not None

    def _check(self, need_in=False, need_out=False):
        if self._closed:
            raise OSError("handle is closed")
        if need_in and self._in is None:
            raise OSError("connection is write-only")
        if need_out and self._out is None:
            raise OSError("connection is read-only")

    # -- sending --------------------------------------------------------------------------
    def send_bytes(self, buf, offset: int = 0, size: int | None = None) -> None:
        self._check(need_out=True)
        view = memoryview(buf)
        itemsize = view.itemsize
        n = view.nbytes // itemsize
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        data = view.cast("B")[offset * itemsize:(offset + size) * itemsize].tobytes()
        self._out._call("put", data)

    def send(self, obj) -> None:
        self._check(need_out=True)
        self._out._call("put", cloudpickle.dumps(obj, protocol=5))

    # -- receiving ----------------------------------------------------------------------------
    def _take(self) -> bytes:
        self._check(need_in=True)
        return self._in._call("get", undo=lambda item: self._in._send("unget", item))[1]

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        data = self._take()
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def recv_bytes_into(self, buf, offset: int = 0) -> int:
        view = memoryview(buf)
        itemsize = view.itemsize
        if offset < 0 or offset > view.nbytes // itemsize:
            raise ValueError("negative offset" if offset < 0 else "offset too large")
        data = self._take()
        start = offset * itemsize
        if len(data) > view.nbytes - start:
            raise multiprocessing.BufferTooShort(data)
        view.cast("B")[start:start + len(data)] = data
        return len(data)

    def recv(self):
        return cloudpickle.loads(self._take())

    def poll(self, timeout: float | None = 0.0) -> bool:
        self._check(need_in=True)
        wait = None if timeout is None else max(0.0, timeout)
        status, _ = self._in._call("poll", timeout=wait)
        return status == OK

    def close(self) -> None:
        self._closed = True
        self._in = self._out = None

    def fileno(self):
        raise OSError("a dragon-nb pipe end has no file descriptor: use poll(timeout), or "
                      "multiprocessing.connection.wait, which takes these ends")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        if self._closed:
            raise OSError("handle is closed")
        return (Connection, (self._in, self._out))

    def __repr__(self):
        state = "closed" if self._closed else ("duplex" if self._in and self._out else
                                               "read-only" if self._in else "write-only")
        return f"<dragon-nb Connection, {state}>"


def Pipe(duplex: bool = True):
    """-> (conn1, conn2); with ``duplex`` False conn1 only receives, conn2 only sends."""
    ab = _Direction()
    if not duplex:
        return Connection(ab, None), Connection(None, ab)
    ba = _Direction(host=ab._host)
    return Connection(ab, ba), Connection(ba, ab)


def wait(object_list, timeout: float | None = None):
    """``multiprocessing.connection.wait`` over dragon-nb pipe ends and anything
    the stdlib's takes (sentinels, sockets, stdlib connections): -> those ready."""
    ours = [o for o in object_list if isinstance(o, Connection)]
    others = [o for o in object_list if not isinstance(o, Connection)]
    if not ours:
        return _stdlib_wait(others, timeout)
    if len(ours) == 1 and not others:
        return ours if ours[0]._closed or ours[0].poll(timeout) else []
    deadline = None if timeout is None else time.monotonic() + timeout
    step = 0.001
    while True:
        ready = [c for c in ours if c._closed or c.poll(0)]
        if others:
            ready += _stdlib_wait(others, 0 if ready else min(step, _left(deadline)))
        elif not ready:
            time.sleep(min(step, _left(deadline)))
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return ready
        step = min(step * 2, 0.05)


def _left(deadline):
    return 0.05 if deadline is None else max(0.0, deadline - time.monotonic())


def _stdlib_wait(object_list, timeout):
    from dragon_nb import mp_compat
    return mp_compat.stdlib_wait(object_list, timeout)
