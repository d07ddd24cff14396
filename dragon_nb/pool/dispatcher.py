"""The pool's I/O thread: hands chunks to workers and results to callers.

One thread per pool owns the task endpoint (a ROUTER that workers connect
to) and a subscription to the head's exit events for this pool's workers.
Scheduling is credit based: each worker holds at most a *window* of chunks,
sized from the measured chunk time (about 20 ms of work, 1..256 chunks), so
tiny tasks travel many to a message and long ones balance across workers.
Every chunk sent is remembered until its result arrives; a worker that dies
gets its chunks re-run once on another worker, then the job fails with an
error naming the worker and node.

User threads talk to it only through ``submit``/``cancel``/``close``/... which
queue a command and poke a pipe.
"""
from __future__ import annotations

import collections
import contextvars
import logging
import os
import signal
import sys
import threading
import time
import uuid
import weakref

import zmq

from dragon_nb.errors import CallCancelledError, PoolBrokenError, WorkerLostError
from dragon_nb.pool.worker import APPLY
from dragon_nb.runtime.client import drain_events, exit_reason, zmq_context
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S
from dragon_nb.tunables import EXIT_GRACE_S, LIVENESS_S, TARGET_QUEUED_S, TASK_RETRIES

log = logging.getLogger("dragon_nb.pool")
_dropped = P.DropLog(log)

MAX_WINDOW = 256
START_WINDOW = 2
MAX_BATCH_BYTES = 4 << 20
WORKER_ENTRY = "dragon_nb.pool.worker:main"


def _emit(context, stream: str, text: str) -> None:
    def write():
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(text)
        target.flush()
    try:
        if context is not None:
            context.run(write)
        else:
            write()
    except Exception:
        log.debug("could not write worker output", exc_info=True)


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
        # chunks: [idx, payload, bufs, attempts, first item's position in the input]
        self.pending: collections.deque = collections.deque()
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


class WorkerState:
    def __init__(self, node, pid):
        self.node, self.pid = node, pid
        self.wid = f"w{node}-{pid}".encode()
        self.handle = WorkerHandle(node, pid)
        self.connected = False
        self.sent = 0
        self.outstanding: dict = {}     # (job id, idx) -> (job, chunk), in send order
        self.funcs: set = set()
        self.exit_code = None
        self.exit_deadline = None       # set when its exit is known


