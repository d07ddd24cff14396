"""Every socket a runtime listens on, fed 10,000 random and malformed messages.

For each kind of socket -- the head's ROUTER, a Pool's endpoint in the caller,
a DDict manager (its zmq ROUTER, and its same-host lane), a pipeline stage's
input -- the messages are a mix of random frames, real message kinds with
random or ill-typed bodies, requests that lie about their sizes, and valid
pickles that would create a marker directory if anything unpickled them with
globals allowed. Afterwards: no process of the runtime crashed, nothing was
unpickled (no marker), and the same runtime still serves real work.

On a runtime that spans hosts (TCP, signed), every one of those messages must
fail the signature check, so nothing in them is read at all. On a one-host
runtime (ipc in a 0700 directory), the peer is the same user; messages must
still not crash or hang anything, and control messages cannot build objects.
Agents bind no socket: they hear only the head.
"""
from __future__ import annotations

import os
import pickle
import random
import select
import socket
import threading
import time

import psutil
import pytest
import zmq

import dragon_nb
from dragon_nb import DDict, Pipeline, Pool, stage
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

from conftest import wait_until

MESSAGES = 10_000


class Marker:
    """Unpickling this (globals allowed) creates a directory: proof something was read."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def square(x):
    return x * x


KINDS = [P.REQ, P.REP, P.EVT, P.HELLO, P.TASKS, P.RESULTS, P.CANCEL, P.INIT_FAILED,
         P.STOP, P.OUTPUT, P.PIPE_ITEMS, P.PIPE_END, P.PIPE_LINK, P.BOUND]


def messages(marker: str, seed: int, control: bool):
    """``MESSAGES`` multipart messages (lists of bytes). ``control``: include
    well-formed control requests that would act if they were obeyed (spawn of a
    foreign entry point, kill, shutdown) -- only where they must be refused."""
    rng = random.Random(seed)
    evil = pickle.dumps(Marker(marker), protocol=5)
    evil_dict = pickle.dumps({"op": "register", "rid": 1, "x": Marker(marker)}, protocol=5)
    ill_typed = [{"op": "spawn", "rid": 1, "count": "many", "entry": 3, "owner": None},
                 {"op": "register", "node": None, "cpus": "x", "hostname": 5},
                 {"op": "telemetry", "node": [], "owners": 7},
                 {"op": "exited", "node": 0, "procs": "zz"},
                 {"results": [(1, 2)], "busy": "no"}, {"wid": b"", "pid": -1},
                 {"seq": "a", "start": None}, {"jobs": 5}, [], None, 42]
    if control:
        ill_typed += [{"op": "spawn", "rid": 2, "count": 1, "entry": "builtins:exec",
                       "owner": "x", "spec": b"import os; os.mkdir('" +
                       marker.encode() + b"')"},
                      {"op": "kill", "rid": 3, "procs": [(0, 1)], "sig": 9},
                      {"op": "shutdown", "rid": 4}]
    for _ in range(MESSAGES):
        r = rng.random()
        kind = rng.choice(KINDS)
        if r < 0.25:
            yield [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 5))]
        elif r < 0.40:
            yield [kind, rng.randbytes(rng.randrange(0, 200))]
        elif r < 0.55:
            yield [kind, rng.choice([evil, evil_dict])] + [evil] * rng.randrange(0, 2)
        elif r < 0.65:
            yield [kind, rng.randbytes(32), evil]                  # looks signed
        elif r < 0.80:
            yield [kind, pickle.dumps(rng.choice(ill_typed), protocol=5)]
        elif r < 0.95:
            yield [P.DD_REQUEST.pack(rng.randrange(0, 40), rng.randrange(0, 256),
                                     rng.randrange(0, 256), rng.randrange(0, 4),
                                     rng.randrange(0, 2 ** 32), rng.randrange(0, 2 ** 32),
                                     rng.randrange(-2 ** 63, 2 ** 63))
                   + rng.choice([b"", evil, rng.randbytes(50)])]
        else:
            yield [b""] * rng.randrange(1, 3) + [rng.randbytes(rng.randrange(1, 1 << 20))]


def signed_nonsense(key: bytes, seed: int):
    """Messages that pass the signature check (a peer holding the key) but make no
    sense: ill-typed bodies, unknown DDict ops, sizes that lie, and signed messages
    whose frames were split or merged after signing."""
    rng = random.Random(seed)
    codec, signer = P.Codec(key), P.FrameSigner(key)
    bodies = [{"op": "register", "node": None, "cpus": "x", "hostname": 5},
              {"op": "telemetry", "node": [], "owners": 7}, {"op": "exited", "procs": "zz"},
              {"op": "spawn", "rid": 1, "count": "many"}, {"results": [(1, 2)], "busy": "no"},
              {"seq": "a", "start": None}, {"jobs": 5}, [], None, 42, {"op": 3}]
    for _ in range(MESSAGES // 4):
        r = rng.random()
        if r < 0.4:
            yield codec.encode(rng.choice(KINDS), rng.choice(bodies))
        elif r < 0.7:
            frames = codec.encode(rng.choice(KINDS), rng.choice(bodies), [b"ab", b"cd"])
            yield frames[:-2] + [frames[-2] + frames[-1]]      # merged after signing
        else:
            head = P.DD_REQUEST.pack(rng.choice([0, 25, 99, P.DD_GET]), 0, 0,
                                     rng.randrange(0, 3), rng.randrange(0, 2 ** 32),
                                     rng.randrange(0, 2 ** 32), 0)
            yield signer.sign([head + rng.randbytes(rng.randrange(0, 40))])


def flood(address: str, sock_type: int, frames_iter, net=None, sync=None) -> int:
    """Send every message of ``frames_iter``; -> how many were handed to zmq. With
    ``net``, as a peer of the runtime (CurveZMQ done); without, as a stranger, whose
    handshake never completes (sends that would wait are counted as not sent) -- or,
    on a one-host runtime, as a local peer. ``sync(sock)``, if given, runs last, on
    the same connection: it returns once the target has read everything sent."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 2000)
    if net is not None:
        net.connect(sock, address)
    else:
        sock.connect(address)
    sent = 0
    for frames in frames_iter:
        try:
            sock.send_multipart(frames, flags=0 if net is not None else zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            pass
        if sock_type == zmq.DEALER and sock.poll(0):      # replies, if any: read, never trusted
            while sock.poll(0):
                sock.recv_multipart()
    if sync is not None:
        sync(sock)
    sock.close()          # lingers while what was queued is handed over
    return sent


# --- proof that a target has read a flood ----------------------------------------------
# zmq keeps the order of one connection's messages and every target reads its socket
# from one thread, so a last message on the flood's own connection that the target
# is seen to have read proves it has read the whole flood. Each sync(sock) sends one
# and waits (SYNC_S at most) for the proof that it was read.

SYNC_S = 60


def _recv_until(sock, found, what: str) -> None:
    """Read ``sock`` until ``found(frames)``; fail naming ``what`` after SYNC_S."""
    deadline = time.monotonic() + SYNC_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(left * 1000):
            pytest.fail(f"{what}: no answer within {SYNC_S} s")
        if found(sock.recv_multipart()):
            return


def head_sync(net):
    """A request the head answers: a reply to it comes after all the flood was read."""
    codec = net.codec() if net is not None else P.Codec()

    def sync(sock):
        rid = f"fuzz-sync-{os.urandom(8).hex()}"
        sock.send_multipart(codec.encode(P.REQ, {"op": "nodes", "rid": rid}))

        def found(frames):
            try:
                kind, body, _ = codec.decode(frames)
            except P.ProtocolError:
                return False
            return kind == P.REP and isinstance(body, dict) and body.get("rid") == rid
        _recv_until(sock, found, "the head answering a request after the fuzz")
    return sync


def manager_sync(net):
    """A DDict ping: the manager answers it (with its rid) after the flood."""
    signer = P.FrameSigner(net.key if net is not None else None)

    def sync(sock):
        rid = random.getrandbits(32)
        sock.send_multipart(signer.sign([P.DD_REQUEST.pack(P.DD_PING, 0, 0, 0, rid, 0, 0)]))

        def found(frames):
            head = frames[0]
            return len(head) >= P.DD_REPLY.size and P.DD_REPLY.unpack_from(head)[3] == rid
        _recv_until(sock, found, "the DDict manager answering a ping after the fuzz")
    return sync


class _Noting:
    """Stands in for a channel's codec: decodes as it does, and notes when it has
    decoded ``token`` (a message body)."""

    def __init__(self, codec, token):
        self.codec, self.token, self.seen = codec, token, threading.Event()

    def decode(self, frames):
        kind, body, bufs = self.codec.decode(frames)
        if body == self.token:
            self.seen.set()
        return kind, body, bufs

    def __getattr__(self, name):
        return getattr(self.codec, name)


def pool_sync(pool, net):
    """The pool answers no stranger, but its I/O thread is in this process: its
    endpoint's codec notes a hello, sent last, when the thread reads it."""
    codec = net.codec() if net is not None else P.Codec()

    def sync(sock):
        router = pool._dispatcher.router
        noting = _Noting(router.codec, {"fuzz-sync": os.urandom(8).hex()})
        router.codec = noting
        try:
            sock.send_multipart(codec.encode(P.HELLO, noting.token))
            if not noting.seen.wait(SYNC_S):
                pytest.fail(f"the pool's I/O thread did not read a message sent after the "
                            f"fuzz within {SYNC_S} s")
        finally:
            router.codec = noting.codec
    return sync


def stage_sync(net, folder):
    """A stage worker answers nobody, but unpickles the items of a real batch: one
    whose item makes a directory when unpickled (a Marker), sent last, shows when it
    was read. Its batch number is the first one's, which has come out already, so the
    caller drops it when it comes out again (as it does any batch that comes out twice)."""
    def sync(sock):
        done = os.path.join(folder, f"read-{os.urandom(8).hex()}")
        data, bufs = S.dumps_work(([Marker(done)], {}))
        sock.send_multipart(net.codec().encode(P.PIPE_ITEMS, {"seq": 0, "start": 0},
                                               [data, *bufs]))
        wait_until(lambda: os.path.isdir(done), SYNC_S,
                   "the stage worker reading a batch sent after the fuzz")
    return sync


def flood_lane(path: str, seed: int) -> int:
    rng = random.Random(seed)
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)
        s.settimeout(10)          # a manager that stops reading fails the test, not hangs it
        for _ in range(MESSAGES):
            head = P.DD_REQUEST.pack(rng.randrange(0, 40), rng.randrange(0, 256), 0, 0,
                                     rng.randrange(0, 2 ** 32), rng.randrange(0, 2 ** 32),
                                     rng.randrange(-2 ** 63, 2 ** 63))
            data = rng.choice([head, head + rng.randbytes(100), rng.randbytes(30), b"\0"])
            s.send(data)
            sent += 1
            while select.select([s], [], [], 0)[0]:     # replies, if any: read, not trusted
                s.recv(1 << 17)
        # a ping last: its answer (with its rid) comes once the manager has read the
        # lane's datagrams before it, in order
        rid = random.getrandbits(32)
        s.send(P.DD_REQUEST.pack(P.DD_PING, 0, 0, 0, rid, 0, 0))
        deadline = time.monotonic() + SYNC_S
        while True:
            assert time.monotonic() < deadline, \
                "the DDict manager did not answer a ping on its lane after the fuzz"
            try:
                reply = s.recv(1 << 17)
            except socket.timeout:
                continue
            if len(reply) >= P.DD_REPLY.size and P.DD_REPLY.unpack_from(reply)[3] == rid:
                break
    return sent


