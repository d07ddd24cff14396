"""The Ring of ``dragon_nb/mp/shm_ring.py``, specified by what it does: a FIFO of
byte records shared by name between the processes of one host, bounded by
``maxsize`` and by its bytes, whose records are neither lost nor duplicated by
many processes at once, by a Ctrl-C or by a fork, and which a process killed
inside it cannot hang.

Every test makes its rings through the ``rings`` fixture, which closes them,
unlinks them and checks that nothing of theirs is left in /dev/shm. Children
are forked (``multiprocessing``'s "fork" context); conditions are polled with a
deadline, never slept for.
"""
from __future__ import annotations

import array
import itertools
import multiprocessing
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from dragon_nb.mp import shm_ring
from dragon_nb.mp.shm_ring import Ring

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)

FORK = multiprocessing.get_context("fork")
SHM = "/dev/shm"
_numbers = itertools.count()


def shm_entries(name: str) -> list[str]:
    """Every entry of /dev/shm whose name contains ``name``."""
    return sorted(f for f in os.listdir(SHM) if name in f)


class Rings:
    """The rings of one test: made with unique names, closed, unlinked and
    checked for leftovers at its end."""

    def __init__(self):
        self.names, self.handles = [], []

    def name(self) -> str:
        # the final "r": no name is part of another ("...-1r" is not in "...-12r")
        name = f"dnbtest-{os.getpid()}-{next(_numbers)}r"
        self.names.append(name)
        return name

    def new(self, **kwargs) -> Ring:
        return self.keep(Ring.create(self.name(), **kwargs))

    def open(self, name: str) -> Ring:
        return self.keep(Ring.open(name))

    def keep(self, ring: Ring) -> Ring:
        self.handles.append(ring)
        return ring

    def finish(self):
        for ring in self.handles:
            ring.close()
        for name in self.names:
            Ring.unlink(name)
        left = [f for name in self.names for f in shm_entries(name)]
        assert not left, f"left in /dev/shm: {left}"


@pytest.fixture
def rings():
    made = Rings()
    yield made
    made.finish()


@pytest.fixture
def children():
    """Start forked children; any still alive at the end of the test is killed."""
    started = []

    def start(target, *args):
        p = FORK.Process(target=target, args=args, daemon=True)
        p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(10)


def finish(*procs, timeout: float = 30):
    """Wait for children and check that each succeeded."""
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"child {p.pid} ended with {p.exitcode}"


def record(i: int, size: int) -> bytes:
    """Record ``i`` of a stream: its index, repeated and cut to ``size`` bytes."""
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def index_of(rec: bytes) -> int:
    """The index of a record of at least 4 bytes, checking that it is whole."""
    i = int.from_bytes(rec[:4], "little")
    assert rec == record(i, len(rec)), f"record {i} of {len(rec)} B is damaged"
    return i


def fill(ring: Ring, size: int) -> int:
    """Put records of ``size`` bytes until the ring refuses one; how many went in."""
    n = 0
    while True:
        try:
            ring.put(record(n, size), timeout=0)
        except queue.Full:
            return n
        n += 1


def extra_files(ring: Ring) -> list[str]:
    """The ring's entries in /dev/shm besides its segment and four semaphores."""
    return [f for f in shm_entries(ring.name)
            if f != ring.name and not f.startswith("sem.")]


# ---------------------------------------------------------------- records


