"""``Value``, ``Array``, ``RawValue`` and ``RawArray`` in shared memory.

Used instead of ``sharedctypes.py``'s when the runtime is on one host (see
``shm.py``). As with the stdlib, a raw value or array *is* a ctypes object,
here laid over a segment every process of the runtime maps: ``v.value`` and
``a[i]`` are memory reads and writes, not calls to a host (~0.1 µs instead of
~1 ms). ``Value`` and ``Array`` wrap it with the stdlib's synchronized
wrappers and an RLock (``get_lock()``) that ``+=`` does not take by itself.
Both pickle to the segment's name: through queues, into Processes and Pools.
"""
from __future__ import annotations

import copyreg
import ctypes
import multiprocessing.sharedctypes as _sc

from dragon_nb.mp import shm
from dragon_nb.mp.shm_sync import RLock


def _ctype(typecode_or_type):
    ctype = _sc.typecode_to_type.get(typecode_or_type, typecode_or_type)
    if not isinstance(ctype, type) or not hasattr(ctype, "from_buffer"):
        raise TypeError(f"not a ctypes type or typecode: {typecode_or_type!r}")
    return ctype


def _over(segment: shm.Segment, type_, length=None):
    if length is not None:
        type_ = type_ * length
    obj = type_.from_buffer(segment.memory)
    obj._dnb_segment = segment          # the segment lives as long as the object
    copyreg.pickle(type_, _reduce_ctype)
    return obj


def _reduce_ctype(obj):
    segment = getattr(obj, "_dnb_segment", None)
    if segment is None:                 # a ctypes object of that type, not shared
        return obj.__reduce__()
    if isinstance(obj, ctypes.Array):   # its type is made anew: pickled by what makes it
        return _over, (segment, obj._type_, obj._length_)
    return _over, (segment, type(obj))


def _new(type_):
    return _over(shm.Segment(ctypes.sizeof(type_), f"a shared {type_.__name__}"), type_)


def RawValue(typecode_or_type, *args):
    """A ctypes object in shared memory."""
    obj = _new(_ctype(typecode_or_type))
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array in shared memory."""
    ctype = _ctype(typecode_or_type)
    if isinstance(size_or_initializer, int):
        return _new(ctype * size_or_initializer)
    init = list(size_or_initializer)
    obj = _new(ctype * len(init))
    obj.__init__(*init)
    return obj


class _Reducible:
    def __reduce__(self):
        return synchronized, (self._obj, self._lock)


_wrappers: dict = {}


def synchronized(obj, lock):
    """The stdlib's synchronized wrapper of ``obj``, picklable anywhere."""
    if isinstance(obj, ctypes._SimpleCData):
        std = _sc.Synchronized
    elif isinstance(obj, ctypes.Array):
        std = _sc.SynchronizedString if obj._type_ is ctypes.c_char else _sc.SynchronizedArray
    else:                               # a Structure: the stdlib makes a class of properties
        std = type(_sc.synchronized(obj, lock))
    cls = _wrappers.get(std)
    if cls is None:
        cls = _wrappers[std] = type(std.__name__, (_Reducible, std), {"__module__": __name__})
    return cls(obj, lock)


def _lock_for(lock):
    if lock in (True, None):
        return RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """``multiprocessing.Value``: with ``lock`` False, a RawValue."""
    obj = RawValue(typecode_or_type, *args)
    return obj if lock is False else synchronized(obj, _lock_for(lock))


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """``multiprocessing.Array``: with ``lock`` False, a RawArray."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    return obj if lock is False else synchronized(obj, _lock_for(lock))
