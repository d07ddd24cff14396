"""Aliases that mirror Dragon's ``dragon.data`` package (DDict lands with its issue)."""
