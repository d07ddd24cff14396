"""What the widgets show, as plain data: one row per node.

Kept apart from ipywidgets so the same rows feed the live widget and the
static HTML left in the saved notebook.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass

MiB = 2 ** 20
GiB = 2 ** 30


@dataclass
class NodeRow:
    node: int
    host: str
    workers: int = 0
    done: int = 0             # items done (of one call, or of everything on the node)
    running: int = 0
    queued: int = 0
    rate: float = 0.0         # items per second
    cpu_percent: float = 0.0  # 100 = one core
    num_cpus: int = 1
    rss: int = 0
    physical_mem: int = 0
    ddict_bytes: int = 0
    lost: str | None = None   # why the runtime lost the node (its agent died), if it did

    @property
    def mem_fraction(self) -> float:
        return self.rss / self.physical_mem if self.physical_mem else 0.0

    @property
    def cpu_fraction(self) -> float:
        return min(1.0, self.cpu_percent / (100.0 * max(1, self.num_cpus)))


def node_rows(telemetry: dict[int, dict], owner: str | None = None,
              call_by_node: dict | None = None, nodes=None,
              lost: dict | None = None) -> list[NodeRow]:
    """Rows from the newest telemetry records; ``owner`` narrows tasks to one pool,
    ``call_by_node`` (items done per node for one call) replaces the done counts;
    ``lost`` ({node: why}) marks the nodes the runtime lost, which run nothing."""
    lost = lost or {}
    ids = sorted(set(telemetry) | set(nodes or ()) | set(call_by_node or ()))
    rows = []
    for node in ids:
        rec = telemetry.get(node, {})
        owners = rec.get("owners", {})
        mine = [owners[owner]] if owner is not None and owner in owners else \
            ([] if owner is not None else list(owners.values()))
        row = NodeRow(node=node, host=rec.get("hostname", "?"),
                      workers=sum(o.get("procs", 0) for o in mine),
                      done=sum(o.get("done", 0) for o in mine),
                      running=sum(o.get("running", 0) for o in mine),
                      queued=sum(o.get("qdepth", 0) for o in mine),
                      cpu_percent=rec.get("cpu_percent", 0.0),
                      num_cpus=rec.get("num_cpus", 1) or 1,
                      rss=rec.get("rss", 0), physical_mem=rec.get("physical_mem", 0),
                      ddict_bytes=sum(o.get("bytes", 0) for o in owners.values()))
        if call_by_node is not None:
            row.done = call_by_node.get(node, 0)
        if node in lost:            # its last figures are history: nothing runs there
            row.lost = lost[node]
            row.workers = row.running = row.queued = row.rss = row.ddict_bytes = 0
            row.cpu_percent = 0.0
        rows.append(row)
    return rows


class RateMeter:
    """Items per second per node, from successive done counts."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self.history: dict[int, list] = {}

    def update(self, rows: list[NodeRow], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for row in rows:
            hist = self.history.setdefault(row.node, [])
            hist.append((now, row.done))
            while len(hist) > 2 and now - hist[0][0] > self.window:
                hist.pop(0)
            (t0, d0), (t1, d1) = hist[0], hist[-1]
            row.rate = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


def fmt_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB"


def rows_html(title: str, rows: list[NodeRow], footer: str = "") -> str:
    """A static table of the rows: what stays in the saved notebook."""
    head = ("<tr><th>node</th><th>host</th><th>workers</th><th>done</th><th>running</th>"
            "<th>queued</th><th>CPU</th><th>memory</th><th>DDict</th></tr>")
    body = "".join(
        f"<tr><td>{r.node}{' (lost)' if r.lost else ''}</td><td>{html.escape(r.host)}</td>"
        f"<td>{r.workers}</td>"
        f"<td>{r.done}</td><td>{r.running}</td><td>{r.queued}</td>"
        f"<td>{r.cpu_percent:.0f}%</td><td>{fmt_bytes(r.rss)} / {fmt_bytes(r.physical_mem)}</td>"
        f"<td>{fmt_bytes(r.ddict_bytes)}</td></tr>" for r in rows)
    return (f"<div class='dragon-nb'><b>{html.escape(title)}</b>"
            f"<table>{head}{body}</table><div>{html.escape(footer)}</div></div>")
