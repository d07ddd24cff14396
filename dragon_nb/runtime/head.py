"""The head: the runtime's registry of nodes and processes.

It starts one agent per virtual node, places service processes (pool
workers, DDict managers, ...) on nodes, relays spawn/kill requests to agents,
fans telemetry and exit events out on one PUB socket, and tears everything
down when its client goes away. Tasks and results never pass through it.

Run as ``python -m dragon_nb.runtime.head --rundir DIR --nodes N ...``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import socket
import time

import psutil
import zmq

from dragon_nb.runtime import launch
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.head")

AGENT_POLL_S = 0.1
SHUTDOWN_GRACE_S = 2.0


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
        self.codec = P.Codec()
        self.router = P.Channel(self.ctx.socket(zmq.ROUTER), self.codec, routed=True)
        self.router.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.address = f"ipc://{self.rundir}/head"
        self.router.sock.bind(self.address)
        self.pub = P.Channel(self.ctx.socket(zmq.PUB), self.codec)
        self.events_address = f"ipc://{self.rundir}/events"
        self.pub.sock.bind(self.events_address)
        self.nodes: dict[int, dict] = {}           # node id -> info (+ "ident", "alive")
        self.agents: dict[int, tuple] = {}         # node id -> (Popen, lifeline wfd)
        self.procs: dict[tuple, str] = {}          # (node, pid) -> owner
        self.rids = itertools.count(1)
        self.pending: dict[int, dict] = {}          # head rid -> pending client request
        self.ready_waiters: list[tuple] = []
        self.expected_nodes = args.nodes
        self.running = True

    # -- agents -------------------------------------------------------------
    def start_agents(self):
        for info in split_host(self.args.nodes, self.args.cpus_per_node):
            proc, wfd = launch.start_child("dragon_nb.runtime.agent", [
                "--head", self.address, "--node", str(info["id"]),
                "--cpus", ",".join(map(str, info["cpus"])),
                "--mem", str(info["physical_mem"]),
                "--telemetry-interval", str(self.args.telemetry_interval),
                "--preload", self.args.preload or "",
                "--parent-pid", str(os.getpid())])
            self.agents[info["id"]] = (proc, wfd)
            info.update(alive=False, ident=None, agent_pid=proc.pid)
            self.nodes[info["id"]] = info

    def check_agents(self):
        for nid, (proc, _) in list(self.agents.items()):
            code = proc.poll()
            if code is not None and self.nodes[nid].get("alive", False) is not None:
                self.node_lost(nid, f"agent exited with code {code}")

    def node_lost(self, nid: int, why: str):
        info = self.nodes[nid]
        if info.get("lost"):
            return
        info["alive"] = False
        info["lost"] = why
        log.warning("node %s lost: %s", nid, why)
        gone: dict[str, list] = {}
        for (node, pid), owner in list(self.procs.items()):
            if node == nid:
                del self.procs[(node, pid)]
                gone.setdefault(owner, []).append((node, pid, None))
        for owner, procs in gone.items():
            self.publish(P.TOPIC_EXIT + owner.encode(), {"procs": procs, "why": why})
        self.publish(P.TOPIC_NODES, {"event": "lost", "node": nid, "why": why})
        for rid, pend in list(self.pending.items()):
            if nid in pend["waiting"]:
                self.finish(rid, ok=False, error=f"node {nid} lost during spawn: {why}")

    def publish(self, topic: bytes, body):
        frames = self.codec.encode(P.EVT, body)
        self.pub.sock.send_multipart([topic, *frames])

    def live_nodes(self) -> list[dict]:
        return [n for n in self.nodes.values() if n.get("alive")]

    # -- requests -----------------------------------------------------------
    def reply(self, ident, rid, ok=True, **body):
        self.router.send(P.REP, {"rid": rid, "ok": ok, **body}, to=ident)

    def public_nodes(self):
        keys = ("id", "name", "hostname", "cpus", "num_cpus", "physical_mem",
                "virtual", "alive", "agent_pid")
        return [{k: n.get(k) for k in keys} for n in sorted(self.nodes.values(),
                                                             key=lambda n: n["id"])]

    def on_request(self, ident, body):
        op, rid = body.get("op"), body.get("rid")
        if op == "ready":
            if len(self.live_nodes()) >= self.expected_nodes:
                self.reply(ident, rid, nodes=self.public_nodes(),
                           events=self.events_address)
            else:
                self.ready_waiters.append((ident, rid))
        elif op == "nodes":
            self.reply(ident, rid, nodes=self.public_nodes())
        elif op == "spawn":
            self.spawn(ident, body)
        elif op == "kill":
            self.kill(body.get("procs", ()), body.get("sig", signal.SIGTERM))
            self.reply(ident, rid)
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
                              "procs": []}
        for n, k in per_node.items():
            self.router.send(P.REQ, {"op": "spawn", "rid": hrid, "count": k,
                                     "entry": body["entry"], "owner": body["owner"],
                                     "spec": body["spec"]}, to=self.nodes[n]["ident"])

    def on_agent_reply(self, nid, body):
        pend = self.pending.get(body.get("rid"))
        if pend is None:
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
        if ok:
            self.reply(pend["ident"], pend["rid"], procs=pend["procs"])
        else:
            self.reply(pend["ident"], pend["rid"], ok=False, error=error,
                       procs=pend["procs"])

    def kill(self, procs, sig):
        by_node: dict[int, list] = {}
        for node, pid in procs:
            by_node.setdefault(node, []).append(pid)
        for node, pids in by_node.items():
            info = self.nodes.get(node)
            if info and info.get("alive"):
                self.router.send(P.EVT, {"op": "kill", "pids": pids, "sig": int(sig)},
                                 to=info["ident"])

    # -- agent events --------------------------------------------------------
    def on_agent_event(self, ident, body):
        op = body.get("op")
        if op == "register":
            nid = body["node"]
            info = self.nodes.get(nid)
            if info is None:
                return
            info.update(ident=ident, alive=True, hostname=body.get("hostname", info["hostname"]))
            self.publish(P.TOPIC_NODES, {"event": "joined", "node": nid})
            if len(self.live_nodes()) >= self.expected_nodes:
                for wident, wrid in self.ready_waiters:
                    self.reply(wident, wrid, nodes=self.public_nodes(),
                               events=self.events_address)
                self.ready_waiters.clear()
        elif op == "telemetry":
            self.publish(P.TOPIC_TELEMETRY + str(body["node"]).encode(), body)
        elif op == "exited":
            nid = body["node"]
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
        ident_to_node = {}
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
                        log.warning("dropped malformed message: %s", e)
                        continue
                    if not isinstance(body, dict):
                        log.warning("dropped message with a non-dict body")
                        continue
                    if kind == P.REQ:
                        self.on_request(ident, body)
                    elif kind == P.EVT:
                        if body.get("op") == "register":
                            ident_to_node[ident] = body.get("node")
                        self.on_agent_event(ident, body)
                    elif kind == P.REP and ident in ident_to_node:
                        self.on_agent_reply(ident_to_node[ident], body)
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
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc, _ in self.agents.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                proc.kill()
                proc.wait(5)
        reply = getattr(self, "shutdown_reply", None)
        if reply is not None:
            self.reply(*reply)
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
