"""The node agent: one per node; forks, watches and reaps its service processes.

It knows nothing of pools or dictionaries: the head asks it to run ``count``
copies of an entry point (``"package.module:function"``) with an opaque spec,
and it forks them from itself (the entry modules are imported once, before
any fork, so a new worker costs a fork, not an interpreter start; the modules
an entry module names in ``WARM_AT_FIRST_SPAWN`` are imported at its first
spawn, so only the nodes that use them pay for them, once). It reports
exits, and a few times a second publishes the node's figures: processes, CPU,
RSS and the counters its children keep in shared memory.

Run as ``python -m dragon_nb.runtime.agent --head ADDR --node ID ...`` by the
head, or as ``dragon-nb agent --connect tcp://HEAD:PORT --key-file FILE`` on
another host, to join a running runtime as a new node: it then reports this
host's cores, memory and name, and lives while it hears from the head (pings)
and, when launched with the key on standard input, while that pipe is open.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

import psutil
import zmq

from dragon_nb.runtime import launch, network
from dragon_nb.runtime.counters import CUMULATIVE, FIELDS, CounterBlock, Counters
from dragon_nb.tunables import (HEAD_TIMEOUT_S, JOIN_TIMEOUT_S, OWNER_GRACE_S, STOP_TERM_S,
                                TELEMETRY_INTERVAL_S)
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.agent")
_dropped = P.DropLog(log)

ENTRY_PACKAGE = "dragon_nb."   # service entry points are dragon-nb's own, nothing else


@dataclass
class ServiceContext:
    """What a service process learns about where it runs."""
    node: int
    hostname: str
    cpus: list
    physical_mem: int
    owner: str
    index: int                     # position among the processes of one spawn request
    head: str = ""                 # the head's address from this node (ipc here, else TCP)
    counters: Counters = field(repr=False, default=None)
    network: network.Network | None = field(repr=False, default=None)


@dataclass
class Child:
    pid: int
    owner: str
    slot: int
    ps: psutil.Process | None = None


HANDLERS = P.Handlers("agent")


class Agent:
    """One node's agent: its children, their counters, and a handler per message
    from the head (``HANDLERS``)."""

    def __init__(self, args, net: network.Network):
        self.args = args
        self.net = net
        self.node = args.node
        self.joining = args.node is None          # from another host: the head names us
        self.hostname = socket.gethostname()
        self.cpus = [int(c) for c in args.cpus.split(",") if c] or \
            sorted(os.sched_getaffinity(0))
        self.mem = args.mem or psutil.virtual_memory().total
        self.counters = CounterBlock()
        self.children: dict[int, Child] = {}
        self.retired: dict[str, list] = {}     # owner -> summed counters of exited children
        self.retired_at: dict[str, float] = {}  # owner -> when its last child exited
        self.folded = [0] * len(FIELDS)         # running totals of owners long gone
        self.recent_exits: collections.deque = collections.deque(maxlen=256)  # (pid, code)
        self.warmed: set[str] = set()           # entry modules whose WARM_AT_FIRST_SPAWN is in
        self.lifeline_fd = args.lifeline_fd
        self.pid = os.getpid()
        # wake the poll loop on SIGCHLD
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_w, False)
        os.set_blocking(self.sig_r, False)
        signal.set_wakeup_fd(self.sig_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        self.ctx = zmq.Context()
        self.chan = P.Channel(self.ctx.socket(zmq.DEALER), net.codec())
        ident = f"agent-{self.node}" if not self.joining else \
            f"agent-{self.hostname}-{self.pid}-{os.urandom(4).hex()}"
        self.chan.sock.setsockopt(zmq.IDENTITY, ident.encode())
        net.connect(self.chan.sock, args.head)
        self.heard = time.monotonic()
        self.self_ps = psutil.Process()
        self.running = True
        self.welcomed = False
        self.sent_away = None
        self.dispatch = HANDLERS.bind(self)

    # -- spawning -------------------------------------------------------------
    def spawn(self, body):
        module = str(body["entry"]).partition(":")[0]
        if not module.startswith(ENTRY_PACKAGE):   # never "builtins:exec" and the like
            raise ValueError(f"{body['entry']!r} is not an entry point of dragon-nb")
        if module not in self.warmed:
            for name in getattr(importlib.import_module(module), "WARM_AT_FIRST_SPAWN", ()):
                importlib.import_module(name)
            self.warmed.add(module)
        pids = []
        try:
            for index in range(int(body["count"])):
                slot = self.counters.allocate()
                pid = os.fork()
                if pid == 0:
                    self._child(body, index, slot)     # never returns
                self.children[pid] = Child(pid, body["owner"], slot)
                pids.append(pid)
        except BaseException:        # all of a request or none: nobody would track the rest
            self.kill(pids, signal.SIGKILL)
            raise
        return pids

    def _child(self, body, index, slot):
        code = 1
        try:
            launch.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != self.pid:
                os._exit(1)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for fd in (self.sig_r, self.sig_w, self.lifeline_fd):
                if fd == 0:              # stdin was the lifeline: leave fd 0 to /dev/null
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    os.close(devnull)
                elif fd is not None:
                    os.close(fd)
            ctx = ServiceContext(node=self.node, hostname=self.hostname, cpus=self.cpus,
                                 physical_mem=self.mem, owner=body["owner"], index=index,
                                 head=self.args.head,
                                 counters=self.counters.view(slot), network=self.net)
            module, _, func = body["entry"].partition(":")
            result = getattr(importlib.import_module(module), func)(body["spec"], ctx)
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def kill(self, pids, sig):
        for pid in pids:
            if pid in self.children:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def reap(self):
        exited = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            values = self.counters.release(child.slot)
            acc = self.retired.setdefault(child.owner, [0] * len(FIELDS))
            for f in CUMULATIVE:          # running totals outlive the process; levels do not
                acc[f] += values[f]
            self.retired_at[child.owner] = time.monotonic()
            exited.append((pid, code))
        if exited:
            self.recent_exits.extend(exited)
            self.chan.send(P.EVT, {"op": P.Op.EXITED, "node": self.node, "procs": exited})

    # -- telemetry --------------------------------------------------------------
    def telemetry(self):
        owners: dict[str, dict] = {}
        cpu = 0.0
        rss = 0
        for child in self.children.values():
            values = self.counters.read(child.slot)
            o = owners.setdefault(child.owner, {"procs": 0, **{f: 0 for f in FIELDS}})
            o["procs"] += 1
            for name, v in zip(FIELDS, values):
                o[name] += v
            try:
                if child.ps is None:
                    child.ps = psutil.Process(child.pid)
                    child.ps.cpu_percent(None)
                with child.ps.oneshot():
                    cpu += child.ps.cpu_percent(None)
                    rss += child.ps.memory_info().rss
            except psutil.Error:
                pass
        now = time.monotonic()
        for owner, acc in list(self.retired.items()):
            if owner not in owners and now - self.retired_at[owner] > OWNER_GRACE_S:
                for f in CUMULATIVE:     # gone for good: only the node's totals keep it
                    self.folded[f] += acc[f]
                del self.retired[owner], self.retired_at[owner]
                continue
            o = owners.setdefault(owner, {"procs": 0, **{f: 0 for f in FIELDS}})
            for f in CUMULATIVE:
                o[FIELDS[f]] += acc[f]
        # every live child, and the last exits: the head reconciles its table with
        # them should an ``exited`` event be lost on a cut link
        self.chan.send(P.EVT, {
            "op": P.Op.TELEMETRY, "node": self.node, "hostname": self.hostname,
            "pids": list(self.children), "exits": list(self.recent_exits),
            "time": time.time(), "procs": len(self.children),
            "done": sum(o["done"] for o in owners.values()) + self.folded[FIELDS.index("done")],
            "running": sum(o["running"] for o in owners.values()),
            "cpu_percent": cpu, "rss": rss, "physical_mem": self.mem,
            "num_cpus": len(self.cpus), "owners": owners})

    # -- loop ---------------------------------------------------------------------
    def stop_children(self):
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TERM_S
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)

    def join(self) -> None:
        """Register with the head; a joining agent waits to be welcomed and named."""
        self.chan.send(P.EVT, {"op": P.Op.REGISTER, "node": self.node, "name": self.args.name,
                               "hostname": self.hostname, "pid": self.pid,
                               "pid_space": network.pid_space(),
                               "cpus": self.cpus, "physical_mem": self.mem,
                               "address": self.net.host})
        if not self.joining:
            return
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while time.monotonic() < deadline and not self.welcomed:
            if self.chan.poll(100):
                self.read_messages()
            if not self.running:
                raise SystemExit(f"dragon-nb agent: the head sent this agent away: "
                                 f"{self.sent_away}")
        if self.welcomed:
            return
        raise SystemExit(f"dragon-nb agent: the head at {self.args.head} did not welcome "
                         f"this agent within {JOIN_TIMEOUT_S:g} s: a wrong or missing key, "
                         f"or an address this host cannot reach")

    def run(self):
        try:
            self.join()
        except SystemExit:       # never welcomed: what we queued will never go anywhere
            self.chan.close(linger=0)
            self.ctx.term()
            raise
        if self.joining:          # a host taken away (SIGTERM) leaves the runtime cleanly
            signal.signal(signal.SIGTERM, lambda *a: setattr(self, "running", False))
        poller = zmq.Poller()
        poller.register(self.chan.sock, zmq.POLLIN)
        poller.register(self.sig_r, zmq.POLLIN)
        if self.lifeline_fd is not None:
            poller.register(self.lifeline_fd, zmq.POLLIN)
        interval = self.args.telemetry_interval
        next_tel = time.monotonic()
        while self.running:
            timeout = max(0.0, next_tel - time.monotonic())
            events = dict(poller.poll(timeout * 1000))
            if self.lifeline_fd is not None and self.lifeline_fd in events:
                break
            if self.sig_r in events:
                try:
                    while os.read(self.sig_r, 512):
                        pass
                except BlockingIOError:
                    pass
            self.reap()
            if self.chan.sock in events:
                self.read_messages()
            if time.monotonic() >= next_tel:
                self.telemetry()
                next_tel = time.monotonic() + interval
            if self.joining and time.monotonic() - self.heard > HEAD_TIMEOUT_S:
                log.warning("no word from the head for %g s: stopping", HEAD_TIMEOUT_S)
                break
        self.stop_children()
        if self.joining:
            self.chan.send(P.EVT, {"op": P.Op.LEAVING, "why": "its agent stopped"})
        self.chan.close(linger=500 if self.joining else 0)
        self.ctx.term()

    # -- what the head says -----------------------------------------------------------
    def read_messages(self):
        for _ident, kind, body, _bufs in self.chan.drain(_dropped):
            if not isinstance(body, dict):
                continue
            self.heard = time.monotonic()
            try:
                self.dispatch(kind, body)
            except Exception as e:             # a well-signed but nonsensical message
                _dropped("dropped a %r message it could not act on: %r", kind, e)

    @HANDLERS.on(P.EVT, P.Op.GOODBYE)
    def on_goodbye(self, body):
        self.sent_away = body.get("why")
        log.warning("the head sent this agent away: %s", self.sent_away)
        self.running = False

    @HANDLERS.on(P.EVT, P.Op.PING)
    def on_ping(self, body):
        """Nothing to do: hearing it is the point (``heard``)."""

    @HANDLERS.on(P.EVT, P.Op.WELCOME)
    def on_welcome(self, body):
        """The head took the registration. A joining agent learns its node id, the
        telemetry rate and the modules to import before any fork; a second welcome
        (a registration sent twice) changes nothing."""
        if self.welcomed:
            return
        self.welcomed = True
        if self.joining:
            self.node = int(body["node"])
            self.args.telemetry_interval = float(body.get("telemetry_interval",
                                                          TELEMETRY_INTERVAL_S))
            for module in filter(None, (body.get("preload") or "").split(",")):
                importlib.import_module(module)
            log.info("joined %s as node %s", self.args.head, self.node)
        self.heard = time.monotonic()

    @HANDLERS.on(P.REQ, P.Op.SPAWN)
    def on_spawn(self, body):
        try:
            pids = self.spawn(body)
            self.chan.send(P.REP, {"rid": body["rid"], "ok": True, "pids": pids})
        except Exception as e:
            self.chan.send(P.REP, {"rid": body["rid"], "ok": False,
                                   "error": f"node {self.node}: {e}"})

    @HANDLERS.on(P.REQ, P.Op.KILL)
    def on_kill_confirmed(self, body):
        """A client waits on it: say when it is sent."""
        self.kill(body.get("pids", ()), body.get("sig", signal.SIGTERM))
        self.chan.send(P.REP, {"rid": body["rid"], "ok": True})

    @HANDLERS.on(P.EVT, P.Op.KILL)
    def on_kill(self, body):
        self.kill(body.get("pids", ()), body.get("sig", signal.SIGTERM))


def arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--connect", "--head", dest="head", metavar="ADDRESS", required=True,
                    help="the head's address, e.g. tcp://10.0.0.1:5555")
    ap.add_argument("--key-file", default=None,
                    help="the runtime's connection file (0600), or - to read the key "
                         "from standard input (which then stays open as a lifeline)")
    ap.add_argument("--name", default=None, help="this node's name (default: hostname)")
    ap.add_argument("--listen", default=None,
                    help="address to bind this host's endpoints on (default: the "
                         "interface that routes to the head)")
    ap.add_argument("--node", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpus", default="", help="cores to report (default: this host's)")
    ap.add_argument("--mem", type=int, default=0, help="memory to report, bytes")
    ap.add_argument("--telemetry-interval", type=float, default=TELEMETRY_INTERVAL_S,
                    help=argparse.SUPPRESS)
    ap.add_argument("--preload", default="", help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    return ap


def main(argv=None, prog: str = "dragon_nb.runtime.agent"):
    args = arguments(argparse.ArgumentParser(prog=prog)).parse_args(argv)
    if args.node is not None:            # started by the head: tied to it
        launch.set_pdeathsig(signal.SIGKILL)
        if args.parent_pid and os.getppid() != args.parent_pid:
            return 1
    logging.basicConfig(level=os.environ.get("DRAGON_NB_LOGLEVEL", "WARNING"),
                        format=f"dragon-nb agent {args.name or args.node or ''}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    key = None
    if args.key_file:
        try:
            key = network.read_key_file(args.key_file)[0]
        except (OSError, ValueError) as e:
            print(f"dragon-nb agent: {e}", file=sys.stderr)
            return 2
        if args.key_file == "-" and args.lifeline_fd is None:
            args.lifeline_fd = 0          # the launcher's pipe: EOF when the head goes
    elif args.head.startswith("tcp://"):
        print("dragon-nb agent: a TCP head needs the runtime's key: --key-file FILE",
              file=sys.stderr)
        return 2
    for module in filter(None, args.preload.split(",")):
        importlib.import_module(module)     # so forked children start warm
    if args.node is not None:
        rundir = os.path.dirname(args.head[len("ipc://"):]) if args.head.startswith("ipc://") \
            else launch.make_runtime_dir()
        host = args.listen
    else:
        try:
            host = args.listen or network.route_source(_head_host(args.head))
            if args.listen:
                host = network.resolve_interface(args.listen)
        except (OSError, ValueError) as e:
            print(f"dragon-nb agent: cannot reach the head at {args.head}: {e}",
                  file=sys.stderr)
            return 2
        rundir = launch.make_runtime_dir()
    net = network.Network(rundir, host if key is not None else None, key)
    network.set_current(net)
    try:
        Agent(args, net).run()
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        if args.node is None:
            launch.remove_runtime_dir(rundir)
    return 0


def _head_host(address: str) -> str:
    hostport = address.split("://", 1)[-1]
    host = hostport.rsplit(":", 1)[0].strip("[]")
    return socket.gethostbyname(host) if ":" not in host else host


if __name__ == "__main__":
    sys.exit(main())
