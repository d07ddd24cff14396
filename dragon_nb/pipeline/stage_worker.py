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
from dragon_nb.tunables import STAGE_POLL_MS
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S


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


CONTROL_TOPIC = b"pipe"      # the caller's control PUB: STOP and REWIRE under this topic
HANDLERS = P.Handlers("stage worker")
SOURCE_HANDLERS = P.Handlers("node source")


class _Links:
    """A sender's link watches (its data links, its report link) and what it tells
    the caller of them: which were cut and dialled again. The batches on a data
    link are lost, and only the caller knows which those were. A report sent on
    the report link as it was cut is lost too, so its redial is reported in turn,
    saying how many data links had been cut by then (the caller feeds in again
    once more; with a node source, it stops if any had)."""

    def __init__(self, report: P.Channel, stage: int, data, report_watch):
        self.report, self.stage = report, stage
        self.data = [w for w in data if w is not None]
        self.report_watch = report_watch

    def check(self) -> bool:
        """Report what was cut since the last look; -> was the report link redialled."""
        for watch in self.data:
            for endpoint in watch.poll():
                self.report.send(P.PIPE_LINK, {"stage": self.stage, "to": endpoint})
        redialled = False
        for endpoint in self.report_watch.poll() if self.report_watch is not None else ():
            redialled = True
            self.report.send(P.PIPE_LINK, {"stage": self.stage, "to": endpoint,
                                           "report": True,
                                           "cut": sum(w.redials for w in self.data)})
        return redialled

    @property
    def watches(self):
        return self.data + ([self.report_watch] if self.report_watch is not None else [])

    def close(self) -> None:
        for watch in self.watches:
            watch.close()


def _report_channel(zctx, net, spec) -> tuple:
    """The DEALER to the caller's report ROUTER, and (on TCP) its link watch."""
    sock = zctx.socket(zmq.DEALER)
    watch = net.watch_links(sock)
    net.connect(sock, spec["report"])
    return P.Channel(sock, net.codec()), watch


def _control_channel(zctx, net, spec) -> P.Channel:
    sock = zctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, CONTROL_TOPIC)
    net.connect(sock, spec["control"])
    return P.Channel(sock, net.codec(), subscribed=True)


def _obey(control: P.Channel, dispatch) -> bool:
    """Read the caller's word (a ``Handlers`` table); -> True if told to stop."""
    try:
        for _topic, kind, body, _ in control.drain():
            try:
                dispatch(kind, body)
            except (P.UnknownMessage, KeyError, TypeError):
                continue             # not for us, or not as the caller writes it
    except _Stop:
        return True
    return False


