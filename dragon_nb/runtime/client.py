"""The client's handle on a runtime: start it, ask the head things, stop it.

One process (a kernel or a script) usually holds one ``Runtime``; the module
functions ``start``/``stop``/``get_runtime`` manage that current one, and
features call ``get_runtime()`` so the runtime starts on first use.
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import threading
import time
import weakref

import zmq

from dragon_nb import checks
from dragon_nb.errors import (RuntimeRequestError, RuntimeRunningError, RuntimeStoppedError,
                              RuntimeTimeoutError)
from dragon_nb.runtime import hosts as hosts_mod
from dragon_nb.runtime import launch, network
from dragon_nb.tunables import DEFAULT_TIMEOUT, KILL_NOWAIT_LOCK_S
from dragon_nb.wire import protocol as P


# Modules whose entry points agents may fork; features register theirs at import
# so agents import them before forking (the runtime never imports a feature).
ENTRY_MODULES: list[str] = []


def register_entry_module(module: str) -> None:
    if module not in ENTRY_MODULES:
        ENTRY_MODULES.append(module)


_ctx_pid = None
_ctx = None


def zmq_context() -> zmq.Context:
    """This process's zmq context (a fresh one after a fork)."""
    global _ctx, _ctx_pid
    if _ctx is None or _ctx_pid != os.getpid():
        _ctx, _ctx_pid = zmq.Context(), os.getpid()
    return _ctx


