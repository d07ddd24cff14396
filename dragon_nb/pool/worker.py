"""A Pool worker: runs in a process forked by a node agent.

It connects straight to its pool's task endpoint in the caller, runs the
initializer once, then executes the chunks the pool sends (several per
message) and returns results in batches, so ``chunksize=1`` does not cost a
round trip per item. ``SIGUSR1`` means "look at your mailbox": if the chunk
being run belongs to a cancelled job, it is interrupted.

Entry point: ``main(spec, ctx)``, started by the agent.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import multiprocessing.pool as mpp
import multiprocessing.process as mpproc
import os
import signal
import sys
import time
import traceback

import zmq

from dragon_nb import mp_compat
from dragon_nb.errors import TaskExitError
from dragon_nb.forwarding import ForwardedStream
from dragon_nb.runtime.counters import BUSY_US, DONE, QDEPTH, RUNNING
from dragon_nb.runtime.client import attach_here
from dragon_nb.runtime.launch import adopt_caller_environment
from dragon_nb.tunables import FLUSH_EVERY_S, IDLE_POLL_MS, OUTPUT_FLUSH_S
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

APPLY, MAP, STARMAP = 0, 1, 2
FLUSH_BYTES = 1 << 20
FUNC_CACHE = 256
OUTPUT_FLUSH_BYTES = 8192
OUTPUT_RATE = 64 * 1024        # bytes per second a worker may print; the rest is dropped

HANDLERS = P.Handlers("pool worker")     # pool -> worker: handler(body, bufs)


class TaskCancelled(BaseException):
    """Raised inside a running task whose job was cancelled by the caller."""


class _Unloadable:
    """Stands in for a function that could not be unpickled here (say, its
    module is not importable on this node): running it raises that error."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


class WorkerProcess(mpproc.BaseProcess):
    """What ``current_process()`` returns in a worker: one object for its life,
    so attributes such as ``stash`` set by an initializer persist between tasks."""

    def __init__(self, name: str, identity: tuple, node: int):   # no BaseProcess.__init__:
        self._identity = identity                                 # nothing to start
        self._name = name
        self._parent_pid = None
        self._parent_name = None
        self._popen = None
        self._closed = False
        self._target, self._args, self._kwargs = None, (), {}
        self._config = {"authkey": mpproc.AuthenticationString(os.urandom(32)),
                        "semprefix": "/mp"}
        self.node = node


def _run_chunk(func, mode, payload, start):
    if mode == APPLY:
        args, kwargs = payload
        return func(*args, **kwargs)
    out = []
    for i, item in enumerate(payload):
        try:
            out.append(func(item) if mode == MAP else func(*item))
        except Exception as e:      # name the item (TaskCancelled is not an Exception)
            if hasattr(e, "add_note"):
                name = getattr(func, "__qualname__", None) or repr(func)
                e.add_note(f"dragon-nb: raised by {name}() on input item {start + i}")
            raise
    return out


