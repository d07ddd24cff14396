"""Serialization, transport and the message protocol (the bottom layer)."""
