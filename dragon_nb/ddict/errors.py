"""The DDict's exceptions, named as in Dragon's ``dragon.data.ddict``; defined with
every other error of dragon-nb in ``dragon_nb/errors.py``.

``DDictKeyError`` is also a ``KeyError`` and ``DDictTimeoutError`` also a
``TimeoutError``, so code written for a plain dict (or for timeouts in
general) catches them unchanged.
"""
from dragon_nb.errors import DDictError, DDictFullError, DDictKeyError, DDictTimeoutError

__all__ = ["DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError"]
