"""One DDict manager, as a handle knows it: a named record.

A handle's state carries its managers as plain lists of built-in values (the
state is pickled into Pool workers and pipeline stages, and is JSON in
``serialize()``): ``ManagerRecord.to_state`` and ``ManagerRecord.from_state``
turn a record into that form and back, so nothing but the record's fields is
tied to their order. In a process, code reads the fields by name.
"""
from __future__ import annotations

from typing import NamedTuple

from dragon_nb.ddict.errors import DDictError
from dragon_nb.runtime.liveness import ProcessRef


class ManagerRecord(NamedTuple):
    """Where one manager runs and how to reach it. ``address``: its zmq ROUTER;
    ``lane_path``: its same-host lane ("" on TCP); ``pid`` and ``start_time`` mean
    something only in ``pid_space`` (``network.pid_space``)."""
    mid: int
    node: int
    hostname: str
    address: str
    lane_path: str
    pid: int
    start_time: float
    pid_space: str

    @property
    def proc(self) -> ProcessRef:
        """Its process, for the liveness layer (alive, signal, wait)."""
        return ProcessRef(self.node, self.pid, self.pid_space, self.start_time)

    def to_state(self) -> list:
        """The built-in form a handle's state carries."""
        return list(self)

    @classmethod
    def from_state(cls, fields) -> "ManagerRecord":
        """A record from ``to_state``'s form (from a pickle, or from JSON)."""
        if isinstance(fields, cls):
            return fields
        try:
            mid, node, hostname, address, lane_path, pid, start_time, pid_space = fields
            return cls(int(mid), int(node), str(hostname), str(address), str(lane_path),
                       int(pid), float(start_time), str(pid_space))
        except (TypeError, ValueError) as e:
            raise DDictError(f"not a serialized DDict: a manager is {fields!r} ({e})") from None


def records(state_managers) -> list[ManagerRecord]:
    return [ManagerRecord.from_state(m) for m in state_managers]


def to_state(managers) -> list[list]:
    return [ManagerRecord.from_state(m).to_state() for m in managers]