def test_records_come_out_in_order_and_whole_across_many_wraps_of_the_byte_ring(rings):
    r = rings.new(capacity=1024)
    inline_max = r.capacity // 4 - 8
    rng = random.Random(7)
    sizes = [rng.randrange(inline_max + 1) if rng.random() > 0.03
             else r.capacity // 4 + rng.randrange(3 * r.capacity) for _ in range(3000)]
    sizes[:4] = [0, 1, inline_max, inline_max + 1]
    expected = [rng.randbytes(n) for n in sizes]
    out, fulls, split = [], 0, 0
    pending = iter(expected)
    rec = next(pending)
    while rec is not None:
        tail = r._header()["tail"]
        try:
            r.put(rec, timeout=0)
        except queue.Full:
            fulls += 1
            for _ in range(rng.randrange(1, r.qsize() + 1)):
                out.append(r.get(timeout=0))
            continue
        if 0 < len(rec) <= inline_max and tail + 8 + len(rec) > r.capacity:
            split += 1                     # its payload wrapped to the ring's start
        rec = next(pending, None)
    while not r.empty():
        out.append(r.get(timeout=0))
    assert out == expected
    assert sum(sizes) > 200 * r.capacity
    assert fulls > 100 and split > 100
    assert r._header()["used"] == 0 and extra_files(r) == []


def test_empty_records_are_records(rings):
    r = rings.new()
    for rec in (b"", b"a", b"", b""):
        r.put(rec)
    assert r.qsize() == 4 and not r.empty()
    assert [r.get(timeout=0) for _ in range(4)] == [b"", b"a", b"", b""]
    assert r.empty()
    with pytest.raises(queue.Empty):
        r.get(timeout=0)


def test_any_bytes_like_object_goes_in_and_bytes_come_out(rings):
    r = rings.new(capacity=4096)
    items = [bytearray(b"ba"), memoryview(b"xmvx")[1:3], array.array("i", [1, 2]),
             memoryview(bytes(range(12))).cast("B", (3, 4))[::2], bytearray(3000)]
    for item in items:
        r.put(item)
    for item in items:
        got = r.get(timeout=0)
        assert type(got) is bytes and got == memoryview(item).tobytes()
    with pytest.raises(TypeError):
        r.put("text")


def test_a_record_above_a_quarter_of_the_ring_goes_to_a_file_of_its_own(rings):
    r = rings.new(capacity=4096)
    inline_max = r.capacity // 4 - 8        # its 8-byte length makes it a quarter
    r.put(b"i" * inline_max)
    assert extra_files(r) == []
    big = record(1, inline_max + 1)
    r.put(big)
    (path,) = extra_files(r)
    assert r.qsize() == 2
    assert r.get(timeout=0) == b"i" * inline_max
    assert r.get(timeout=0) == big
    assert extra_files(r) == []


def test_a_record_bigger_than_the_whole_ring_comes_through(rings):
    r = rings.new(capacity=1024)
    huge = [record(i, 5 * r.capacity + i) for i in range(3)]
    for rec in huge:
        r.put(rec, timeout=0)
    assert len(extra_files(r)) == 3
    assert [r.get(timeout=0) for _ in huge] == huge
    assert extra_files(r) == []


def test_out_of_line_records_never_read_are_removed_by_unlink(rings):
    r = rings.new(capacity=1024)
    for i in range(3):
        r.put(record(i, 2000))
    assert len(extra_files(r)) == 3
    name = r.name
    r.close()
    Ring.unlink(name)
    assert shm_entries(name) == []


# ---------------------------------------------------------------- bounds and timeouts


def test_a_full_ring_refuses_a_put_at_once_or_after_its_timeout(rings):
    r = rings.new(maxsize=2)
    r.put(b"1")
    assert not r.full()
    r.put(b"2")
    assert r.full() and r.qsize() == 2
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        r.put(b"3", timeout=0)
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        r.put(b"3", timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 3
    assert r.qsize() == 2 and r._header()["putters_waiting"] == 0
    assert [r.get(), r.get()] == [b"1", b"2"]


def test_an_empty_ring_refuses_a_get_at_once_or_after_its_timeout(rings):
    r = rings.new()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        r.get(timeout=0)
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        r.get(timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 < 3
    assert r._header()["getters_waiting"] == 0


def test_a_ring_whose_bytes_are_used_up_is_full_whatever_its_maxsize(rings):
    """full(): not even an empty record fits. A record out of line needs only
    its marker's bytes in the ring."""
    r = rings.new(capacity=1024)
    n = fill(r, 200)
    assert r.qsize() == n and 2 <= n < 1024 // 200
    assert not r.full()                        # bytes are left, fewer than 200
    r.put(record(n, 2000), timeout=0)
    while not r.full():
        r.put(b"", timeout=0)
    with pytest.raises(queue.Full):
        r.put(b"", timeout=0)
    with pytest.raises(queue.Full):
        r.put(record(0, 2000), timeout=0)
    assert r.get() == record(0, 200)
    assert not r.full()


def test_qsize_empty_and_full_follow_puts_and_gets(rings):
    r = rings.new(maxsize=3)
    seen = []
    for rec in (b"a", b"b", b"c"):
        seen.append((r.qsize(), r.empty(), r.full()))
        r.put(rec)
    seen.append((r.qsize(), r.empty(), r.full()))
    r.get()
    seen.append((r.qsize(), r.empty(), r.full()))
    assert seen == [(0, True, False), (1, False, False), (2, False, False),
                    (3, False, True), (2, False, False)]


# ---------------------------------------------------------------- other processes


def put_when_a_getter_waits(name: str, rec: bytes):
    r = Ring.open(name)
    wait_until(lambda: r._header()["getters_waiting"] == 1, 20, "a getter waiting")
    r.put(rec)
    r.close()


def get_when_a_putter_waits(ring: Ring, n: int):
    wait_until(lambda: ring._header()["putters_waiting"] == 1, 20, "a putter waiting")
    for i in range(n):
        assert index_of(ring.get(timeout=10)) == i


def test_a_blocked_get_is_woken_by_a_put_of_another_process(rings, children):
    r = rings.new()
    p = children(put_when_a_getter_waits, r.name, b"hello")
    assert r.get(timeout=30) == b"hello"
    finish(p)
    assert r._header()["getters_waiting"] == 0


def test_a_put_blocked_by_maxsize_is_woken_by_a_get_of_another_process(rings, children):
    r = rings.new(maxsize=1)
    r.put(record(0, 8))
    p = children(get_when_a_putter_waits, r, 1)
    r.put(record(1, 8), timeout=30)
    finish(p)
    assert r.get(timeout=0) == record(1, 8) and r.empty()
    assert r._header()["putters_waiting"] == 0


def test_a_put_blocked_by_used_up_bytes_is_woken_by_gets_of_another_process(rings, children):
    r = rings.new(capacity=1024)
    n = fill(r, 200)
    p = children(get_when_a_putter_waits, r, n)
    r.put(record(n, 200), timeout=30)
    finish(p)
    assert r.get(timeout=0) == record(n, 200) and r.empty()


def produce(ring: Ring, who: int, n: int):
    rng = random.Random(who)
    for i in range(n):
        size = 4000 if rng.random() < 0.02 else rng.randrange(8, 300)
        ring.put(struct.pack("<II", who, i) + bytes([who]) * (size - 8))


def consume(name: str, conn):
    r = Ring.open(name)
    got = []
    while True:
        rec = r.get(timeout=30)
        if rec == b"STOP":
            break
        who, i = struct.unpack_from("<II", rec)
        assert rec[8:] == bytes([who]) * (len(rec) - 8)
        got.append((who, i))
    conn.send(got)
    r.close()


def test_records_of_several_producers_reach_several_consumers_each_exactly_once(
        rings, children):
    r = rings.new(capacity=8192)
    n, producers, consumers = 1500, 3, 3
    pipes = [FORK.Pipe(duplex=False) for _ in range(consumers)]
    cons = [children(consume, r.name, w) for _, w in pipes]
    prods = [children(produce, r, who, n) for who in range(producers)]
    finish(*prods)
    for _ in cons:
        r.put(b"STOP")
    lists = [rd.recv() for rd, _ in pipes]
    finish(*cons)
    every = sorted(x for got in lists for x in got)
    assert every == [(who, i) for who in range(producers) for i in range(n)]
    for got in lists:          # what one consumer got of one producer is in order
        for who in range(producers):
            mine = [i for w, i in got if w == who]
            assert mine == sorted(mine)
    assert r.empty() and extra_files(r) == []


# ---------------------------------------------------------------- tasks


def finish_tasks(name: str, n: int):
    r = Ring.open(name)
    for _ in range(n):
        r.get(timeout=10)
        r.task_done()
    r.close()


def test_join_waits_until_every_put_record_is_task_done(rings, children):
    r = rings.new()
    for i in range(3):
        r.put(record(i, 8))
    t0 = time.monotonic()
    assert r.join(timeout=0.2) is False
    assert time.monotonic() - t0 >= 0.19
    assert r._header()["unfinished"] == 3 and r._header()["joiners_waiting"] == 0
    p = children(finish_tasks, r.name, 3)
    assert r.join(timeout=30) is True
    finish(p)
    assert r.join(timeout=0) is True and r.join() is True
    with pytest.raises(ValueError, match="too many"):
        r.task_done()
    r.put(b"x")
    r.task_done()
    with pytest.raises(ValueError):
        r.task_done()
    assert r._header()["unfinished"] == 0


# ---------------------------------------------------------------- a killed process


def hold_the_mutex_until_killed(name: str, held):
    Ring.open(name)._hold_mutex()
    held.set()
    signal.pause()


def test_a_process_killed_holding_the_mutex_makes_the_others_fail_naming_it(
        rings, children):
    r = rings.new()
    r.put(b"x")
    held = FORK.Event()
    p = children(hold_the_mutex_until_killed, r.name, held)
    assert held.wait(20)
    os.kill(p.pid, signal.SIGKILL)
    # not reaped yet: a zombie, which is as dead as a holder gets
    wait_until(lambda: psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE, 10,
               "the killed child a zombie")
    for call in (lambda: r.get(timeout=0), lambda: r.put(b"y", timeout=None)):
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=f"process {p.pid} died"):
            call()
        assert time.monotonic() - t0 < 10
    p.join(10)


def hold_the_raw_mutex(name: str, held):
    """Take the ring's mutex semaphore the way every process does, and hold it a
    while before doing anything else (as a process preempted right after taking
    it), longer than a waiter takes to look at who holds it."""
    mutex = shm_ring.SemLock._rebuild(0, 1, 1, f"/{name}-m")
    mutex.acquire()
    held.set()
    time.sleep(shm_ring._BROKEN_AFTER + 0.6)
    mutex.release()


def test_a_live_holder_is_waited_for_even_when_the_previous_one_has_exited(
        rings, children):
    r = rings.new()
    # the last process to take the mutex put a record and exited
    p = children(lambda: Ring.open(r.name).put(b"first"))
    finish(p)
    held = FORK.Event()
    q = children(hold_the_raw_mutex, r.name, held)
    assert held.wait(20)
    t0 = time.monotonic()
    r.put(b"second", timeout=30)
    assert time.monotonic() - t0 > shm_ring._BROKEN_AFTER
    finish(q)
    assert [r.get(timeout=0), r.get(timeout=0)] == [b"first", b"second"]


# ---------------------------------------------------------------- Ctrl-C


class Interrupter:
    """A thread that sends this process one SIGINT per stretch the main thread
    opens with ``arm()`` (inside its ``try``), a random moment (up to ``jitter``
    seconds) after it: so no SIGINT can land outside the ``try`` that counts it.
    The signals alternate between the process (any thread may receive it) and
    the main thread."""

    def __init__(self, jitter: float):
        self.armed = self.sent = 0
        self.jitter = jitter
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def arm(self):
        self.armed += 1

    def _run(self):
        rng = random.Random(5)
        main = threading.main_thread().ident
        while not self.done.is_set():
            if self.armed > self.sent:
                time.sleep(rng.uniform(0, self.jitter))
                self.sent += 1
                if self.sent % 2:
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    signal.pthread_kill(main, signal.SIGINT)
            else:
                self.done.wait(0.0005)

    def run(self, body, on_interrupt) -> int:
        """Run ``body()`` until it returns, calling ``on_interrupt()`` after each
        KeyboardInterrupt it raises; the number of those."""
        interrupts = 0
        while True:
            try:
                self.arm()
                body()
                self.done.set()
                self.thread.join()        # a SIGINT still on its way lands here
                return interrupts
            except KeyboardInterrupt:
                interrupts += 1
                on_interrupt()


def record_size(i: int) -> int:
    """Mostly small records, one in twenty out of line (in a ring of 4 KiB)."""
    return 3000 if i % 20 == 7 else 4 + (i * 37) % 600


MIN_RECORDS, MIN_INTERRUPTS = 3000, 150


def stream_until(ring: Ring, enough):
    """Put records 0, 1, ... until ``enough`` is set, then b"END"."""
    i = 0
    while not enough.is_set():
        ring.put(record(i, record_size(i)), timeout=20)
        i += 1
    ring.put(b"END", timeout=20)


def test_ctrl_c_during_the_gets_of_a_stream_loses_and_duplicates_no_record(
        rings, children):
    r = rings.new(capacity=4096)
    enough = FORK.Event()
    p = children(stream_until, r, enough)
    irq = Interrupter(jitter=0.002)
    got = []

    def take_all():
        while not got or got[-1] != b"END":
            rec = r.get(timeout=20)
            got.append(rec)
            if irq.sent >= MIN_INTERRUPTS and len(got) >= MIN_RECORDS:
                enough.set()

    interrupts = irq.run(take_all, lambda: None)
    finish(p)
    assert interrupts == irq.sent >= MIN_INTERRUPTS
    del got[-1]
    assert [index_of(rec) for rec in got] == list(range(len(got)))
    assert [len(rec) for rec in got] == [record_size(i) for i in range(len(got))]
    assert r.empty() and extra_files(r) == []


def collect_until_end(name: str, conn):
    r = Ring.open(name)
    got = []
    while (rec := r.get(timeout=20)) != b"END":
        got.append(index_of(rec))
    conn.send(got)
    r.close()


def test_ctrl_c_during_the_puts_of_a_stream_loses_and_duplicates_no_record(
        rings, children):
    """A put that returned put its record; one that raised KeyboardInterrupt
    put it at most once (not at all unless the Ctrl-C came after it was in)."""
    r = rings.new(capacity=4096)
    rd, wr = FORK.Pipe(duplex=False)
    p = children(collect_until_end, r.name, wr)
    irq = Interrupter(jitter=0.002)

    class At:
        i = 0
        trying = None
    interrupted = []

    def put_all():
        while At.i < MIN_RECORDS or irq.sent < MIN_INTERRUPTS:
            rec = record(At.i, record_size(At.i))
            At.trying = At.i
            r.put(rec, timeout=20)
            At.trying = None
            At.i += 1

    def skip_interrupted():
        if At.trying is not None:
            interrupted.append(At.trying)
            At.i, At.trying = At.trying + 1, None

    interrupts = irq.run(put_all, skip_interrupted)
    r.put(b"END")
    got = rd.recv()
    finish(p)
    assert interrupts == irq.sent >= MIN_INTERRUPTS
    assert len(interrupted) > MIN_INTERRUPTS // 4
    assert got == sorted(set(got))                      # in order, none twice
    returned = set(range(At.i)) - set(interrupted)
    assert returned <= set(got) <= returned | set(interrupted)
    assert extra_files(r) == []


def test_ctrl_c_interrupts_a_blocked_get_which_then_takes_nothing(rings):
    r = rings.new()

    def interrupt_the_waiting_getter():
        wait_until(lambda: r._header()["getters_waiting"] == 1, 20, "a getter waiting")
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt_the_waiting_getter)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        r.get(timeout=30)
    assert time.monotonic() - t0 < 20
    t.join()
    assert r._header()["getters_waiting"] == 0
    r.put(b"after")
    assert r.get(timeout=0) == b"after"


def test_a_ctrl_c_while_get_decodes_puts_the_record_back(rings):
    """get(decode=...) decodes inside the gate: a Ctrl-C that lands while the
    record is decoded (where Python would run the handler after a C call such
    as pickle.loads) raises KeyboardInterrupt and leaves the record first in
    the ring; an error of decode's own consumes it, as the stdlib's get does."""
    r = rings.new()
    r.put(b"one")
    r.put(b"two")
    decoded = []

    def decode_and_interrupt(data: bytes) -> str:
        decoded.append(data)
        os.kill(os.getpid(), signal.SIGINT)
        return data.decode()

    with pytest.raises(KeyboardInterrupt):
        r.get(timeout=0, decode=decode_and_interrupt)
    assert decoded == [b"one"] and r.qsize() == 2
    assert r.get(timeout=0, decode=bytes.decode) == "one"

    def broken(data: bytes):
        raise ValueError(f"cannot decode {data!r}")

    with pytest.raises(ValueError, match="cannot decode b'two'"):
        r.get(timeout=0, decode=broken)
    assert r.empty()


def test_ctrl_c_interrupts_a_blocked_put_which_then_puts_nothing(rings):
    r = rings.new(maxsize=1)
    r.put(b"first")

    def interrupt_the_waiting_putter():
        wait_until(lambda: r._header()["putters_waiting"] == 1, 20, "a putter waiting")
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt_the_waiting_putter)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        r.put(b"second", timeout=30)
    t.join()
    assert r._header()["putters_waiting"] == 0
    assert r.qsize() == 1 and r.get(timeout=0) == b"first" and r.empty()