class Dispatcher:
    def __init__(self, runtime, processes, maxtasks, spec: dict, nodes=None,
                 task_retries: int = TASK_RETRIES):
        self.runtime = runtime
        self.task_retries = task_retries
        self.processes = processes
        self.maxtasks = maxtasks
        self.nodes = nodes
        self.owner = f"pool-{uuid.uuid4().hex[:12]}"
        # nodes in this process's pid space: their workers' pids can be signalled here
        self.local_nodes = runtime.nodes_here()
        ctx = zmq_context()
        net = runtime.network
        self.router = P.Channel(ctx.socket(zmq.ROUTER), net.codec(), routed=True)
        self.address = net.bind(self.router.sock, self.owner)
        self.sub = runtime.subscribe(P.TOPIC_EXIT + self.owner.encode())
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.commands: collections.deque = collections.deque()
        self.spec = S.dumps_inline({**spec, "address": self.address, "maxtasks": maxtasks})
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.workers: dict[bytes, WorkerState] = {}
        self.handles: list[WorkerHandle] = []
        self.jobs: dict[int, Job] = {}
        self.contexts: collections.OrderedDict = collections.OrderedDict()  # job -> context
        self.line_start: dict = {}      # (wid, stream) -> next text starts a line
        self.ready: collections.deque = collections.deque()
        self.chunk_time = None
        self.state = "run"            # run -> close -> (stopping) ; or terminate
        self.broken: Exception | None = None
        self.stopping = False
        self.spawned = 0              # workers started over the pool's life
        self.early_deaths: list = []  # workers that died before their hello, in a row
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"dragon-nb {self.owner}",
                                       daemon=True)
        try:
            self._spawn(processes)    # pids known before the constructor returns
        except BaseException:
            self.router.close(linger=0)
            self.sub.close(linger=0)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.finished.set()
            raise
        self.thread.start()

    # -- called from user threads ----------------------------------------------
    def _command(self, *cmd):
        self.commands.append(cmd)
        if self._wake_pending:          # the thread will see this command anyway
            return
        with self._wake_lock:
            if self.finished.is_set():
                return
            self._wake_pending = True
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass            # the pipe is full: the thread is awake anyway

    def submit(self, job: Job, chunks=None):
        """A job with all its chunks (eager) or none yet (lazy: see ``feed``)."""
        if self.finished.is_set():
            job.result._fail(self.broken or PoolBrokenError("the pool has stopped"))
            return
        self._command("submit", job, chunks)
        if self.finished.is_set():      # the thread ended meanwhile: nobody will read it
            self._fail_leftovers()

    def _fail_leftovers(self):
        """Fail the jobs of commands the (finished) thread will never read."""
        while True:
            try:
                cmd = self.commands.popleft()
            except IndexError:
                return
            if cmd[0] == "submit":
                cmd[1].result._fail(self.broken or PoolBrokenError("the pool has stopped"))

    def feed_error(self, job_id: int, idx: int, exc: BaseException):
        """The lazy input of a job raised: ``exc`` takes position ``idx`` and ends it."""
        self._command("feed_error", job_id, idx, exc)

    def feed(self, job_id: int, chunk):
        self._command("feed", job_id, chunk)

    def end(self, job_id: int, total: int):
        self._command("end", job_id, total)

    def cancel(self, job_id: int):
        self._command("cancel", job_id)

    def close(self):
        self._command("close")

    def terminate(self):
        self._command("terminate")

    def repopulate(self, timeout=30.0):
        done = threading.Event()
        self._command("repopulate", done)
        done.wait(timeout)

    # -- workers ----------------------------------------------------------------
    def _spawn(self, count: int):
        procs = self.runtime.spawn(WORKER_ENTRY, self.spec, count, self.owner, nodes=self.nodes)
        self.spawned += len(procs)
        for node, pid in sorted(procs):
            w = WorkerState(node, pid)
            self.workers[w.wid] = w
        self._update_handles()

    def _live_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.exit_deadline is None)

    def _repopulate(self):
        if self.broken or self.state == "terminate" or not self.runtime.alive:
            return
        if self.state == "close" and not self.jobs:
            return
        missing = self.processes - self._live_count()
        if missing > 0:
            try:
                self._spawn(missing)
            except Exception as e:  # runtime stopping or nodes lost
                self._break(PoolBrokenError(f"cannot start pool workers: {e}"))

    def _worker_exited(self, w: WorkerState, code):
        if w.exit_deadline is not None:
            return
        w.exit_code = code
        w.handle._alive = False
        # results it flushed before dying may still be on their way
        grace = EXIT_GRACE_S if w.outstanding else 0.0
        w.exit_deadline = time.monotonic() + grace
        self._update_handles()
        if not w.connected:          # died before saying hello: start-up is failing
            self.early_deaths.append((w.pid, w.node, code))
            if len(self.early_deaths) >= max(3, self.processes) and self.broken is None:
                pids = ", ".join(f"pid {p} on node {n} (code {c})"
                                 for p, n, c in self.early_deaths[-3:])
                self._break(PoolBrokenError(
                    f"pool workers keep dying before they start ({pids}); "
                    f"is the initializer exiting or crashing the process?"))

    def _update_handles(self):
        """``Pool._pool``: the live workers, by node then pid."""
        live = [w for w in self.workers.values() if w.exit_deadline is None]
        self.handles = [w.handle for w in sorted(live, key=lambda w: (w.node, w.pid))]

    def _reap_exited(self):
        now = time.monotonic()
        for wid, w in list(self.workers.items()):
            if w.exit_deadline is None or now < w.exit_deadline:
                continue
            del self.workers[wid]
            for (jid, idx), (job, chunk) in list(w.outstanding.items()):
                if job.cancelled or job.id not in self.jobs:
                    continue
                chunk[3] += 1
                if chunk[3] > self.task_retries:
                    how = exit_reason(w.exit_code)
                    tries = f"it ran {chunk[3]} time(s), each time losing its worker" \
                        if chunk[3] > 1 else "no retries were allowed"
                    self._finish(job, fail=WorkerLostError(
                        f"pool worker pid {w.pid} on node {w.node} {how} while running "
                        f"chunk {idx} (input items from {chunk[4]}) of {job.name}; {tries}"))
                else:
                    log.info("re-running chunk %s of %s lost with worker %s", idx, job.name, w.pid)
                    self._put_back(job, chunk)
            w.outstanding.clear()
        self._repopulate()

    def _requeue(self, w: WorkerState):
        """Send a live worker's outstanding chunks again (to whoever is free): a TCP
        connection zmq dropped and redialled loses what was queued on it. Results of
        the old copies, if they come after all, are ignored (nothing is outstanding)."""
        for (jid, idx), (job, chunk) in list(w.outstanding.items()):
            if not (job.cancelled or job.id not in self.jobs):
                self._put_back(job, chunk)
        log.info("worker %s reconnected: %d chunk(s) sent again", w.pid, len(w.outstanding))
        w.outstanding.clear()

    def _put_back(self, job: Job, chunk) -> None:
        """A chunk sent to a worker that will not answer: first in line again."""
        job.pending.appendleft(chunk)
        if job not in self.ready:
            self.ready.appendleft(job)

    def _check_liveness(self):
        for w in self.workers.values():
            if w.exit_deadline is None and w.node in self.local_nodes:
                try:
                    os.kill(w.pid, 0)
                except ProcessLookupError:
                    self._worker_exited(w, None)
                except PermissionError:      # there, but another user's (a joined agent)
                    pass
        if not self.runtime.alive and self.state != "terminate":
            self._break(PoolBrokenError("the dragon-nb runtime stopped"))
            for w in self.workers.values():
                self._worker_exited(w, None)

    def _signal(self, workers, sig):
        remote = [(w.node, w.pid) for w in workers if w.node not in self.local_nodes]
        for w in workers:
            if w.node not in self.local_nodes:
                continue
            try:
                os.kill(w.pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:          # another user's agent on this host: ask it
                remote.append((w.node, w.pid))
        if remote and self.runtime.alive:
            try:
                self.runtime.kill(remote, sig, wait=False)
            except Exception as e:         # the runtime going away: the exits will tell
                log.info("could not signal workers %s: %r", remote, e)

    # -- jobs -------------------------------------------------------------------------
    def _finish(self, job: Job, fail: Exception | None = None, cancelled: bool = False):
        """Forget a job; with ``fail``, its result raises that."""
        job.cancelled = True
        self.jobs.pop(job.id, None)
        job.pending.clear()
        if cancelled and fail is None:
            fail = CallCancelledError(f"{job.name} was cancelled")
        if fail is not None:
            job.result._fail(fail)
        window = getattr(job.result, "_window", None)
        if window is not None:
            window.close()            # its feeder stops reading the input
        if job.progress is not None:
            err = fail
            if err is None and getattr(job.result, "_success", True) is False:
                err = job.result._value
            job.progress.finish(err, cancelled)

    def _break(self, exc: Exception):
        if self.broken is None:
            self.broken = exc
        for job in list(self.jobs.values()):
            self._finish(job, fail=exc)
        self.ready.clear()

    def _cancel(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            return
        self._finish(job, cancelled=True)
        hit = []
        for w in self.workers.values():
            mine = [k for k in w.outstanding if k[0] == job_id]
            if mine:
                for k in mine:
                    del w.outstanding[k]
                hit.append(w)
                self.router.send(P.CANCEL, {"jobs": [job_id]}, to=w.wid)
        if hit:
            self._signal(hit, signal.SIGUSR1)

    def _window(self) -> int:
        if self.chunk_time is None:
            return START_WINDOW
        return 1 + min(MAX_WINDOW - 1, int(TARGET_QUEUED_S / max(self.chunk_time, 1e-7)))

    def _schedule(self):
        if not self.ready:
            return
        window = self._window()
        for w in sorted(self.workers.values(), key=lambda w: len(w.outstanding)):
            if not w.connected or w.exit_deadline is not None:
                continue
            room = window - len(w.outstanding)
            if self.maxtasks:
                room = min(room, self.maxtasks - w.sent)
            if room <= 0:
                continue
            tasks, funcs, bufs, size = [], {}, [], 0
            while room > 0 and self.ready and size < MAX_BATCH_BYTES:
                job = self.ready[0]
                if job.cancelled or not job.pending:
                    self.ready.popleft()
                    continue
                chunk = job.pending.popleft()
                idx, payload, pbufs, _attempts, start = chunk
                if job.fid not in w.funcs:
                    funcs[job.fid] = job.func_blob
                    w.funcs.add(job.fid)
                tasks.append((job.id, idx, job.mode, job.fid, payload, len(pbufs), start))
                bufs.extend(pbufs)
                w.outstanding[(job.id, idx)] = (job, chunk)
                w.sent += 1
                room -= 1
                size += len(payload) + sum(memoryview(b).nbytes for b in pbufs)
                if not job.pending:
                    self.ready.popleft()
            if tasks:
                self.router.send(P.TASKS, {"funcs": funcs, "tasks": tasks}, buffers=bufs, to=w.wid)
            if not self.ready:
                break

    # -- messages ---------------------------------------------------------------------
    def _on_results(self, w: WorkerState, body, bufs):
        pos = 0
        batched: dict = {}          # job -> [(idx, ok, value)] for results that take many
        for jid, idx, ok, data, nbufs, dt in body["results"]:
            mine = bufs[pos:pos + nbufs]
            pos += nbufs
            entry = w.outstanding.pop((jid, idx), None)
            self.chunk_time = dt if self.chunk_time is None else 0.8 * self.chunk_time + 0.2 * dt
            if entry is None:
                continue                    # cancelled, or already re-run elsewhere
            job = entry[0]
            if job.cancelled:
                continue
            try:
                value = S.loads(data, mine)
            except Exception as e:
                ok, value = False, e
            job.received += 1
            if job.progress is not None:
                job.progress.add(w.node, len(value) if ok and job.mode != APPLY else 1)
            if hasattr(job.result, "_set_many"):
                batched.setdefault(job, []).append((idx, ok, value))
            elif job.result._set(idx, ok, value) or (job.total is not None and
                                                     job.received >= job.total):
                self._finish(job)
        for job, results in batched.items():
            if job.result._set_many(results) or (job.total is not None and
                                                 job.received >= job.total):
                self._finish(job)

    def _on_message(self, ident, kind, body, bufs):
        w = self.workers.get(ident)
        if w is None:
            return
        if kind == P.RESULTS:
            self._on_results(w, body, bufs)
        elif kind == P.OUTPUT:
            self._on_output(w, body)
        elif kind == P.HELLO:
            if w.connected and isinstance(body, dict) and body.get("again"):
                self._requeue(w)        # its connection was redialled: what we sent is lost
            w.connected = True
            self.early_deaths.clear()
            if self.stopping:
                self.router.send(P.STOP, None, to=w.wid)
        elif kind == P.INIT_FAILED:
            exc = PoolBrokenError(
                f"the pool initializer failed in worker pid {w.pid} on node {w.node}: "
                f"{body.get('summary')}\n\nRemote traceback:\n{body.get('error')}")
            self._break(exc)

    def _on_output(self, w: WorkerState, body):
        """Worker prints, each line prefixed with where it came from."""
        prefix = f"[node{w.node} pid{w.pid}] "
        merged: list = []                 # adjacent writes of one job and stream, joined
        for job, stream, text in body.get("lines", ()):
            if merged and merged[-1][0] == job and merged[-1][1] == stream:
                merged[-1][2].append(text)
            else:
                merged.append((job, stream, [text]))
        for job, stream, texts in merged:
            text = "".join(texts)
            key = (w.wid, stream)
            out = []
            for piece in text.splitlines(keepends=True):
                if self.line_start.get(key, True):
                    out.append(prefix)
                out.append(piece)
                self.line_start[key] = piece.endswith("\n")
            ctx = self.contexts.get(job)
            _emit(ctx, stream, "".join(out))
        if body.get("dropped"):
            _emit(None, "stderr", f"{prefix}... {body['dropped']} characters of output dropped "
                                  f"(more than the worker's print budget)\n")

    def _on_command(self, cmd):
        op = cmd[0]
        if op == "submit":
            _, job, chunks = cmd
            if self.broken is not None:
                job.result._fail(self.broken)
                return
            self.jobs[job.id] = job
            self.contexts[job.id] = job.context
            while len(self.contexts) > 256:
                self.contexts.popitem(last=False)
            if chunks is not None:
                job.pending.extend(chunks)
                job.total = len(chunks)
                if not chunks:
                    self._finish(job)
                    return
                self.ready.append(job)
        elif op == "feed":
            job = self.jobs.get(cmd[1])
            if job is not None and not job.cancelled:
                job.pending.append(cmd[2])
                if job not in self.ready:
                    self.ready.append(job)
        elif op == "end":
            job = self.jobs.get(cmd[1])
            if job is not None:
                job.total = cmd[2]
                if job.result._set_length(cmd[2]) or job.received >= job.total:
                    self._finish(job)
        elif op == "feed_error":
            _, jid, idx, exc = cmd
            job = self.jobs.get(jid)
            if job is not None:
                job.received += 1
                job.total = idx + 1
                done = job.result._set(idx, False, exc)
                if job.result._set_length(idx + 1) or done or job.received >= job.total:
                    self._finish(job)
        elif op == "cancel":
            self._cancel(cmd[1])
        elif op == "close":
            if self.state == "run":
                self.state = "close"
        elif op == "terminate":
            self.state = "terminate"
        elif op == "repopulate":
            self._repopulate()
            cmd[1].set()

    # -- the loop ---------------------------------------------------------------------
    def _run(self):
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        poller.register(self.sub.sock, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        last_live = time.monotonic()
        terminate_deadline = None
        try:
            while True:
                events = dict(poller.poll(100))
                if self.wake_r in events:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                self._wake_pending = False      # before reading commands: none is missed
                while self.commands:
                    self._on_command(self.commands.popleft())
                if self.router.sock in events:
                    for _ in range(256):
                        try:
                            ident, kind, body, bufs = self.router.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except P.ProtocolError as e:
                            _dropped("dropped malformed message: %s", e)
                            continue
                        self._on_message(ident, kind, body, bufs)
                if self.sub.sock in events:
                    self._on_exit_events()
                now = time.monotonic()
                if now - last_live >= LIVENESS_S:
                    last_live = now
                    self._check_liveness()
                self._reap_exited()
                if self.state == "terminate":
                    if terminate_deadline is None:
                        terminate_deadline = now + 5.0
                        self._break(PoolBrokenError("the pool was terminated"))
                        self._signal([w for w in self.workers.values()
                                      if w.exit_deadline is None], signal.SIGTERM)
                    if now > terminate_deadline and self.workers:
                        self._signal(list(self.workers.values()), signal.SIGKILL)
                    if not self.workers or now > terminate_deadline:
                        break
                    continue
                self._schedule()
                if self.state == "close" and not self.jobs:
                    if not self.stopping:
                        self.stopping = True
                        for w in self.workers.values():
                            if w.connected:     # the others get it when they say hello
                                self.router.send(P.STOP, None, to=w.wid)
                    if not self.workers:
                        break
                    if not self.runtime.alive:
                        break
        except Exception:
            log.exception("pool I/O thread failed")
            self._break(PoolBrokenError("the pool's I/O thread failed; see the log"))
        finally:
            for w in self.workers.values():
                w.handle._alive = False
            self.router.close(linger=0)
            self.sub.close(linger=0)
            with self._wake_lock:
                self.finished.set()
                os.close(self.wake_r)
                os.close(self.wake_w)
            for job in list(self.jobs.values()):   # nothing may wait forever
                self._finish(job, fail=self.broken or PoolBrokenError("the pool has stopped"))
            self._fail_leftovers()

    def _on_exit_events(self):
        for body in drain_events(self.sub):
            for node, pid, code in body.get("procs", ()):
                w = self.workers.get(f"w{node}-{pid}".encode())
                if w is not None:
                    self._worker_exited(w, code)
