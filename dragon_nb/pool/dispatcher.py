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
queue a command and poke a pipe. What it reads is handled through two tables:
``MESSAGES`` (worker -> pool wire kinds) and ``COMMANDS`` (those queued
commands, named below); per-job and per-worker state is in ``state``. Whether a
worker is alive, and signals to it, go through ``runtime.liveness``: a
``ProcessRef`` per worker, made as it is spawned.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
import uuid

import zmq

from dragon_nb.errors import CallCancelledError, PoolBrokenError, WorkerLostError
from dragon_nb.forwarding import emit
from dragon_nb.pool.state import Job, WorkerHandle, WorkerState, lost, worker_id
from dragon_nb.pool.worker import APPLY
from dragon_nb.runtime import liveness
from dragon_nb.runtime.client import drain_events, exit_reason, zmq_context
from dragon_nb.tunables import EXIT_GRACE_S, LIVENESS_S, TARGET_QUEUED_S, TASK_RETRIES
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

log = logging.getLogger("dragon_nb.pool")
_dropped = P.DropLog(log)

MAX_WINDOW = 256
START_WINDOW = 2
MAX_BATCH_BYTES = 4 << 20
WORKER_ENTRY = "dragon_nb.pool.worker:main"

# what user threads ask of the I/O thread (in-process commands, not wire messages):
# ``(command, arg, *more)`` on ``Dispatcher.commands``, run by the COMMANDS table
SUBMIT = "submit"            # job, its chunks (None: lazy, fed later)
FEED = "feed"                # job id, one more chunk
END = "end"                  # job id, how many chunks it has
FEED_ERROR = "feed_error"    # job id, position, the exception its input raised
CANCEL = "cancel"            # job id
CLOSE = "close"              # None: finish the jobs, then stop the workers
TERMINATE = "terminate"      # None: stop now
REPOPULATE = "repopulate"    # an Event, set once missing workers were started

MESSAGES = P.Handlers("pool")                 # worker -> pool: handler(body, worker, bufs)
COMMANDS = P.Handlers("pool I/O thread")      # user thread -> I/O thread: handler(arg, *more)


