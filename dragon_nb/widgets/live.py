"""Live ipywidgets: the per-node dashboard and the progress of one Pool call.

Both redraw from a background thread a few times a second while the cell
is still running (ipywidgets sends state changes from any thread), fed by the
runtime's telemetry and by the call's own progress record. When a call
ends, its widget is replaced by a static HTML table of the final state, so
the saved notebook keeps it.
"""
from __future__ import annotations

import html
import threading
import time

import ipywidgets as W
from IPython.display import HTML, display

from dragon_nb.telemetry import TelemetryMonitor
from dragon_nb.tunables import LIVE_FOR_S, REFRESH_S
from dragon_nb.widgets.view import RateMeter, fmt_bytes, node_rows, rows_html


def _close_all(widget) -> None:
    """Close a widget and everything in it (their models live in the kernel)."""
    for child in getattr(widget, "children", ()):
        _close_all(child)
    widget.close()


class _NodeLine:
    """One node's row of widgets."""

    def __init__(self, node: int):
        self.label = W.HTML(f"<b>node {node}</b>", layout=W.Layout(width="90px"))
        self.tasks = W.IntProgress(min=0, max=1, value=0, description="tasks",
                                   layout=W.Layout(width="260px"))
        self.cpu = W.FloatProgress(min=0, max=1, value=0, description="cpu",
                                   bar_style="info", layout=W.Layout(width="200px"))
        self.mem = W.FloatProgress(min=0, max=1, value=0, description="mem",
                                   bar_style="warning", layout=W.Layout(width="200px"))
        self.text = W.HTML("", layout=W.Layout(width="420px"))
        self.box = W.HBox([self.label, self.tasks, self.cpu, self.mem, self.text])

    def show(self, row, tasks_max: int):
        if row.lost:
            self.label.value = (f"<b>node {row.node}</b> <small>{row.host}</small> "
                                f"<b style='color:#c62828'>lost</b>")
            for bar in (self.cpu, self.mem):
                bar.value = 0
            self.tasks.bar_style = "danger"
            self.tasks.max = max(1, tasks_max)
            self.tasks.value = min(row.done, self.tasks.max)
            self.text.value = (f"lost ({html.escape(row.lost)}) · {row.done} done before; "
                               f"its work moved to the live nodes")
            return
        self.label.value = f"<b>node {row.node}</b> <small>{row.host}</small>"
        self.tasks.max = max(1, tasks_max)
        self.tasks.value = min(row.done, self.tasks.max)
        self.cpu.value = row.cpu_fraction
        self.mem.value = min(1.0, row.mem_fraction)
        self.text.value = (f"{row.done} done · {row.running} running · {row.queued} queued · "
                           f"{row.rate:.0f}/s · cpu {row.cpu_percent:.0f}% · "
                           f"{fmt_bytes(row.rss)} / {fmt_bytes(row.physical_mem)}"
                           + (f" · DDict {fmt_bytes(row.ddict_bytes)}" if row.ddict_bytes else ""))