class Worker:
    def __init__(self, spec: dict, ctx):
        self.spec = spec
        self.ctx = ctx
        self.node = ctx.node
        self.counters = ctx.counters
        self.wid = f"w{ctx.node}-{os.getpid()}".encode()
        self.zctx = zmq.Context()
        net = ctx.network
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.wid)
        sock.setsockopt(zmq.LINGER, 2000)
        # on TCP, zmq may drop a connection and dial it again: the pool then has to
        # hear hello again, or it waits for results of tasks that were lost on the way
        self.redials = net.watch_links(sock)
        net.connect(sock, spec["address"])
        self.chan = P.Channel(sock, net.codec())
        self.queue: collections.deque = collections.deque()
        self.funcs: collections.OrderedDict = collections.OrderedDict()
        self.cancelled: set = set()
        self.out: list = []
        self.out_bufs: list = []
        self.out_bytes = 0
        self.last_flush = time.monotonic()
        self.stopping = False
        self.in_user_code = False
        self.current_job = None
        self.signalled = False
        self.signals = 0               # cancel signals received
        self.cancels = 0               # CANCEL messages received
        self.maxtasks = spec.get("maxtasks")
        self.completed = 0
        self.last_job = None
        self.printed: list = []          # (job, stream, text) waiting to be sent
        self.printed_bytes = 0
        self.dropped = 0
        self.budget = float(OUTPUT_RATE)
        self.budget_at = time.monotonic()
        self.last_output = time.monotonic()
        self.main_thread = threading.main_thread()
        self.dispatch = HANDLERS.bind(self)

    # -- mailbox ---------------------------------------------------------------
    def drain(self, block_ms: int = 0) -> None:
        """Read every waiting message (waiting up to ``block_ms`` for the first)."""
        if self.redials is not None:
            self.watch_connection()
        if block_ms and not self.chan.poll(block_ms):
            return
        while True:
            try:
                _, kind, body, bufs = self.chan.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except P.ProtocolError:
                continue
            try:
                self.dispatch(kind, body, bufs)
            except P.UnknownMessage:
                continue

    @HANDLERS.on(P.TASKS)
    def on_tasks(self, body, bufs) -> None:
        for fid, blob in body.get("funcs", {}).items():
            try:
                self.funcs[fid] = S.loads_function(blob)
            except Exception as e:
                self.funcs[fid] = _Unloadable(e)
            if len(self.funcs) > FUNC_CACHE:
                self.funcs.popitem(last=False)
        pos = 0
        for job, idx, mode, fid, payload, nbufs, start in body["tasks"]:
            self.queue.append((job, idx, mode, fid, payload, bufs[pos:pos + nbufs], start))
            pos += nbufs

    @HANDLERS.on(P.CANCEL)
    def on_cancel(self, body, bufs) -> None:
        self.cancels += 1
        jobs = set(body["jobs"])
        self.cancelled |= jobs
        kept = collections.deque(t for t in self.queue if t[0] not in jobs)
        self.completed += len(self.queue) - len(kept)   # dropped tasks count
        self.queue = kept

    @HANDLERS.on(P.STOP)
    def on_stop(self, body, bufs) -> None:
        self.stopping = True

    def watch_connection(self) -> None:
        if self.redials.poll():               # a redial: say hello again
            self.chan.send(P.HELLO, {"wid": self.wid, "pid": os.getpid(),
                                     "node": self.node, "again": True})

    def catch_up(self) -> None:
        """After a cancel signal, read the mailbox until its CANCEL message is in.

        The pool sends the message before the signal, but the signal can
        overtake it; wait for it, briefly."""
        self.signalled = False
        deadline = time.monotonic() + 0.5
        self.drain()
        while self.cancels < self.signals and time.monotonic() < deadline:
            self.drain(block_ms=20)

    def on_signal(self, signum, frame):
        self.signals += 1
        self.signalled = True
        if self.in_user_code and not self.sending:   # never in the middle of a send
            self.catch_up()
            if self.current_job in self.cancelled:
                raise TaskCancelled()

    # -- output -------------------------------------------------------------------
    def output(self, stream: str, text: str) -> None:
        now = time.monotonic()
        self.budget = min(OUTPUT_RATE, self.budget + (now - self.budget_at) * OUTPUT_RATE)
        self.budget_at = now
        if len(text) > self.budget:       # a flood: keep the page responsive, count the rest
            self.dropped += len(text)
            return
        self.budget -= len(text)
        self.printed.append((self.current_job if self.current_job is not None else
                             self.last_job, stream, text))
        self.printed_bytes += len(text)
        # only the main thread touches the socket; other threads' prints wait for it
        if threading.current_thread() is self.main_thread and not self.sending and (
                self.printed_bytes >= OUTPUT_FLUSH_BYTES
                or (now - self.last_output >= OUTPUT_FLUSH_S and text.endswith("\n"))):
            self.flush_output()

    sending = False

    def flush_output(self) -> None:
        if not self.printed and not self.dropped:
            return
        lines, self.printed, self.printed_bytes = self.printed, [], 0
        dropped, self.dropped = self.dropped, 0
        self.sending = True
        try:
            self.chan.send(P.OUTPUT, {"lines": lines, "dropped": dropped})
        finally:
            self.sending = False
        self.last_output = time.monotonic()

    # -- results ------------------------------------------------------------------
    def add_result(self, job, idx, ok, value, dt):
        try:
            data, bufs = S.dumps_result(value)
        except Exception as e:
            ok = False
            data, bufs = S.dumps_result(mpp.MaybeEncodingError(e, value))
        self.out.append((job, idx, ok, data, len(bufs), dt))
        self.out_bufs.extend(bufs)
        self.out_bytes += len(data) + sum(b.raw().nbytes for b in bufs)

    def flush(self):
        self.flush_output()
        if self.out:
            self.sending = True
            try:
                self.chan.send(P.RESULTS, {"results": self.out}, buffers=self.out_bufs)
            finally:
                self.sending = False
            self.out, self.out_bufs, self.out_bytes = [], [], 0
        self.last_flush = time.monotonic()

    # -- main loop ----------------------------------------------------------------
    def run_initializer(self) -> bool:
        init = self.spec.get("initializer")
        if init is None:
            return True
        try:
            func, args = S.loads(init)
            func(*args)
            return True
        except BaseException as e:
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            self.chan.send(P.INIT_FAILED, {"error": tb, "pid": os.getpid(),
                                           "node": self.node, "summary": repr(e)})
            return False

    def execute(self, task):
        job, idx, mode, fid, payload, bufs, start = task
        func = self.funcs.get(fid)
        t0 = time.perf_counter()
        self.current_job = job
        self.counters.set(RUNNING, 1)
        self.counters.set(QDEPTH, len(self.queue))
        self.counters.publish()
        ok = True
        try:
            if func is None:
                raise RuntimeError(f"worker {self.wid.decode()} was sent a task for an "
                                   f"unknown function id {fid!r}")
            args = S.loads(payload, bufs)
            self.in_user_code = True
            if self.signalled:       # a cancel arrived while we were between tasks
                self.in_user_code = False
                self.catch_up()
                if job in self.cancelled:
                    raise TaskCancelled()
                self.in_user_code = True
            value = _run_chunk(func, mode, args, start)
            self.in_user_code = False
        except TaskCancelled:
            self.in_user_code = False
            self.current_job = None
            self.counters.set(RUNNING, 0)
            self.counters.publish()
            self.completed += 1
            return
        except BaseException as e:
            self.in_user_code = False
            if not isinstance(e, Exception):
                wrapped = TaskExitError(f"the task raised {e!r}")
                wrapped.__cause__ = e
                e = wrapped
            ok, value = False, mpp.ExceptionWithTraceback(e, e.__traceback__)
        dt = time.perf_counter() - t0
        self.last_job = job
        self.current_job = None
        n = len(args) if mode != APPLY and ok else 1
        self.counters.add(DONE, n)
        self.counters.add(BUSY_US, dt * 1e6)
        self.counters.set(RUNNING, 0)
        self.counters.publish()
        self.add_result(job, idx, ok, value, dt)
        self.completed += 1

    def run(self) -> int:
        if not self.run_initializer():
            self.flush()
            return 3
        self.chan.send(P.HELLO, {"wid": self.wid, "pid": os.getpid(), "node": self.node})
        while True:
            if self.maxtasks and self.completed >= self.maxtasks:
                self.flush()
                return 0
            if not self.queue:
                self.flush()
                if self.stopping:
                    return 0
                self.drain(IDLE_POLL_MS)
                continue
            if self.signalled:
                self.catch_up()
                if not self.queue:
                    continue
            self.execute(self.queue.popleft())
            now = time.monotonic()
            if now - self.last_flush >= FLUSH_EVERY_S or self.out_bytes >= FLUSH_BYTES:
                self.flush()
                self.drain()

    def close(self):
        if self.redials is not None:
            self.redials.close()
        self.chan.close(linger=2000)
        self.zctx.term()


def main(spec_bytes: bytes, ctx) -> int:
    spec = S.loads(spec_bytes)
    adopt_caller_environment(spec)
    os.environ["DRAGON_NB_NODE"] = str(ctx.node)       # where it runs, for the user's code
    attach_here(ctx.head, ctx.network)       # its tasks may start processes and pools
    mp_compat.select_here()
    name = f"DragonPoolWorker-{ctx.node}-{os.getpid()}"
    mpproc._current_process = WorkerProcess(name, (ctx.node, ctx.index + 1), ctx.node)
    worker = Worker(spec, ctx)
    signal.signal(signal.SIGUSR1, worker.on_signal)
    sys.stdout = ForwardedStream(worker.output, "stdout")
    sys.stderr = ForwardedStream(worker.output, "stderr")
    try:
        return worker.run()
    finally:
        try:
            worker.flush()
            handles = sys.modules.get("dragon_nb.mp.link")
            if handles is not None:          # tasks had queues, locks or values
                handles.release_all()
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            worker.close()


def func_id(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=12).hexdigest()
