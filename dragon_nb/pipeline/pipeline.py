"""``Pipeline``: stages connected worker to worker, the caller only at the ends.

    with Pipeline(reader, stage(generate_data, workers=2),
                  stage(process_data, workers=4, nodes=[1, 2])) as pipe:
        for item in pipe:
            ...

The caller pushes the source's items (an iterable here, or ``on_node(gen)``
to run a generator on a node) and pulls the last stage's results; between
stages, items go from worker to worker. Every queue is bounded (socket
high-water marks), so a slow stage slows the source and nothing piles up.
Items are batched on the wire, the batch growing with the measured rate.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from dragon_nb import checks
from dragon_nb.checks import is_int, node_ids, positive_int
from dragon_nb.errors import PipelineError
from dragon_nb.pipeline.feeder import Feeder
from dragon_nb.pipeline.ledger import Ledger, TooManyRetries
from dragon_nb.pipeline.stage_worker import CONTROL_TOPIC, bind_receiver, connect_sender
from dragon_nb.runtime import liveness
from dragon_nb.runtime.client import (Runtime, drain_events, exit_reason, get_runtime,
                                      register_entry_module, zmq_context)
from dragon_nb.runtime.launch import caller_environment
from dragon_nb.tunables import CLOSE_GRACE_S, LINK_REFEEDS
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

register_entry_module("dragon_nb.pipeline.stage_worker")

STAGE_ENTRY = "dragon_nb.pipeline.stage_worker:main"
SOURCE_ENTRY = "dragon_nb.pipeline.stage_worker:source_main"
log = logging.getLogger("dragon_nb.pipeline")

# What the caller reads on its report socket (workers and a node source -> caller).
REPORTS = P.Handlers("pipeline caller")


@dataclass
class Stage:
    func: object
    workers: int = 1
    nodes: list | None = None
    name: str = ""


def stage(func, workers: int = 1, nodes=None) -> Stage:
    """One step of a pipeline: ``func`` applied to every item by ``workers`` processes."""
    if not callable(func):
        raise TypeError(f"a stage needs a callable, not {func!r}")
    workers = checks.count("workers", workers)     # a ValueError either way, as it has been
    return Stage(func, workers, node_ids(nodes), getattr(func, "__qualname__", repr(func)))


@dataclass
class NodeSource:
    func: object
    args: tuple = ()
    node: int | None = None
    batch: int = 16
    name: str = field(default="")


def on_node(gen_func, *args, node: int | None = None, batch: int = 16) -> NodeSource:
    """A source run on a node: ``gen_func(*args)`` is iterated there, not in the caller."""
    if not callable(gen_func):
        raise TypeError(f"on_node needs a generator function, not {gen_func!r}")
    if node is not None and not is_int(node):      # a node id, not a count: no checks helper
        raise TypeError(f"node must be a node id (int) or None, not {node!r}")
    batch = positive_int("batch", batch)
    return NodeSource(gen_func, args, node, batch, getattr(gen_func, "__qualname__", "source"))


def _raise_failure(failure):
    exc = failure.exc
    where = "the source" if failure.stage < 0 else f"stage {failure.stage} ({failure.name})"
    msg = f"dragon-nb: {where} on node {failure.node} failed on item {failure.position}"
    if hasattr(exc, "add_note"):
        exc.add_note(msg)
    raise exc


class Pipeline:
    """An iterator over the results of ``stages`` applied in turn to ``source``.

    ``ordered``: results in input order (default) or as they come.
    ``into``: a mapping handle (e.g. a DDict) the last stage stores results in,
    keyed by ``key(position, value)`` (default: the position); then iterating
    yields nothing and ``run()`` returns the number of items.
    ``queue_depth``: batches each link may hold.
    ``task_retries``: a stage worker that dies is replaced and the batches in
    flight are fed in again, each at most this many times (a source run on a node
    cannot be fed again: there a dead worker stops the pipeline, and so does a cut
    TCP link, which may have lost items).
    """

    def __init__(self, source, *stages: Stage, ordered: bool = True, into=None, key=None,
                 queue_depth: int = 4, runtime=None, task_retries: int = 1):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        for st in stages:
            if not isinstance(st, Stage):
                raise TypeError(f"pipeline stages are made with stage(func, ...), not {st!r}")
        if not isinstance(source, NodeSource) and not (hasattr(source, "__iter__") or
                                                       hasattr(source, "__getitem__")):
            raise TypeError(f"the source must be an iterable or on_node(gen_func, ...), "
                            f"not {source!r}")
        if into is not None and not hasattr(into, "__setitem__"):
            raise TypeError(f"into must be a mapping (such as a DDict) that results are "
                            f"stored in, not {into!r}")
        checks.callable_or_none("key (a function key(position, value))", key)
        queue_depth = positive_int("queue_depth", queue_depth)
        task_retries = checks.non_negative_int("task_retries", task_retries)
        checks.instance_or_none("runtime", runtime, Runtime, "a dragon_nb.Runtime")
        self.runtime = runtime or get_runtime()
        self.stages = stages
        self.ordered = ordered
        self.owner = f"pipe-{uuid.uuid4().hex[:10]}"
        self.hwm = queue_depth
        net = self.runtime.network
        ctx = zmq_context()
        self._closed = False
        self._lock = threading.Lock()
        self.control = P.Channel(ctx.socket(zmq.PUB), net.codec())
        control = net.bind(self.control.sock, f"{self.owner}-ctl")
        self.exits = self.runtime.subscribe(P.TOPIC_EXIT + self.owner.encode())
        # workers bind their outputs where they run and say where on the report socket
        self.report = P.Channel(ctx.socket(zmq.ROUTER), net.codec(), routed=True)
        report = net.bind(self.report.sock, f"{self.owner}-rep")
        self._reports = REPORTS.bind(self)
        self._announced: dict[tuple, str] = {}      # (stage, place) -> input, from BOUND
        self._cuts: list = []                       # PIPE_LINK reports not yet acted on
        self.procs: list = []                       # (stage index, node, pid)
        self.refs: dict[tuple, liveness.ProcessRef] = {}   # (node, pid) -> how to reach it
        self.worker_index: dict[tuple, int] = {}    # (node, pid) -> its place in its stage
        env = caller_environment()
        common = {**env, "control": control, "report": report, "hwm": self.hwm}
        self.ledger = None if isinstance(source, NodeSource) else \
            Ledger(task_retries, LINK_REFEEDS)
        self._end = None                            # a node source's (batches, failure)
        self._rate = 0.0
        self.feeder = None
        # Built from the sink back to the source: every process binds where it
        # *receives* (a PULL) and connects where it sends, so a peer that reaches
        # a bound socket can offer items (signed, or dropped) but never take any.
        self.sink = P.Channel(ctx.socket(zmq.PULL), net.codec())
        self.sink.sock.setsockopt(zmq.RCVHWM, self.hwm)
        self.sink_address = bind_receiver(net, self.sink.sock, f"{self.owner}-sink")
        outputs = [self.sink_address]
        self.stage_specs: dict[int, dict] = {}       # stage -> what its workers are given
        self.next_index: dict[int, int] = {}         # stage -> the next worker's place
        self._bound: dict[tuple, str] = {}    # (stage, place) -> where that worker receives
        try:
            for k in reversed(range(len(stages))):
                st, last = stages[k], k == len(stages) - 1
                self.stage_specs[k] = {
                    **common, "stage": k, "name": st.name, "func": S.dumps_function(st.func),
                    "into": S.dumps_inline(into) if (last and into is not None) else None,
                    "key": S.dumps_inline(key) if (last and key is not None) else None}
                for i in range(st.workers):
                    self._start_worker(k, i, outputs)
                self.next_index[k] = st.workers
                found = self._inputs(k, range(st.workers))
                self._bound.update(((k, i), a) for i, a in found.items())
                outputs = self.stage_inputs[k]
            if isinstance(source, NodeSource):
                spec = {**common, "source": S.dumps_inline((source.func, source.args)),
                        "outputs": outputs, "batch": source.batch}
                self._spawn(SOURCE_ENTRY, spec, -1,
                            [source.node] if source.node is not None else None)
            else:
                push = ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.SNDHWM, self.hwm)
                push.setsockopt(zmq.IMMEDIATE, 1)   # never to a dead worker
                watch = net.watch_links(push)
                self.feeder = Feeder(self.owner, P.Channel(push, net.codec()), self.ledger,
                                     watch, rate=lambda: self._rate,
                                     alive=lambda: self.runtime.alive,
                                     connect=lambda sock, addr: connect_sender(net, sock, addr),
                                     describe=self._describe)
                for addr in outputs:
                    connect_sender(net, push, addr)
                it = iter(source)
        except BaseException:
            self.close()
            raise
        self._pending: dict = {}          # seq -> (start, values, failures), when ordered
        self._next_seq = 0
        self._received = 0
        self._current: list = []
        if self.feeder is not None:
            self.feeder.start(it)

    def _start_worker(self, k: int, index: int, outputs: list, nodes=None):
        st = self.stages[k]
        spec = {**self.stage_specs[k], "index": index, "outputs": outputs,
                "input": f"{self.owner}-s{k}-{index}"}
        if nodes is None and st.nodes:
            nodes = [st.nodes[index % len(st.nodes)]]
        for node, pid in self._spawn(STAGE_ENTRY, spec, k, nodes):
            self.worker_index[(node, pid)] = index

    def _inputs(self, stage_index: int, indexes, watch_exits: bool = True) -> dict:
        """Wait for workers of a stage to say where they bound their input -> {index: address}."""
        wanted = set(indexes)
        deadline = time.monotonic() + self.runtime.timeout
        while not all((stage_index, i) in self._announced for i in wanted):
            if time.monotonic() > deadline:
                raise PipelineError(f"stage {stage_index}'s workers did not start within "
                                    f"{self.runtime.timeout:g} s")
            if watch_exits and self.exits.poll(0):
                self._on_exit()
            if self.report.poll(100):
                self._read_reports()
        return {i: self._announced.pop((stage_index, i)) for i in wanted}

    # -- what workers and a node source report ------------------------------------------
    def _read_reports(self) -> None:
        for _ident, kind, body, rest in self.report.drain(limit=100):
            try:
                self._reports(kind, body, rest)
            except (P.UnknownMessage, KeyError, TypeError, ValueError):
                continue                 # not from one of ours (they would be signed)

    @REPORTS.on(P.BOUND)
    def _on_bound(self, body, rest) -> None:
        if isinstance(body["stage"], int) and isinstance(body["index"], int):
            self._announced[(body["stage"], body["index"])] = str(body["input"])

    @REPORTS.on(P.PIPE_END)
    def _on_end(self, body, rest) -> None:
        self._end = (int(body["batches"]), S.loads(rest[0]) if rest else None)

    @REPORTS.on(P.PIPE_LINK)
    def _on_link(self, body, rest) -> None:
        if isinstance(body, dict):      # acted on by _receive, not while a stage starts
            self._cuts.append(body)

    @property
    def stage_inputs(self) -> dict[int, list]:
        """Stage -> the addresses its live workers receive on."""
        out: dict[int, list] = {}
        for (k, _), address in sorted(self._bound.items()):
            out.setdefault(k, []).append(address)
        return out

    def _live(self, nodes):
        """A stage's pinned nodes that are still there (None: anywhere)."""
        if not nodes:
            return None
        live = {n["id"] for n in self.runtime.nodes(refresh=True) if n.get("alive", True)}
        left = [n for n in nodes if n in live]
        if not left:
            raise ValueError(f"the stage's nodes {list(nodes)} are all lost")
        return left

    def _spawn(self, entry, spec, stage_index, nodes) -> list:
        owner = f"{self.owner}.s{stage_index}" if stage_index >= 0 else f"{self.owner}.src"
        procs = self.runtime.spawn(entry, S.dumps_inline(spec), 1, owner, nodes=nodes)
        for node, pid in procs:
            self.procs.append((stage_index, node, pid))
        for ref in liveness.refs(self.runtime, procs):
            self.refs[ref.key] = ref
        return procs

    # -- cut links ------------------------------------------------------------------------
    def _act_on_cuts(self) -> None:
        while self._cuts:
            body = self._cuts.pop(0)
            stage = body.get("stage")
            sender = "the source" if stage == -1 else f"a stage {stage} worker"
            self._link_cut(sender, str(body.get("to")), body.get("report", False),
                           body.get("cut", 1))

    def _link_cut(self, sender: str, endpoint: str, report: bool = False,
                  cut: int = 1) -> None:
        """A TCP link was cut and dialled again. Into a stage (or the sink): the
        batches on it are lost, and the feeder sends again all that have not come
        out. ``report``: the sender's report link: a report sent on it may be lost
        (the feeder sends again once more); ``cut``: how many of the sender's data
        links had been cut by then."""
        if self.feeder is not None:
            try:
                self.feeder.link_cut(sender, endpoint)
            except PipelineError:
                self.close()
                raise
            return
        if report and not cut:   # a node source's pipeline: only a report may be lost,
            log.info("%s: %s's report link was cut and dialled again", self.owner, sender)
            return                 # and the only one that matters (its end) is sent again
        self.close()
        raise PipelineError(
            f"{sender}'s link to {self._describe(endpoint)} was cut and dialled again: "
            f"the items on it may have been lost, and a source run on a node cannot be "
            f"fed again, so the pipeline stops")

    def _describe(self, endpoint: str) -> str:
        """``endpoint`` as the stage worker (with its node) or the sink it reaches."""
        port = endpoint.rsplit(":", 1)[-1]
        if endpoint == self.sink_address or self.sink_address.endswith(":" + port):
            return f"the caller ({endpoint})"
        for (k, index), address in list(self._bound.items()):   # (the feeder asks too)
            if address == endpoint or address.endswith(":" + port):
                node = next((n for s, n, p in self.procs
                             if s == k and self.worker_index.get((n, p)) == index), "?")
                return (f"stage {k} ({self.stages[k].name}) worker {index} on node {node} "
                        f"({endpoint})")
        return endpoint

    @property
    def total_batches(self):
        """How many batches the source made, once it is done (None before)."""
        if self.feeder is not None:
            return self.feeder.total_batches
        return self._end[0] if self._end is not None else None

    @property
    def items_sent(self) -> int:
        return self.feeder.items_sent if self.feeder is not None else 0

    def _take_source_failure(self):
        """The source's own error (once), if it ended with one."""
        if self.feeder is not None:
            failure, self.feeder.failure = self.feeder.failure, None
        elif self._end is not None:
            failure, self._end = self._end[1], (self._end[0], None)
        else:
            failure = None
        return failure

    # -- results -----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        try:
            while True:
                if self._current:
                    kind, value = self._current.pop()
                    if kind:
                        return value
                    _raise_failure(value)
                if self._done():
                    failure = self._take_source_failure()
                    self.close()
                    if failure is not None:
                        _raise_failure(failure)
                    raise StopIteration
                self._receive()
        except KeyboardInterrupt:
            self.close()
            raise

    def _done(self) -> bool:
        if self.ordered:
            return self.total_batches is not None and self._next_seq >= self.total_batches
        return self.total_batches is not None and self._received >= self.total_batches

    def _take(self, start, values, failures):
        items = [(False, failures[i]) if i in failures else (True, v)
                 for i, v in enumerate(values)]
        items.reverse()                  # _current is popped from the end
        self._current = items
        self._rate_update(len(values))

    def _rate_update(self, n):
        now = time.monotonic()
        last = getattr(self, "_rate_at", None)
        if last is not None and now > last:
            inst = n / (now - last)
            self._rate = inst if self._rate == 0 else 0.8 * self._rate + 0.2 * inst
        self._rate_at = now

    def _receive(self):
        if self.ordered and self._next_seq in self._pending:
            self._take(*self._pending.pop(self._next_seq))
            self._next_seq += 1
            return
        poller = zmq.Poller()
        poller.register(self.sink.sock, zmq.POLLIN)
        poller.register(self.exits.sock, zmq.POLLIN)
        poller.register(self.report.sock, zmq.POLLIN)
        events = dict(poller.poll(500))
        if not events and not self.runtime.alive:     # no head left to report deaths
            self.close()
            raise PipelineError("the dragon-nb runtime stopped under the pipeline")
        if self.exits.sock in events:
            self._on_exit()
        if self.report.sock in events:
            self._read_reports()
        self._act_on_cuts()
        if self.feeder is not None and self.feeder.error is not None:
            self.close()                 # the feeder's own link kept being cut
            raise self.feeder.error
        if self.sink.sock in events:
            try:
                _, kind, body, rest = self.sink.recv()
            except P.ProtocolError:
                return
            if kind != P.PIPE_ITEMS or not rest or not isinstance(body, dict):
                return
            if self.ledger is not None and not self.ledger.arrived(body["seq"]):
                return                             # sent again, and both copies came out
            values, failures = S.loads(rest[0], rest[1:])
            self._received += 1
            if not self.ordered:
                self._take(body["start"], values, failures)
            elif body["seq"] == self._next_seq:
                self._take(body["start"], values, failures)
                self._next_seq += 1
            else:
                self._pending[body["seq"]] = (body["start"], values, failures)
        if self._closed:
            raise PipelineError("the pipeline was closed")

    def _on_exit(self):
        for body in drain_events(self.exits):
            for node, pid, code in body.get("procs", ()):
                k = next((k for k, n, p in self.procs if p == pid and n == node), None)
                if k is None:
                    continue
                name = "the source" if k < 0 else f"stage {k} ({self.stages[k].name})"
                what = f"{name}: worker pid {pid} on node {node} {exit_reason(code)}"
                if k < 0 or self.ledger is None:
                    self.close()
                    raise PipelineError(f"{what}; a source run on a node cannot be fed "
                                        f"again, so the pipeline stops")
                try:
                    self._replace(k, node, pid)
                except PipelineError as e:
                    self.close()
                    raise PipelineError(f"{what}; {e}") from None

    def _replace(self, k: int, node: int, pid: int) -> None:
        """A worker of stage ``k`` died: start another, point stage k-1 (or the
        feeder) at it, and feed in again every batch that had not come out."""
        self.procs.remove((k, node, pid))
        self.refs.pop((node, pid), None)
        old = self._bound.pop((k, self.worker_index.pop((node, pid))))
        new_index = self.next_index[k]
        self.next_index[k] += 1
        outputs = self.stage_inputs.get(k + 1, [self.sink_address])
        try:
            self._start_worker(k, new_index, outputs, nodes=self._live(self.stages[k].nodes))
            new = self._inputs(k, [new_index], watch_exits=False)[new_index]
        except (RuntimeError, ValueError) as e:
            raise PipelineError(f"no replacement could start: {e}") from None
        self._bound[(k, new_index)] = new
        if k == 0:
            self.feeder.rewire(old, new)
        else:
            self.control.publish(CONTROL_TOPIC, P.EVT, {"op": P.Op.REWIRE, "stage": k,
                                                        "old": old, "new": new})
        try:
            again = self.ledger.send_again()
        except TooManyRetries as e:
            raise PipelineError(
                f"items {e.start} to {e.start + e.count - 1} were fed in {e.retries + 1} "
                f"time(s) and lost each time (task_retries={e.retries})") from None
        log.info("%s: stage %s worker replaced; %d batch(es) fed in again", self.owner, k,
                 again)
        if self.feeder is not None:
            self.feeder.wake.set()

    def run(self) -> int:
        """Drain the pipeline; returns the number of items that went through."""
        n = 0
        for _ in self:
            n += 1
        return self.items_sent if self.feeder is not None else n

    # -- telemetry -------------------------------------------------------------------------
    def stage_owners(self) -> list[str]:
        """Telemetry owner ids, one per stage (see dragon_nb.telemetry)."""
        return [f"{self.owner}.s{k}" for k in range(len(self.stages))]

    def stats(self, snapshot: dict) -> list[dict]:
        """Per stage from a telemetry snapshot: items in, out, queued before it, workers."""
        out, upstream = [], self.items_sent
        for k, owner in enumerate(self.stage_owners()):
            fig = {"in": 0, "out": 0, "workers": 0}
            for rec in snapshot.values():
                o = rec.get("owners", {}).get(owner)
                if o:
                    fig["in"] += o.get("items", 0)
                    fig["out"] += o.get("done", 0)
                    fig["workers"] += o.get("procs", 0)
            fig["queued"] = max(0, upstream - fig["in"])
            fig["name"] = self.stages[k].name
            upstream = fig["out"]
            out.append(fig)
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every stage now; what is in flight is dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.control.publish(CONTROL_TOPIC, P.EVT, {"op": P.Op.STOP})
        except zmq.ZMQError:
            pass
        refs = list(self.refs.values())
        if self.runtime.alive and refs:
            # give them a moment to see the stop, then make sure: those here by pid,
            # the others (other hosts, other pid spaces) through their agents
            left = liveness.wait_gone(refs, CLOSE_GRACE_S)
            left += [r for r in refs if r.alive() is None]
            if left:
                liveness.signal_all(self.runtime, left, signal.SIGKILL)
        if self.feeder is not None:
            self.feeder.close()      # closes its channel, or leaves it to its thread
        for name in ("control", "exits", "sink", "report"):
            chan = getattr(self, name, None)
            if chan is not None:
                chan.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
