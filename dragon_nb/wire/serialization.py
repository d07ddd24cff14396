"""How user objects cross process boundaries.

* Work sent to workers (functions, arguments, initializers) goes with
  cloudpickle, so functions, lambdas and classes defined in ``__main__`` or a
  notebook cell work.
* Results come back with plain pickle semantics, as in ``multiprocessing``
  (an unpicklable result is a ``MaybeEncodingError``), with one exception:
  classes that arrived by value from the caller (notebook classes) travel back
  by value, so a worker can return instances of them.
* Both use protocol 5: large out-of-band buffers (NumPy arrays and anything
  else that pickles through ``PickleBuffer``) become separate zero-copy
  frames. Plain ``bytes``/``bytearray`` are saved by the pickler's fast path,
  which no override can intercept: they are copied once into the pickle.
"""
from __future__ import annotations

import io
import linecache
import os
import pickle
import types

import cloudpickle

PROTOCOL = 5
OOB_THRESHOLD = 1 << 16   # buffers at least this large travel as their own frame

try:  # cloudpickle >= 3 keeps its by-value class registry here
    from cloudpickle.cloudpickle import _DYNAMIC_CLASS_TRACKER_BY_CLASS as _DYNAMIC_CLASSES
except ImportError:  # pragma: no cover - older cloudpickle
    _DYNAMIC_CLASSES = {}


def _oob(buffers):
    def callback(buf: pickle.PickleBuffer):
        if buf.raw().nbytes >= OOB_THRESHOLD:
            buffers.append(buf)
            return False      # out of band
        return True           # small: keep inline
    return callback


class _WorkPickler(cloudpickle.Pickler):
    """cloudpickle, except bound methods go as ``getattr(owner, name)`` like
    plain pickle does, so a classmethod of an importable class is sent by
    reference (cloudpickle would copy its code)."""

    def reducer_override(self, obj):
        if isinstance(obj, types.MethodType) and not isinstance(obj.__self__, types.ModuleType):
            return getattr, (obj.__self__, obj.__func__.__name__)
        return super().reducer_override(obj)


def _dump_work(obj, buffer_callback=None) -> bytes:
    f = io.BytesIO()
    _WorkPickler(f, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


def dumps_work(obj) -> tuple[bytes, list]:
    """cloudpickle ``obj``; returns (pickle bytes, out-of-band buffers)."""
    buffers: list = []
    data = _dump_work(obj, _oob(buffers))
    return data, buffers


class WorkEncoder:
    """``dumps_work`` for many objects in a row, reusing one pickler (a third
    of the cost for small objects). One per thread."""

    def __init__(self):
        self._file = io.BytesIO()
        self._buffers: list = []
        self._pickler = _WorkPickler(self._file, protocol=PROTOCOL,
                                     buffer_callback=_oob(self._buffers))

    def dumps(self, obj) -> tuple[bytes, list]:
        f = self._file
        f.seek(0)
        f.truncate()
        self._buffers.clear()
        self._pickler.clear_memo()
        try:
            self._pickler.dump(obj)
        except Exception:
            self.__init__()          # a failed dump can leave the pickler half-way
            raise
        return f.getvalue(), list(self._buffers)


def dumps_function(func) -> bytes:
    """A function plus where it came from, so remote tracebacks show its source.

    cloudpickle renames the file of code it copies to "<dynamic-code>"; we send
    the real name along, and the source lines when they exist only in this
    process (a notebook cell), so the worker's traceback can show them.
    """
    return dumps_with_source(func, func)


def loads_function(blob):
    return loads_with_source(blob, lambda func: func)[0]


def dumps_with_source(obj, func) -> bytes:
    """``obj`` by value, with where ``func`` (a part of it) came from."""
    code = getattr(func, "__code__", None)
    filename = lines = None
    if isinstance(code, types.CodeType):
        filename = code.co_filename
        if not os.path.exists(filename):
            lines = linecache.getlines(filename) or None
    return _dump_work((obj, filename, lines))


def loads_with_source(blob, find):
    """-> (obj, func): ``obj`` of ``dumps_with_source``, and its ``find(obj)``
    with the name of its source file back (and its lines, for a cell's)."""
    obj, filename, lines = pickle.loads(blob)
    func = find(obj)
    code = getattr(func, "__code__", None)
    if filename and isinstance(code, types.CodeType) and code.co_filename == "<dynamic-code>":
        if lines:
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
        try:
            func.__code__ = _renamed(code, filename)
        except (TypeError, ValueError):
            pass
    return obj, func


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_renamed(c, filename) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def dumps_inline(obj) -> bytes:
    """cloudpickle ``obj`` into one bytes object (specs, initializers)."""
    return _dump_work(obj)


class _ResultPickler(pickle.Pickler):
    """Plain pickle, except classes that cloudpickle rebuilt from the caller:
    those go whole, by value (methods included), and the caller maps them
    back to its own class through cloudpickle's class tracker."""

    def reducer_override(self, obj):
        if isinstance(obj, type) and obj in _DYNAMIC_CLASSES:
            return pickle.loads, (cloudpickle.dumps(obj, protocol=PROTOCOL),)
        return NotImplemented


def dumps_result(obj) -> tuple[bytes, list]:
    buffers: list = []
    f = io.BytesIO()
    _ResultPickler(f, protocol=PROTOCOL, buffer_callback=_oob(buffers)).dump(obj)
    return f.getvalue(), buffers


def loads(data, buffers=()):
    return pickle.loads(data, buffers=buffers)


def describe_unpicklable(func) -> str | None:
    """Name the global or closure variable that makes ``func`` unpicklable.

    Returns a sentence for an error message, or None if no single culprit is
    found. Runs only after pickling already failed, so cost does not matter.
    """
    if not isinstance(func, types.FunctionType):
        return None
    code = func.__code__
    suspects = []
    names = set(code.co_names)
    for const in code.co_consts:  # names used by nested functions/comprehensions
        if isinstance(const, types.CodeType):
            names.update(const.co_names)
    for name in sorted(names):
        if name in func.__globals__:
            suspects.append(("global", name, func.__globals__[name]))
    if func.__closure__:
        for name, cell in zip(code.co_freevars, func.__closure__):
            try:
                suspects.append(("closure variable", name, cell.cell_contents))
            except ValueError:
                pass
    for what, name, value in suspects:
        if isinstance(value, types.ModuleType):
            continue
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL)
        except Exception as e:
            return (f"{func.__qualname__!r} uses the {what} {name!r} "
                    f"({type(value).__name__}), which cannot be pickled: {e}. "
                    f"Create it inside the function (or in a Pool initializer) "
                    f"instead of capturing it.")
    return None
