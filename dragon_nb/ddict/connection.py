"""This process's links to one DDict's managers.

A ``Connection`` holds, per manager, a zmq DEALER (every request can take it)
and, when the manager is on this host, a SOCK_SEQPACKET *lane* for small
synchronous requests (see ``manager.py`` for why). It is created lazily in
each process that uses a handle (a fork gets its own: ``connection_for``
looks at the pid) and shared by that process's handles of the same DDict.

Every wait has a way out: replies are awaited in slices of at most 100 ms;
after each slice the manager is checked: its process through the liveness
layer (``ProcessRef.alive``: same pid space, pid, start time, not a zombie) and,
on TCP, its link through the runtime's one link watcher (``network.LinkWatch``:
lost and refused ``REFUSALS_DEAD`` times in a row, nobody listens there any
more). So a dead manager is reported as a ``DDictError`` naming it within about
a slice, and a live one that does not answer gives a ``DDictTimeoutError`` at
the deadline. A reply that comes after its request gave up is recognised by its
request id and dropped; a link the watcher saw cut and dialled again
(``LinkWatch.redials``) gets a request that may be sent twice sent again.

Ordering: a request waits for its reply before the next is sent, so the two
paths cannot overtake each other, except for batch messages, which have no
reply. So after a batch message a manager is reached only over zmq until a
zmq reply from it proves the batch was read (``Link.zmq_only``).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref
from typing import NamedTuple

import zmq

from dragon_nb.ddict.errors import DDictError, DDictTimeoutError
from dragon_nb.ddict.records import ManagerRecord
from dragon_nb.runtime import network
from dragon_nb.runtime.client import zmq_context
from dragon_nb.tunables import LANE_EXIT_WAIT_S, REDIAL_GRACE_S, REFUSALS_DEAD, SLICE_S
from dragon_nb.wire import protocol as P

REQ, REP, ENTRY = P.DD_REQUEST, P.DD_REPLY, P.DD_ENTRY
BATCH_COUNT = struct.Struct("<Q")      # DD_BATCH_END's key: how many puts were sent
# A lane reply is first awaited by polling for up to SPIN_S, yielding the CPU in
# between, so that this process's CPU does not go idle: on a virtual machine,
# waking an idle CPU costs tens of microseconds, more than the whole request
# (measured here: 18k requests/s with client and manager on different CPUs, 30k
# with the spin; 60k on one CPU either way). A yield that takes longer than
# YIELD_BUSY_S means another process wanted this CPU: then it sleeps at once.
# Managers never spin: a spinning CPU looks busy to the scheduler, which then
# crowds the other processes onto the remaining CPUs (two clients on two
# managers lost half their throughput when managers spun).
SPIN_S = 50e-6
YIELD_BUSY_S = 10e-6
LANE_RECV = P.DD_LANE_MAX + 64
# Requests that may be sent again when their TCP link was cut and dialled again (the
# request or its reply may have been lost on it): doing them twice is doing them once.
# The others (pop, fetch_add, clear, freeze, destroy) fail, after a grace for a reply
# still on its way, saying they may or may not have happened.
# A re-sent put is at least once: in the moment its first copy's reply was lost,
# another client's later put of the same key may be overwritten by it.
RESENDABLE = frozenset((P.DD_PING, P.DD_PUT, P.DD_GET, P.DD_CONTAINS, P.DD_LEN, P.DD_KEYS,
                        P.DD_MGET, P.DD_STATS, P.DD_IS_FROZEN, P.DD_WAIT_FOR,
                        P.DD_BATCH_END))


class Reply(NamedTuple):
    status: int
    vflags: int
    arg: int
    payload: bytes
    bufs: list


class Link:
    """One manager (``rec``, a ``ManagerRecord``), as this process reaches it."""

    __slots__ = ("rec", "mid", "proc", "zsock", "zslice", "lane", "lslice", "lane_usable",
                 "zmq_only", "dead", "watch", "signer")

    def __init__(self, rec: ManagerRecord):
        self.rec = rec = ManagerRecord.from_state(rec)
        self.mid = rec.mid
        self.proc = rec.proc             # its process, for the liveness layer
        self.zsock = self.lane = None
        self.zslice = self.lslice = None
        self.lane_usable = bool(rec.lane_path)   # none across hosts (TCP runtimes)
        self.zmq_only = False
        self.dead: str | None = None     # why it cannot be reached any more
        self.watch: network.LinkWatch | None = None    # a TCP link's events
        self.signer: P.FrameSigner | None = None       # its socket's signing and replay guard

    @property
    def redials(self) -> int:
        """Times its TCP link was cut and made again (as of the watcher's last look)."""
        return self.watch.redials if self.watch is not None else 0

    def describe(self) -> str:
        return f"DDict manager {self.mid} (node {self.rec.node}, pid {self.rec.pid})"


class Connection:
    def __init__(self, managers, name: str, tombstone: str, net=None):
        self.pid = os.getpid()
        self.name = name
        self.tombstone = tombstone
        self.lock = threading.Lock()
        self.links = [Link(m) for m in managers]
        # the creator passes its runtime's network; a handle unpickled in a service
        # process takes that process's
        self.net = net if net is not None else network.current()
        self.key = self.net.key if self.net is not None else None   # signs every frame
        self._rid = 0
        self._finalizer = weakref.finalize(self, _close_links, self.links, self.pid)

    # -- one request, one reply ---------------------------------------------------------
    def request(self, mid: int, op: int, key: bytes = b"", value: bytes = b"", bufs=(),
                flags: int = 0, vflags: int = 0, arg: int = 0, timeout: float = 30.0,
                lane: bool = True) -> Reply:
        link = self.links[mid]
        if link.dead is not None:
            raise DDictError(link.dead)
        with self.lock:
            rid = self._next_rid()
            frame = b"".join((REQ.pack(op, flags, vflags, len(bufs), rid, len(key), arg),
                              key, value))
            deadline = time.monotonic() + timeout
            if (lane and not bufs and link.lane_usable and not link.zmq_only
                    and len(frame) <= P.DD_LANE_MAX):
                rep = self._lane_request(link, frame, rid, op, deadline, timeout)
                if rep is not None:
                    return rep
            self._zsend(link, frame, bufs, op, deadline, timeout)
            return self._zrecv(link, rid, op, deadline, timeout, frame, bufs)

    def request_many(self, mids, op: int, key: bytes = b"", value: bytes = b"", bufs=(),
                     flags: int = 0, vflags: int = 0, arg: int = 0,
                     timeout: float = 30.0, flags_for=None, key_for=None) -> list:
        """The same request to several managers at once (over zmq); their replies
        in the order of ``mids``. ``flags_for(mid)`` and ``key_for(mid)`` override
        ``flags`` and ``key``."""
        links = [self.links[m] for m in mids]
        for link in links:
            if link.dead is not None:
                raise DDictError(link.dead)
        with self.lock:
            deadline = time.monotonic() + timeout
            sent = []
            for link in links:
                rid = self._next_rid()
                f = flags if flags_for is None else flags_for(link.mid)
                k = key if key_for is None else key_for(link.mid)
                frame = b"".join((REQ.pack(op, f, vflags, len(bufs), rid, len(k), arg),
                                  k, value))
                self._zsend(link, frame, bufs, op, deadline, timeout)
                sent.append((rid, frame))
            return [self._zrecv(link, rid, op, deadline, timeout, frame, bufs)
                    for link, (rid, frame) in zip(links, sent)]

    def send_batch(self, mid: int, frame: bytes, bufs, timeout: float):
        """A message with no reply (DD_BATCH)."""
        link = self.links[mid]
        if link.dead is not None:
            raise DDictError(link.dead)
        with self.lock:
            self._zsend(link, frame, bufs, P.DD_BATCH, time.monotonic() + timeout, timeout)
            link.zmq_only = True

    def wait(self, mid: int, key: bytes, value: bytes, bufs, flags: int, vflags: int,
             wait_s: float | None, grace: float) -> Reply:
        """DD_WAIT_FOR on a socket of its own, so other threads keep the shared one."""
        link = self.links[mid]
        if link.dead is not None:
            raise DDictError(link.dead)
        own = Link(link.rec)
        own.zsock = self._new_zsock(own)
        with self.lock:
            rid = self._next_rid()
        ms = -1 if wait_s is None else int(wait_s * 1000)
        frame = b"".join((REQ.pack(P.DD_WAIT_FOR, flags, vflags, len(bufs), rid, len(key), ms),
                          key, value))
        total = (wait_s or 0.0) + grace
        deadline = time.monotonic() + total
        try:
            self._zsend(own, frame, bufs, P.DD_WAIT_FOR, deadline, total)
            return self._zrecv(own, rid, P.DD_WAIT_FOR, deadline, total, frame, bufs)
        finally:
            if own.dead is not None and link.dead is None:
                link.dead = own.dead
            _close_link(own, linger=0)

    def _next_rid(self) -> int:
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        return self._rid

    # -- the lane ---------------------------------------------------------------------
    def _lane_request(self, link: Link, frame, rid, op, deadline, timeout):
        """-> Reply, or None to go over zmq instead (nothing was sent, or the reply
        would not fit a datagram and the manager changed nothing)."""
        sock = link.lane
        if sock is None:
            sock = self._open_lane(link)
            if sock is None:
                return None
        slice_s = min(SLICE_S, timeout)
        if link.lslice != slice_s:
            _set_timeouts(sock, slice_s)
            link.lslice = slice_s
        try:
            sock.send(frame)
        except OSError:
            self._drop_lane(link)
            return None
        spin_until = time.perf_counter() + SPIN_S
        while True:
            try:
                if spin_until:
                    data = sock.recv(LANE_RECV, socket.MSG_DONTWAIT)
                else:
                    data = sock.recv(LANE_RECV)
            except BlockingIOError:       # nothing yet, or a slice of waiting is over
                if spin_until:
                    t = time.perf_counter()
                    if t < spin_until:
                        os.sched_yield()
                        if time.perf_counter() - t > YIELD_BUSY_S:
                            spin_until = 0.0      # the CPU is wanted: sleep instead
                    else:
                        spin_until = 0.0
                    continue
                self._check(link, op, deadline, timeout)
                continue
            except OSError:
                data = b""
            if not data:       # the manager closed the lane: it is dying, most likely
                self._drop_lane(link)
                self._wait_dead(link, op)
            if len(data) < REP.size:
                continue
            status, vflags, _nbufs, r, arg = REP.unpack_from(data)
            if r != rid:
                continue        # the late answer to a request that timed out
            if status == P.DDS_TOO_BIG:
                return None
            return Reply(status, vflags, arg, data[REP.size:], [])

    def _open_lane(self, link: Link):
        if not link.proc.local:          # its lane is a path on another host
            link.lane_usable = False
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _set_timeouts(sock, SLICE_S)
            sock.connect(link.rec.lane_path)
        except OSError:
            sock.close()
            return None          # zmq will tell whether the manager is there
        link.lane, link.lslice = sock, SLICE_S
        return sock

    def _drop_lane(self, link: Link):
        if link.lane is not None:
            link.lane.close()
            link.lane = link.lslice = None

    # -- zmq ---------------------------------------------------------------------------
    def _new_zsock(self, link: Link) -> zmq.Socket:
        sock = zmq_context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        link.signer = P.FrameSigner(self.key)       # one numbering and guard per socket
        address = link.rec.address
        if self.net is not None:
            link.watch = self.net.watch_links(sock)     # TCP: watch the link (else None)
            return self.net.connect(sock, address)
        sock.connect(address)
        return sock

    def _zsend(self, link: Link, frame, bufs, op, deadline, timeout):
        sock = link.zsock
        if sock is None:
            sock = link.zsock = self._new_zsock(link)
        elif link.watch is not None:
            link.watch.poll()    # a redial before this request is not one during it
        if self.key is not None:
            bufs = link.signer.sign([frame, *bufs])[1:]
        while True:
            try:
                if bufs:
                    sock.send(frame, zmq.SNDMORE | zmq.NOBLOCK)
                    last = len(bufs) - 1
                    for i, b in enumerate(bufs):
                        sock.send(b, 0 if i == last else zmq.SNDMORE, copy=False)
                else:
                    sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:    # its queue is full: the manager is not reading
                if not sock.poll(min(SLICE_S, timeout) * 1000, zmq.POLLOUT):
                    self._check(link, op, deadline, timeout)

    def _zrecv(self, link: Link, rid, op, deadline, timeout, frame, bufs) -> Reply:
        sock = link.zsock
        slice_ms = max(1, int(min(SLICE_S, timeout) * 1000))
        if link.zslice != slice_ms:
            sock.setsockopt(zmq.RCVTIMEO, slice_ms)
            link.zslice = slice_ms
        redials = link.redials
        give_up = None                 # a request not to send twice: when to stop waiting
        while True:
            try:
                head = sock.recv()
            except zmq.Again:
                self._check(link, op, deadline, timeout)
                if link.redials != redials:      # cut and made again: the request or
                    redials = link.redials       # its reply may have been on it
                    if op in RESENDABLE:
                        self._zsend(link, frame, bufs, op, deadline, timeout)
                    elif give_up is None:        # it may still come (sent after the cut)
                        give_up = time.monotonic() + REDIAL_GRACE_S
                if give_up is not None and time.monotonic() >= give_up:
                    raise DDictError(f"the connection to {link.describe()} was cut during "
                                     f"{P.DD_OP_NAMES.get(op, op)}; it may or may not have "
                                     f"happened")
                continue
            got = []
            while sock.getsockopt(zmq.RCVMORE):
                got.append(sock.recv(copy=False))
            if self.key is not None:
                try:
                    head, *got = link.signer.verify([head, *got])
                except P.ProtocolError:
                    continue
                head = bytes(head)
            if len(head) < REP.size:
                continue
            status, vflags, _nbufs, r, arg = REP.unpack_from(head)
            if r != rid:
                continue
            link.zmq_only = False      # everything sent before was read
            return Reply(status, vflags, arg, head[REP.size:], got)

    # -- is it there? --------------------------------------------------------------------
    def _check(self, link: Link, op, deadline, timeout):
        if not self.alive(link):
            raise self._mark_dead(link)
        if time.monotonic() >= deadline:
            raise DDictTimeoutError(f"{link.describe()} did not answer "
                                    f"{P.DD_OP_NAMES.get(op, op)} within {timeout:g} s")

    def _wait_dead(self, link: Link, op):
        """The lane closed under a request: the manager is exiting. Report it."""
        end = time.monotonic() + LANE_EXIT_WAIT_S
        while time.monotonic() < end:
            if not self.alive(link):
                raise self._mark_dead(link)
            time.sleep(0.01)
        raise DDictError(f"{link.describe()} closed the connection during "
                         f"{P.DD_OP_NAMES.get(op, op)}; it may or may not have happened")

    def alive(self, link: Link) -> bool:
        """Is the manager there? Its link, on TCP: one lost and refused again and again
        has nobody listening at its other end (``LinkWatch.gone``); its process, where
        this process can look at its pid (``ProcessRef.alive``). True when neither can
        tell: the deadline decides."""
        if link.watch is not None and link.watch.gone(REFUSALS_DEAD):
            return False
        return link.proc.alive() is not False

    def _mark_dead(self, link: Link) -> DDictError:
        if link.dead is None:
            if os.path.exists(self.tombstone):
                link.dead = f"the DDict {self.name!r} has been destroyed"
            elif link.watch is not None and not link.proc.local:
                link.dead = (f"{link.describe()} cannot be reached: it exited or was killed, "
                             f"its DDict {self.name!r} was destroyed, or its host is gone; "
                             f"the keys it held are lost; the other managers keep serving")
            else:
                link.dead = (f"{link.describe()} is not running (it exited or was killed); "
                             f"the keys it held are lost; the other managers keep serving")
            _close_link(link, linger=0)
        return DDictError(link.dead)

    def close(self):
        self._finalizer()


def _set_timeouts(sock: socket.socket, seconds: float):
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _close_link(link: Link, linger=None):
    if link.watch is not None:
        link.watch.close()
        link.watch = None
    if link.zsock is not None:
        link.zsock.close(linger=linger)
        link.zsock = link.zslice = None
    if link.lane is not None:
        link.lane.close()
        link.lane = link.lslice = None


def _close_links(links, pid):
    if os.getpid() == pid:        # a fork's inherited sockets are the parent's
        for link in links:
            _close_link(link)


# --- one Connection per DDict per process ----------------------------------------------
_connections: dict = {}
_connections_pid = None
_connections_lock = threading.Lock()


def connection_for(owner: str, managers, name: str, tombstone: str, net=None) -> Connection:
    global _connections_pid
    with _connections_lock:
        if _connections_pid != os.getpid():
            _connections.clear()
            _connections_pid = os.getpid()
        ref = _connections.get(owner)
        conn = ref() if ref is not None else None
        if conn is None:
            conn = Connection(managers, name, tombstone, net)
            _connections[owner] = weakref.ref(conn)
        return conn


def _after_fork_in_child():
    global _connections_lock, _connections_pid
    _connections_lock = threading.Lock()     # another thread may have held it
    _connections.clear()
    _connections_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def forget(owner: str) -> None:
    """Close this process's links to a DDict (detach, destroy)."""
    with _connections_lock:
        ref = _connections.pop(owner, None)
    conn = ref() if ref is not None else None
    if conn is not None:
        conn.close()


class BatchWriter:
    """The puts of a batch, sent as DD_BATCH messages of up to FLUSH_BYTES with
    no reply each; ``end`` asks every manager written to how it went."""

    FLUSH_BYTES = 256 << 10
    FLUSH_COUNT = 4096

    def __init__(self, conn: Connection, timeout: float):
        self.conn = conn
        self.timeout = timeout
        self.id = int.from_bytes(os.urandom(8), "little") >> 1
        self.pending: dict[int, list] = {}      # mid -> [parts, bufs, bytes, count]
        self.sent: dict[int, int] = {}          # mid -> puts sent to it

    def add(self, mid: int, key: bytes, vflags: int, inline: bytes, bufs, flags: int = 0):
        p = self.pending.get(mid)
        if p is None:
            p = self.pending[mid] = [[], [], 0, 0]
        p[0] += (ENTRY.pack(len(key), len(inline), len(bufs), vflags, flags), key, inline)
        if bufs:      # sent later, with no reply to wait for: the caller may change them
            p[1].extend(b if type(b) is bytes else bytes(b) for b in bufs)
        p[2] += len(key) + len(inline) + sum(len(b) for b in bufs)
        p[3] += 1
        if p[2] >= self.FLUSH_BYTES or p[3] >= self.FLUSH_COUNT:
            self.flush(mid)

    def flush(self, mid: int):
        p = self.pending.pop(mid, None)
        if p is None:
            return
        self.sent[mid] = self.sent.get(mid, 0) + p[3]
        frame = b"".join((REQ.pack(P.DD_BATCH, 0, 0, len(p[1]), 0, 0, self.id), *p[0]))
        self.conn.send_batch(mid, frame, p[1], self.timeout)

    def end(self) -> list:
        """-> [(mid, Reply)] for every manager the batch wrote to. Each is told how
        many puts were sent to it: batches have no replies, so a message lost on the
        way (a TCP connection cut) is found here, not never."""
        for mid in list(self.pending):
            self.flush(mid)
        mids = sorted(self.sent)
        if not mids:
            return []
        replies = self.conn.request_many(mids, P.DD_BATCH_END, arg=self.id,
                                         timeout=self.timeout,
                                         key_for=lambda m: BATCH_COUNT.pack(self.sent[m]))
        return list(zip(mids, replies))