class Dispatcher:
    def __init__(self, runtime, processes, maxtasks, spec: dict, nodes=None,
                 task_retries: int = TASK_RETRIES):
        self.runtime = runtime
        self.task_retries = task_retries
        self.processes = processes
        self.maxtasks = maxtasks
        self.nodes = nodes
        self.owner = f"pool-{uuid.uuid4().hex[:12]}"
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
        self.on_message = MESSAGES.bind(self)
        self.on_command = COMMANDS.bind(self)
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
    def _command(self, command: str, arg=None, *more):
        self.commands.append((command, arg, *more))
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
        self._command(SUBMIT, job, chunks)
        if self.finished.is_set():      # the thread ended meanwhile: nobody will read it
            self._fail_leftovers()

    def _fail_leftovers(self):
        """Fail the jobs of commands the (finished) thread will never read."""
        while True:
            try:
                cmd = self.commands.popleft()
            except IndexError:
                return
            if cmd[0] == SUBMIT:
                cmd[1].result._fail(self.broken or PoolBrokenError("the pool has stopped"))

    def feed_error(self, job_id: int, idx: int, exc: BaseException):
        """The lazy input of a job raised: ``exc`` takes position ``idx`` and ends it."""
        self._command(FEED_ERROR, job_id, idx, exc)

    def feed(self, job_id: int, chunk):
        self._command(FEED, job_id, chunk)

    def end(self, job_id: int, total: int):
        self._command(END, job_id, total)

    def cancel(self, job_id: int):
        self._command(CANCEL, job_id)

    def close(self):
        self._command(CLOSE)

    def terminate(self):
        self._command(TERMINATE)

    def repopulate(self, timeout=30.0):
        done = threading.Event()
        self._command(REPOPULATE, done)
        done.wait(timeout)

    # -- workers ----------------------------------------------------------------
    def _spawn(self, count: int):
        procs = self.runtime.spawn(WORKER_ENTRY, self.spec, count, self.owner, nodes=self.nodes)
        self.spawned += len(procs)
        # references made now, so that a pid reused later is not taken for the worker
        for ref in liveness.refs(self.runtime, sorted(procs)):
            w = WorkerState(ref)
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
        """Its exit is known: told by an exit event (``code``), or seen (None: its
        process is gone, the event with the code may still come, within the grace)."""
        now = time.monotonic()
        if w.exit_deadline is not None:
            if w.exit_code is None and code is not None:    # seen gone, now told how
                w.exit_code = code
                w.exit_deadline = min(w.exit_deadline, now + EXIT_GRACE_S)
            return
        w.exit_code = code
        w.handle._alive = False
        # results it flushed before dying may still be on their way (and, if it was
        # seen gone, the exit event that says how it ended: its chunks' errors name it)
        grace = 0.0
        if w.outstanding:
            grace = EXIT_GRACE_S if code is not None or not self.runtime.alive else \
                max(EXIT_GRACE_S, LIVENESS_S)
        w.exit_deadline = now + grace
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
                chunk.attempts += 1
                if chunk.attempts > self.task_retries:
                    how = exit_reason(w.exit_code)
                    tries = f"it ran {chunk.attempts} time(s), each time losing its worker" \
                        if chunk.attempts > 1 else "no retries were allowed"
                    self._finish(job, fail=WorkerLostError(
                        f"pool worker pid {w.pid} on node {w.node} {how} while running "
                        f"chunk {idx} (input items from {chunk.start}) of {job.name}; {tries}"))
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
        for w in lost(self.workers.values()):
            self._worker_exited(w, None)
        if not self.runtime.alive and self.state != "terminate":
            self._break(PoolBrokenError("the dragon-nb runtime stopped"))
            for w in self.workers.values():
                self._worker_exited(w, None)

    def _signal(self, workers, sig):
        """Directly where the pid can be seen, else through the agents; never
        waits on the head (this is the I/O thread)."""
        liveness.signal_all(self.runtime, [w.ref for w in workers], sig, wait=False)

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
                idx, payload, pbufs, start = chunk.idx, chunk.payload, chunk.bufs, chunk.start
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

    # -- messages: MESSAGES, handler(body, worker, bufs) --------------------------------
    @MESSAGES.on(P.RESULTS)
    def _on_results(self, body, w: WorkerState, bufs):
        pos = 0
        batched: dict = {}          # job -> [(idx, ok, value)] for results that take many
        for jid, idx, ok, data, nbufs, dt in body["results"]:
            mine = bufs[pos:pos + nbufs]
            pos += nbufs
            entry = w.outstanding.pop((jid, idx), None)
            self.chunk_time = dt if self.chunk_time is None else 0.8 * self.chunk_time + 0.2 * dt
            if entry is None:
                continue                    # cancelled, or already re-run elsewhere
            job, _chunk = entry
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

    @MESSAGES.on(P.HELLO)
    def _on_hello(self, body, w: WorkerState, bufs):
        if w.connected and isinstance(body, dict) and body.get("again"):
            self._requeue(w)        # its connection was redialled: what we sent is lost
        w.connected = True
        self.early_deaths.clear()
        if self.stopping:
            self.router.send(P.STOP, None, to=w.wid)

    @MESSAGES.on(P.INIT_FAILED)
    def _on_init_failed(self, body, w: WorkerState, bufs):
        self._break(PoolBrokenError(
            f"the pool initializer failed in worker pid {w.pid} on node {w.node}: "
            f"{body.get('summary')}\n\nRemote traceback:\n{body.get('error')}"))

    @MESSAGES.on(P.OUTPUT)
    def _on_output(self, body, w: WorkerState, bufs):
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
            emit(ctx, stream, "".join(out))
        if body.get("dropped"):
            emit(None, "stderr", f"{prefix}... {body['dropped']} characters of output dropped "
                                  f"(more than the worker's print budget)\n")

    # -- commands: COMMANDS, handler(arg, *more) ---------------------------------------
    @COMMANDS.on(SUBMIT)
    def _on_submit(self, job: Job, chunks):
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

    @COMMANDS.on(FEED)
    def _on_feed(self, job_id, chunk):
        job = self.jobs.get(job_id)
        if job is not None and not job.cancelled:
            job.pending.append(chunk)
            if job not in self.ready:
                self.ready.append(job)

    @COMMANDS.on(END)
    def _on_end(self, job_id, total):
        job = self.jobs.get(job_id)
        if job is not None:
            job.total = total
            if job.result._set_length(total) or job.received >= job.total:
                self._finish(job)

    @COMMANDS.on(FEED_ERROR)
    def _on_feed_error(self, job_id, idx, exc):
        job = self.jobs.get(job_id)
        if job is not None:
            job.received += 1
            job.total = idx + 1
            done = job.result._set(idx, False, exc)
            if job.result._set_length(idx + 1) or done or job.received >= job.total:
                self._finish(job)

    @COMMANDS.on(CANCEL)
    def _on_cancel(self, job_id):
        self._cancel(job_id)

    @COMMANDS.on(CLOSE)
    def _on_close(self, _):
        if self.state == "run":
            self.state = "close"

    @COMMANDS.on(TERMINATE)
    def _on_terminate(self, _):
        self.state = "terminate"

    @COMMANDS.on(REPOPULATE)
    def _on_repopulate(self, done: threading.Event):
        self._repopulate()
        done.set()

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
                    self.on_command(*self.commands.popleft())
                if self.router.sock in events:
                    for _ in range(256):
                        try:
                            ident, kind, body, bufs = self.router.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except P.ProtocolError as e:
                            _dropped("dropped malformed message: %s", e)
                            continue
                        w = self.workers.get(ident)
                        if w is None:
                            continue            # a worker already reaped, or a stranger
                        try:
                            self.on_message(kind, body, w, bufs)
                        except P.UnknownMessage as e:
                            _dropped("dropped a message: %s", e)
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
                w = self.workers.get(worker_id(node, pid))
                if w is not None:
                    self._worker_exited(w, code)
