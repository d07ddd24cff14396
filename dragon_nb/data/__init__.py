"""Aliases that mirror Dragon's ``dragon.data`` package."""
from dragon_nb.data.ddict import DDict

__all__ = ["DDict"]
