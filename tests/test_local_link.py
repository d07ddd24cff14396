"""The Unix-socket link from a Process to its parent's hub on one host
(``dragon_nb.mp.local_link``), as a specification.

The listener and senders are exercised in this process (threads at most), and
one forked child where a test needs a peer of another user; the last tests run
Processes on a runtime to see the link carry a large print, and the bye of a
child quicker than its own spawn reply.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import socket
import threading

import pytest

import dragon_nb
from dragon_nb.mp import hub as mp_hub, local_link
from dragon_nb.wire import protocol as P

pytestmark = pytest.mark.timeout(60)


def read_all(listener: local_link.Listener, until_closed: int = 1, timeout: float = 10.0):
    """Every (kind, body) the listener gets until ``until_closed`` connections have
    closed; fails if that takes over ``timeout`` s."""
    got, closed = [], 0
    while closed < until_closed:
        fds = [listener.sock.fileno(), *listener.conns]
        ready, _, _ = select.select(fds, [], [], timeout)
        assert ready, f"nothing came in {timeout} s (got {got})"
        if listener.sock.fileno() in ready:
            listener.accept()
        for fd in [fd for fd in ready if fd in listener.conns]:
            messages, still_open = listener.read(listener.conns[fd])
            got.extend(messages)
            closed += not still_open
    return got


@pytest.fixture
def listener():
    lis = local_link.Listener()
    yield lis
    lis.close()


def test_what_a_sender_sends_arrives_whole_in_order_and_its_close_is_seen(listener):
    sender = local_link.Sender.connect(listener.where)
    assert sender is not None
    for i in range(50):
        sender.send(P.MP_OUTPUT, {"pid": 1, "stream": "stdout", "text": f"line {i}\n"})
    sender.last(P.MP_BYE, {"pid": 1, "code": 0}, timeout=5)
    got = read_all(listener)
    assert [b["text"] for k, b in got[:-1]] == [f"line {i}\n" for i in range(50)]
    assert got[-1] == (P.MP_BYE, {"pid": 1, "code": 0})
    assert listener.conns == {}


def test_a_large_print_goes_in_pieces_that_join_up_to_it(listener):
    text = "".join(f"{i:07d}\n" for i in range(40000))       # 320,000 characters
    sender = local_link.Sender.connect(listener.where)

    def send():                        # blocks while the socket is full: read meanwhile
        sender.send_output({"pid": 2, "stream": "stderr", "text": text})
        sender.last(P.MP_BYE, {"pid": 2, "code": 0}, timeout=5)
    thread = threading.Thread(target=send)
    thread.start()
    got = read_all(listener)
    thread.join(10)
    assert not sender.gone
    pieces = [b["text"] for k, b in got if k == P.MP_OUTPUT]
    assert len(pieces) == -(-len(text) // local_link.OUTPUT_PIECE_CHARS)
    assert all(len(p) <= local_link.OUTPUT_PIECE_CHARS for p in pieces)
    assert "".join(pieces) == text


def test_a_packet_holding_anything_but_plain_data_is_skipped_and_the_rest_read(listener):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))
    sender = local_link.Sender.connect(listener.where)
    sender.sock.send(bytes([len(P.MP_OUTPUT)]) + P.MP_OUTPUT + pickle.dumps(Evil()))
    sender.sock.send(b"\x09ab")                        # says its kind has 9 bytes: short
    sender.send(P.MP_BYE, {"pid": 3, "code": 0})
    sender.sock.close()
    assert read_all(listener) == [(P.MP_BYE, {"pid": 3, "code": 0})]


def test_packets_decode_to_what_was_encoded_and_refuse_globals():
    body = {"pid": 4, "text": "é\n", "n": [1, 2.5, None], "b": b"\x00"}
    assert P.decode_packet(P.encode_packet(P.MP_OUTPUT, body)) == (P.MP_OUTPUT, body)
    with pytest.raises(P.ProtocolError, match="refused"):
        P.decode_packet(bytes([2]) + b"mo" + pickle.dumps(socket.socket))
    with pytest.raises(P.ProtocolError, match="short"):
        P.decode_packet(b"")


def test_a_hub_elsewhere_is_not_reached_and_the_child_falls_back_to_zmq(listener):
    name, netns = listener.where
    assert local_link.Sender.connect((name, netns + 1)) is None     # another namespace
    assert local_link.Sender.connect((name + "-gone", netns)) is None
    assert local_link.Sender.connect(None) is None                  # an older parent


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_a_connection_of_another_user_is_closed_unread(listener):
    pid = os.fork()
    if pid == 0:                                    # the child: nobody, then connect
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sender = local_link.Sender.connect(listener.where)
            sender.send(P.MP_BYE, {"pid": 5, "code": 0})
            sender.sock.close()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    ready, _, _ = select.select([listener.sock], [], [], 10)
    assert ready
    assert listener.accept() == [] and listener.conns == {}


def test_sending_to_a_hub_that_is_gone_drops_quietly():
    lis = local_link.Listener()
    sender = local_link.Sender.connect(lis.where)
    lis.close()                                     # not accepted: the connection is reset
    for _ in range(3):
        sender.send(P.MP_OUTPUT, {"pid": 6, "stream": "stdout", "text": "x\n"})
    assert sender.gone
    sender.last(P.MP_BYE, {"pid": 6, "code": 0}, timeout=1)


def test_the_last_message_waits_at_most_its_timeout_for_a_hub_that_does_not_read(listener):
    sender = local_link.Sender.connect(listener.where)
    sender.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender.sock.setblocking(False)
    try:
        while True:                                 # fill the hub's side until it is full
            sender.sock.send(P.encode_packet(P.MP_OUTPUT, {"text": "y" * 1000}))
    except BlockingIOError:
        pass
    sender.sock.setblocking(True)
    sender.last(P.MP_BYE, {"pid": 7, "code": 0}, timeout=0.2)
    assert sender.gone and sender.sock.fileno() == -1


# --- on a runtime -------------------------------------------------------------------------
def print_a_lot(n):
    for i in range(n):
        print(f"line {i:06d} " + "z" * 50)


def exit_at_once():
    pass


@pytest.fixture
def dragon():
    dragon_nb.stop()
    dragon_nb.start(nodes=2)
    yield multiprocessing.get_context("dragon")
    dragon_nb.stop()


def test_a_process_on_this_host_sends_its_prints_whole_over_the_unix_socket(dragon, capfd):
    capfd.readouterr()
    p = dragon.Process(target=print_a_lot, args=(5000,))
    p.start()
    hub = mp_hub.get_hub()
    p.join(30)
    assert p.exitcode == 0
    out = capfd.readouterr().out.splitlines()
    assert out == [f"line {i:06d} " + "z" * 50 for i in range(5000)]
    assert hub.local.conns == {}                     # its connection closed after the bye


def test_a_bye_that_comes_before_the_spawn_reply_finishes_the_process_at_track(dragon):
    hub = mp_hub.get_hub()
    key = (0, 2 ** 22 + 12345)                        # a pid no process has
    hub.on_bye({"node": key[0], "pid": key[1], "code": 3})
    ended = []
    hub.track(key, lambda code, why: ended.append((code, why)), None)
    assert ended == [(3, None)]                        # not up to LIVENESS_POLL_S later
    p = dragon.Process(target=exit_at_once)
    p.start()
    p.join(30)
    assert p.exitcode == 0