def runtime_processes(rt) -> list[psutil.Process]:
    head = psutil.Process(rt._proc.pid)
    return [head, *head.children(recursive=True)]


def still_serves(rt, pool, d):
    assert len(rt.request("nodes")["nodes"]) == 2
    assert pool.map(square, range(100)) == [x * x for x in range(100)]
    d["after"] = list(range(10))
    assert d["after"] == list(range(10)) and d["before"] == "kept"


@pytest.fixture(params=["tcp", "ipc"])
def runtime(request):
    kw = {"listen": "127.0.0.1"} if request.param == "tcp" else {}
    rt = dragon_nb.start(nodes=2, **kw)
    try:
        yield request.param, rt
    finally:
        dragon_nb.stop()


@pytest.mark.timeout(240)
def test_random_and_malformed_messages_crash_nothing_and_unpickle_nothing(runtime, tmp_path):
    mode, rt = runtime
    marker = str(tmp_path / "unpickled")
    with Pool(2) as pool:
        d = DDict(1, 2, 32 << 20)
        d["before"] = "kept"
        procs_before = {p.pid for p in runtime_processes(rt)}
        manager = d._managers[0]
        # each target with the way to see that it has read a flood (see the syncs)
        targets = [(rt.tcp_address if mode == "tcp" else rt.address, zmq.DEALER, head_sync),
                   (pool._dispatcher.address, zmq.DEALER, lambda net: pool_sync(pool, net)),
                   (manager[3], zmq.DEALER, manager_sync)]
        pipe = None
        if mode == "tcp":
            pipe = Pipeline(range(2000), stage(square, workers=2))
            first = [next(pipe) for _ in range(10)]
            targets += [(address, zmq.PUSH, lambda net: stage_sync(net, str(tmp_path)))
                        for address in pipe.stage_inputs[0]]
        for seed, (address, kind, sync) in enumerate(targets):
            if mode == "ipc":              # a local peer: the same user, no key to hold
                assert flood(address, kind, messages(marker, seed, False),
                             sync=sync(None)) == MESSAGES
                continue
            # a stranger: not one handshake completes, so nothing reaches the runtime
            # (nor is anything of it queued there: no sync, none could be read)
            flood(address, kind, messages(marker, seed, True))
            # a peer that completed CurveZMQ but signs nothing (or signs nonsense):
            # every unsigned message is dropped before it is read
            assert flood(address, kind, messages(marker, seed, True), net=rt.network,
                         sync=sync(rt.network)) == MESSAGES
            assert flood(address, kind, signed_nonsense(rt.network.key, seed),
                         net=rt.network, sync=sync(rt.network)) == MESSAGES // 4
        if mode == "ipc":
            assert flood_lane(manager[4], 99) == MESSAGES
        if pipe is not None:
            assert first + list(pipe) == [x * x for x in range(2000)]
        # no wait here: every flood above ended with its sync, so each target has
        # read everything that was queued for it
        still_serves(rt, pool, d)
        gone = procs_before - {p.pid for p in runtime_processes(rt)}
        assert not gone, f"runtime processes died under the fuzz: {gone}"
        assert not os.path.exists(marker), "a fuzzed message was unpickled"
        d.destroy()
