"""``Value``, ``Array``, ``RawValue`` and ``RawArray`` of the "dragon" context.

The bytes of the ctypes object live in an object host (a ``buffer``); reading
``.value`` or an item fetches them, assigning writes them, so a process on
any node sees the same memory. Each access is one call to the host: read a
slice (``arr[:]``) rather than item after item. As with the stdlib,
``Value(..., lock=True)`` (the default) comes with an RLock (``get_lock()``)
that ``+=`` does not take by itself: take it around read-modify-write.
"""
from __future__ import annotations

import ctypes
from multiprocessing.sharedctypes import typecode_to_type

from dragon_nb.mp.link import Shared
from dragon_nb.mp.synchronize import Lock, RLock


def _ctype(typecode_or_type):
    ctype = typecode_to_type.get(typecode_or_type, typecode_or_type)
    if not isinstance(ctype, type) or not hasattr(ctype, "from_buffer_copy"):
        raise TypeError(f"not a ctypes type or typecode: {typecode_or_type!r}")
    return ctype


class _Buffer(Shared):
    _kind = "buffer"

    def _make(self, ctype, length, initial: bytes):
        self._ctype, self._length = ctype, length
        self._create({"size": len(initial), "initial": initial})

    def _getstate(self):
        return (self._ctype, self._length)

    def _setstate(self, state):
        self._ctype, self._length = state

    def _read(self, start: int, stop: int) -> bytes:
        return self._value("read", start, stop)

    def _write(self, start: int, data: bytes) -> None:
        self._value("write", start, data)


class RawValue(_Buffer):
    """A ctypes value shared across the runtime, without a lock."""

    def __init__(self, typecode_or_type, *args):
        ctype = _ctype(typecode_or_type)
        self._make(ctype, None, bytes(ctype(*args)))

    @property
    def value(self):
        return self._ctype.from_buffer_copy(self._read(0, ctypes.sizeof(self._ctype))).value

    @value.setter
    def value(self, new):
        self._write(0, bytes(self._ctype(new)))

    def __repr__(self):
        return f"{self._ctype.__name__}({self.value!r})"


class RawArray(_Buffer):
    """A ctypes array shared across the runtime, without a lock."""

    def __init__(self, typecode_or_type, size_or_initializer):
        ctype = _ctype(typecode_or_type)
        if isinstance(size_or_initializer, int):
            length, init = size_or_initializer, ()
        else:
            init = list(size_or_initializer)
            length = len(init)
        self._make(ctype, length, bytes((ctype * length)(*init)))

    def __len__(self):
        return self._length

    def _span(self, index):
        size = ctypes.sizeof(self._ctype)
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            return start, stop, step, size
        if not isinstance(index, int):
            raise TypeError(f"array indices must be integers, not {type(index).__name__}")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("invalid index")
        return index, index + 1, None, size

    def __getitem__(self, index):
        start, stop, step, size = self._span(index)
        if step is None:
            return self._ctype.from_buffer_copy(self._read(start * size, stop * size)).value
        lo, hi = (start, stop) if step > 0 else (stop + 1, start + 1)
        if hi <= lo:
            return b"" if self._ctype is ctypes.c_char else []
        items = (self._ctype * (hi - lo)).from_buffer_copy(self._read(lo * size, hi * size))
        return items[:][start - lo::step]     # lo..hi holds the span either way

    def __setitem__(self, index, value):
        start, stop, step, size = self._span(index)
        if step is None:
            self._write(start * size, bytes(self._ctype(value)))
            return
        values = list(value) if not isinstance(value, bytes) else list(value)
        positions = range(start, stop, step)
        if len(values) != len(positions):
            raise ValueError("Can only assign sequence of same size")
        if step == 1:
            self._write(start * size, bytes((self._ctype * len(values))(*values)))
            return
        current = (self._ctype * self._length).from_buffer_copy(self._read(0, self._length * size))
        for i, v in zip(positions, values):
            current[i] = v
        self._write(0, bytes(current))

    def __iter__(self):
        return iter(self[:])

    def __repr__(self):
        return f"<{type(self).__name__} of {self._length} {self._ctype.__name__}>"

    # char arrays, as the stdlib's
    @property
    def value(self):
        raw = self.raw
        return raw.split(b"\0", 1)[0] if self._ctype is ctypes.c_char else raw

    @value.setter
    def value(self, new: bytes):
        self.raw = bytes(new) + b"\0" * (len(new) < self._length)

    @property
    def raw(self) -> bytes:
        return self._read(0, self._length * ctypes.sizeof(self._ctype))

    @raw.setter
    def raw(self, new: bytes):
        if len(new) > self._length * ctypes.sizeof(self._ctype):
            raise ValueError("byte string too long")
        self._write(0, bytes(new))


class _Synchronized:
    """What ``lock=True`` adds: ``get_lock``, ``get_obj``, ``acquire``/``release``."""

    def _attach_lock(self, lock):
        if lock is True or lock is None:
            lock = RLock()
        elif not isinstance(lock, Lock):
            raise AttributeError(f"{lock!r} has no attribute 'acquire' of a 'dragon' lock")
        self._lock = lock

    def get_lock(self):
        return self._lock

    def get_obj(self):
        return self._raw_view()

    def acquire(self, *args):
        return self._lock.acquire(*args)

    def release(self):
        return self._lock.release()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


class SynchronizedValue(_Synchronized, RawValue):
    def __init__(self, typecode_or_type, *args, lock=True):
        RawValue.__init__(self, typecode_or_type, *args)
        self._attach_lock(lock)

    def _getstate(self):
        return (self._ctype, self._length, self._lock)

    def _setstate(self, state):
        self._ctype, self._length, self._lock = state

    def _raw_view(self):
        view = RawValue.__new__(RawValue)
        view._host, view._oid, view._ctype, view._length = self._host, self._oid, \
            self._ctype, None
        return view

    def __repr__(self):
        return f"<Synchronized wrapper for {RawValue.__repr__(self)}>"


class SynchronizedArray(_Synchronized, RawArray):
    def __init__(self, typecode_or_type, size_or_initializer, lock=True):
        RawArray.__init__(self, typecode_or_type, size_or_initializer)
        self._attach_lock(lock)

    _getstate = SynchronizedValue._getstate
    _setstate = SynchronizedValue._setstate

    def _raw_view(self):
        view = RawArray.__new__(RawArray)
        view._host, view._oid, view._ctype, view._length = self._host, self._oid, \
            self._ctype, self._length
        return view

    def __repr__(self):
        return f"<SynchronizedArray wrapper for {RawArray.__repr__(self)}>"


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """``multiprocessing.Value``: with ``lock`` False, a RawValue."""
    if lock is False:
        return RawValue(typecode_or_type, *args)
    return SynchronizedValue(typecode_or_type, *args, lock=lock)


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """``multiprocessing.Array``: with ``lock`` False, a RawArray."""
    if lock is False:
        return RawArray(typecode_or_type, size_or_initializer)
    return SynchronizedArray(typecode_or_type, size_or_initializer, lock=lock)
