"""What the pool's I/O thread keeps per job and per worker.

A ``Job`` is one call (``map``, ``apply``, an ``imap``...) with the chunks it
has yet to send; a ``WorkerState`` is one worker with the chunks it holds
(sent, no result yet), keyed ``(job id, chunk index)``, each a ``Chunk``.
Only the I/O thread touches them (``WorkerHandle`` is what ``Pool._pool`` shows).
"""
from __future__ import annotations

import collections
import contextvars
import weakref

from dragon_nb.runtime.liveness import ProcessRef


class Chunk:
    """Some consecutive items of a call, pickled once: what a worker runs at a time."""

    __slots__ = ("idx", "payload", "bufs", "attempts", "start")

    def __init__(self, idx: int, payload: bytes, bufs: list, start: int):
        self.idx = idx                 # its place among the call's chunks
        self.payload, self.bufs = payload, bufs
        self.attempts = 0              # times it was lost with its worker
        self.start = start             # its first item's position in the input


class WorkerHandle:
    """One entry of ``Pool._pool``: what the stdlib's Process objects offer there."""

    def __init__(self, node: int, pid: int):
        self.node, self.pid = node, pid
        self._alive = True

    def is_alive(self) -> bool:
        return self._alive

    @property
    def name(self) -> str:
        return f"DragonPoolWorker-{self.node}-{self.pid}"

    def __repr__(self):
        return f"<WorkerHandle node={self.node} pid={self.pid} alive={self._alive}>"


class _Gone:
    """Stands in for the result of a lazy call whose iterator the caller dropped."""
    _success = None
    _window = None

    def _set(self, *a):
        return True

    _set_many = _set_length = _set

    def _fail(self, *a):
        pass

    _note_size = _fail


_GONE = _Gone()


class Job:
    __slots__ = ("id", "mode", "fid", "func_blob", "_result", "pending", "total",
                 "received", "cancelled", "name", "progress", "context")

    def __init__(self, jid, mode, fid, func_blob, result, name, progress=None, weak=False):
        self.id, self.mode, self.fid, self.func_blob = jid, mode, fid, func_blob
        # a lazy call's iterator is held weakly: dropping it cancels the call
        self._result = weakref.ref(result) if weak else result
        self.name, self.progress = name, progress
        # the caller's context: worker output is written inside it, so a notebook
        # shows it under the cell that made the call (ipykernel keeps the cell's
        # parent header in a context variable)
        self.context = contextvars.copy_context()
        self.pending: collections.deque = collections.deque()   # Chunks not sent yet
        self.total = None
        self.received = 0
        self.cancelled = False

    @property
    def result(self):
        r = self._result
        if isinstance(r, weakref.ref):
            r = r()
            return _GONE if r is None else r
        return r


def worker_id(node: int, pid: int) -> bytes:
    """The zmq identity of a pool worker (the worker sets the same one)."""
    return f"w{node}-{pid}".encode()


class WorkerState:
    """One worker as the I/O thread sees it; ``ref`` is how to look at and signal it."""

    def __init__(self, ref: ProcessRef):
        self.ref = ref
        self.node, self.pid = ref.node, ref.pid
        self.wid = worker_id(ref.node, ref.pid)
        self.handle = WorkerHandle(ref.node, ref.pid)
        self.connected = False
        self.sent = 0
        self.outstanding: dict = {}     # (job id, idx) -> (job, chunk), in send order
        self.funcs: set = set()
        self.exit_code = None
        self.exit_deadline = None       # set when its exit is known

    @property
    def live(self) -> bool:
        """Not known to have exited."""
        return self.exit_deadline is None


def lost(workers) -> list[WorkerState]:
    """The workers not yet known to have exited whose process is gone (only those
    in this pid space can be looked at; a pid now used by another process, with
    another start time, is gone too). A zombie is not: its agent is about to say
    how it ended, which the pool's errors name. The head also publishes exits
    whose event was lost, so this is the last resort, not the rule."""
    return [w for w in workers if w.exit_deadline is None and w.ref.gone()]
