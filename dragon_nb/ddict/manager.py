"""A DDict manager: one process per shard, forked by a node agent.

Entry point ``main(spec, ctx)``. It binds two endpoints under the runtime
directory, both named from the spec's prefix and ``ctx.index``:

* ``ipc://<prefix>-<index>``: a zmq ROUTER, for every client and every request;
* ``<prefix>-<index>.lane``: a SOCK_SEQPACKET socket, the same-host fast lane
  for small synchronous requests (a zmq message wakes three threads on its way:
  the sender's I/O thread, the receiver's, then the receiving thread; a lane
  datagram wakes one. About 2.5x the requests per second on this machine).

One thread serves both from one epoll loop (the ROUTER through its
``zmq.FD``), so requests are handled one at a time and every operation is
atomic; it sleeps whenever it has nothing to do (``connection.SPIN_S`` says why
the client, not the manager, polls briefly for a reply). The shard
(``store.Shard``) holds the data; its bytes and key count go to the node's
telemetry through the agent's shared counters. A malformed message is logged
and dropped or answered DDS_BAD; the manager never unpickles a key or value.
On a runtime that spans hosts (TCP, signed), there is no lane: the ROUTER
binds a TCP port where the manager runs, tells its creator the address
(BOUND), and every frame carries an HMAC that is checked before anything
else looks at it. It exits after DD_DESTROY (leaving a tombstone file so other clients can tell
"destroyed" from "died"), on SIGTERM from its agent when the runtime stops, or
with its agent (parent-death signal).
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import resource
import select
import socket
import time

import zmq

from dragon_nb.ddict.store import Shard
from dragon_nb.runtime.counters import BYTES, KEYS
from dragon_nb.tunables import IDLE_S, PUBLISH_EVERY_S
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.ddict")
_dropped = P.DropLog(log)

ZMQ_BURST = 256          # zmq messages served before looking at the lane again


class Manager:
    def __init__(self, spec: dict, ctx):
        self.spec = spec
        self.ctx = ctx
        self.counters = ctx.counters
        mid = spec["first_id"] + ctx.index
        base = f"{spec['prefix']}-{ctx.index}"
        self.shard = Shard(mid, ctx.node, ctx.hostname, spec["budget"], spec.get("name", ""))
        _raise_fd_limit()
        net = ctx.network
        self.key = net.key
        self.signer = P.FrameSigner(net.key)
        self.lanes: dict[int, socket.socket] = {}
        self.epoll = select.epoll()
        self.listener = None
        self.lane_path = None
        if not net.tcp:
            # the lane first: a manager that answers on zmq can be reached on its lane
            self.lane_path = base + ".lane"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.listener.bind(self.lane_path)
            self.listener.listen(256)
            self.listener.setblocking(False)
            self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.zctx = zmq.Context()
        self.router = self.zctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        if net.tcp:
            address = net.bind(self.router, os.path.basename(base))
            report = P.Channel(net.connect(self.zctx.socket(zmq.DEALER), spec["report"]),
                               net.codec())
            report.send(P.BOUND, {"manager": mid, "address": address})
            report.close(linger=2000)
        else:
            self.router.bind("ipc://" + base)
        self.zfd = self.router.getsockopt(zmq.FD)
        self.epoll.register(self.zfd, select.EPOLLIN)
        self.accept_paused_until = 0.0
        self.last_publish = 0.0

    # -- zmq ------------------------------------------------------------------------
    def serve_zmq(self) -> bool:
        """Serve waiting zmq requests; -> True if more may be waiting."""
        router = self.router
        for _ in range(ZMQ_BURST):
            if not router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return False
            try:
                ident = router.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            frame, bufs = b"", []
            if router.getsockopt(zmq.RCVMORE):
                frame = router.recv()
                while router.getsockopt(zmq.RCVMORE):
                    bufs.append(router.recv(copy=False))
            if self.key is not None:
                try:
                    frame, *bufs = self.signer.verify([frame, *bufs])
                except (P.ProtocolError, ValueError) as e:
                    _dropped("manager %s: dropped a message: %s", self.shard.mid, e)
                    continue
            out = self.shard.handle(frame, bufs, ident)
            if out is not None:
                self.send_zmq(ident, out)
            if self.shard.destroyed:
                return False
        return True

    def send_zmq(self, ident: bytes, out):
        head, bufs = out
        if self.key is not None:
            bufs = self.signer.sign([head, *bufs])[1:]
        try:
            if bufs:
                self.router.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
                self.router.send(head, zmq.SNDMORE)
                for b in bufs[:-1]:
                    self.router.send(b, zmq.SNDMORE, copy=False)
                self.router.send(bufs[-1], copy=False)
            else:
                self.router.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
                self.router.send(head)
        except zmq.Again:          # that client is not reading: its reply is dropped
            log.warning("manager %s: dropped a reply to a client that is not reading",
                        self.shard.mid)

    # -- the lane -----------------------------------------------------------------
    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("manager %s: cannot accept lane clients for now: %s",
                                self.shard.mid, e)
                    self.epoll.unregister(self.listener.fileno())
                    self.accept_paused_until = time.monotonic() + 1.0
                return
            conn.setblocking(False)
            self.lanes[conn.fileno()] = conn
            self.epoll.register(conn.fileno(), select.EPOLLIN)

    def serve_lane(self, fd: int):
        """One datagram (epoll reports the connection again if there are more)."""
        conn = self.lanes.get(fd)
        if conn is None:
            return
        try:
            frame = conn.recv(P.DD_LANE_MAX + 64)
        except BlockingIOError:
            return
        except OSError:
            frame = b""
        if not frame:
            self.drop_lane(fd)
            return
        out = self.shard.handle(frame, (), None, lane=True)
        if out is not None:
            try:
                conn.send(out[0])
            except BlockingIOError:
                log.warning("manager %s: dropped a reply to a lane client that is not "
                            "reading", self.shard.mid)
            except OSError:
                self.drop_lane(fd)

    def drop_lane(self, fd: int):
        conn = self.lanes.pop(fd, None)
        if conn is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            conn.close()

    # -- the loop -------------------------------------------------------------------
    def publish(self, now: float):
        shard = self.shard
        if shard.dirty and now - self.last_publish >= PUBLISH_EVERY_S:
            self.counters.set(BYTES, shard.used)
            self.counters.set(KEYS, len(shard.data))
            self.counters.publish()
            shard.dirty = False
            self.last_publish = now

    def run(self) -> int:
        shard, epoll = self.shard, self.epoll
        lfd = self.listener.fileno() if self.listener is not None else -1
        zfd = self.zfd
        zmq_due = True    # look at the ROUTER: its FD only signals changes, so after
        while True:       # any zmq operation of ours, and when epoll reports it
            if zmq_due:
                zmq_due = self.serve_zmq()
            if shard.destroyed:
                break
            timeout = IDLE_S
            if shard.next_deadline is not None or shard.outbox or shard.dirty \
                    or self.accept_paused_until:
                now = time.monotonic()
                if shard.next_deadline is not None:
                    if now >= shard.next_deadline:
                        shard.expire(now)
                    if shard.next_deadline is not None:
                        timeout = max(0.0, shard.next_deadline - now) + 0.001
                if shard.outbox:
                    self.flush_outbox()
                    zmq_due = True
                if shard.dirty:
                    self.publish(now)
                    timeout = min(timeout, PUBLISH_EVERY_S)
                if self.accept_paused_until and now >= self.accept_paused_until:
                    self.accept_paused_until = 0.0
                    epoll.register(lfd, select.EPOLLIN)
            for fd, _ in epoll.poll(0 if zmq_due else timeout):
                if fd == zfd:
                    zmq_due = True
                elif fd == lfd:
                    self.accept()
                else:
                    self.serve_lane(fd)
                    if shard.destroyed:
                        break
        self.publish(float("inf"))
        return 0

    def flush_outbox(self):
        outbox, self.shard.outbox = self.shard.outbox, []
        for ident, out in outbox:
            self.send_zmq(ident, out)

    def close(self):
        if self.shard.destroyed:
            try:
                with open(self.spec["tombstone"], "a"):
                    pass
            except OSError:
                pass
        for fd in list(self.lanes):
            self.drop_lane(fd)
        self.epoll.close()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.lane_path)
            except OSError:
                pass
        self.router.close()             # lingers up to 1 s for the last replies
        self.zctx.term()


def _raise_fd_limit():
    """Every client process opens a lane to the managers it uses: allow many."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    except (ValueError, OSError):
        pass


def main(spec_bytes: bytes, ctx) -> int:
    spec = pickle.loads(spec_bytes)     # from the runtime, like a pool worker's spec
    manager = Manager(spec, ctx)
    try:
        return manager.run()
    finally:
        manager.close()
