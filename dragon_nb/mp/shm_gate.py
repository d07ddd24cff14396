"""The SIGINT gate of ``shm_ring.py``: Ctrl-C is held back while a ring's record
and header change together, so a KeyboardInterrupt never lands half way.

Why a handler and not a signal mask: ``signal.pthread_sigmask`` costs 3.4 +
1.8 us a block/unblock pair here (more than a whole put), and a main thread
that blocks SIGINT still gets KeyboardInterrupt when another thread of the
process receives the signal, since Python runs handlers in the main thread
whoever received it. So the main thread puts ``on_sigint`` in front of the
Python handler it finds (``install``, chaining to that one); while
``proc.held`` is set (a *section*: mutex taken, record being copied, header
written) the handler only notes the signal in ``proc.pending``, and the
section's owner calls ``fire`` once it is safe: before its commit (nothing
happened) or after it has undone what the Ctrl-C must not see.

The same object keeps what a ring needs to know about this process and must
be reset in a forked child: the main thread (signals go to the forking
thread there), the fork generation (handles of an older one reopen by name),
the pid written into a ring's header while its mutex is held, and the count
of open rings, whose last ``close`` gives the original handler back
(``uninstall``).
"""
from __future__ import annotations

import _signal
import _thread
import os
import threading

__all__ = ["proc", "on_sigint", "fire", "install", "uninstall"]

_SIGINT = 2
_ident = _thread.get_ident
_getsig = _signal.getsignal


class _Process:
    __slots__ = ("held", "pending", "chained", "main", "gen", "pid", "lock", "rings")


proc = _Process()
proc.held = False        # the main thread is in a section: SIGINT handling deferred
proc.pending = None      # (signum, frame) noted while held
proc.chained = None      # the handler found when ours was installed
proc.main = threading.main_thread().ident
proc.gen = 0             # fork generation
proc.pid = os.getpid()
# Re-entrant: a queue's finalizer may close a ring (taking this lock) from a
# garbage collection that runs while this thread holds it.
proc.lock = threading.RLock()
proc.rings = 0           # open Ring objects of this process


def on_sigint(signum, frame):
    """The SIGINT handler while rings are open: runs the chained handler now,
    or after the current section if one is open."""
    p = proc
    if p.held:
        p.pending = (signum, frame)
        return
    h = p.chained
    if callable(h):
        h(signum, frame)


def fire():
    """Run the chained handler for a SIGINT noted during a section."""
    p = proc
    pend, p.pending = p.pending, None
    h = p.chained
    if pend is not None and callable(h):
        h(*pend)


def install() -> bool:
    """Put on_sigint in front of the current SIGINT handler (main thread only).
    False if that handler is not a Python callable (SIG_IGN, SIG_DFL, C)."""
    h = _getsig(_SIGINT)
    if h is on_sigint:
        return True
    if not callable(h):
        return False
    proc.chained = h
    _signal.signal(_SIGINT, on_sigint)
    return True


def uninstall():
    """Give back the handler install() found, if this is the main thread and
    nobody replaced ours meanwhile."""
    if (_ident() == proc.main and not proc.held and _getsig(_SIGINT) is on_sigint
            and callable(proc.chained)):
        _signal.signal(_SIGINT, proc.chained)


def _after_fork():
    p = proc
    p.held = False
    p.pending = None
    p.main = _ident()
    p.gen += 1
    p.pid = os.getpid()
    p.lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork)
