"""``System`` and ``Node``: the machine as the runtime sees it (Dragon's API).

Static facts come from the head's node table; the live figures (load,
memory in use, processes) from the newest telemetry the agents published.
"""
from __future__ import annotations

import operator
import time

from dragon_nb.errors import RuntimeTimeoutError
from dragon_nb.runtime import get_runtime
from dragon_nb.runtime.client import Runtime, drain_events
from dragon_nb.wire import protocol as P


def _node_table(runtime=None) -> list[dict]:
    return (runtime or get_runtime()).nodes(refresh=True)


def _check_runtime(runtime):
    if runtime is not None and not isinstance(runtime, Runtime):
        raise TypeError(f"runtime must be a dragon_nb.Runtime or None, not {runtime!r}")
    return runtime or get_runtime()


class System:
    """All the nodes of the current runtime (started on first use)."""

    def __init__(self, runtime=None):
        self._runtime = _check_runtime(runtime)
        self._nodes = [n for n in _node_table(self._runtime) if n.get("alive", True)]

    @property
    def nnodes(self) -> int:
        return len(self._nodes)

    @property
    def nodes(self) -> list[int]:
        """Node ids (``h_uid``), for ``Node(h_uid)``."""
        return [n["id"] for n in self._nodes]

    @property
    def primary_node(self) -> "Node":
        return Node(self._nodes[0]["id"], runtime=self._runtime)

    def cpu_count(self) -> int:
        return self._runtime.cpu_count()

    def __repr__(self):
        return f"<dragon_nb.System nnodes={self.nnodes}>"


class Node:
    """One node: its identity and resources, and a live view of its load."""

    def __init__(self, ident, runtime=None):
        if isinstance(ident, bool) or not (isinstance(ident, str) or
                                           hasattr(type(ident), "__index__")):
            raise TypeError(f"Node() takes a node id (h_uid, an int) or a node name "
                            f"(a str), not {ident!r}")
        if not isinstance(ident, str):
            ident = operator.index(ident)
        self._runtime = _check_runtime(runtime)
        table = _node_table(self._runtime)
        match = [n for n in table if ident in (n["id"], n["name"])]
        if not match:
            known = ", ".join(f"{n['id']} ({n['name']})" for n in table)
            raise ValueError(f"no node {ident!r} in this runtime; nodes are: {known}")
        self._info = match[0]

    h_uid = property(lambda self: self._info["id"])
    name = property(lambda self: self._info["name"])
    hostname = property(lambda self: self._info["hostname"])
    cpus = property(lambda self: list(self._info["cpus"]))
    num_cpus = property(lambda self: self._info["num_cpus"])
    physical_mem = property(lambda self: self._info["physical_mem"],
                            doc="Bytes of memory: a virtual node's share of its host.")
    is_virtual = property(lambda self: bool(self._info.get("virtual")))

    def telemetry(self, timeout: float = 2.0) -> dict:
        """The node's next telemetry record (processes, CPU %, RSS, tasks)."""
        sock = self._runtime.subscribe(P.TOPIC_TELEMETRY + str(self.h_uid).encode())
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if sock.poll(max(1, (deadline - time.monotonic()) * 1000)):
                    for body in drain_events(sock):
                        if body.get("node") == self.h_uid:
                            return body
            raise RuntimeTimeoutError(f"no telemetry from node {self.h_uid} within {timeout} s")
        finally:
            sock.close(linger=0)

    @property
    def load(self) -> float:
        """CPU use of the node's processes, in cores (1.0 = one core busy)."""
        return self.telemetry()["cpu_percent"] / 100.0

    @property
    def mem_used(self) -> int:
        """Resident memory of the node's processes, in bytes."""
        return self.telemetry()["rss"]

    def __repr__(self):
        return (f"<dragon_nb.Node h_uid={self.h_uid} name={self.name} host={self.hostname} "
                f"cpus={self.num_cpus} mem={self.physical_mem / 2**30:.1f} GiB>")


def node_table(runtime=None) -> str:
    """A printable table of the runtime's nodes."""
    rows = [("node", "name", "host", "cpus", "memory", "state")]
    for n in _node_table(runtime):
        rows.append((str(n["id"]), n["name"], n["hostname"],
                     ",".join(map(str, n["cpus"])), f"{n['physical_mem'] / 2**30:.1f} GiB",
                     "up" if n.get("alive") else "lost"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

