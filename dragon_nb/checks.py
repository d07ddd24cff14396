"""Argument checks shared by the public constructors (Pool, stage, Pipeline, ...),
so that the same mistake gets the same message wherever it is made."""
from __future__ import annotations

import numbers
import operator


def is_int(value) -> bool:
    """An int (or a numpy integer), not a bool."""
    return hasattr(type(value), "__index__") and not isinstance(value, bool)


def node_ids(nodes):
    """``nodes=``: None, or node ids (ints) -> a list; anything else a TypeError."""
    if nodes is None:
        return None
    if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
        raise TypeError(f"nodes must be a list of node ids (ints), not {nodes!r}")
    nodes = list(nodes)
    bad = [n for n in nodes if not is_int(n)]
    if bad:
        raise TypeError(f"nodes must be a list of node ids (ints); {bad[0]!r} is not one")
    nodes = [operator.index(n) for n in nodes]
    if not nodes:
        raise ValueError("nodes must name at least one node id")
    return nodes


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be a positive integer, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return operator.index(value)


def non_negative_int(name: str, value) -> int:
    """``value`` as an int >= 0, or a TypeError/ValueError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= 0, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, not {value!r}")
    return operator.index(value)


def optional(check, name: str, value):
    """``check(name, value)`` unless ``value`` is None."""
    return None if value is None else check(name, value)


def callable_or_none(name: str, value):
    """``value`` (a callable or None), or a TypeError naming ``name``."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable, not {value!r}")
    return value


def arguments(name: str, value, of: str) -> tuple:
    """``value`` (the positional arguments for ``of``) as a tuple, or a TypeError."""
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of arguments for {of}, not {value!r}") from None


def instance_or_none(name: str, value, cls: type, what: str):
    """``value`` (a ``cls`` or None), or a TypeError saying it must be ``what``."""
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be {what} or None, not {value!r}")
    return value


def positive_seconds(name: str, value, none_ok: bool = False):
    """``value`` as a positive number of seconds (None too, with ``none_ok``), or a
    TypeError (not a number) / ValueError (not positive) naming ``name``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds{' or None' if none_ok else ''}, "
                        f"not {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return value


def count(name: str, value, low: int = 1) -> int:
    """``value`` as an int >= ``low``; anything else a ValueError naming ``name``.
    For the runtime's sizes (nodes, workers and cores per node), whose mistakes have
    always been ValueErrors (docs/reliability.md's catalogue), type or value alike."""
    if not is_int(value) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return operator.index(value)


def port(name: str, value) -> int:
    """A TCP port to bind, or 0 for any free one; else a ValueError naming ``name``."""
    if not is_int(value) or not 0 <= value < 65536:
        raise ValueError(f"{name} must be 0 (any free port) or a TCP port, not {value!r}")
    return operator.index(value)
