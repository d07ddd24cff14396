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
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.head")
_dropped = P.DropLog(log)

AGENT_POLL_S = 0.1
SHUTDOWN_GRACE_S = 2.0
NODE_TIMEOUT_S = 3.0       # an agent on another host silent this long is lost
SPAWN_TIMEOUT_S = 30.0     # a spawn some node has not answered by then fails whole
KILL_TIMEOUT_S = 5.0       # a kill some node has not confirmed by then is answered anyway
PING_S = 1.0               # how often agents on other hosts hear from the head
JOIN_GRACE_S = 10.0        # more silence allowed to an agent that has just joined


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


class Head:
    def __init__(self, args):
        self.args = args
        self.rundir = args.rundir
        self.ctx = zmq.Context()
        key = network.read_key_file(args.key_file)[0] if args.key_file else None
        self.net = network.Network(self.rundir, args.listen, key)
        self.codec = self.net.codec()
        self.router = P.Channel(self.net.serve(self.ctx.socket(zmq.ROUTER)), self.codec,
                                routed=True)
        self.router.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.address = f"ipc://{self.rundir}/head"      # this host's processes
        self.router.sock.bind(self.address)
        self.pub = P.Channel(self.net.serve(self.ctx.socket(zmq.PUB)), self.codec)
        self.events_address = f"ipc://{self.rundir}/events"
        self.pub.sock.bind(self.events_address)
        # other hosts' agents reach the ROUTER; the event stream stays on this host
        self.tcp_address = None
        self.shared_key_file = None        # a copy for srun agents, removed at the end
        if self.net.tcp:
            self.tcp_address = self.net.bind(self.router.sock, "head", args.port)
            network.write_connection_file(args.key_file, key, head=self.tcp_address)
        self.nodes: dict[int, dict] = {}           # node id -> info (+ "ident", "alive")
        self.agents: dict[int, tuple] = {}         # node id -> (Popen, lifeline wfd)
        self.launched: list[tuple] = []            # (host, Popen) of launchers
        self.procs: dict[tuple, str] = {}          # (node, pid) -> owner
        self.ident_to_node: dict[bytes, int] = {}
        self.next_node = args.nodes
        self.rids = itertools.count(1)
        self.pending: dict[int, dict] = {}          # head rid -> pending client request
        self.abandoned: list[int] = []              # failed requests some nodes still answer
        self.ready_waiters: list[tuple] = []
        hosts = [h for h in (args.hosts or "").split(",") if h]
        self.expected_nodes = args.nodes + len(hosts)
        self.hosts = hosts
        self.running = True

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
            info.update(alive=False, ident=None, agent_pid=proc.pid,
                        address=self.net.host)
            self.nodes[info["id"]] = info
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
            if code is not None and self.nodes[nid].get("alive", False) is not None:
                self.node_lost(nid, f"agent exited with code {code}")
        for host, proc in list(self.launched):
            code = proc.poll()
            if code is None:
                continue
            self.launched.remove((host, proc))
            names = [host] if host else list(self.hosts)
            mine = [n for n in self.nodes.values() if n.get("remote") and n["name"] in names]
            for info in mine:
                if info.get("alive"):
                    self.node_lost(info["id"], f"its launcher exited with code {code}")
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
            if now > pend["deadline"]:
                late = ", ".join(f"node {n}" for n in sorted(pend["waiting"]))
                what = ("confirm the signal" if pend.get("op") == "kill"
                        else "start the processes")
                self.finish(hrid, ok=False, error=f"{late} did not {what} in time")
        for nid, info in list(self.nodes.items()):
            if not info.get("remote") or not info.get("alive"):
                continue
            if now - info["seen"] > NODE_TIMEOUT_S:
                self.node_lost(nid, f"no word from its agent for {NODE_TIMEOUT_S:g} s")
            elif now - info.get("pinged", 0.0) >= PING_S:
                info["pinged"] = now
                self.router.send(P.EVT, {"op": "ping"}, to=info["ident"])

    def node_lost(self, nid: int, why: str):
        info = self.nodes[nid]
        if info.get("lost"):
            return
        info["alive"] = False
        info["lost"] = why
        log.warning("node %s lost: %s", nid, why)
        if info.get("remote") and info.get("ident"):    # if it still hears us: stop
            self.router.send(P.EVT, {"op": "goodbye", "why": why}, to=info["ident"])
        gone: dict[str, list] = {}
        for (node, pid), owner in list(self.procs.items()):
            if node == nid:
                del self.procs[(node, pid)]
                gone.setdefault(owner, []).append((node, pid, None))
        for owner, procs in gone.items():
            self.publish(P.TOPIC_EXIT + owner.encode(), {"procs": procs, "why": why})
        self.publish(P.TOPIC_NODES, {"event": "lost", "node": nid, "why": why})
        for rid, pend in list(self.pending.items()):
            if nid not in pend["waiting"]:
                continue
            if pend.get("op") != "kill":
                self.finish(rid, ok=False, error=f"node {nid} lost during spawn: {why}")
            else:                            # its processes went with it: signal done
                pend["waiting"].discard(nid)
                if not pend["waiting"]:
                    self.finish(rid, ok=True)

    def publish(self, topic: bytes, body):
        frames = self.codec.encode(P.EVT, body)
        self.pub.sock.send_multipart([topic, *frames])

    def live_nodes(self) -> list[dict]:
        return [n for n in self.nodes.values() if n.get("alive")]

    # -- requests -----------------------------------------------------------
    def reply(self, ident, rid, ok=True, **body):
        self.router.send(P.REP, {"rid": rid, "ok": ok, **body}, to=ident)

    def public_nodes(self):
        keys = ("id", "name", "hostname", "pid_space", "cpus", "num_cpus", "physical_mem",
                "virtual", "alive", "agent_pid", "address", "remote", "lost")
        return [{k: n.get(k) for k in keys} for n in sorted(self.nodes.values(),
                                                             key=lambda n: n["id"])]

    def on_request(self, ident, body):
        op, rid = body.get("op"), body.get("rid")
        if op == "ready":
            if len(self.live_nodes()) >= self.expected_nodes:
                self.reply(ident, rid, **self.ready_body())
            else:
                self.ready_waiters.append((ident, rid))
        elif op == "nodes":
            self.reply(ident, rid, nodes=self.public_nodes())
        elif op == "spawn":
            self.spawn(ident, body)
        elif op == "kill":
            self.kill_confirmed(ident, body)
        elif op == "procs":
            self.reply(ident, rid, procs=[(n, p, o) for (n, p), o in self.procs.items()])
        elif op == "shutdown":
            self.running = False
            self.shutdown_reply = (ident, rid)
        else:
            self.reply(ident, rid, ok=False, error=f"unknown op {op!r}")

    def place(self, count: int, allowed) -> list[int]:
        """Pick a node for each of ``count`` processes: fewest processes first."""
        live = {n["id"] for n in self.live_nodes()}
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

    def spawn(self, ident, body):
        try:
            placement = self.place(int(body["count"]), body.get("nodes"))
        except (ValueError, KeyError) as e:
            return self.reply(ident, body.get("rid"), ok=False, error=str(e))
        per_node: dict[int, int] = {}
        for n in placement:
            per_node[n] = per_node.get(n, 0) + 1
        hrid = next(self.rids)
        self.pending[hrid] = {"ident": ident, "rid": body.get("rid"),
                              "owner": body["owner"], "waiting": set(per_node),
                              "procs": [], "deadline": time.monotonic() +
                              float(body.get("within") or SPAWN_TIMEOUT_S)}
        for n, k in per_node.items():
            self.router.send(P.REQ, {"op": "spawn", "rid": hrid, "count": k,
                                     "entry": body["entry"], "owner": body["owner"],
                                     "spec": body["spec"]}, to=self.nodes[n]["ident"])

    def kill_confirmed(self, ident, body):
        """A client's kill: answered once every agent concerned has sent the signal
        (or its node was lost), so that what the caller does next meets the process
        already signalled, not about to be."""
        try:
            sig = int(body.get("sig", signal.SIGTERM))
            by_node = self.by_node(body.get("procs", ()))
        except (TypeError, ValueError) as e:
            return self.reply(ident, body.get("rid"), ok=False, error=f"bad kill: {e}")
        waiting = {n for n in by_node if self.nodes.get(n, {}).get("alive")}
        if not waiting:
            return self.reply(ident, body.get("rid"))
        hrid = next(self.rids)
        self.pending[hrid] = {"op": "kill", "ident": ident, "rid": body.get("rid"),
                              "waiting": waiting, "procs": [],
                              "deadline": time.monotonic() + KILL_TIMEOUT_S}
        for n in waiting:
            self.router.send(P.REQ, {"op": "kill", "rid": hrid, "pids": by_node[n],
                                     "sig": sig}, to=self.nodes[n]["ident"])

    def on_agent_reply(self, nid, body):
        pend = self.pending.get(body.get("rid"))
        if pend is None:
            if body.get("rid") in self.abandoned and body.get("pids"):
                # the request failed elsewhere first: what this node started, nobody wants
                self.router.send(P.EVT, {"op": "kill", "pids": list(body["pids"]),
                                         "sig": int(signal.SIGKILL)},
                                 to=self.nodes[nid]["ident"])
            return
        pend["waiting"].discard(nid)
        if not body.get("ok", True):
            return self.finish(body["rid"], ok=False, error=body.get("error"))
        for pid in body.get("pids", ()):
            self.procs[(nid, pid)] = pend["owner"]
            pend["procs"].append((nid, pid))
        if not pend["waiting"]:
            self.finish(body["rid"], ok=True)

    def finish(self, hrid, ok, error=None):
        pend = self.pending.pop(hrid)
        if pend.get("op") == "kill":
            return self.reply(pend["ident"], pend["rid"], ok=ok, error=error)
        if ok:
            self.reply(pend["ident"], pend["rid"], procs=pend["procs"])
            return
        # all or nothing: what other nodes started for a failed request is killed now,
        # and whatever they report later too
        for proc in pend["procs"]:
            self.procs.pop(proc, None)
        self.kill(pend["procs"], signal.SIGKILL)
        if pend["waiting"]:
            self.abandoned.append(hrid)
            del self.abandoned[:-256]
        self.reply(pend["ident"], pend["rid"], ok=False, error=error, procs=[])

    @staticmethod
    def by_node(procs) -> dict[int, list]:
        out: dict[int, list] = {}
        for node, pid in procs:
            out.setdefault(node, []).append(pid)
        return out

    def kill(self, procs, sig):
        """Signal processes and go on: for the head's own clean-ups."""
        for node, pids in self.by_node(procs).items():
            info = self.nodes.get(node)
            if info and info.get("alive"):
                self.router.send(P.EVT, {"op": "kill", "pids": pids, "sig": int(sig)},
                                 to=info["ident"])

    # -- agent events --------------------------------------------------------
    def ready_body(self) -> dict:
        return {"nodes": self.public_nodes(), "events": self.events_address,
                "tcp_address": self.tcp_address}

    def register(self, ident, body):
        """An agent says hello: one this head started, or one joining from another host."""
        nid = body.get("node")
        if nid is None:                      # joining: a new node id, its own figures
            if ident in self.ident_to_node:
                nid = self.ident_to_node[ident]
            else:
                nid = self.next_node
                self.next_node += 1
            try:
                cpus = [int(c) for c in body["cpus"]]
                info = {"id": nid, "name": str(body.get("name") or body["hostname"]),
                        "hostname": str(body["hostname"]), "cpus": cpus,
                        "num_cpus": len(cpus), "physical_mem": int(body["physical_mem"]),
                        "virtual": False, "agent_pid": int(body["pid"]),
                        "address": str(body.get("address")), "remote": True}
            except (KeyError, TypeError, ValueError) as e:
                _dropped("dropped a malformed registration: %r", e)
                return
            self.nodes[nid] = info
        info = self.nodes.get(nid)
        if info is None or info.get("lost"):
            self.router.send(P.EVT, {"op": "goodbye", "why": "unknown or lost node"}, to=ident)
            return
        self.ident_to_node[ident] = nid
        # a joining agent imports the entry modules after its welcome (a cold
        # shared file system may take a while): its silence is counted from then on
        grace = JOIN_GRACE_S if info.get("remote") else 0.0
        info.update(ident=ident, alive=True, seen=time.monotonic() + grace,
                    hostname=str(body.get("hostname", info["hostname"])),
                    pid_space=str(body.get("pid_space", "")))
        self.router.send(P.EVT, {"op": "welcome", "node": nid, "preload": self.args.preload,
                                 "telemetry_interval": self.args.telemetry_interval},
                         to=ident)
        log.info("node %s joined: %s (%s)", nid, info["name"], info.get("address"))
        self.publish(P.TOPIC_NODES, {"event": "joined", "node": nid})
        if len(self.live_nodes()) >= self.expected_nodes:
            for wident, wrid in self.ready_waiters:
                self.reply(wident, wrid, **self.ready_body())
            self.ready_waiters.clear()

    def on_agent_event(self, ident, body):
        op = body.get("op")
        if op == "register":
            return self.register(ident, body)
        nid = self.ident_to_node.get(ident)
        if nid is None:
            return
        info = self.nodes[nid]
        if info.get("lost"):                 # back after it was given up: send it away
            self.router.send(P.EVT, {"op": "goodbye", "why": info["lost"]}, to=ident)
            return
        info["seen"] = time.monotonic()
        if op == "leaving":
            self.node_lost(nid, body.get("why") or "its agent left")
        elif op == "telemetry":
            body["node"] = nid
            self.publish(P.TOPIC_TELEMETRY + str(nid).encode(), body)
        elif op == "exited":
            gone: dict[str, list] = {}
            for pid, code in body["procs"]:
                owner = self.procs.pop((nid, pid), None)
                if owner is not None:
                    gone.setdefault(owner, []).append((nid, pid, code))
            for owner, procs in gone.items():
                self.publish(P.TOPIC_EXIT + owner.encode(), {"procs": procs})

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
                for _ in range(1000):
                    try:
                        ident, kind, body, _bufs = self.router.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except P.ProtocolError as e:
                        _dropped("dropped malformed message: %s", e)
                        continue
                    if not isinstance(body, dict):
                        _dropped("dropped message with a non-dict body")
                        continue
                    try:
                        if kind == P.REQ:
                            self.on_request(ident, body)
                        elif kind == P.EVT:
                            self.on_agent_event(ident, body)
                        elif kind == P.REP and ident in self.ident_to_node:
                            self.on_agent_reply(self.ident_to_node[ident], body)
                    except Exception as e:       # a well-signed but nonsensical message
                        _dropped("dropped a %r message it could not act on: %r", kind, e)
            now = time.monotonic()
            if now - last_check >= AGENT_POLL_S:
                last_check = now
                self.check_agents()
        self.shutdown()

    def shutdown(self):
        for info in self.nodes.values():
            info["alive"] = None      # expected exits are not node losses
        for proc, wfd in self.agents.values():
            if wfd is not None:
                os.close(wfd)          # lifeline EOF: agent stops its children and exits
        for info in self.nodes.values():
            if info.get("remote") and info.get("ident"):     # joined by hand: told
                self.router.send(P.EVT, {"op": "goodbye", "why": "the runtime stopped"},
                                 to=info["ident"])
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
    ap.add_argument("--telemetry-interval", type=float, default=0.25)
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
