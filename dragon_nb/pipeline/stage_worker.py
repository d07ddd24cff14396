"""A pipeline stage process: pull batches from upstream, apply the stage's
function to each item, push the results downstream.

Stages are wired worker-to-worker with PUSH/PULL sockets: each worker binds
its own input (and tells the caller where, BOUND) and connects to every
worker of the next stage, so items never pass through the caller between
stages, and a stranger who reaches a bound socket can offer items (dropped
unless signed) but never take one. The sockets' high-water marks
bound every queue: a slow stage blocks its upstream, and so on back to the
source. A failing item becomes an error record that later stages pass
through untouched, so the caller can raise it at its position.

Entry points (started by node agents): ``main`` for a stage worker,
``source_main`` for a generator run on a node.
"""
from __future__ import annotations

import multiprocessing.pool as mpp

import zmq

from dragon_nb.runtime.counters import DONE, ITEMS, RUNNING
from dragon_nb.runtime.launch import adopt_caller_environment
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S
from dragon_nb.tunables import STAGE_POLL_MS



class StageFailure:
    """An item's error, travelling downstream in place of its value."""

    def __init__(self, stage: int, name: str, position: int, node: int, exc: BaseException):
        self.stage, self.name, self.position, self.node = stage, name, position, node
        self.exc = exc

    def __reduce__(self):        # the exception travels with its remote traceback
        wrapped = mpp.ExceptionWithTraceback(self.exc, self.exc.__traceback__)
        return _rebuild_failure, (self.stage, self.name, self.position, self.node, wrapped)


def _rebuild_failure(stage, name, position, node, exc):
    f = StageFailure.__new__(StageFailure)
    f.stage, f.name, f.position, f.node, f.exc = stage, name, position, node, exc
    return f


class _Stop(Exception):
    pass


class StageWorker:
    def __init__(self, spec: dict, ctx):
        self.spec, self.ctx = spec, ctx
        self.zctx = zmq.Context()
        net = ctx.network
        self.codec = net.codec()
        self.control = self.zctx.socket(zmq.SUB)
        self.control.setsockopt(zmq.SUBSCRIBE, b"")
        net.connect(self.control, spec["control"])
        self.push, self.redials = _connect_push(self.zctx, net, spec)
        self.pull = self.zctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, spec["hwm"])
        address = net.bind(self.pull, spec["input"])
        self.report = self.zctx.socket(zmq.DEALER)
        self.report_redials = net.watch_links(self.report)
        net.connect(self.report, spec["report"])
        self.report.send_multipart(self.codec.encode(P.BOUND, {
            "stage": spec["stage"], "index": spec["index"], "input": address}))
        self.counters = ctx.counters
        self.items_in = self.items_out = 0

    def stopped(self) -> bool:
        """Read the caller's word: stop (True), or connect to a new worker of the next
        stage in place of one that died (``rewire``)."""
        while self.control.poll(0):
            try:
                _, body, _ = self.codec.decode(self.control.recv_multipart())
            except P.ProtocolError:
                continue
            if not isinstance(body, dict) or body.get("op") == "stop":
                return True
            if body.get("op") == "rewire" and body.get("stage") == self.spec["stage"] + 1:
                try:
                    self.push.disconnect(body["old"])
                except zmq.ZMQError:
                    pass
                self.ctx.network.connect(self.push, body["new"])
        return False

    def send(self, frames) -> None:
        """Blocking send downstream (that is the backpressure), but stoppable."""
        while not self.push.poll(STAGE_POLL_MS, zmq.POLLOUT):
            if self.stopped():
                raise _Stop()
            self.report_links()
        self.push.send_multipart(frames, copy=False)

    def report_links(self) -> None:
        _report_redials((self.redials, self.report_redials), self.report, self.codec,
                        self.spec["stage"])

    def process(self, body, payload, bufs):
        func, stage, name = self.func, self.spec["stage"], self.spec["name"]
        values, failures = S.loads(payload, bufs)
        start = body["start"]
        out = []
        self.items_in += len(values)
        self.counters.set(ITEMS, self.items_in)   # in: counted on arrival
        self.counters.set(RUNNING, len(values))
        self.counters.publish()
        for i, value in enumerate(values):
            if i in failures:
                out.append(None)
                continue
            try:
                out.append(func(value))
            except Exception as e:
                failures[i] = StageFailure(stage, name, start + i, self.ctx.node, e)
                out.append(None)
        into = self.into
        if into is not None:           # the last stage stores results where they belong
            for i, value in enumerate(out):
                if i not in failures:
                    try:           # a full DDict, say: that item's error, at its position
                        into[self.key(start + i, value)] = value
                    except Exception as e:
                        failures[i] = StageFailure(stage, name, start + i, self.ctx.node, e)
            out = [None] * len(out)
        self.items_out += len(values)
        self.counters.set(DONE, self.items_out)
        self.counters.set(RUNNING, 0)
        self.counters.publish()
        data, obufs = S.dumps_result((out, failures))
        return self.codec.encode(P.PIPE_ITEMS, body, [data, *obufs])

    def run(self) -> int:
        self.func = S.loads_function(self.spec["func"])
        self.into = S.loads(self.spec["into"]) if self.spec.get("into") else None
        self.key = S.loads(self.spec["key"]) if self.spec.get("key") else (lambda i, v: i)
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        if self.redials is not None:
            poller.register(self.redials.watch, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if self.control in events and self.stopped():
                    return 0
                self.report_links()
                if self.pull in events:
                    frames = self.pull.recv_multipart(copy=False)
                    try:
                        kind, body, rest = self.codec.decode(frames)
                    except P.ProtocolError:
                        continue
                    if kind != P.PIPE_ITEMS or not rest or not _is_batch(body):
                        continue
                    self.send(self.process(body, rest[0], rest[1:]))
        except _Stop:
            return 0
        finally:
            for watcher in (self.redials, self.report_redials):
                if watcher is not None:
                    watcher.close()
            for s in (self.pull, self.push, self.control):
                s.close(linger=0)
            self.report.close(linger=1000)
            self.zctx.term()


def _is_batch(body) -> bool:
    """A batch header as the caller writes it: {"seq": int, "start": int}."""
    return isinstance(body, dict) and isinstance(body.get("seq"), int) and \
        isinstance(body.get("start"), int)


def _connect_push(zctx, net, spec):
    """Where this process sends: every worker of the next stage (or the caller's
    sink); -> the socket, and on TCP the watch on its links."""
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, spec["hwm"])
    push.setsockopt(zmq.IMMEDIATE, 1)        # never queue for a worker that has gone
    redials = net.watch_links(push)
    for addr in spec["outputs"]:
        net.connect(push, addr)
    return push, redials