class Runtime:
    """A running head and its agents: ``nodes`` virtual nodes on this host, and
    one node on each of ``hosts`` (agents started there with ``launcher``).

    With ``hosts`` or ``listen`` the head also binds TCP on ``listen`` (an
    address or interface name; default: the interface that routes to the
    first host, never all interfaces); every socket then speaks CurveZMQ and
    every message is signed, with a key kept in the 0600 ``connection_file``
    (see runtime/network.py); agents started by hand join with
    ``dragon-nb agent --connect <tcp_address> --key-file <connection_file>``.
    """

    def __init__(self, nodes: int = 1, workers_per_node: int | None = None, *,
                 cpus_per_node: int | None = None, telemetry_interval: float = 0.25,
                 timeout: float = DEFAULT_TIMEOUT, hosts=None, listen: str | None = None,
                 launcher: str = "ssh", port: int = 0):
        checks.positive_seconds("timeout", timeout)
        checks.positive_seconds("telemetry_interval", telemetry_interval)
        hosts = _host_list(hosts)
        networked = bool(hosts) or listen is not None
        nodes = checks.count("nodes", nodes, low=0 if networked else 1)
        port = checks.port("port", port)
        workers_per_node = checks.optional(checks.count, "workers_per_node", workers_per_node)
        cpus_per_node = checks.optional(checks.count, "cpus_per_node", cpus_per_node)
        if networked:
            if hosts:
                hosts_mod.check_launcher(launcher)
            host = network.resolve_interface(listen, hosts)
        self.n_nodes = nodes
        self.hosts, self.listen, self.launcher = hosts, listen, launcher   # for a restart
        self.workers_per_node = workers_per_node
        self.timeout = timeout
        self.pid = os.getpid()
        self.rundir = launch.make_runtime_dir()
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self.connection_file = self.tcp_address = None
        net_args = []
        if networked:
            key = network.new_key()
            self.connection_file = network.write_connection_file(
                os.path.join(self.rundir, network.CONNECTION_FILE), key)
            self.network = network.Network(self.rundir, host, key)
            net_args = ["--listen", host, "--key-file", self.connection_file,
                        "--port", str(port), "--hosts", ",".join(hosts),
                        "--launcher", launcher]
        else:
            self.network = network.Network(self.rundir)
        try:
            self._proc, self._lifeline = launch.start_child("dragon_nb.runtime.head", [
                "--rundir", self.rundir, "--nodes", str(nodes),
                *(["--cpus-per-node", str(cpus_per_node)] if cpus_per_node else []),
                "--telemetry-interval", str(telemetry_interval),
                "--preload", ",".join(ENTRY_MODULES), *net_args])
            self.address = f"ipc://{self.rundir}/head"
            self._chan = P.Channel(zmq_context().socket(zmq.DEALER), self.network.codec())
            self.network.connect(self._chan.sock, self.address)
            reply = self.request(P.Op.READY, timeout=timeout + 10.0 * bool(hosts))
        except BaseException:
            self._abort()
            raise
        _lifelines.add(self._lifeline)
        self.events_address = reply["events"]
        self.tcp_address = reply.get("tcp_address")
        self._nodes = reply["nodes"]
        network.set_current(self.network)     # what DDict handles in this process sign with
        self._finalizer = weakref.finalize(self, _finalize, self._proc, self._lifeline,
                                           self.rundir, 5.0, self.pid)

    @classmethod
    def attach(cls, address: str, net: network.Network,
               timeout: float = DEFAULT_TIMEOUT) -> "Runtime":
        """A handle on the runtime this process runs in (a Process or a Pool worker
        started by an agent): it asks the head at ``address`` for what it needs
        (spawns, kills, events), and stopping it closes only the handle."""
        self = cls.__new__(cls)
        self.n_nodes, self.hosts, self.listen, self.launcher = None, [], None, None
        self.workers_per_node = None
        self.timeout = timeout
        self.pid = os.getpid()
        self.rundir = net.rundir
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self._proc = self._lifeline = self._finalizer = None
        self.connection_file = None
        self.network = net
        self.address = address
        self._chan = P.Channel(zmq_context().socket(zmq.DEALER), net.codec())
        net.connect(self._chan.sock, address)
        try:
            reply = self.request(P.Op.READY)
        except BaseException:
            self._chan.close(linger=0)
            raise
        self.tcp_address = reply.get("tcp_address")
        # the event stream on this host, or over TCP from another
        self.events_address = reply["tcp_events"] if address.startswith("tcp://") \
            else reply["events"]
        self._nodes = reply["nodes"]
        return self

    @property
    def attached(self) -> bool:
        """True in a process of the runtime: this handle did not start the head."""
        return self._proc is None

    # -- requests -----------------------------------------------------------------
    def request(self, op: str, timeout: float | None = None, **body) -> dict:
        """Send ``op`` to the head and wait for its reply; errors raise."""
        if self._closed:
            raise RuntimeStoppedError("the dragon-nb runtime has been stopped")
        if os.getpid() != self.pid:
            raise RuntimeStoppedError("a dragon-nb runtime cannot be used from a forked child")
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            rid = next(self._rids)
            self._chan.send(P.REQ, {"op": op, "rid": rid, **body})
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeTimeoutError(f"the runtime head did not answer {op!r} "
                                              f"within {timeout:g} s")
                if self._chan.sock.poll(min(left, 0.2) * 1000):
                    try:
                        _, kind, reply, _ = self._chan.recv()
                    except P.ProtocolError:
                        continue
                    if kind == P.REP and isinstance(reply, dict) and reply.get("rid") == rid:
                        break
                elif self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeStoppedError(f"the runtime head exited "
                                              f"(code {self._proc.returncode})")
        if not reply.get("ok", False):
            raise RuntimeRequestError(reply.get("error") or f"{op} failed")
        return reply

    # -- what features use ------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and (self._proc is None or self._proc.poll() is None)

    def nodes(self, refresh: bool = False) -> list[dict]:
        if refresh:
            self._nodes = self.request(P.Op.NODES)["nodes"]
        return self._nodes

    def cpu_count(self) -> int:
        """Cores on all nodes: the sum of every node's ``num_cpus``."""
        nodes = self.nodes(refresh=self.network.tcp)    # hosts may have joined or left
        return sum(n["num_cpus"] for n in nodes if n.get("alive", True)) or 1

    def default_workers(self) -> int:
        if self.workers_per_node:
            return self.workers_per_node * len(self.nodes())
        return self.cpu_count()

    def spawn(self, entry: str, spec: bytes, count: int, owner: str,
              nodes=None, timeout: float | None = None) -> list[tuple]:
        """Start ``count`` processes running ``entry(spec, ctx)``; -> [(node, pid)]."""
        timeout = self.timeout if timeout is None else timeout
        # the head gives up a little before we do, and kills what was started meanwhile
        reply = self.request(P.Op.SPAWN, entry=entry, spec=spec, count=count, owner=owner,
                             nodes=list(nodes) if nodes is not None else None,
                             within=max(0.1, timeout - 0.5), timeout=timeout)
        return [tuple(p) for p in reply["procs"]]

    def kill(self, procs, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        """Signal processes through their agents: once the agents have sent it, or,
        with ``wait=False``, as a message nobody answers (for a thread that must
        not block on the head: the pool's I/O thread)."""
        procs = [tuple(p) for p in procs]
        if wait:
            self.request(P.Op.KILL, procs=procs, sig=int(sig))
            return
        if self._closed or os.getpid() != self.pid:
            return
        if not self._lock.acquire(timeout=KILL_NOWAIT_LOCK_S):   # someone waits on the head
            raise RuntimeTimeoutError("the runtime handle is busy; the signal was not sent")
        try:
            self._chan.send(P.EVT, {"op": P.Op.SIGNAL, "procs": procs, "sig": int(sig)})
        finally:
            self._lock.release()

    def subscribe(self, *topics: bytes, context: zmq.Context | None = None) -> P.Channel:
        """A channel on the head's event stream (telemetry, exits, nodes): read it
        with ``drain_events``; poll ``.sock``."""
        sock = (context or zmq_context()).socket(zmq.SUB)
        for t in topics:
            sock.setsockopt(zmq.SUBSCRIBE, t)
        self.network.connect(sock, self.events_address)
        return P.Channel(sock, self.network.codec(), subscribed=True)

    # -- lifecycle ------------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        if self.attached:                    # the runtime is not ours to stop
            self._closed = True
            if os.getpid() == self.pid:
                self._chan.close(linger=0)
            return
        try:
            if os.getpid() == self.pid and self._proc.poll() is None:
                try:
                    self.request(P.Op.SHUTDOWN, timeout=timeout)
                except Exception:
                    pass
        finally:
            self._closed = True
            self._abort(timeout)
            self._finalizer.detach()
            if network.current() is self.network:
                network.set_current(None)

    def _abort(self, timeout: float = 5.0):
        self._closed = True
        if getattr(self, "_chan", None) is not None and os.getpid() == self.pid:
            self._chan.close(linger=0)
        proc = getattr(self, "_proc", None)
        _finalize(proc, getattr(self, "_lifeline", None), self.rundir, timeout, self.pid)
        self._lifeline = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def join_command(self) -> str | None:
        """How an agent on another host joins this runtime (None: not listening)."""
        if self.tcp_address is None:
            return None
        return (f"dragon-nb agent --connect {self.tcp_address} "
                f"--key-file {self.connection_file}")

    def __repr__(self):
        state = "running" if self.alive else "stopped"
        if self.attached:
            return f"<dragon_nb.Runtime {state}, attached to {self.address}>"
        where = f" listening on {self.tcp_address}" if self.tcp_address else ""
        return f"<dragon_nb.Runtime {state} nodes={self.n_nodes}{where} dir={self.rundir}>"


def drain_events(chan: P.Channel):
    """Yield the body of every event waiting on a ``subscribe`` channel, without
    blocking; a malformed one is skipped."""
    for _topic, _kind, body, _bufs in chan.drain():
        if isinstance(body, dict):
            yield body


def exit_reason(code) -> str:
    """How a process of an ``exit.<owner>`` event ended, for error messages."""
    if code is None:
        return "was lost with its node"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _host_list(hosts) -> list[str]:
    if hosts is None:
        return []
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    try:
        out = [str(h).strip() for h in hosts]
    except TypeError:
        raise TypeError(f"hosts must be a list of host names or a comma-separated "
                        f"string, not {hosts!r}") from None
    if not all(out) or len(set(out)) != len(out):
        raise ValueError(f"hosts must be distinct, non-empty names, not {hosts!r}")
    return out


def _finalize(proc, lifeline, rundir, timeout: float = 5.0, owner_pid: int | None = None):
    if owner_pid is not None and os.getpid() != owner_pid:
        return          # a forked child: the runtime is its parent's, not its to end
    if lifeline is not None:
        _lifelines.discard(lifeline)
        try:
            os.close(lifeline)
        except OSError:
            pass
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(timeout)
        except Exception:
            proc.kill()
            proc.wait(5)
    launch.remove_runtime_dir(rundir)
    try:                             # a killed head leaves srun's copy of the key behind
        os.unlink(hosts_mod.shared_copy_path(rundir))
    except OSError:
        pass


# --- the current runtime --------------------------------------------------------
_current: Runtime | None = None
_current_lock = threading.RLock()


def start(nodes: int | None = None, workers_per_node: int | None = None,
          **kwargs) -> Runtime:
    """Start the current runtime (``nodes`` virtual nodes on this host).

    ``workers_per_node``: workers a ``Pool()`` without a size puts on each node
    (default: the node's cores). ``cpus_per_node``: cores each virtual node
    claims (default: its share of the host's). Defaults come from the
    environment variables DRAGON_NB_NODES, DRAGON_NB_WORKERS_PER_NODE and
    DRAGON_NB_CPUS_PER_NODE (set by ``dragon-nb run``).
    Returns the Runtime, usable as a context manager that stops it.
    """
    global _current
    with _current_lock:
        if _current is not None and _current.alive:
            raise RuntimeRunningError(f"a dragon-nb runtime is already running: {_current!r}; "
                                      f"call dragon_nb.stop() first")
        if _current is not None and _current.pid == os.getpid():
            _current.stop()          # its head died: what it left goes before a new one
        if nodes is None:
            nodes = int(os.environ.get("DRAGON_NB_NODES", "1"))
        if workers_per_node is None and os.environ.get("DRAGON_NB_WORKERS_PER_NODE"):
            workers_per_node = int(os.environ["DRAGON_NB_WORKERS_PER_NODE"])
        if kwargs.get("cpus_per_node") is None and os.environ.get("DRAGON_NB_CPUS_PER_NODE"):
            kwargs["cpus_per_node"] = int(os.environ["DRAGON_NB_CPUS_PER_NODE"])
        _current = Runtime(nodes, workers_per_node, **kwargs)
        return _current


def stop() -> None:
    """Stop the current runtime, if any: every process and file it made goes."""
    global _current
    with _current_lock:
        rt, _current = _current, None
    if rt is not None:
        for hook in list(_stop_hooks):
            try:
                hook(rt)
            except Exception:
                pass
        rt.stop()


def get_runtime(auto_start: bool = True) -> Runtime | None:
    """The current runtime; started with defaults on first use. In a process the
    runtime runs (see ``attach_here``), the runtime it runs in."""
    global _current
    with _current_lock:
        if _current is not None and _current.alive and _current.pid == os.getpid():
            return _current
        if _home is not None and _home[2] == os.getpid():
            _current = Runtime.attach(_home[0], _home[1])
            return _current
        if not auto_start:
            return None
        return start()


_home: tuple | None = None     # (head address, Network, pid) of the runtime this process runs in


def attach_here(address: str, net: network.Network) -> None:
    """In a service process: ``get_runtime()`` is the runtime it runs in (connected
    on first use), so a Process or Pool worker can start processes and pools."""
    global _home
    _home = (address, net, os.getpid())


_stop_hooks: list = []


def on_stop(hook) -> None:
    """Call ``hook(runtime)`` before the current runtime stops (features close first)."""
    _stop_hooks.append(hook)


_lifelines: set = set()         # write ends of this process's runtimes' lifelines


def _after_fork_in_child():
    global _current, _home
    _current = _home = None    # the parent's runtime is not ours to use or stop
    for fd in list(_lifelines):  # nor to keep alive once the parent is gone
        try:
            os.close(fd)
        except OSError:
            pass
    _lifelines.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop)
