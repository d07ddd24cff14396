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
from dragon_nb.runtime.client import drain_events, zmq_context
from dragon_nb.wire import protocol as P


class TelemetryMonitor:
    """Latest telemetry per node, updated in the background."""

    def __init__(self, runtime=None, on_update=None):
        self.runtime = runtime or get_runtime()
        self.latest: dict[int, dict] = {}
        self.on_update = on_update
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dragon-nb telemetry",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        sock = self.runtime.subscribe(P.TOPIC_TELEMETRY, context=zmq_context())
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    if not self.runtime.alive:
                        return
                    continue
                for body in drain_events(sock):
                    with self._lock:
                        self.latest[body["node"]] = body
                if self.on_update is not None:
                    self.on_update(self.snapshot())
        finally:
            sock.close(linger=0)

    def snapshot(self) -> dict[int, dict]:
        with self._lock:
            return dict(self.latest)

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
