"""The head: the runtime's registry of nodes and processes.

It starts one agent per virtual node, places service processes (pool
workers, DDict managers, ...) on nodes, relays spawn/kill requests to agents,
fans telemetry and exit events out on one PUB socket, and tears everything
down when its client goes away. Tasks and results never pass through it.

With ``--listen ADDR`` it also binds TCP on that address, signs every message
with the runtime's key (``--key-file``), and takes agents that join from other
hosts: launched by it (``--hosts``, ``--launcher``) or started by hand with
``dragon-nb agent --connect``. Agents on other hosts are not its children, so
their liveness is a heartbeat: telemetry one way, pings the other; a node
silent for ``NODE_TIMEOUT_S`` is lost, just as if its agent had died here.

Run as ``python -m dragon_nb.runtime.head --rundir DIR --nodes N ...``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import subprocess
import time

import psutil
import zmq

from dragon_nb.runtime import hosts as hosts_mod
from dragon_nb.runtime import launch, network
from dragon_nb.runtime.records import NodeRecord, NodeState, Pending
from dragon_nb.tunables import (AGENT_POLL_S, JOIN_GRACE_S, KILL_TIMEOUT_S, NODE_TIMEOUT_S,
                                PING_S, SHUTDOWN_GRACE_S, SPAWN_TIMEOUT_S,
                                TELEMETRY_INTERVAL_S)
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.head")
_dropped = P.DropLog(log)


def split_host(nodes: int, cpus_per_node: int | None = None) -> list[dict]:
    """Virtual nodes on this host: cores dealt out in turn, memory split evenly.

    With ``cpus_per_node`` each node claims that many (possibly shared) cores,
    to stand in for a cluster whose nodes are bigger than this host.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))
    mem = psutil.virtual_memory().total
    hostname = socket.gethostname()
    out = []
    for i in range(nodes):
        if cpus_per_node:
            mine = [cpus[(i * cpus_per_node + j) % len(cpus)] for j in range(cpus_per_node)]
        else:
            mine = cpus[i::nodes] if nodes <= len(cpus) else [cpus[i % len(cpus)]]
        out.append({"id": i, "name": f"node{i}", "hostname": hostname,
                    "cpus": mine, "num_cpus": len(mine),
                    "physical_mem": mem // nodes, "virtual": nodes > 1})
    return out


HANDLERS = P.Handlers("head")


class Head:
    """The head's state (the node and process tables, requests waiting on agents)
    and its handlers, one per message it takes (``HANDLERS``)."""

    def __init__(self, args):
        self.args = args
        self.rundir = args.rundir
        self.ctx = zmq.Context()
        key = network.read_key_file(args.key_file)[0] if args.key_file else None
        self.net = network.Network(self.rundir, args.listen, key)
        self.router = P.Channel(self.net.serve(self.ctx.socket(zmq.ROUTER)), self.net.codec(),
                                routed=True)
        self.router.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.address = f"ipc://{self.rundir}/head"      # this host's processes
        self.router.sock.bind(self.address)
        self.pub = P.Channel(self.net.serve(self.ctx.socket(zmq.PUB)), self.net.codec())
        self.events_address = f"ipc://{self.rundir}/events"
        self.pub.sock.bind(self.events_address)
        # other hosts' agents, and the processes they run (which may start processes
        # of their own and wait for them to exit), reach the ROUTER and the event stream
        self.tcp_address = self.tcp_events_address = None
        self.shared_key_file = None        # a copy for srun agents, removed at the end
        if self.net.tcp:
            self.tcp_address = self.net.bind(self.router.sock, "head", args.port)
            self.tcp_events_address = self.net.bind(self.pub.sock, "events")
            network.write_connection_file(args.key_file, key, head=self.tcp_address)
        self.nodes: dict[int, NodeRecord] = {}
        self.agents: dict[int, tuple] = {}         # node id -> (Popen, lifeline wfd)
        self.launched: list[tuple] = []            # (host, Popen) of launchers
        self.procs: dict[tuple, str] = {}          # (node, pid) -> owner
        self.ident_to_node: dict[bytes, int] = {}
        self.next_node = args.nodes
        self.rids = itertools.count(1)
        self.pending: dict[int, Pending] = {}       # head rid -> a client request
        self.abandoned: list[int] = []              # failed requests some nodes still answer
        self.ready_waiters: list[tuple] = []
        hosts = [h for h in (args.hosts or "").split(",") if h]
        self.expected_nodes = args.nodes + len(hosts)
        self.hosts = hosts
        self.dropped = 0
        self.running = True
        self.dispatch = HANDLERS.bind(self)

    # -- agents -------------------------------------------------------------
    def start_agents(self):
        net_args = ["--listen", self.net.host, "--key-file", self.args.key_file] \
            if self.net.tcp else []
        for info in (split_host(self.args.nodes, self.args.cpus_per_node)
                     if self.args.nodes else []):
            proc, wfd = launch.start_child("dragon_nb.runtime.agent", [
                "--head", self.address, "--node", str(info["id"]),
                "--cpus", ",".join(map(str, info["cpus"])),
                "--mem", str(info["physical_mem"]),
                "--telemetry-interval", str(self.args.telemetry_interval),
                "--preload", self.args.preload or "",
                "--parent-pid", str(os.getpid()), *net_args])
            self.agents[info["id"]] = (proc, wfd)
            self.nodes[info["id"]] = NodeRecord(
                id=info["id"], name=info["name"], hostname=info["hostname"],
                cpus=info["cpus"], physical_mem=info["physical_mem"],
                virtual=info["virtual"], agent_pid=proc.pid, address=self.net.host)
        self.launch_hosts()

    def launch_hosts(self):
        """Start an agent on each of ``--hosts`` with the chosen launcher."""
        if not self.hosts:
            return
        key = self.net.key
        key_file = self.args.key_file
        if self.args.launcher == "srun":
            key_file = self.shared_key_file = hosts_mod.shared_copy(key_file)
        for host, argv, key_on_stdin in hosts_mod.launch_commands(
                self.hosts, self.args.launcher, self.tcp_address, key_file):
            log.info("launching: %s", hosts_mod.show([(host, argv, key_on_stdin)]))
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, start_new_session=True,
                                        close_fds=True)
            except OSError as e:
                log.error("cannot launch an agent on %s: %s", host or self.hosts, e)
                self.expected_nodes -= 1 if host else len(self.hosts)
                continue
            if key_on_stdin:
                try:
                    proc.stdin.write(key.hex().encode() + b"\n")
                    proc.stdin.flush()       # then kept open: the agent's lifeline
                except OSError as e:         # it exited at once: check_agents says so
                    log.error("the launcher for %s took no key: %s", host, e)
            self.launched.append((host, proc))

    def check_agents(self):
        for nid, (proc, _) in list(self.agents.items()):
            code = proc.poll()
            if code is not None and self.nodes[nid].state is not NodeState.STOPPING:
                self.node_lost(nid, f"agent exited with code {code}")
        for host, proc in list(self.launched):
            code = proc.poll()
            if code is None:
                continue
            self.launched.remove((host, proc))
            names = [host] if host else list(self.hosts)
            mine = [n for n in self.nodes.values() if n.remote and n.name in names]
            for node in mine:
                if node.up:
                    self.node_lost(node.id, f"its launcher exited with code {code}")
            if len(mine) < len(names) and self.running:
                why = (f"the agent launched on {', '.join(names)} exited with code {code} "
                       f"before joining")
                log.error("%s", why)
                self.expected_nodes -= len(names) - len(mine)
                for wident, wrid in self.ready_waiters:
                    self.reply(wident, wrid, ok=False, error=why)
                self.ready_waiters.clear()
        now = time.monotonic()
        for hrid, pend in list(self.pending.items()):
            if now > pend.deadline:
                late = ", ".join(f"node {n}" for n in sorted(pend.waiting))
                what = "confirm the signal" if pend.op == P.Op.KILL else "start the processes"
                self.finish(hrid, ok=False, error=f"{late} did not {what} in time")
        for nid, node in list(self.nodes.items()):
            if not node.remote or not node.up:
                continue
            if now - node.seen > NODE_TIMEOUT_S:
                self.node_lost(nid, f"no word from its agent for {NODE_TIMEOUT_S:g} s")
            elif now - node.pinged >= PING_S:
                node.pinged = now
                self.router.send(P.EVT, {"op": P.Op.PING}, to=node.ident)

    def node_lost(self, nid: int, why: str):
        node = self.nodes[nid]
        if node.lost:
            return
        node.state, node.lost = NodeState.LOST, why
        log.warning("node %s lost: %s", nid, why)
        if node.remote and node.ident:    # if it still hears us: stop
            self.router.send(P.EVT, {"op": P.Op.GOODBYE, "why": why}, to=node.ident)
        self.forget_procs(nid, [pid for (n, pid) in self.procs if n == nid], {}, why)
        self.pub.publish(P.TOPIC_NODES, P.EVT, {"event": "lost", "node": nid, "why": why})
        for rid, pend in list(self.pending.items()):
            if nid not in pend.waiting:
                continue
            if pend.op != P.Op.KILL:
                self.finish(rid, ok=False, error=f"node {nid} lost during spawn: {why}")
            else:                            # its processes went with it: signal done
                pend.waiting.discard(nid)
                if not pend.waiting:
                    self.finish(rid, ok=True)

    def forget_procs(self, nid: int, pids, codes: dict, why: str | None = None):
        """Processes of node ``nid`` that are gone: out of the table, and an
        ``exit.<owner>`` event for each owner (with the exit code where known)."""
        gone: dict[str, list] = {}
        for pid in pids:
            owner = self.procs.pop((nid, pid), None)
            if owner is not None:
                gone.setdefault(owner, []).append((nid, pid, codes.get(pid)))
        for owner, procs in gone.items():
            body = {"procs": procs} if why is None else {"procs": procs, "why": why}
            self.pub.publish(P.TOPIC_EXIT + owner.encode(), P.EVT, body)

    def live_nodes(self) -> list[NodeRecord]:
        return [n for n in self.nodes.values() if n.up]

    # -- client requests ----------------------------------------------------
    def reply(self, ident, rid, ok=True, **body):
        self.router.send(P.REP, {"rid": rid, "ok": ok, **body}, to=ident)

    def public_nodes(self) -> list[dict]:
        return [n.public() for n in sorted(self.nodes.values(), key=lambda n: n.id)]

    @HANDLERS.on(P.REQ, P.Op.READY)
    def on_ready(self, body, ident):
        if len(self.live_nodes()) >= self.expected_nodes:
            self.reply(ident, body.get("rid"), **self.ready_body())
        else:
            self.ready_waiters.append((ident, body.get("rid")))

    @HANDLERS.on(P.REQ, P.Op.NODES)
    def on_nodes(self, body, ident):
        self.reply(ident, body.get("rid"), nodes=self.public_nodes())

    @HANDLERS.on(P.REQ, P.Op.PROCS)
    def on_procs(self, body, ident):
        self.reply(ident, body.get("rid"),
                   procs=[(n, p, o) for (n, p), o in self.procs.items()])

    @HANDLERS.on(P.REQ, P.Op.STATS)
    def on_stats(self, body, ident):
        self.reply(ident, body.get("rid"), dropped=self.dropped, replayed=self.router.codec.replays,
                   pending=[(p.op, sorted(p.waiting)) for p in self.pending.values()])

    @HANDLERS.on(P.REQ, P.Op.SHUTDOWN)
    def on_shutdown(self, body, ident):
        self.running = False
        self.shutdown_reply = (ident, body.get("rid"))

    def place(self, count: int, allowed) -> list[int]:
        """Pick a node for each of ``count`` processes: fewest processes first."""
        live = {n.id for n in self.live_nodes()}
        allowed = [n for n in (allowed if allowed is not None else sorted(live))]
        missing = [n for n in allowed if n not in live]
        if missing or not allowed:
            raise ValueError(f"no such live node(s): {missing or allowed}; "
                             f"live nodes are {sorted(live)}")
        load = {n: 0 for n in allowed}
        for (node, _pid) in self.procs:
            if node in load:
                load[node] += 1
        out = []
        for _ in range(count):
            n = min(allowed, key=lambda n: (load[n], n))
            load[n] += 1
            out.append(n)
        return out

    @HANDLERS.on(P.REQ, P.Op.SPAWN)
    def on_spawn(self, body, ident):
        try:
            placement = self.place(int(body["count"]), body.get("nodes"))
        except (ValueError, KeyError) as e:
            return self.reply(ident, body.get("rid"), ok=False, error=str(e))
        per_node: dict[int, int] = {}
        for n in placement:
            per_node[n] = per_node.get(n, 0) + 1
        hrid = next(self.rids)
        self.pending[hrid] = Pending(
            op=P.Op.SPAWN, ident=ident, rid=body.get("rid"), owner=body["owner"],
            waiting=set(per_node),
            deadline=time.monotonic() + float(body.get("within") or SPAWN_TIMEOUT_S))
        for n, k in per_node.items():
            self.router.send(P.REQ, {"op": P.Op.SPAWN, "rid": hrid, "count": k,
                                     "entry": body["entry"], "owner": body["owner"],
                                     "spec": body["spec"]}, to=self.nodes[n].ident)

    @HANDLERS.on(P.REQ, P.Op.KILL)
    def on_kill(self, body, ident):
        """A client's kill: answered once every agent concerned has sent the signal
        (or its node was lost), so that what the caller does next meets the process
        already signalled, not about to be."""
        try:
            sig, by_node = self.kill_targets(body)
        except (TypeError, ValueError) as e:
            return self.reply(ident, body.get("rid"), ok=False, error=f"bad kill: {e}")
        waiting = {n for n in by_node if n in self.nodes and self.nodes[n].up}
        if not waiting:
            return self.reply(ident, body.get("rid"))
        hrid = next(self.rids)
        self.pending[hrid] = Pending(op=P.Op.KILL, ident=ident, rid=body.get("rid"),
                                     waiting=waiting,
                                     deadline=time.monotonic() + KILL_TIMEOUT_S)
        for n in waiting:
            self.router.send(P.REQ, {"op": P.Op.KILL, "rid": hrid, "pids": by_node[n],
                                     "sig": sig}, to=self.nodes[n].ident)

    @HANDLERS.on(P.EVT, P.Op.SIGNAL)
    def on_signal(self, body, ident):
        """A client's kill that nobody waits for: passed on, never answered."""
        try:
            sig, by_node = self.kill_targets(body)
        except (TypeError, ValueError) as e:
            _dropped("dropped a bad signal request: %s", e)
            return
        self.kill([(n, pid) for n, pids in by_node.items() for pid in pids], sig)

    @staticmethod
    def kill_targets(body) -> tuple[int, dict[int, list]]:
        sig = int(signal.Signals(int(body.get("sig", signal.SIGTERM))))
        return sig, Head.by_node(body.get("procs", ()))

    @HANDLERS.on(P.REP)
    def on_agent_reply(self, body, ident):
        nid = self.ident_to_node.get(ident)
        if nid is None:
            return
        pend = self.pending.get(body.get("rid"))
        if pend is None:
            if body.get("rid") in self.abandoned and body.get("pids"):
                # the request failed elsewhere first: what this node started, nobody wants
                self.router.send(P.EVT, {"op": P.Op.KILL, "pids": list(body["pids"]),
                                         "sig": int(signal.SIGKILL)},
                                 to=self.nodes[nid].ident)
            return
        pend.waiting.discard(nid)
        if not body.get("ok", True):
            return self.finish(body["rid"], ok=False, error=body.get("error"))
        for pid in body.get("pids", ()):
            self.procs[(nid, pid)] = pend.owner
            pend.procs.append((nid, pid))
        if not pend.waiting:
            self.finish(body["rid"], ok=True)

    def finish(self, hrid, ok, error=None):
        pend = self.pending.pop(hrid)
        if pend.op == P.Op.KILL:
            return self.reply(pend.ident, pend.rid, ok=ok, error=error)
        if ok:
            self.reply(pend.ident, pend.rid, procs=pend.procs)
            return
        # all or nothing: what other nodes started for a failed request is killed now,
        # and whatever they report later too
        for proc in pend.procs:
            self.procs.pop(proc, None)
        self.kill(pend.procs, signal.SIGKILL)
        if pend.waiting:
            self.abandoned.append(hrid)
            del self.abandoned[:-256]
        self.reply(pend.ident, pend.rid, ok=False, error=error, procs=[])

    @staticmethod
    def by_node(procs) -> dict[int, list]:
        out: dict[int, list] = {}
        for node, pid in procs:
            out.setdefault(int(node), []).append(int(pid))
        return out

    def kill(self, procs, sig):
        """Signal processes and go on: for the head's own clean-ups."""
        for nid, pids in self.by_node(procs).items():
            node = self.nodes.get(nid)
            if node and node.up:
                self.router.send(P.EVT, {"op": P.Op.KILL, "pids": pids, "sig": int(sig)},
                                 to=node.ident)

    # -- agent events --------------------------------------------------------
    def ready_body(self) -> dict:
        return {"nodes": self.public_nodes(), "events": self.events_address,
                "tcp_address": self.tcp_address, "tcp_events": self.tcp_events_address}

    @HANDLERS.on(P.EVT, P.Op.REGISTER)
    def on_register(self, body, ident):
        """An agent says hello: one this head started, or one joining from another host."""
        nid = body.get("node")
        if nid is None:                      # joining: a new node id, its own figures
            if ident in self.ident_to_node:
                nid = self.ident_to_node[ident]
            else:
                nid = self.next_node
                self.next_node += 1
            try:
                self.nodes[nid] = NodeRecord(
                    id=nid, name=str(body.get("name") or body["hostname"]),
                    hostname=str(body["hostname"]), cpus=[int(c) for c in body["cpus"]],
                    physical_mem=int(body["physical_mem"]), agent_pid=int(body["pid"]),
                    address=str(body.get("address")), remote=True)
            except (KeyError, TypeError, ValueError) as e:
                _dropped("dropped a malformed registration: %r", e)
                return
        node = self.nodes.get(nid)
        if node is None or node.lost:
            self.router.send(P.EVT, {"op": P.Op.GOODBYE, "why": "unknown or lost node"},
                             to=ident)
            return
        self.ident_to_node[ident] = nid
        # a joining agent imports the entry modules after its welcome (a cold
        # shared file system may take a while): its silence is counted from then on
        grace = JOIN_GRACE_S if node.remote else 0.0
        node.ident, node.state, node.seen = ident, NodeState.UP, time.monotonic() + grace
        node.hostname = str(body.get("hostname", node.hostname))
        node.pid_space = str(body.get("pid_space", ""))
        self.router.send(P.EVT, {"op": P.Op.WELCOME, "node": nid, "preload": self.args.preload,
                                 "telemetry_interval": self.args.telemetry_interval},
                         to=ident)
        log.info("node %s joined: %s (%s)", nid, node.name, node.address)
        self.pub.publish(P.TOPIC_NODES, P.EVT, {"event": "joined", "node": nid})
        if len(self.live_nodes()) >= self.expected_nodes:
            for wident, wrid in self.ready_waiters:
                self.reply(wident, wrid, **self.ready_body())
            self.ready_waiters.clear()

    def agent_node(self, ident) -> NodeRecord | None:
        """The node whose agent sent a message, heard now; None (and sent away, if it
        was given up) when it is not one the head takes messages from."""
        nid = self.ident_to_node.get(ident)
        if nid is None:
            return None
        node = self.nodes[nid]
        if node.lost:                        # back after it was given up: send it away
            self.router.send(P.EVT, {"op": P.Op.GOODBYE, "why": node.lost}, to=ident)
            return None
        node.seen = time.monotonic()
        return node

    @HANDLERS.on(P.EVT, P.Op.LEAVING)
    def on_leaving(self, body, ident):
        node = self.agent_node(ident)
        if node is not None:
            self.node_lost(node.id, body.get("why") or "its agent left")

    @HANDLERS.on(P.EVT, P.Op.TELEMETRY)
    def on_telemetry(self, body, ident):
        node = self.agent_node(ident)
        if node is None:
            return
        body["node"] = node.id
        self.reconcile(node.id, body)
        self.pub.publish(P.TOPIC_TELEMETRY + str(node.id).encode(), P.EVT, body)

    def reconcile(self, nid: int, body) -> None:
        """A process the table holds that the agent no longer lists has exited, even
        if its ``exited`` event was lost (on a TCP link cut as it was sent). The
        agent's messages arrive in order and a process is listed from its spawn
        reply on, so one missing from a later list is gone; the agent's recent
        exits give its code."""
        live = body.get("pids")
        if live is None:
            return
        live = set(live)
        missing = [pid for (n, pid) in self.procs if n == nid and pid not in live]
        if missing:
            codes = dict(body.get("exits") or ())
            log.info("node %s: processes %s exited unreported", nid, missing)
            self.forget_procs(nid, missing, codes)

    @HANDLERS.on(P.EVT, P.Op.EXITED)
    def on_exited(self, body, ident):
        node = self.agent_node(ident)
        if node is not None:
            codes = dict(body["procs"])
            self.forget_procs(node.id, list(codes), codes)

    # -- main loop ------------------------------------------------------------
    def run(self, lifeline_fd: int | None):
        self.start_agents()
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        if lifeline_fd is not None:
            poller.register(lifeline_fd, zmq.POLLIN)
        last_check = 0.0
        while self.running:
            events = dict(poller.poll(AGENT_POLL_S * 1000))
            if lifeline_fd is not None and lifeline_fd in events:
                log.info("client gone; shutting down")
                break
            if self.router.sock in events:
                self.read_messages()
            now = time.monotonic()
            if now - last_check >= AGENT_POLL_S:
                last_check = now
                self.check_agents()
        self.shutdown()

    def read_messages(self):
        for _ in range(1000):
            try:
                ident, kind, body, _bufs = self.router.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except P.ReplayError as e:     # counted by the codec (``replayed``)
                _dropped("dropped a message: %s", e)
                continue
            except P.ProtocolError as e:
                self.dropped += 1
                _dropped("dropped a message: %s", e)
                continue
            if not isinstance(body, dict):
                self.dropped += 1
                _dropped("dropped a message with a non-dict body")
                continue
            try:
                self.dispatch(kind, body, ident)
            except Exception as e:       # a well-signed but nonsensical message
                self.dropped += 1
                _dropped("dropped a %r message it could not act on: %r", kind, e)

    def shutdown(self):
        for node in self.nodes.values():
            if node.state is not NodeState.LOST:
                node.state = NodeState.STOPPING    # expected exits are not node losses
        for proc, wfd in self.agents.values():
            if wfd is not None:
                os.close(wfd)          # lifeline EOF: agent stops its children and exits
        for node in self.nodes.values():
            if node.remote and node.ident:     # joined by hand: told
                self.router.send(P.EVT, {"op": P.Op.GOODBYE, "why": "the runtime stopped"},
                                 to=node.ident)
        for _host, proc in self.launched:
            try:
                proc.stdin.close()     # their lifeline: the agents stop and exit
            except OSError:
                pass
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in [p for p, _ in self.agents.values()] + [p for _, p in self.launched]:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                proc.kill()
                proc.wait(5)
        reply = getattr(self, "shutdown_reply", None)
        if reply is not None:
            self.reply(*reply)
        if self.shared_key_file:
            try:
                os.unlink(self.shared_key_file)
            except OSError:
                pass
        self.router.close(linger=200)
        self.pub.close(linger=0)
        self.ctx.term()
        launch.remove_runtime_dir(self.rundir)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="dragon_nb.runtime.head")
    ap.add_argument("--rundir", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--cpus-per-node", type=int, default=None)
    ap.add_argument("--telemetry-interval", type=float, default=TELEMETRY_INTERVAL_S)
    ap.add_argument("--preload", default="")
    ap.add_argument("--lifeline-fd", type=int)
    ap.add_argument("--listen", default=None, help="also bind TCP on this address")
    ap.add_argument("--port", type=int, default=0, help="TCP port (default: any free)")
    ap.add_argument("--key-file", default=None, help="connection file with the key")
    ap.add_argument("--hosts", default="", help="launch an agent on each of these")
    ap.add_argument("--launcher", default="ssh")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DRAGON_NB_LOGLEVEL", "WARNING"),
                        format="dragon-nb head: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    head = Head(args)
    signal.signal(signal.SIGTERM, lambda *a: setattr(head, "running", False))
    try:
        head.run(args.lifeline_fd)
    finally:
        launch.remove_runtime_dir(args.rundir)


if __name__ == "__main__":
    main()
