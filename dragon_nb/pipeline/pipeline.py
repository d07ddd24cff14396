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

import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import zmq

from dragon_nb.checks import is_int, node_ids, positive_int
from dragon_nb.runtime.client import (Runtime, drain_events, exit_reason, get_runtime,
                                      register_entry_module, zmq_context)
from dragon_nb.runtime.launch import caller_environment
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

register_entry_module("dragon_nb.pipeline.stage_worker")

STAGE_ENTRY = "dragon_nb.pipeline.stage_worker:main"
SOURCE_ENTRY = "dragon_nb.pipeline.stage_worker:source_main"
MAX_BATCH = 256
BATCH_TARGET_S = 0.005      # aim for about this much work per batch


class PipelineError(RuntimeError):
    """The pipeline cannot go on: a stage worker died, or it was closed."""


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
    """

    def __init__(self, source, *stages: Stage, ordered: bool = True, into=None, key=None,
                 queue_depth: int = 4, runtime=None):
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
        self.control = net.prepare(ctx.socket(zmq.PUB))
        control = net.bind(self.control, f"{self.owner}-ctl")
        self.exits = self.runtime.subscribe(P.TOPIC_EXIT + self.owner.encode())
        # workers bind their outputs where they run and say where on the report socket
        self.report = net.prepare(ctx.socket(zmq.ROUTER))
        report = net.bind(self.report, f"{self.owner}-rep")
        self.procs: list = []                       # (stage index, node, pid)
        self.local_nodes = {n["id"] for n in self.runtime.nodes() if not n.get("remote")}
        env = caller_environment()
        common = {**env, "control": control, "report": report, "hwm": self.hwm}
        self.total_batches = None
        self.source_failure = None
        self.items_sent = 0
        self._rate = 0.0
        self.feeder = None
        # Built from the sink back to the source: every process binds where it
        # *receives* (a PULL) and connects where it sends, so a peer that reaches
        # a bound socket can offer items (signed, or dropped) but never take any.
        self.sink = net.prepare(ctx.socket(zmq.PULL))
        self.sink.setsockopt(zmq.RCVHWM, self.hwm)
        outputs = [net.bind(self.sink, f"{self.owner}-sink")]
        self.stage_inputs: dict[int, list] = {}      # stage -> where its workers receive
        try:
            for k in reversed(range(len(stages))):
                st, last = stages[k], k == len(stages) - 1
                func = S.dumps_function(st.func)
                for i in range(st.workers):
                    spec = {**common, "stage": k, "index": i, "name": st.name, "func": func,
                            "input": f"{self.owner}-s{k}-{i}", "outputs": outputs,
                            "into": S.dumps_inline(into) if (last and into is not None) else None,
                            "key": S.dumps_inline(key) if (last and key is not None) else None}
                    nodes = [st.nodes[i % len(st.nodes)]] if st.nodes else None
                    self._spawn(STAGE_ENTRY, spec, k, nodes)
                outputs = self.stage_inputs[k] = self._inputs(k, st.workers)
            if isinstance(source, NodeSource):
                spec = {**common, "source": S.dumps_inline((source.func, source.args)),
                        "outputs": outputs, "batch": source.batch}
                self._spawn(SOURCE_ENTRY, spec, -1,
                            [source.node] if source.node is not None else None)
            else:
                self.source_push = net.prepare(ctx.socket(zmq.PUSH))
                self.source_push.setsockopt(zmq.SNDHWM, self.hwm)
                for addr in outputs:
                    self.source_push.connect(addr)
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

    def _inputs(self, stage_index: int, count: int) -> list[str]:
        """Wait for the ``count`` workers of a stage to say where they bound their input."""
        found: dict[int, str] = {}
        deadline = time.monotonic() + self.runtime.timeout
        while len(found) < count:
            if time.monotonic() > deadline:
                raise PipelineError(f"stage {stage_index}'s workers did not start within "
                                    f"{self.runtime.timeout:g} s")
            if self.exits.poll(0):
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
        return [found[i] for i in range(count)]

    def _spawn(self, entry, spec, stage_index, nodes):
        owner = f"{self.owner}.s{stage_index}" if stage_index >= 0 else f"{self.owner}.src"
        for node, pid in self.runtime.spawn(entry, S.dumps_inline(spec), 1, owner, nodes=nodes):
            self.procs.append((stage_index, node, pid))

    # -- the source in the caller --------------------------------------------------
    def _feed(self, it):
        seq = start = 0
        try:
            while not self._closed:
                size = max(1, min(MAX_BATCH, int(self._rate * BATCH_TARGET_S)))
                batch = []
                began = time.monotonic()
                exhausted = False
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
                    while not self.source_push.poll(200, zmq.POLLOUT):
                        if self._closed or not self.runtime.alive:
                            return
                    self.source_push.send_multipart(frames, copy=False)
                    seq += 1
                    start += len(batch)
                    self.items_sent = start
                if exhausted or self.source_failure is not None:
                    self.total_batches = seq
                    return
        except Exception as e:                  # pickling an item failed, say
            from dragon_nb.pipeline.stage_worker import StageFailure
            if not self._closed:
                self.source_failure = StageFailure(-1, "source", start, 0, e)
            self.total_batches = seq
        finally:
            if self._closed:         # close() left the socket to us: we were still using it
                self.source_push.close(linger=0)

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
        poller.register(self.exits, zmq.POLLIN)
        if self.report is not None:
            poller.register(self.report, zmq.POLLIN)
        events = dict(poller.poll(500))
        if not events and not self.runtime.alive:     # no head left to report deaths
            self.close()
            raise PipelineError("the dragon-nb runtime stopped under the pipeline")
        if self.exits in events:
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
        if self.sink in events:
            try:
                kind, body, rest = self.codec.decode(self.sink.recv_multipart(copy=False))
            except P.ProtocolError:
                return
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
                where = next(((k, n) for k, n, p in self.procs if p == pid and n == node), None)
                if where is None:
                    continue
                k = where[0]
                name = "the source" if k < 0 else f"stage {k} ({self.stages[k].name})"
                self.close()
                raise PipelineError(
                    f"{name}: worker pid {pid} on node {node} {exit_reason(code)}; "
                    f"its in-flight items are lost, so the pipeline stops")

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
            self.control.send(b"stop")
        except zmq.ZMQError:
            pass
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
        for sock in ("control", "exits", "sink", "source_push", "report"):
            if sock == "source_push" and feeding:
                continue         # the feeder, stuck in the source's next(), closes it
            s = getattr(self, sock, None)
            if s is not None:
                s.close(linger=0)

    def _is_alive(self, node, pid) -> bool:
        import os
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
