"""Calls whose arguments come off the wire: checked against the signature.

An object host's methods say what they take with their signature and
annotations (``def put(self, call, item: bytes)``); ``checked_call`` holds
the arguments of a request to them and answers a wrong count, name or type
with an error naming the parameter, never an exception from inside the
method. Signatures are read once per function (about 12 µs per call here).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple


def _checker(test: Callable, what: str, convert: Callable | None = None) -> Callable:
    def check(v):
        if not test(v):
            raise TypeError(f"must be {what}, not {type(v).__name__}")
        return v if convert is None else convert(v)
    return check


_bytes = _checker(lambda v: isinstance(v, (bytes, bytearray, memoryview)), "bytes", bytes)
_int = _checker(lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")
_number = _checker(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                   "a number of seconds or None")


def seconds(v) -> float | None:
    """A timeout: None (no limit) or seconds; a negative one counts as 0."""
    if v is None or _number(v) == math.inf:
        return None
    if math.isnan(v):
        raise ValueError("must be a number of seconds, not NaN")
    return max(0.0, float(v))


# what an annotation of a method (or of a kind's ``setup``) lets through
CHECKS = {"bytes": _bytes, "int": _int, "float | None": seconds,
          "bool": _checker(lambda v: isinstance(v, bool), "True or False"),
          "bytes | None": lambda v: None if v is None else _bytes(v)}


class _Param(NamedTuple):
    name: str
    check: Callable | None           # from CHECKS, by annotation
    default: object                  # inspect.Parameter.empty: required


_plans: dict = {}                     # (code, len(lead)) -> its other parameters


def checked_call(fn: Callable, what: str, error: type, lead: tuple = (), args: tuple = (),
                 kwargs: dict | None = None):
    """``fn(*lead, *args, **kwargs)`` once ``args`` and ``kwargs`` fit its
    signature and annotations (``CHECKS``); else ``error`` naming the problem."""
    key = getattr(fn, "__func__", fn).__code__, len(lead)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = tuple(_Param(p.name, CHECKS.get(p.annotation), p.default) for p
                                   in inspect.signature(fn).parameters.values())[len(lead):]
    if len(args) > len(plan) or kwargs and not set(kwargs) <= {p.name for p in plan}:
        names = ", ".join(p.name for p in plan)
        if len(args) > len(plan):
            raise error(f"{what}: takes at most {len(plan)} arguments ({names}), "
                        f"got {len(args)}")
        unknown = sorted(set(kwargs) - {p.name for p in plan})
        raise error(f"{what}: unknown parameters {unknown} (it takes {names})")
    kwargs = kwargs or {}
    values = list(lead)
    for i, p in enumerate(plan):
        if i < len(args) or p.name in kwargs:
            try:
                value = args[i] if i < len(args) else kwargs[p.name]
                values.append(value if p.check is None else p.check(value))
            except (TypeError, ValueError) as e:
                raise error(f"{what}: {p.name} {e}") from None
        elif p.default is inspect.Parameter.empty:
            raise error(f"{what}: the argument {p.name!r} is missing")
        else:
            values.append(p.default)
    return fn(*values)


