"""The terminal view of a Pool call: one tqdm bar, items per node alongside.

Shown for map-family calls when stderr is a terminal (or when
``DRAGON_NB_PROGRESS=text``); ``DRAGON_NB_PROGRESS=off`` or
``dragon_nb.pool.progress.enabled = False`` turns it off, and so does
``progress=False`` on one call.
"""
from __future__ import annotations

import os
import sys
import threading

from dragon_nb.tunables import REFRESH_S


class CallBar:
    def __init__(self, progress, file=None):
        from tqdm import tqdm
        self.progress = progress
        self.bar = tqdm(total=progress.total, desc=progress.name, unit="item",
                        file=file or sys.stderr, leave=True, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="dragon-nb bar")
        self._thread.start()

    def refresh(self):
        p = self.progress
        if p.total is not None and self.bar.total != p.total:
            self.bar.total = p.total
        if p.done > self.bar.n:
            self.bar.update(p.done - self.bar.n)
        self.bar.set_postfix_str(" ".join(f"node{n}:{c}" for n, c in sorted(p.by_node.items())),
                                 refresh=True)

    def _loop(self):
        while not self._stop.wait(REFRESH_S) and not self.progress.finished:
            self.refresh()
        self.refresh()
        self.bar.close()

    def close(self, timeout: float = 2.0):
        self.progress.wait(0.5)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def show_call(pool, progress):
    """Progress observer for terminals."""
    progress.views.append(CallBar(progress))


def wanted() -> bool:
    """Should scripts show text bars? DRAGON_NB_PROGRESS=text|off, else: stderr is a tty."""
    setting = os.environ.get("DRAGON_NB_PROGRESS", "").lower()
    if setting in ("off", "0", "no", "false", "widget"):
        return False
    if setting in ("text", "1", "on", "yes", "true"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
