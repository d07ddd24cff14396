"""The DDict's exceptions, named as in Dragon's ``dragon.data.ddict``.

``DDictKeyError`` is also a ``KeyError`` and ``DDictTimeoutError`` also a
``TimeoutError``, so code written for a plain dict (or for timeouts in
general) catches them unchanged.
"""
from __future__ import annotations

import reprlib


class DDictError(Exception):
    """Anything that went wrong in a DDict operation."""


class DDictKeyError(DDictError, KeyError):
    """The key is not in the DDict."""

    def __init__(self, key, where: str = ""):
        KeyError.__init__(self, key)
        self.key = key
        self.where = where

    def __str__(self):
        return f"{reprlib.repr(self.key)} is not in the DDict{self.where}"


class DDictFullError(DDictError):
    """The value does not fit in its manager's share of ``total_mem``; nothing
    was stored, and what the manager held before is intact."""


class DDictTimeoutError(DDictError, TimeoutError):
    """A manager did not answer within the DDict's timeout."""


__all__ = ["DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError"]
