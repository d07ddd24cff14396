"""DDict: Dragon's distributed in-memory dictionary (client handle and managers).

``from dragon_nb.ddict import DDict`` (also ``dragon_nb.DDict`` and, as in
Dragon, ``from dragon_nb.data.ddict import DDict``). The managers run the
entry point of ``dragon_nb.ddict.manager``, registered here so that node
agents import it before they fork.
"""
from dragon_nb.ddict.client import DDict, DDictManagerStats, ManagerNode
from dragon_nb.ddict.errors import (DDictError, DDictFullError, DDictKeyError,
                                    DDictTimeoutError)
from dragon_nb.runtime.client import register_entry_module

register_entry_module("dragon_nb.ddict.manager")

__all__ = ["DDict", "DDictError", "DDictKeyError", "DDictFullError", "DDictTimeoutError",
           "DDictManagerStats", "ManagerNode"]
