"""Progress of Pool calls, for whoever wants to show it.

Each map-family call (``map``, ``starmap``, ``imap``, ``imap_unordered`` and
their async forms) carries a ``CallProgress`` that the pool's I/O thread
updates as results arrive: items done per node, exactly, for this call.
Front ends (the notebook widgets, a terminal bar) register an *observer*;
the pool calls it when a call starts, so the pool never imports a front end.

The one exception is the default: the terminal bar (``dragon_nb.widgets.text``,
which imports nothing heavy) is added the first time the observers are used,
if stderr is a terminal or ``DRAGON_NB_PROGRESS=text``. Deciding that here,
not at ``import dragon_nb``, keeps that import from loading the pool; a front
end that replaces the bar (the notebook widgets) removes it as before.
"""
from __future__ import annotations

import collections
import threading
import time

_observers: list = []
_lock = threading.Lock()
_defaults_added = False
enabled = True          # global switch: False turns every progress view off


def _add_default_observers() -> None:
    """Add the terminal bar if it is wanted, once; the caller holds ``_lock``."""
    global _defaults_added
    if _defaults_added:
        return
    _defaults_added = True
    from dragon_nb.widgets import text
    if text.wanted():
        _observers.insert(0, text.show_call)


class CallProgress:
    """What one call has done so far. Written by the I/O thread, read by views."""

    def __init__(self, name: str, total: int | None, pool_owner: str, nodes: list):
        self.name = name
        self.total = total                 # items, None while a lazy input is unread
        self.pool_owner = pool_owner
        self.nodes = list(nodes)           # node ids the pool's workers are on
        self.by_node: collections.Counter = collections.Counter()
        self.done = 0
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._finished = threading.Event()
        self.views: list = []              # things with .close(), settled by a sync call

    def add(self, node: int, items: int) -> None:
        self.by_node[node] += items
        self.done += items

    def finish(self, error: BaseException | None = None, cancelled: bool = False) -> None:
        if self._finished.is_set():
            return
        self.error = error
        self.cancelled = cancelled
        self.finished_at = time.monotonic()
        self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def close_views(self) -> None:
        """Bring every view to its final state now (a synchronous call is over)."""
        for view in list(self.views):
            try:
                view.close()
            except Exception:
                import logging
                logging.getLogger("dragon_nb.pool").exception("closing a progress view failed")

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Items per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


def add_observer(observer) -> None:
    """``observer(pool, progress)`` is called as each map-family call starts."""
    with _lock:
        _add_default_observers()
        if observer not in _observers:
            _observers.append(observer)


def remove_observer(observer) -> None:
    with _lock:
        _add_default_observers()
        if observer in _observers:
            _observers.remove(observer)


def notify_start(pool, progress: CallProgress, show: bool | None) -> None:
    if show is False or (show is None and not enabled):
        return
    with _lock:
        _add_default_observers()
        observers = list(_observers)
    for observer in observers:
        try:
            observer(pool, progress)
        except Exception:        # a broken view must never break the computation
            import logging
            logging.getLogger("dragon_nb.pool").exception("progress observer failed")
