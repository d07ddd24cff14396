"""The hub: how a process hears from the processes it started.

One per process that starts a ``Process`` (or an object host), made on first
use. Two things reach it, read by one background thread:

* straight from each child, on a ROUTER the hub binds: its prints
  (``MP_OUTPUT``), written under the cell that started it, and its last word
  (``MP_BYE``), sent once its output is all out; object hosts say where they
  listen (``BOUND``);
* from the head, the ``exit.<owner>`` events of the hub's owner name: how each
  child ended, also one killed by SIGKILL (its agent reaped it) or lost with
  its node (no exit code: it counts as killed, ``-SIGKILL``).

An exit event can overtake the child's last prints, which travel another way:
a child that exited by itself is finished once its bye is in, or
``BYE_GRACE_S`` after the exit event. The hub owns the children's sentinels:
the write end of a pipe per child, closed when the child is finished, so that
``multiprocessing.connection.wait`` on ``Process.sentinel`` works as with fork.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import zmq

from dragon_nb.errors import RuntimeRequestError
from dragon_nb.forwarding import emit
from dragon_nb.mp import local_link
from dragon_nb.runtime.client import exit_reason, get_runtime
from dragon_nb.tunables import BYE_GRACE_S, HOST_START_S
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.mp")
_dropped = P.DropLog(log)

HANDLERS = P.Handlers("process hub")   # child or object host -> hub: handler(body)
LIVENESS_POLL_S = 0.5                  # how often the thread looks at the runtime itself
MAX_FINISHED = 4096


@dataclass
class Child:
    """A started process as the hub tracks it."""
    key: tuple                          # (node, pid)
    finish: object                      # finish(code, why): the Popen's callback
    context: object = None              # contextvars context its prints are written in
    bye: bool = False
    exit_code: object = None            # from the exit event, while the bye is awaited
    exit_why: str | None = None
    finish_by: float | None = None      # finished then, bye or not


@dataclass
class Early:
    """What arrived for a (node, pid) before its spawn returned."""
    output: list = field(default_factory=list)
    bye: bool = False
    bye_code: int | None = None
    exit: tuple | None = None           # (code, why)


class Hub:
    def __init__(self, runtime):
        self.runtime = runtime
        self.pid = os.getpid()
        self.owner = f"mp-{self.pid}-{os.urandom(3).hex()}"
        self.zctx = zmq.Context()
        net = runtime.network
        self.router = P.Channel(self.zctx.socket(zmq.ROUTER), net.codec(), routed=True)
        self.address = net.bind(self.router.sock, f"mp-hub-{self.pid}-{os.urandom(3).hex()}")
        self.local = local_link.Listener()      # children on this host say it here
        self.sub = runtime.subscribe(P.TOPIC_EXIT + self.owner.encode(), P.TOPIC_TELEMETRY,
                                     context=self.zctx)
        self.subscribed = threading.Event()     # the exit events are reaching us
        self.lock = threading.Lock()
        self.children: dict[tuple, Child] = {}
        self.early: dict[tuple, Early] = {}
        self.finished: dict[tuple, None] = {}   # finished at their bye, exit event to come
        self.bound: dict[tuple, dict] = {}      # (node, pid) of an object host -> its BOUND
        self.bound_changed = threading.Condition(self.lock)
        self.running = True
        self.dispatch = HANDLERS.bind(self)
        from dragon_nb.mp import object_hosts
        here = object_hosts._node          # children go round the nodes from the next one
        self.next_node = 0 if here is None else here + 1
        self.thread = threading.Thread(target=self.loop, name="dragon-nb process hub",
                                       daemon=True)
        self.thread.start()

    # -- what Popen and the object hosts' starter use -----------------------------------
    def spawn(self, entry: str, spec: bytes, node: int) -> tuple:
        """Start one ``entry`` process on ``node`` under the hub's owner -> (node, pid)."""
        self.subscribed.wait(LIVENESS_POLL_S * 4)   # else a quick exit could go unheard
        return tuple(self.runtime.spawn(entry, spec, 1, self.owner, nodes=[node])[0])

    def spawn_placed(self, entry: str, spec: bytes) -> tuple:
        """``spawn`` on the next node round-robin; a node lost since the node table
        was read is skipped (the table is read again)."""
        try:
            return self.spawn(entry, spec, self.place())
        except RuntimeRequestError as e:
            if "no such live node" not in str(e):
                raise
            return self.spawn(entry, spec, self.place(refresh=True))

    def track(self, key: tuple, finish, context) -> None:
        """Follow the process ``key``: its prints go out in ``context``, ``finish(code,
        why)`` is called once it has ended."""
        with self.lock:
            child = Child(key, finish, context)
            self.children[key] = child
            early = self.early.pop(key, None)
        if early is None:
            return
        for stream, text in early.output:
            emit(context, stream, text)
        child.bye = early.bye
        if early.exit is not None:
            self.exited(key, *early.exit)
        elif early.bye_code is not None:
            self.exited(key, early.bye_code, finished_by_bye=True)
        self.finish_due()          # here: the thread may sleep LIVENESS_POLL_S before it looks

    def wait_bound(self, key: tuple, timeout: float = HOST_START_S) -> dict:
        """The BOUND message of the object host ``key``; raises if it does not come."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while key not in self.bound:
                if key in self.early and self.early[key].exit is not None:
                    code, why = self.early[key].exit
                    raise RuntimeError(f"the object host on node {key[0]} "
                                       f"{why or exit_reason(code)} before it started")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the object host on node {key[0]} did not start "
                                       f"within {timeout:g} s")
                self.bound_changed.wait(min(left, LIVENESS_POLL_S))
            return self.bound.pop(key)

    def place(self, refresh: bool = False) -> int:
        """Dragon's default placement: round-robin over the live nodes."""
        table = self.runtime.nodes(refresh=refresh or self.runtime.network.tcp)
        nodes = [n["id"] for n in table if n.get("alive", True)]
        if not nodes:
            raise RuntimeError("the dragon-nb runtime has no live node to start a process on")
        with self.lock:
            after = [n for n in nodes if n >= self.next_node]
            node = after[0] if after else nodes[0]
            self.next_node = node
            self.next_node += 1
        return node

    # -- the thread ------------------------------------------------------------------------
    def loop(self):
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        poller.register(self.sub.sock, zmq.POLLIN)
        poller.register(self.local.sock.fileno(), zmq.POLLIN)   # reported by descriptor
        next_look = time.monotonic() + LIVENESS_POLL_S
        try:
            while self.running:
                events = dict(poller.poll(self.poll_ms()))
                if self.local.sock.fileno() in events:
                    for conn in self.local.accept():
                        poller.register(conn.fileno(), zmq.POLLIN)
                for fd in [fd for fd in self.local.conns if fd in events]:
                    self.read_local(fd, poller)
                if self.router.sock in events:       # prints and byes before exits
                    self.read_children()
                if self.sub.sock in events:
                    self.read_events()
                self.finish_due()
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + LIVENESS_POLL_S
                    if not self.runtime.alive:
                        self.runtime_gone()
                        break
        except Exception:
            log.exception("the process hub stopped")
            self.runtime_gone()
        finally:
            self.router.close(linger=0)
            self.sub.close(linger=0)
            self.local.close()
            self.zctx.term()

    def poll_ms(self) -> int:
        due = [c.finish_by for c in self.children.values() if c.finish_by is not None]
        wait = LIVENESS_POLL_S if not due else max(0.0, min(due) - time.monotonic())
        return int(min(wait, LIVENESS_POLL_S) * 1000) + 1

    def read_children(self):
        self.handle((kind, body) for _ident, kind, body, _bufs in self.router.drain(_dropped))

    def read_local(self, fd, poller):
        messages, still_open = self.local.read(self.local.conns[fd])
        if not still_open:
            poller.unregister(fd)
        self.handle(messages)

    def handle(self, messages):
        """Each (kind, body) from a child or an object host to its handler."""
        for kind, body in messages:
            try:
                self.dispatch(kind, body)
            except Exception as e:
                _dropped("dropped a %r message: %r", kind, e)

    def read_events(self):
        for topic, _kind, body, _bufs in self.sub.drain(_dropped):
            if not isinstance(body, dict):
                continue
            if topic.startswith(P.TOPIC_TELEMETRY):     # the subscription is live
                if not self.subscribed.is_set():
                    self.subscribed.set()
                    self.sub.sock.setsockopt(zmq.UNSUBSCRIBE, P.TOPIC_TELEMETRY)
                continue
            for node, pid, code in body.get("procs", ()):
                self.exited((node, pid), code, body.get("why"))

    @HANDLERS.on(P.MP_OUTPUT)
    def on_output(self, body):
        key = (body["node"], body["pid"])
        child = self.children.get(key)
        if child is None:
            with self.lock:
                if key not in self.children:
                    self.early.setdefault(key, Early()).output.append(
                        (body["stream"], body["text"]))
                    return
                child = self.children[key]
        emit(child.context, body["stream"], body["text"])

    @HANDLERS.on(P.MP_BYE)
    def on_bye(self, body):
        """The child's last word, after its at-exit work, with the code it exits with:
        it is finished now (joined) rather than once its agent reaped it and the
        head said so, ~3 ms later; only the kernel's tearing down is left."""
        key, code = (body["node"], body["pid"]), body.get("code")
        with self.lock:
            child = self.children.get(key)
            if child is None:
                early = self.early.setdefault(key, Early())
                early.bye, early.bye_code = True, code
                return
            child.bye = True
            if child.finish_by is not None:
                child.finish_by = time.monotonic()
        if code is not None and child.exit_code is None:
            self.exited(key, code, finished_by_bye=True)

    @HANDLERS.on(P.BOUND)
    def on_bound(self, body):
        with self.lock:
            self.bound[(body["node"], body["pid"])] = body
            self.bound_changed.notify_all()

    def exited(self, key, code, why=None, finished_by_bye=False):
        with self.lock:
            child = self.children.get(key)
            if child is None and not finished_by_bye and key in self.finished:
                del self.finished[key]           # the exit event of one its bye finished
                return
            if child is None:
                self.early.setdefault(key, Early()).exit = (code, why)
                self.bound_changed.notify_all()
                return
            if code is None:                     # lost with its node
                code, why = -signal.SIGKILL, why or "its node was lost"
            child.exit_code, child.exit_why = code, why
            if finished_by_bye:
                self.finished[key] = None
                while len(self.finished) > MAX_FINISHED:     # events that never came
                    del self.finished[next(iter(self.finished))]
            # killed: nothing more will come; exited by itself: its bye may be on its way
            child.finish_by = time.monotonic() + (BYE_GRACE_S if code >= 0 and not child.bye
                                                  else 0.0)

    def finish_due(self):
        now = time.monotonic()
        with self.lock:
            due = [c for c in self.children.values()
                   if c.finish_by is not None and c.finish_by <= now]
            for c in due:
                del self.children[c.key]
        for c in due:
            c.finish(c.exit_code, c.exit_why)

    def runtime_gone(self):
        with self.lock:
            children, self.children = list(self.children.values()), {}
            self.running = False
            self.bound_changed.notify_all()
        for c in children:
            c.finish(-signal.SIGKILL, "the runtime stopped")


_hub: Hub | None = None
_hub_lock = threading.Lock()


def get_hub() -> Hub:
    """This process's hub, made (and the runtime started) on first use."""
    global _hub
    with _hub_lock:
        runtime = get_runtime()
        if _hub is None or _hub.pid != os.getpid() or not _hub.running \
                or _hub.runtime is not runtime:
            _hub = Hub(runtime)
        return _hub