class _LiveView:
    """Shared machinery: a monitor, node lines, a refresh thread."""

    def __init__(self, runtime, title: str):
        self.runtime = runtime
        self.monitor = TelemetryMonitor(runtime)
        self.title = W.HTML(f"<b>{title}</b>")
        self.lines: dict[int, _NodeLine] = {}
        self.rows_box = W.VBox([])
        self.widget = W.VBox([self.title, self.rows_box])
        self.rates = RateMeter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="dragon-nb widget")

    def _line(self, node):
        if node not in self.lines:
            self.lines[node] = _NodeLine(node)
            self.rows_box.children = [self.lines[n].box for n in sorted(self.lines)]
        return self.lines[node]

    live_for = None           # seconds a view refreshes at most (None: until done())

    def _loop(self):
        began = time.monotonic()
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except Exception:          # a view must never take the kernel down
                pass
            if self.done():
                break
            if self.live_for is not None and time.monotonic() - began > self.live_for:
                self.title.value += (f" <i>(no longer live after {self.live_for / 60:g} min: "
                                     f"show it again to follow on)</i>")
                break
        self.finish()

    def close(self, timeout: float = 2.0):
        """Stop refreshing and wait for the final state to be drawn."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def start(self):
        self.handle = display(self.widget, display_id=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def done(self) -> bool:
        return not self.runtime.alive

    def finish(self):
        self.monitor.close()


class CallWidget(_LiveView):
    """Progress of one map-family Pool call, per node."""

    def __init__(self, pool, progress):
        super().__init__(pool._runtime, progress.name)
        self.pool = pool
        self.progress = progress
        self.total = W.IntProgress(min=0, max=max(1, progress.total or 1), value=0,
                                   description="total", bar_style="info")
        self.widget.children = [self.title, self.total, self.rows_box]

    def rows(self):
        rows = node_rows(self.monitor.snapshot(), owner=self.pool.owner,
                         call_by_node=dict(self.progress.by_node), nodes=self.progress.nodes,
                         lost=self.monitor.lost_nodes())
        self.rates.update(rows)
        static = {n["id"]: n for n in self.runtime.nodes()}
        workers = {}
        for h in self.pool._pool:
            workers[h.node] = workers.get(h.node, 0) + 1
        for row in rows:                 # no telemetry from a node yet: what is known
            info = static.get(row.node, {})
            if row.host == "?":
                row.host = info.get("hostname", "?")
            if not row.physical_mem:
                row.physical_mem = info.get("physical_mem", 0)
            if not row.workers:
                row.workers = workers.get(row.node, 0)
        if self.progress.finished:      # nothing of this call runs or waits any more;
            for row in rows:            # telemetry may not have caught up yet
                row.running = row.queued = 0
        return rows

    def header(self) -> str:
        p = self.progress
        total = p.total if p.total is not None else "?"
        state = ("cancelled" if p.cancelled else f"failed: {p.error!r}" if p.error else
                 "done" if p.finished else "running")
        return (f"{p.name}: {p.done}/{total} items · {p.rate:.0f}/s · "
                f"{p.elapsed:.1f} s · {state}")

    def refresh(self):
        p = self.progress
        rows = self.rows()
        total = p.total or max(p.done, 1)
        self.total.max = max(1, total)
        self.total.value = min(p.done, self.total.max)
        self.title.value = f"<b>{self.header()}</b>"
        # a node's bar is full when it has done its even share (or the most of any node)
        share = max(-(-total // max(1, len(rows))), max((r.done for r in rows), default=1))
        for row in rows:
            self._line(row.node).show(row, share)

    def done(self) -> bool:
        return self.progress.finished or not self.runtime.alive

    def close(self, timeout: float = 2.0):
        self.progress.wait(0.5)        # a cancel is being processed: show its outcome
        super().close(timeout)

    def finish(self):
        try:
            self.refresh()
            self.handle.update(HTML(rows_html(self.header(), self.rows())))
            _close_all(self.widget)
        finally:
            super().finish()


class Dashboard(_LiveView):
    """Every node of the runtime: workers, tasks, rate, CPU, memory, DDict bytes."""

    live_for = LIVE_FOR_S      # a thread and a subscription each: not for ever

    def __init__(self, runtime):
        super().__init__(runtime, "dragon-nb runtime")

    def rows(self):
        snapshot = self.monitor.snapshot()
        static = {n["id"]: n for n in self.runtime.nodes()}
        if not set(snapshot) <= set(static):       # a host joined: learn its name and size
            static = {n["id"]: n for n in self.runtime.nodes(refresh=True)}
        rows = node_rows(snapshot, nodes=list(static),
                         lost=self.monitor.lost_nodes())
        for row in rows:                 # no telemetry from a node (yet, or ever): what is known
            info = static.get(row.node, {})
            if row.host == "?":
                row.host = info.get("hostname", "?")
            if not row.physical_mem:
                row.physical_mem = info.get("physical_mem", 0)
            row.num_cpus = info.get("num_cpus", row.num_cpus)
        return rows

    def refresh(self):
        rows = self.rows()
        self.rates.update(rows)
        busiest = max((r.done for r in rows), default=1)
        lost = [r.node for r in rows if r.lost]
        live = [r for r in rows if not r.lost]
        cores = sum(r.num_cpus for r in live)
        self.title.value = (f"<b>dragon-nb runtime</b>: {len(live)} node(s), {cores} core(s)"
                            + (f"; lost: {', '.join(f'node {n}' for n in lost)}"
                               if lost else ""))
        for row in rows:
            self._line(row.node).show(row, busiest)


def show_call(pool, progress):
    """Progress observer: a live widget under the cell that made the call."""
    progress.views.append(CallWidget(pool, progress).start())


class PipelineWidget:
    """Per-stage figures of a running pipeline: workers, items in/out, queue, rate."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.monitor = TelemetryMonitor(pipe.runtime)
        self.title = W.HTML("<b>pipeline</b>")
        self.rows = {}
        self.box = W.VBox([])
        self.widget = W.VBox([self.title, self.box])
        self.rates = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="dragon-nb pipeline widget")

    def _row(self, k, name):
        if k not in self.rows:
            bar = W.IntProgress(min=0, max=1, value=0, description=f"{k}: {name}"[:20],
                                layout=W.Layout(width="320px"))
            text = W.HTML("")
            self.rows[k] = (bar, text)
            self.box.children = [W.HBox(list(self.rows[i])) for i in sorted(self.rows)]
        return self.rows[k]

    def stats(self):
        return self.pipe.stats(self.monitor.snapshot())

    def refresh(self):
        import time as _time
        now = _time.monotonic()
        sent = max(1, self.pipe.items_sent)
        for k, st in enumerate(self.stats()):
            bar, text = self._row(k, st["name"])
            last = self.rates.get(k)
            rate = 0.0
            if last is not None and now > last[0]:
                rate = (st["out"] - last[1]) / (now - last[0])
            self.rates[k] = (now, st["out"])
            bar.max = sent
            bar.value = min(st["out"], sent)
            text.value = (f"{st['workers']} workers · in {st['in']} · out {st['out']} · "
                          f"queued {st['queued']} · {max(rate, 0):.0f}/s")
        self.title.value = f"<b>pipeline</b>: {self.pipe.items_sent} items from the source"

    def _loop(self):
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except Exception:
                pass

    def start(self):
        self.handle = display(self.widget, display_id=True)
        self._thread.start()
        return self

    def close(self):
        self._stop.set()
        self._thread.join(2)
        try:
            self.refresh()
            rows = "".join(
                f"<tr><td>{k}</td><td>{st['name']}</td><td>{st['in']}</td><td>{st['out']}</td></tr>"
                for k, st in enumerate(self.stats()))
            self.handle.update(HTML(
                f"<div class='dragon-nb'><b>pipeline: {self.pipe.items_sent} items</b><table>"
                f"<tr><th>stage</th><th>function</th><th>in</th><th>out</th></tr>{rows}"
                f"</table></div>"))
            _close_all(self.widget)
        finally:
            self.monitor.close()


