"""How DDict keys and values become bytes, and back.

* Keys are pickled deterministically, because their bytes *are* the key (the
  manager compares bytes and the client hashes them to pick a manager): plain
  pickle, protocol 5, with the memo off for containers, so ``("a", "a")`` gives
  the same bytes whether or not its two strings are one object. Equal keys of
  different types are different keys (``1``, ``1.0`` and ``True``), and a key
  whose pickle depends on the process (a frozenset of strings, an instance of
  a class defined in a notebook) cannot be found from other processes: use
  built-in values (str, bytes, int, float, tuples of them) as keys.
* Values: built-in scalars by plain pickle (fast); anything else by cloudpickle,
  so instances of classes defined in ``__main__`` or a notebook load in Pool
  workers, as the Pool's arguments do. Protocol 5: buffers of 64 KiB or more
  (NumPy arrays, bytearrays) travel as separate zero-copy frames, and a large
  ``bytes`` value is sent as itself (``DDV_RAW``), not copied into a pickle.
* Anything that cannot be pickled raises ``TypeError`` naming the key or value,
  before anything is sent.
"""
from __future__ import annotations

import io
import pickle
import reprlib

import cloudpickle

from dragon_nb.wire.protocol import DDV_RAW

PROTOCOL = 5
OOB_THRESHOLD = 1 << 16
_SCALARS = frozenset({str, bytes, int, float, bool, type(None), complex})


def dumps_key(key) -> bytes:
    if type(key) in _SCALARS:
        return pickle.dumps(key, PROTOCOL)
    try:
        return _dumps_unmemoized(pickle.Pickler, key)
    except Exception:
        pass
    try:     # e.g. a key holding a function: by value, still without the memo
        return _dumps_unmemoized(cloudpickle.Pickler, key)
    except Exception as e:
        raise TypeError(f"the DDict key {reprlib.repr(key)} ({type(key).__name__}) "
                        f"cannot be pickled: {e}") from e


def _dumps_unmemoized(pickler_class, obj) -> bytes:
    f = io.BytesIO()
    p = pickler_class(f, PROTOCOL)
    p.fast = True       # no memo: equal keys, equal bytes
    p.dump(obj)
    return f.getvalue()


def dumps_value(value) -> tuple[int, bytes, list]:
    """-> (value flags, inline bytes, out-of-band buffers)."""
    t = type(value)
    if t is bytes and len(value) >= OOB_THRESHOLD:
        return DDV_RAW, b"", [value]
    if t in _SCALARS:
        return 0, pickle.dumps(value, PROTOCOL), []
    bufs: list = []

    def oob(buf: pickle.PickleBuffer):
        raw = buf.raw()
        if raw.nbytes >= OOB_THRESHOLD:
            bufs.append(raw)
            return False
        return True
    try:
        return 0, cloudpickle.dumps(value, PROTOCOL, buffer_callback=oob), bufs
    except Exception as e:
        raise TypeError(f"the DDict value {reprlib.repr(value)} ({t.__name__}) "
                        f"cannot be pickled: {e}") from e


def loads_key(data):
    return pickle.loads(data)


def loads_value(vflags: int, inline, bufs=()):
    if vflags & DDV_RAW:
        return bytes(bufs[0]) if bufs else bytes(inline)
    return pickle.loads(inline, buffers=bufs)
