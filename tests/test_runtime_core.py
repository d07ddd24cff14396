"""The runtime core: the protocol's tables and signing, the liveness layer, the link
watcher, and the head's bookkeeping when messages are lost or played again."""
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq

import dragon_nb
from dragon_nb.runtime import liveness, network
from dragon_nb.wire import protocol as P

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)


# --- handler tables ------------------------------------------------------------------
class _Role:
    HANDLERS = P.Handlers("test role")

    def __init__(self):
        self.seen = []
        self.dispatch = self.HANDLERS.bind(self)

    @HANDLERS.on(P.REQ, P.Op.NODES)
    def on_nodes(self, body, ident):
        self.seen.append(("nodes", ident))
        return "answered"

    @HANDLERS.on(P.TASKS)
    def on_tasks(self, body, bufs):
        self.seen.append(("tasks", bufs))


def test_a_role_dispatches_control_ops_by_op_and_data_kinds_by_kind():
    role = _Role()
    assert role.dispatch(P.REQ, {"op": P.Op.NODES, "rid": 1}, b"client") == "answered"
    role.dispatch(P.TASKS, {"tasks": []}, [b"buf"])
    assert role.seen == [("nodes", b"client"), ("tasks", [b"buf"])]


def test_a_message_no_handler_takes_is_an_unknown_message_naming_kind_and_op():
    role = _Role()
    with pytest.raises(P.UnknownMessage, match="no b'req' message with op 'spawn'"):
        role.dispatch(P.REQ, {"op": P.Op.SPAWN}, b"client")
    with pytest.raises(P.UnknownMessage, match="b'rs'"):
        role.dispatch(P.RESULTS, {}, [])


def test_two_handlers_for_one_message_are_refused_when_the_table_is_built():
    table = P.Handlers("twice")
    table.on(P.EVT, P.Op.PING)(lambda self, body: None)
    with pytest.raises(ValueError, match="two handlers"):
        table.on(P.EVT, P.Op.PING)(lambda self, body: None)


def test_every_op_is_a_distinct_plain_string():
    ops = {k: v for k, v in vars(P.Op).items() if k.isupper()}
    assert all(type(v) is str for v in ops.values())
    assert len(set(ops.values())) == len(ops)
    assert P.loads_body(P.Codec().encode(P.EVT, {"op": P.Op.SIGNAL})[1]) == {"op": "signal"}


# --- replays ---------------------------------------------------------------------------
def test_a_replayed_signed_message_is_refused_and_counted():
    sender, receiver = P.Codec(b"k" * 32), P.Codec(b"k" * 32)
    frames = sender.encode(P.REQ, {"op": P.Op.NODES, "rid": 1})
    assert receiver.decode(frames)[1]["rid"] == 1
    with pytest.raises(P.ReplayError):
        receiver.decode(frames)
    assert receiver.replays == 1
    # the same body sent again is a new message, not a replay
    assert receiver.decode(sender.encode(P.REQ, {"op": P.Op.NODES, "rid": 1}))[1]["rid"] == 1


def test_the_replay_guard_takes_gaps_and_reordering_within_its_window_only():
    guard = P.ReplayGuard(window=8)
    seq = lambda n: P._SEQ.pack(b"session1", n)     # noqa: E731
    for n in (5, 3, 9, 4):                    # out of order, with gaps: all new
        guard.admit(seq(n))
    for n in (3, 9, 1):                       # seen twice, or older than the window
        with pytest.raises(P.ReplayError):
            guard.admit(seq(n))
    assert guard.replays == 3
    guard.admit(P._SEQ.pack(b"session2", 3))  # another sender numbers on its own


def test_one_process_sending_on_two_sockets_to_one_receiver_loses_nothing():
    """zmq keeps order on one connection only: each socket numbers on its own, so a
    receiver reading one socket's messages late takes them all."""
    key = b"k" * 32
    first_socket, second_socket, receiver = P.Codec(key), P.Codec(key), P.Codec(key)
    backlog = [first_socket.encode(P.EVT, {"op": P.Op.PING}) for _ in range(3 * P.REPLAY_WINDOW)]
    receiver.decode(second_socket.encode(P.EVT, {"op": P.Op.PING}))     # read first
    for frames in backlog:
        receiver.decode(frames)
    assert receiver.replays == 0
    signer, other, manager = P.FrameSigner(key), P.FrameSigner(key), P.FrameSigner(key)
    late = [signer.sign([b"put"]) for _ in range(3 * P.REPLAY_WINDOW)]
    manager.verify(other.sign([b"wait_for"]))
    assert all(manager.verify(f) == [b"put"] for f in late)