class DDictWidget(_LiveView):
    """A DDict's keys and bytes per node, live from the managers' telemetry."""

    live_for = LIVE_FOR_S

    def __init__(self, ddict, name: str = ""):
        self.ddict = ddict
        self.name = name or ddict.get_name() or ddict.owner
        self.budget_per_node: dict = {}
        for st in ddict.stats:
            self.budget_per_node[st.node] = self.budget_per_node.get(st.node, 0) + st.total_bytes
        super().__init__(getattr(ddict, "_runtime", None) or _current_runtime(),
                         f"DDict {self.name}")
        self.bars: dict = {}

    def refresh(self):
        snap = self.monitor.snapshot()
        total_keys = total_bytes = 0
        for node, budget in sorted(self.budget_per_node.items()):
            o = snap.get(node, {}).get("owners", {}).get(self.ddict.owner, {})
            keys, used = o.get("keys", 0), o.get("bytes", 0)
            total_keys += keys
            total_bytes += used
            if node not in self.bars:
                bar = W.FloatProgress(min=0, max=1, value=0, description=f"node {node}",
                                      bar_style="success", layout=W.Layout(width="320px"))
                text = W.HTML("")
                self.bars[node] = (bar, text)
                self.rows_box.children = [W.HBox(list(self.bars[n])) for n in sorted(self.bars)]
            bar, text = self.bars[node]
            bar.value = min(1.0, used / budget) if budget else 0.0
            text.value = f"{keys} keys · {fmt_bytes(used)} of {fmt_bytes(budget)}"
        self.title.value = (f"<b>DDict {self.name}</b>: {total_keys} keys, "
                            f"{fmt_bytes(total_bytes)} in {len(self.budget_per_node)} node(s)")

    def done(self) -> bool:
        life = getattr(self.ddict, "_life", None)
        return not self.runtime.alive or bool(life is not None and life.destroyed)


def _current_runtime():
    from dragon_nb.runtime import get_runtime
    return get_runtime()
