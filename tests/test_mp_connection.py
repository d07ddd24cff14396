"""Pipe ends of the "dragon" context, between processes on different nodes:
what CPython's test_connection checks, but for the descriptor and EOFError
(see the skip in test_cpython_mp.py and docs/compatibility.md)."""
import array
import multiprocessing
import multiprocessing.connection

import pytest

import dragon_nb

pytestmark = pytest.mark.timeout(120)

SENTINEL = b"stop"


def echo(conn):
    for msg in iter(conn.recv_bytes, SENTINEL):
        conn.send_bytes(msg)
    conn.close()


@pytest.fixture(scope="module")
def ctx():
    dragon_nb.start(nodes=2)
    yield multiprocessing.get_context("dragon")
    dragon_nb.stop()


def test_a_duplex_pipe_carries_objects_and_bytes_between_nodes(ctx):
    conn, child_conn = ctx.Pipe()
    p = ctx.Process(target=echo, args=(child_conn,), node=1)
    p.start()
    child_conn.close()                      # the child's copy lives on
    conn.send_bytes(b"hello")
    assert conn.recv_bytes() == b"hello"
    conn.send_bytes(b"0123456789", 2, 3)
    assert conn.recv_bytes() == b"234"
    arr = array.array("i", range(4))
    conn.send_bytes(arr)
    out = array.array("i", [0] * 6)
    assert conn.recv_bytes_into(out, 1) == 16
    assert list(out) == [0, 0, 1, 2, 3, 0]
    big = b"X" * (16 << 20)
    conn.send_bytes(big)
    assert conn.recv_bytes() == big
    conn.send_bytes(SENTINEL)
    p.join(30)
    assert p.exitcode == 0


def test_bad_lengths_raise_as_the_stdlib(ctx):
    a, b = ctx.Pipe()
    with pytest.raises(ValueError):
        a.send_bytes(b"abc", 4)
    with pytest.raises(ValueError):
        a.send_bytes(b"abc", 1, 5)
    a.send_bytes(b"too long")
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(3)
    a.send_bytes(b"0123456789")
    small = bytearray(4)
    with pytest.raises(multiprocessing.BufferTooShort) as info:
        b.recv_bytes_into(small)
    assert info.value.args[0] == b"0123456789"


def test_poll_waits_for_data_and_wait_takes_pipe_ends(ctx):
    a, b = ctx.Pipe()
    assert b.poll() is False
    assert b.poll(0.1) is False
    assert multiprocessing.connection.wait([b], timeout=0.1) == []
    a.send([1, 2.25, None])
    assert b.poll(5) is True
    assert multiprocessing.connection.wait([b], timeout=5) == [b]
    assert b.recv() == [1, 2.25, None]


def test_a_one_way_pipe_has_a_reading_and_a_writing_end(ctx):
    reader, writer = ctx.Pipe(duplex=False)
    assert (reader.readable, reader.writable) == (True, False)
    assert (writer.readable, writer.writable) == (False, True)
    with pytest.raises(OSError):
        reader.send(1)
    with pytest.raises(OSError):
        writer.recv()
    writer.send("x")
    assert reader.recv() == "x"


def test_a_closed_end_refuses_use(ctx):
    a, b = ctx.Pipe()
    a.close()
    assert a.closed
    with pytest.raises(OSError, match="closed"):
        a.send(1)
    with pytest.raises(OSError):
        a.fileno()