class StageWorker:
    def __init__(self, spec: dict, ctx):
        self.spec, self.ctx = spec, ctx
        self.zctx = zmq.Context()
        net = ctx.network
        self.control = _control_channel(self.zctx, net, spec)
        self.dispatch = HANDLERS.bind(self)
        self.push, self.redials = _connect_push(self.zctx, net, spec)
        self.pull = P.Channel(self.zctx.socket(zmq.PULL), net.codec())
        self.pull.sock.setsockopt(zmq.RCVHWM, spec["hwm"])
        address = bind_receiver(net, self.pull.sock, spec["input"])
        self.report, report_watch = _report_channel(self.zctx, net, spec)
        self.links = _Links(self.report, spec["stage"], [self.redials], report_watch)
        self.report.send(P.BOUND, {"stage": spec["stage"], "index": spec["index"],
                                   "input": address})
        self.counters = ctx.counters
        self.items_in = self.items_out = 0

    def stopped(self) -> bool:
        """Read the caller's word: stop (True), or connect to a new worker of the next
        stage in place of one that died (``rewire``)."""
        return _obey(self.control, self.dispatch)

    @HANDLERS.on(P.EVT, P.Op.STOP)
    def _on_stop(self, body):
        raise _Stop()

    @HANDLERS.on(P.EVT, P.Op.REWIRE)
    def _on_rewire(self, body):
        if body.get("stage") != self.spec["stage"] + 1:
            return                       # for another stage's senders
        try:
            self.push.sock.disconnect(body["old"])
        except zmq.ZMQError:
            pass
        connect_sender(self.ctx.network, self.push.sock, body["new"])

    def send(self, body, buffers) -> None:
        """Blocking send downstream (that is the backpressure), but stoppable."""
        while not self.push.poll(STAGE_POLL_MS, zmq.POLLOUT):
            if self.stopped():
                raise _Stop()
            self.links.check()
        self.push.send(P.PIPE_ITEMS, body, buffers)

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
        return body, [data, *obufs]

    def run(self) -> int:
        self.func = S.loads_function(self.spec["func"])
        self.into = S.loads(self.spec["into"]) if self.spec.get("into") else None
        self.key = S.loads(self.spec["key"]) if self.spec.get("key") else (lambda i, v: i)
        poller = zmq.Poller()
        poller.register(self.pull.sock, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        for watch in self.links.watches:
            poller.register(watch.watch, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if self.control.sock in events and self.stopped():
                    return 0
                self.links.check()
                if self.pull.sock in events:
                    try:
                        _, kind, body, rest = self.pull.recv()
                    except P.ProtocolError:
                        continue
                    if kind != P.PIPE_ITEMS or not rest or not _is_batch(body):
                        continue
                    self.send(*self.process(body, rest[0], rest[1:]))
        except _Stop:
            return 0
        finally:
            self.links.close()
            for chan in (self.pull, self.push, self.control):
                chan.close(linger=0)
            self.report.close(linger=1000)
            self.zctx.term()


def _is_batch(body) -> bool:
    """A batch header as the caller writes it: {"seq": int, "start": int}."""
    return isinstance(body, dict) and isinstance(body.get("seq"), int) and \
        isinstance(body.get("start"), int)


def bind_receiver(net, sock: zmq.Socket, name: str) -> str:
    """``net.bind`` for a PULL whose reader may fall behind (a stage's input, the
    caller's sink): no heartbeats on a data link (see ``Network._common``: libzmq
    aborts a process whose stopped input a heartbeat times out); -> its address."""
    return net.bind(sock, name, heartbeats=False)


def connect_sender(net, sock: zmq.Socket, address: str) -> zmq.Socket:
    """``net.connect`` for a PUSH into a receiver that may stall: no heartbeats
    either (a stalled receiver would miss them and the link be cut under it)."""
    return net.connect(sock, address, heartbeats=False)


def _connect_push(zctx, net, spec):
    """Where this process sends: every worker of the next stage (or the caller's
    sink); -> the channel, and on TCP the watch on its links."""
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, spec["hwm"])
    push.setsockopt(zmq.IMMEDIATE, 1)        # never queue for a worker that has gone
    redials = net.watch_links(push)
    for addr in spec["outputs"]:
        connect_sender(net, push, addr)
    return P.Channel(push, net.codec()), redials


def main(spec_bytes: bytes, ctx) -> int:
    spec = S.loads(spec_bytes)
    adopt_caller_environment(spec)
    return StageWorker(spec, ctx).run()


class NodeSourceRunner:
    """A generator run on a node, its items pushed into the pipeline in batches.

    Nothing here keeps what was sent: a batch lost on a cut link cannot be sent
    again, so the caller is told of every cut (and stops the pipeline)."""

    def __init__(self, spec: dict, ctx):
        self.spec, self.ctx = spec, ctx
        self.zctx = zmq.Context()
        net = ctx.network
        self.push, redials = _connect_push(self.zctx, net, spec)
        self.report, report_watch = _report_channel(self.zctx, net, spec)
        self.links = _Links(self.report, -1, [redials], report_watch)
        self.control = _control_channel(self.zctx, net, spec)
        self.dispatch = SOURCE_HANDLERS.bind(self)
        self.seq = self.count = 0

    @SOURCE_HANDLERS.on(P.EVT, P.Op.STOP)
    def _on_stop(self, body):
        raise _Stop()

    def flush(self, batch: list) -> None:
        data, bufs = S.dumps_work((batch, {}))
        while not self.push.poll(STAGE_POLL_MS, zmq.POLLOUT):
            if _obey(self.control, self.dispatch):
                raise _Stop()
            self.links.check()
        self.push.send(P.PIPE_ITEMS, {"seq": self.seq, "start": self.count - len(batch)},
                       [data, *bufs])
        self.links.check()
        self.ctx.counters.set(DONE, self.count)
        self.ctx.counters.publish()
        self.seq += 1

    def run(self) -> int:
        gen_func, args = S.loads(self.spec["source"])
        size = self.spec["batch"]
        batch, error = [], None
        try:
            try:
                for item in gen_func(*args):
                    batch.append(item)
                    self.count += 1
                    if len(batch) >= size:
                        self.flush(batch)
                        batch = []
            except _Stop:
                raise
            except Exception as e:
                error = StageFailure(-1, getattr(gen_func, "__qualname__", "source"),
                                     self.count, self.ctx.node, e)
            if batch:
                self.flush(batch)
            end = S.dumps_result(error)[0]
            self.send_end(end)
            while not self.control.poll(1000) or not _obey(self.control, self.dispatch):
                if self.links.check():        # the end may have been lost on the cut
                    self.send_end(end)        # report link: again (encoded again)
            return 0
        except _Stop:
            return 0
        finally:
            self.links.close()
            for chan in (self.push, self.report, self.control):
                chan.close(linger=1000)
            self.zctx.term()

    def send_end(self, error_bytes) -> None:
        self.report.send(P.PIPE_END, {"batches": self.seq, "items": self.count},
                         [error_bytes])


def source_main(spec_bytes: bytes, ctx) -> int:
    """Run a generator on this node and push its items into the pipeline."""
    spec = S.loads(spec_bytes)
    adopt_caller_environment(spec)
    return NodeSourceRunner(spec, ctx).run()
