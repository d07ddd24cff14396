"""Following the runtime's telemetry from the client.

``TelemetryMonitor`` keeps the newest record of every node, fed from the
head's event stream by a background thread; widgets and text progress read
it, so nobody ever polls a worker. ``TextProgress`` is the terminal view: one
tqdm bar per node for the work of one pool.
"""
from __future__ import annotations

import threading
import time

from dragon_nb.runtime import get_runtime
from dragon_nb.runtime.client import Runtime, drain_events, zmq_context
from dragon_nb.wire import protocol as P


class TelemetryMonitor:
    """Latest telemetry per node, updated in the background; ``lost`` maps each
    node the runtime lost (its agent died) to why."""

    def __init__(self, runtime=None, on_update=None):
        if runtime is not None and not isinstance(runtime, Runtime):
            raise TypeError(f"runtime must be a dragon_nb.Runtime or None, not {runtime!r}")
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update must be a function or None, not {on_update!r}")
        self.runtime = runtime or get_runtime()
        self.latest: dict[int, dict] = {}
        self.lost: dict[int, str] = {}
        self.on_update = on_update
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dragon-nb telemetry",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        sock = self.runtime.subscribe(P.TOPIC_TELEMETRY, P.TOPIC_NODES, context=zmq_context())
        try:
            self._lost_before()
            while not self._stop.is_set():
                if not sock.poll(200):
                    if not self.runtime.alive:
                        return
                    continue
                for body in drain_events(sock):
                    node = body.get("node")
                    with self._lock:
                        if "event" not in body:            # a node's figures
                            self.latest[node] = body
                        elif body["event"] == "lost":
                            self.lost[node] = body.get("why") or "lost"
                        elif body["event"] == "joined":
                            self.lost.pop(node, None)
                if self.on_update is not None:
                    self.on_update(self.snapshot())
        finally:
            sock.close(linger=0)

    def _lost_before(self):
        """Nodes lost before this monitor subscribed (the events are gone)."""
        try:
            nodes = self.runtime.nodes(refresh=True)
        except Exception:           # a stopped runtime: nothing to show anyway
            return
        with self._lock:
            for n in nodes:
                if n.get("alive") is False and n["id"] not in self.lost:
                    self.lost[n["id"]] = "lost"

    def snapshot(self) -> dict[int, dict]:
        with self._lock:
            return dict(self.latest)

    def lost_nodes(self) -> dict[int, str]:
        """{node id: why} for the nodes the runtime lost."""
        with self._lock:
            return dict(self.lost)

    def wait_for_nodes(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.latest) >= n:
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._stop.set()
        self._thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def owner_progress(snapshot: dict[int, dict], owner: str) -> dict[int, dict]:
    """Per node: {"done", "running", "procs"} of one pool (or other owner)."""
    out = {}
    for node, rec in sorted(snapshot.items()):
        o = rec.get("owners", {}).get(owner)
        out[node] = {"done": o["done"] if o else 0, "running": o["running"] if o else 0,
                     "procs": o["procs"] if o else 0,
                     "cpu_percent": rec.get("cpu_percent", 0.0), "rss": rec.get("rss", 0),
                     "physical_mem": rec.get("physical_mem", 0)}
    return out


class TextProgress:
    """tqdm bars, one per node, for a pool's tasks; use as a context manager."""

    def __init__(self, pool, total: int | None = None, interval: float = 0.25, file=None):
        from tqdm import tqdm
        self._tqdm = tqdm
        self.pool = pool
        self.total = total
        self.interval = interval
        self.file = file
        self.bars: dict[int, object] = {}
        self._stop = threading.Event()
        self.monitor = TelemetryMonitor(pool._runtime)
        self._thread = threading.Thread(target=self._run, name="dragon-nb progress", daemon=True)

    def _refresh(self):
        prog = owner_progress(self.monitor.snapshot(), self.pool.owner)
        for pos, (node, p) in enumerate(sorted(prog.items())):
            bar = self.bars.get(node)
            if bar is None:
                bar = self._tqdm(total=self.total, position=pos, file=self.file,
                                 desc=f"node {node}", unit="task", leave=True,
                                 dynamic_ncols=True,   # counts arrive in telemetry steps
                                 bar_format="{desc}: {n_fmt} tasks [{elapsed}]{postfix}")
                self.bars[node] = bar
            if p["done"] > bar.n:
                bar.update(p["done"] - bar.n)
            bar.set_postfix_str(f"cpu {p['cpu_percent']:5.0f}%  rss {p['rss'] / 2**20:6.0f} MiB",
                                refresh=False)
            bar.refresh()

    def _run(self):
        while not self._stop.wait(self.interval):
            self._refresh()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)
        time.sleep(self.interval * 2)     # let the last telemetry arrive
        self._refresh()
        for bar in self.bars.values():
            bar.close()
        self.monitor.close()