def test_a_sigint_handler_of_the_program_sees_every_sigint_and_no_record_is_hurt(
        rings, children):
    r = rings.new(capacity=4096)
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        enough = FORK.Event()
        p = children(stream_until, r, enough)
        sent = 0
        got = []
        while not got or got[-1] != b"END":
            if len(got) % 10 == 3:
                os.kill(os.getpid(), signal.SIGINT)
                sent += 1
            got.append(r.get(timeout=20))
            if len(got) == MIN_RECORDS:
                enough.set()
        wait_until(lambda: len(seen) == sent, 10, lambda: f"{len(seen)} of {sent} SIGINTs seen")
        finish(p)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent >= MIN_RECORDS // 10
    del got[-1]
    assert [index_of(rec) for rec in got] == list(range(len(got)))


def test_the_sigint_handler_is_given_back_when_the_last_ring_of_the_process_closes(rings):
    script = textwrap.dedent("""
        import signal, sys
        from dragon_nb.mp.shm_ring import Ring
        before = signal.getsignal(signal.SIGINT)
        a = Ring.create(sys.argv[1])
        b = Ring.open(sys.argv[1])
        a.put(b"x")
        assert signal.getsignal(signal.SIGINT) is not before
        a.close()
        assert signal.getsignal(signal.SIGINT) is not before, "b is still open"
        assert b.get() == b"x"
        b.close()
        assert signal.getsignal(signal.SIGINT) is before
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, rings.name()], cwd=root,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- names, handles, fork


def test_open_of_a_ring_that_does_not_exist_raises_file_not_found(rings):
    with pytest.raises(FileNotFoundError):
        Ring.open(rings.name())


def test_create_of_a_name_in_use_raises_file_exists_and_leaves_that_ring_alone(rings):
    r = rings.new()
    r.put(b"kept")
    with pytest.raises(FileExistsError):
        Ring.create(r.name)
    assert r.get(timeout=0) == b"kept"


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 201, "a b", "caf\u00e9", ".", "..",
                                 "sem.x-m", 5, None, b"bytes"])
def test_a_bad_name_is_rejected(bad):
    for call in (Ring.create, Ring.open, Ring.files, Ring.unlink):
        with pytest.raises(ValueError, match="bad ring name"):
            call(bad)


def test_a_name_of_200_characters_is_fine(rings):
    name = rings.name()
    name = name + "n" * (200 - len(name))
    rings.names.append(name)
    r = rings.keep(Ring.create(name, capacity=1024))
    r.put(record(0, 1000))
    assert r.get() == record(0, 1000)


def test_files_are_the_segment_the_four_semaphores_and_out_of_line_records(rings):
    r = rings.new(capacity=1024)
    base = [f"{SHM}/{r.name}"] + [f"{SHM}/sem.{r.name}-{c}" for c in "gjmp"]
    assert Ring.files(r.name) == base
    r.put(record(0, 1000))
    assert len(Ring.files(r.name)) == 6
    r.get()
    assert Ring.files(r.name) == base


def test_unlink_removes_only_its_own_ring_not_one_whose_name_extends_it(rings):
    r = rings.new(capacity=1024)
    others = []
    for suffix in ("-x1", "-xab", "-m", "-1"):
        rings.names.append(r.name + suffix)
        others.append(rings.keep(Ring.create(r.name + suffix)))
        others[-1].put(b"kept")
    r.put(record(0, 1000))          # out of line
    r.close()
    Ring.unlink(r.name)
    assert shm_entries(r.name) == sorted(f for o in others for f in shm_entries(o.name))
    for other in others:
        assert len(Ring.files(other.name)) == 5
        assert rings.open(other.name).get(timeout=0) == b"kept"


def test_a_closed_handle_says_so_and_the_ring_lives_on(rings):
    r = rings.new()
    r.put(b"kept")
    r.close()
    r.close()
    calls = [lambda: r.put(b"x"), lambda: r.put(b"x" * 10 ** 6), r.get, r.qsize, r.empty,
             r.full, r.task_done, r.join, r._header]
    for call in calls:
        with pytest.raises(ValueError, match="closed"):
            call()
    assert "closed" in repr(r)
    assert rings.open(r.name).get(timeout=0) == b"kept"


def put_two(ring: Ring):
    ring.put(b"for the thread")
    ring.put(b"for the parent")
    ring.close()


def test_a_handle_inherited_by_fork_works_in_the_child(rings, children):
    r = rings.new()
    got = []
    waiter = threading.Thread(target=lambda: got.append(r.get(timeout=30)))
    waiter.start()
    wait_until(lambda: r._header()["getters_waiting"] == 1, 20, "the thread waiting")
    p = children(put_two, r)          # forked while a thread of ours waits in get
    waiter.join(30)
    finish(p)
    assert got == [b"for the thread"]
    assert r.get(timeout=10) == b"for the parent"       # the child's close() was its own
    assert r._header()["getters_waiting"] == 0