def _report_redials(watchers, report, codec, stage: int) -> None:
    """Tell the caller which of our links were cut and dialled again: the batches
    on them are lost, and only the caller knows which those were. The report link
    itself is watched too: a report sent on it as it was cut is lost, so its
    redial is reported in turn (the caller feeds in again once more)."""
    for redials in watchers:
        for endpoint in redials.poll() if redials is not None else ():
            report.send_multipart(codec.encode(P.PIPE_LINK, {"stage": stage,
                                                             "to": endpoint}))


def main(spec_bytes: bytes, ctx) -> int:
    spec = S.loads(spec_bytes)
    adopt_caller_environment(spec)
    return StageWorker(spec, ctx).run()


def source_main(spec_bytes: bytes, ctx) -> int:
    """Run a generator on this node and push its items into the pipeline."""
    spec = S.loads(spec_bytes)
    adopt_caller_environment(spec)
    gen_func, args = S.loads(spec["source"])
    zctx = zmq.Context()
    net = ctx.network
    push, redials = _connect_push(zctx, net, spec)
    report = zctx.socket(zmq.DEALER)
    report_redials = net.watch_links(report)
    net.connect(report, spec["report"])
    watchers = (redials, report_redials)
    control = zctx.socket(zmq.SUB)
    control.setsockopt(zmq.SUBSCRIBE, b"")
    net.connect(control, spec["control"])
    codec = net.codec()
    batch, seq, count, error = [], 0, 0, None
    size = spec["batch"]

    def flush():
        nonlocal batch, seq
        data, bufs = S.dumps_work((batch, {}))
        frames = codec.encode(P.PIPE_ITEMS, {"seq": seq, "start": count - len(batch)},
                              [data, *bufs])
        while not push.poll(STAGE_POLL_MS, zmq.POLLOUT):
            if control.poll(0):
                raise _Stop()
            _report_redials(watchers, report, codec, -1)
        push.send_multipart(frames, copy=False)
        _report_redials(watchers, report, codec, -1)
        ctx.counters.set(DONE, count)
        ctx.counters.publish()
        batch, seq = [], seq + 1

    try:
        try:
            for item in gen_func(*args):
                batch.append(item)
                count += 1
                if len(batch) >= size:
                    flush()
        except _Stop:
            raise
        except Exception as e:
            error = StageFailure(-1, getattr(gen_func, "__qualname__", "source"), count,
                                 ctx.node, e)
        if batch:
            flush()
        end = codec.encode(P.PIPE_END, {"batches": seq, "items": count},
                           [S.dumps_result(error)[0]])
        report.send_multipart(end)
        while not control.poll(1000):        # wait to be told to stop
            if report_redials is not None and report_redials.poll():
                report.send_multipart(end)   # it may have been lost on the cut link
            _report_redials(watchers, report, codec, -1)
        return 0
    except _Stop:
        return 0
    finally:
        for watcher in watchers:
            if watcher is not None:
                watcher.close()
        for s in (push, report, control):
            s.close(linger=1000)
        zctx.term()
