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
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from dragon_nb.checks import is_int, node_ids, positive_int
from dragon_nb.errors import PipelineError
from dragon_nb.pipeline.ledger import Ledger, TooManyRetries
from dragon_nb.runtime.client import (Runtime, drain_events, exit_reason, get_runtime,
                                      register_entry_module, zmq_context)
from dragon_nb.runtime.launch import caller_environment
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S
from dragon_nb.tunables import BATCH_TARGET_S

register_entry_module("dragon_nb.pipeline.stage_worker")

STAGE_ENTRY = "dragon_nb.pipeline.stage_worker:main"
SOURCE_ENTRY = "dragon_nb.pipeline.stage_worker:source_main"
log = logging.getLogger("dragon_nb.pipeline")

MAX_BATCH = 256


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
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, not {workers!r}")
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
    if node is not None and not is_int(node):
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
    cannot be fed again: there a dead worker stops the pipeline).
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
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function key(position, value), not {key!r}")
        queue_depth = positive_int("queue_depth", queue_depth)
        if not is_int(task_retries) or task_retries < 0:
            raise TypeError(f"task_retries must be an int >= 0, not {task_retries!r}")
        if runtime is not None and not isinstance(runtime, Runtime):
            raise TypeError(f"runtime must be a dragon_nb.Runtime or None, not {runtime!r}")
        self.runtime = runtime or get_runtime()
        self.stages = stages
        self.ordered = ordered
        self.owner = f"pipe-{uuid.uuid4().hex[:10]}"
        self.hwm = queue_depth
        net = self.runtime.network
        ctx = zmq_context()
        self.codec = net.codec()
        self._closed = False
        self._lock = threading.Lock()
        self.control = ctx.socket(zmq.PUB)
        control = net.bind(self.control, f"{self.owner}-ctl")
        self.exits = self.runtime.subscribe(P.TOPIC_EXIT + self.owner.encode())
        # workers bind their outputs where they run and say where on the report socket
        self.report = ctx.socket(zmq.ROUTER)
        report = net.bind(self.report, f"{self.owner}-rep")
        self.procs: list = []                       # (stage index, node, pid)
        self.worker_index: dict[tuple, int] = {}    # (node, pid) -> its place in its stage
        self.local_nodes = self.runtime.nodes_here()
        env = caller_environment()
        common = {**env, "control": control, "report": report, "hwm": self.hwm}
        self.ledger = None if isinstance(source, NodeSource) else Ledger(task_retries)
        self._wake = threading.Event()              # the feeder has something to send again
        self._rewires: list = []                    # (old, new) input of stage 0, for the feeder
        self.total_batches = None
        self.source_failure = None
        self.items_sent = 0
        self._rate = 0.0
        self.feeder = None
        self.feed_redials = None                    # on TCP: the feeder's links cut and redialled
        # Built from the sink back to the source: every process binds where it
        # *receives* (a PULL) and connects where it sends, so a peer that reaches
        # a bound socket can offer items (signed, or dropped) but never take any.
        self.sink = ctx.socket(zmq.PULL)
        self.sink.setsockopt(zmq.RCVHWM, self.hwm)
        self.sink_address = net.bind(self.sink, f"{self.owner}-sink")
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
                self.source_push = ctx.socket(zmq.PUSH)
                self.source_push.setsockopt(zmq.SNDHWM, self.hwm)
                self.source_push.setsockopt(zmq.IMMEDIATE, 1)   # never to a dead worker
                self.feed_redials = net.watch_links(self.source_push)
                for addr in outputs:
                    net.connect(self.source_push, addr)
                self.feeder = threading.Thread(target=self._feed, args=(iter(source),),
                                               name=f"dragon-nb {self.owner} source",
                                               daemon=True)
        except BaseException:
            self.close()
            raise
        self._pending: dict = {}          # seq -> (start, values, failures), when ordered
        self._next_seq = 0
        self._received = 0
        self._current: list = []
        self._source_error = None
        if self.feeder is not None:
            self.feeder.start()

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
        found: dict[int, str] = {}
        wanted = set(indexes)
        deadline = time.monotonic() + self.runtime.timeout
        while not wanted <= set(found):
            if time.monotonic() > deadline:
                raise PipelineError(f"stage {stage_index}'s workers did not start within "
                                    f"{self.runtime.timeout:g} s")
            if watch_exits and self.exits.poll(0):
                self._on_exit()
            if not self.report.poll(100):
                continue
            try:
                _, *frames = self.report.recv_multipart()
                kind, body, _ = self.codec.decode(frames)
            except (P.ProtocolError, ValueError):
                continue
            if kind == P.BOUND and body.get("stage") == stage_index:
                found[body["index"]] = body["input"]
        return found

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
        return procs

    # -- the source in the caller --------------------------------------------------
    def _feed(self, it):
        """The feeder thread: owns ``source_push``; sends the source's batches, and
        again those the ledger asks for after a stage worker died."""
        seq = start = 0
        exhausted = False
        try:
            while not self._closed:
                self._apply_rewires()
                self._check_feed_links()
                again = self.ledger.next_resend()
                if again is not None:
                    if not self._push(again[1]):
                        return
                    continue
                if exhausted or self.source_failure is not None:
                    self._wake.wait(0.1)         # done feeding; resends may still come
                    self._wake.clear()
                    continue
                size = max(1, min(MAX_BATCH, int(self._rate * BATCH_TARGET_S)))
                batch = []
                began = time.monotonic()
                try:                 # up to `size` items, but never sit on a slow source's
                    while len(batch) < size:          # items longer than a batch's worth
                        batch.append(next(it))
                        if time.monotonic() - began > BATCH_TARGET_S:
                            break
                except StopIteration:
                    exhausted = True
                except Exception as e:          # the source failed: after the items before it
                    from dragon_nb.pipeline.stage_worker import StageFailure
                    self.source_failure = StageFailure(-1, "source", start + len(batch), 0, e)
                if batch:
                    data, bufs = S.dumps_work((batch, {}))
                    frames = self.codec.encode(P.PIPE_ITEMS, {"seq": seq, "start": start},
                                               [data, *bufs])
                    self.ledger.sent(seq, start, len(batch), frames)
                    if not self._push(frames):
                        return
                    seq += 1
                    start += len(batch)
                    self.items_sent = start
                if exhausted or self.source_failure is not None:
                    self.total_batches = seq
        except Exception as e:                  # pickling an item failed, say
            from dragon_nb.pipeline.stage_worker import StageFailure
            if not self._closed:
                self.source_failure = StageFailure(-1, "source", start, 0, e)
            self.total_batches = seq
        finally:
            if self._closed:         # close() left the socket to us: we were still using it
                self._close_source_push()

    def _push(self, frames) -> bool:
        """Send one batch to stage 0, waiting while it is full; False if closed meanwhile."""
        while not self.source_push.poll(200, zmq.POLLOUT):
            if self._closed or not self.runtime.alive:
                return False
            self._apply_rewires()              # the worker we waited for may have died
            self._check_feed_links()
        self.source_push.send_multipart(frames, copy=False)
        return True

    def _check_feed_links(self):
        for endpoint in self.feed_redials.poll() if self.feed_redials is not None else ():
            self._link_cut("the feeder", endpoint)

    def _link_cut(self, sender: str, endpoint: str) -> None:
        """A TCP link into a stage was cut and dialled again: the batches on it are
        lost. Feed in again all that have not come out (not counted as retries)."""
        if self.ledger is None:
            log.warning("%s: %s's link to %s was cut and dialled again; batches on it "
                        "may be lost, and a source run on a node cannot be fed again",
                        self.owner, sender, endpoint)
            return
        again = self.ledger.send_again(charge=False)
        log.info("%s: %s's link to %s was cut and dialled again; %d batch(es) fed in again",
                 self.owner, sender, endpoint, again)
        self._wake.set()

    def _close_source_push(self):
        if self.feed_redials is not None:
            self.feed_redials.close()
        self.source_push.close(linger=0)

    def _apply_rewires(self):
        while self._rewires:
            old, new = self._rewires.pop(0)
            try:
                self.source_push.disconnect(old)
            except zmq.ZMQError:
                pass
            self.runtime.network.connect(self.source_push, new)

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
                    if self.source_failure is not None:
                        failure, self.source_failure = self.source_failure, None
                        self.close()
                        _raise_failure(failure)
                    self.close()
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
        poller.register(self.sink, zmq.POLLIN)
        poller.register(self.exits.sock, zmq.POLLIN)
        if self.report is not None:
            poller.register(self.report, zmq.POLLIN)
        events = dict(poller.poll(500))
        if not events and not self.runtime.alive:     # no head left to report deaths
            self.close()
            raise PipelineError("the dragon-nb runtime stopped under the pipeline")
        if self.exits.sock in events:
            self._on_exit()
        if self.report is not None and self.report in events:
            _, *frames = self.report.recv_multipart()
            try:
                kind, body, rest = self.codec.decode(frames)
            except (P.ProtocolError, ValueError):
                kind = None
            if kind == P.PIPE_END:
                self.total_batches = body["batches"]
                self.source_failure = S.loads(rest[0]) if rest else None
            elif kind == P.PIPE_LINK and isinstance(body, dict):
                stage = body.get("stage")
                self._link_cut("the source" if stage == -1 else f"a stage {stage} worker",
                               str(body.get("to")))
        if self.sink in events:
            try:
                kind, body, rest = self.codec.decode(self.sink.recv_multipart(copy=False))
            except P.ProtocolError:
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
            self._rewires.append((old, new))
        else:
            self.control.send_multipart(self.codec.encode(P.EVT, {
                "op": "rewire", "stage": k, "old": old, "new": new}))
        try:
            again = self.ledger.send_again()
        except TooManyRetries as e:
            raise PipelineError(
                f"items {e.start} to {e.start + e.count - 1} were fed in {e.retries + 1} "
                f"time(s) and lost each time (task_retries={e.retries})") from None
        log.info("%s: stage %s worker replaced; %d batch(es) fed in again", self.owner, k,
                 again)
        self._wake.set()

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
            self.control.send_multipart(self.codec.encode(P.EVT, {"op": "stop"}))
        except zmq.ZMQError:
            pass
        self._wake.set()
        deadline = time.monotonic() + 2.0
        procs = [(n, p) for _, n, p in self.procs]
        local = [(n, p) for n, p in procs if n in self.local_nodes]
        if self.runtime.alive and procs:
            # give them a moment to see the stop, then make sure (pids on other hosts
            # cannot be looked at from here: those are killed through their agents)
            while time.monotonic() < deadline and self._any_alive(local):
                time.sleep(0.02)
            alive = [(n, p) for n, p in procs if n not in self.local_nodes
                     or self._is_alive(n, p)]
            if alive:
                try:
                    self.runtime.kill(alive, signal.SIGKILL)
                except Exception:
                    pass
        feeding = self.feeder is not None and self.feeder.is_alive() and \
            self.feeder is not threading.current_thread()
        if feeding:
            self.feeder.join(1.0)
            feeding = self.feeder.is_alive()
        for sock in ("control", "exits", "sink", "report"):
            s = getattr(self, sock, None)
            if s is not None:
                s.close(linger=0)
        if getattr(self, "source_push", None) is not None and not feeding:
            self._close_source_push()  # else the feeder, stuck in the source's next(), does

    @staticmethod
    def _is_alive(node, pid) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _any_alive(self, procs) -> bool:
        return any(self._is_alive(n, p) for n, p in procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
