"""``from dragon.data.ddict import DDict`` becomes
``from dragon_nb.data.ddict import DDict`` (errors included)."""
from dragon_nb.ddict import (DDict, DDictError, DDictFullError, DDictKeyError,
                             DDictManagerStats, DDictTimeoutError)

__all__ = ["DDict", "DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError",
           "DDictManagerStats"]
