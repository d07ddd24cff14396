"""Aliases that mirror Dragon's ``dragon.native`` package."""
