"""Per-process counters shared between a node agent and the processes it forks.

The agent maps one anonymous shared page before forking; each child owns a
slot and bumps its figures with a single ``pack_into`` (well under a
microsecond), and the agent reads every slot when it publishes telemetry. So
progress reaches the widgets without a message per task and without anyone
polling the workers.
"""
from __future__ import annotations

import mmap
import struct

FIELDS = ("done", "running", "items", "busy_us", "bytes", "keys", "qdepth", "spare")
DONE, RUNNING, ITEMS, BUSY_US, BYTES, KEYS, QDEPTH, SPARE = range(len(FIELDS))
CUMULATIVE = (DONE, ITEMS, BUSY_US)   # totals; the others are levels (now)
_SLOT = struct.Struct("<8q")
MAX_SLOTS = 1024


class CounterBlock:
    """The agent's shared table: MAX_SLOTS rows of FIELDS."""

    def __init__(self, slots: int = MAX_SLOTS):
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * _SLOT.size)   # MAP_SHARED, inherited by fork
        self._free = list(range(slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"more than {self.slots} processes on one node")
        slot = self._free.pop()
        _SLOT.pack_into(self.mem, slot * _SLOT.size, *([0] * len(FIELDS)))
        return slot

    def release(self, slot: int) -> tuple:
        values = self.read(slot)
        self._free.append(slot)
        return values

    def read(self, slot: int) -> tuple:
        return _SLOT.unpack_from(self.mem, slot * _SLOT.size)

    def view(self, slot: int) -> "Counters":
        return Counters(self.mem, slot)


class Counters:
    """One process's row; used in the child."""

    __slots__ = ("_mem", "_off", "_vals")

    def __init__(self, mem, slot: int):
        self._mem = mem
        self._off = slot * _SLOT.size
        self._vals = [0] * len(FIELDS)

    def set(self, field: int, value: int) -> None:
        self._vals[field] = int(value)

    def add(self, field: int, value: int = 1) -> None:
        self._vals[field] += int(value)

    def publish(self) -> None:
        _SLOT.pack_into(self._mem, self._off, *self._vals)