def test_a_forked_child_does_not_reuse_its_parents_message_numbers():
    codec = P.Codec(b"k" * 32)
    first = codec.encode(P.EVT, {"op": P.Op.PING})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                               # the child signs one message
        os.write(w, bytes(codec.encode(P.EVT, {"op": P.Op.PING})[2]))
        os._exit(0)
    os.close(w)
    child_seq = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    assert child_seq[:8] != bytes(first[2])[:8], "the child signed under its parent's session"


def test_ddict_frames_played_again_are_refused():
    signer, manager = P.FrameSigner(b"k" * 32), P.FrameSigner(b"k" * 32)
    frames = signer.sign([b"request", b"buffer"])
    assert manager.verify(frames) == [b"request", b"buffer"]
    with pytest.raises(P.ReplayError):
        manager.verify(frames)


def test_a_signed_request_played_again_to_the_head_over_tcp_is_dropped_and_counted():
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            rt.network.connect(sock, rt.tcp_address)
            frames = rt.network.codec().encode(P.REQ, {"op": P.Op.NODES, "rid": 7})
            sock.send_multipart(frames)
            assert sock.poll(10_000), "the head did not answer the first copy"
            sock.recv_multipart()
            sock.send_multipart(frames)           # a recording of it, played again
            deadline = time.monotonic() + 10
            while rt.request(P.Op.STATS)["replayed"] < 1:
                assert time.monotonic() < deadline, "the replay was not counted"
                time.sleep(0.05)
            assert not sock.poll(0), "the head answered a replayed request"
        finally:
            sock.close(linger=0)


# --- the head's bookkeeping -------------------------------------------------------------
class FakeAgent:
    """An agent the test plays by hand: joins the head as another host's would."""

    def __init__(self, rt):
        self.rt = rt
        self.chan = P.Channel(zmq.Context.instance().socket(zmq.DEALER), rt.network.codec())
        self.chan.sock.setsockopt(zmq.IDENTITY, b"fake-agent")
        rt.network.connect(self.chan.sock, rt.address)

    def join(self) -> int:
        self.chan.send(P.EVT, {"op": P.Op.REGISTER, "node": None, "name": "fake",
                               "hostname": "fake", "pid": os.getpid(), "pid_space": "elsewhere",
                               "cpus": [0], "physical_mem": 1 << 30, "address": None})
        return self.expect(P.EVT, P.Op.WELCOME)["node"]

    def expect(self, kind, op, timeout=10.0):
        deadline = time.monotonic() + timeout
        while self.chan.poll(max(0.0, deadline - time.monotonic()) * 1000):
            _, got, body, _ = self.chan.recv()
            if got == kind and body.get("op") == op:
                return body
        raise AssertionError(f"the head sent no {op!r} within {timeout} s")

    def close(self):
        self.chan.close()


def _events(sub, topic_prefix, timeout=10.0):
    deadline = time.monotonic() + timeout
    while sub.poll(max(0.0, deadline - time.monotonic()) * 1000):
        for topic, _, body, _ in sub.drain():
            if topic.startswith(topic_prefix):
                return body
    raise AssertionError(f"no {topic_prefix!r} event within {timeout} s")


def test_an_exit_whose_event_was_lost_is_published_once_the_agent_no_longer_lists_it():
    """A TCP link cut as a worker exits can lose the agent's ``exited`` event: the
    next telemetry, which lists every live child and the last exits, tells the head."""
    with dragon_nb.Runtime(nodes=1) as rt:
        sub = rt.subscribe(P.TOPIC_TELEMETRY, P.TOPIC_NODES, P.TOPIC_EXIT + b"owner-x")
        _events(sub, P.TOPIC_TELEMETRY)     # node 0's figures arrive: the subscription is live
        agent = FakeAgent(rt)
        try:
            node = agent.join()
            assert _events(sub, P.TOPIC_NODES)["event"] == "joined"
            spawned = []
            spawner = threading.Thread(target=lambda: spawned.extend(rt.spawn(
                "dragon_nb.pool.worker:main", b"", 1, "owner-x", nodes=[node])))
            spawner.start()
            request = agent.expect(P.REQ, P.Op.SPAWN)
            agent.chan.send(P.REP, {"rid": request["rid"], "ok": True, "pids": [424242]})
            spawner.join(10)
            assert spawned == [(node, 424242)]
            # its exit event is never sent; the agent's next figures no longer list it
            agent.chan.send(P.EVT, {"op": P.Op.TELEMETRY, "pids": [],
                                    "exits": [(424242, -9)], "owners": {}})
            event = _events(sub, P.TOPIC_EXIT + b"owner-x")
            assert event["procs"] == [(node, 424242, -9)]
            assert "why" not in event, "reported as a lost node, not as the exit it was"
            assert (node, 424242, "owner-x") not in \
                [tuple(p) for p in rt.request(P.Op.PROCS)["procs"]]
        finally:
            agent.close()
            sub.close()


