"""Where the objects this process makes live: an object host on its node.

A queue, lock or shared value lives in an object host (``host.py``), a
service process on some node. A process makes its objects in the host of its
own node, starting one there the first time (the caller of the runtime, on no
node, uses the first node), and tells the processes it starts which hosts it
knows, so that they reuse them. Two processes of one node may each start one:
that costs a process, never correctness, as every handle names its host.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import NamedTuple

from dragon_nb.runtime.liveness import ProcessRef

HOST_ENTRY = "dragon_nb.mp.host:main"


class HostRef(NamedTuple):
    """An object host, as a handle names it."""
    address: str
    node: int
    pid: int
    pid_space: str
    start_time: float

    @property
    def process(self) -> ProcessRef:
        return ProcessRef(self.node, self.pid, self.pid_space, self.start_time)


_lock = threading.Lock()
_known: dict[int, HostRef] = {}       # node -> its host
_node: int | None = None              # the node this process runs on (None: the caller's)
_pid = os.getpid()


def adopt(hosts: dict, node: int | None) -> None:
    """In a started process: the hosts its parent knew, and the node it runs on."""
    global _node, _pid
    with _lock:
        _known.clear()
        _known.update({int(n): HostRef(*h) for n, h in hosts.items()})
        _node, _pid = node, os.getpid()


def known() -> dict:
    """node -> host, as built-in values (for a child's spec)."""
    _forget_after_fork()
    with _lock:
        return {n: tuple(h) for n, h in _known.items()}


def for_new() -> HostRef:
    """The host new objects go to: this node's, started on first use."""
    from dragon_nb.mp.hub import get_hub
    _forget_after_fork()
    with _lock:
        hub = get_hub()
        node = _node
        if node is None:
            live = [n["id"] for n in hub.runtime.nodes() if n.get("alive", True)]
            if not live:
                raise RuntimeError("the dragon-nb runtime has no live node for an object host")
            node = live[0]
        host = _known.get(node)
        if host is not None and host.process.alive() is not False:
            return host
        key = hub.spawn(HOST_ENTRY, pickle.dumps({"hub": hub.address}), node)
        bound = hub.wait_bound(key)
        host = HostRef(bound["address"], bound["node"], bound["pid"], bound["pid_space"],
                       bound["start_time"])
        _known[node] = host
        return host


def _forget_after_fork() -> None:
    global _pid, _node
    if os.getpid() != _pid:          # a plain fork of this process: its own hosts, later
        with _lock:
            _known.clear()
            _node, _pid = None, os.getpid()