def test_a_kill_without_wait_is_one_message_with_no_reply_to_skip():
    from test_runtime import _manager_spec
    with dragon_nb.Runtime(nodes=1) as rt:
        (node, pid), = rt.spawn("dragon_nb.ddict.manager:main", _manager_spec(rt, "nw"), 1,
                                "test-owner")
        manager = psutil.Process(pid)
        rt.kill([(node, pid)], signal.SIGKILL, wait=False)
        psutil.wait_procs([manager], timeout=10)
        assert not manager.is_running() or manager.status() == psutil.STATUS_ZOMBIE
        rt.request(P.Op.NODES)
        assert not rt._chan.poll(200), "a reply nobody asked for is waiting on the handle"


def test_a_kill_with_a_signal_that_does_not_exist_is_refused_naming_it():
    with dragon_nb.Runtime(nodes=1) as rt:
        with pytest.raises(dragon_nb.errors.RuntimeRequestError, match="bad kill"):
            rt.kill([(0, os.getpid())], 12345)


# --- the liveness layer ----------------------------------------------------------------------
@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_process_here_is_looked_at_by_pid(sleeper):
    ref = liveness.ProcessRef(0, sleeper.pid, network.pid_space(),
                              liveness.start_time(sleeper.pid))
    assert ref.local and ref.alive() is True
    assert ref.signal_here(signal.SIGKILL)
    sleeper.wait(10)
    assert ref.alive() is False


def test_a_reused_pid_is_not_taken_for_the_process_it_was(sleeper):
    ref = liveness.ProcessRef(0, sleeper.pid, network.pid_space(),
                              liveness.start_time(sleeper.pid) - 5.0)
    assert ref.alive() is False
    assert ref.signal_here(signal.SIGTERM)        # nothing to signal: not sent
    assert sleeper.poll() is None, "the process now under that pid was signalled"


def test_a_process_in_another_pid_space_is_unknown_here_and_signalled_through_its_agent(sleeper):
    ref = liveness.ProcessRef(0, sleeper.pid, "another-kernel/1", 0.0)
    assert not ref.local and ref.alive() is None
    assert not ref.signal_here(signal.SIGKILL)

    class Runtime:
        alive = True
        sent = []

        def kill(self, procs, sig, wait=True):
            self.sent.append((procs, sig, wait))

    rt = Runtime()
    liveness.signal_all(rt, [ref], signal.SIGKILL, wait=False)
    assert rt.sent == [([(0, sleeper.pid)], signal.SIGKILL, False)]
    assert sleeper.poll() is None


def test_wait_gone_returns_what_is_still_alive(sleeper):
    ref = liveness.ProcessRef(0, sleeper.pid, network.pid_space(),
                              liveness.start_time(sleeper.pid))
    assert liveness.wait_gone([ref], 0.1) == [ref]
    sleeper.kill()
    assert liveness.wait_gone([ref], 10) == []


# --- the link watcher -------------------------------------------------------------------------
def test_a_link_cut_and_made_again_is_one_redial_and_a_link_nobody_answers_is_gone():
    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.RECONNECT_IVL, 20)
    watch = network.LinkWatch(client)
    client.connect(f"tcp://127.0.0.1:{port}")
    try:
        wait_until(lambda: watch.update() or watch.connected, what="the first connection",
                   interval=0.01)
        assert watch.poll() == [] and watch.redials == 0
        server.close(linger=0)                          # the peer goes
        wait_until(lambda: watch.gone(3), what="three refusals after the link was lost",
                   interval=0.01)
        server = ctx.socket(zmq.ROUTER)                 # and comes back on the same port
        server.bind(f"tcp://127.0.0.1:{port}")
        wait_until(lambda: watch.update() or watch.connected, what="the link made again",
                   interval=0.01)
        assert len(watch.poll()) == 1 and watch.redials == 1 and not watch.gone(3)
    finally:
        watch.close()
        client.close(linger=0)
        server.close(linger=0)
