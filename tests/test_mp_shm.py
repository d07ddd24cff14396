"""On one host, the "dragon" context's queues, locks, semaphores and shared values
are kernel objects in shared memory (``dragon_nb/mp/shm.py``), registered with an
object host that removes them with their last handle; over TCP they stay in
the hosts. CPython's suite runs against both (test_cpython_mp*.py); these are
the properties of the shared-memory kind itself.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import threading

import pytest

import dragon_nb
from dragon_nb.mp import queues, sharedctypes, shm, shm_ctypes, shm_queues, shm_sync, synchronize
from dragon_nb.mp.shm_ring import Ring

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)

DRAGON = multiprocessing.get_context("dragon")


@pytest.fixture(scope="module")
def rt():
    dragon_nb.stop()
    with dragon_nb.start(nodes=2) as runtime:
        yield runtime


def kernel_files(obj) -> list[str]:
    """The /dev/shm files of a lock, semaphore or raw value of this module."""
    if isinstance(obj, shm_sync._SemLock):
        return [shm.sem_path(obj._name)]
    return [shm.segment_path(obj._dnb_segment._name)]


def write_then_report(raw, lock, out):
    with lock:
        raw[0] = os.getpid()
    out.put(sorted(os.listdir("/dev/shm")))


def hold_until(lock, held, go):
    with lock:
        held.set()
        go.wait(30)


def test_on_one_host_locks_and_values_are_kernel_objects_in_shared_memory(rt):
    lock, value = DRAGON.Lock(), DRAGON.RawValue("d", 2.5)
    assert isinstance(lock, shm_sync.Lock)
    assert type(value) is ctypes.c_double and value.value == 2.5   # a ctypes object, as the stdlib's
    for path in kernel_files(lock) + kernel_files(value):
        assert os.path.exists(path)
        assert os.path.basename(path).removeprefix("sem.").startswith(
            os.path.basename(rt.rundir)), "named after the runtime's folder"


def test_a_process_on_another_node_writes_memory_the_caller_reads(rt):
    raw, lock, out = DRAGON.RawArray("q", 4), DRAGON.Lock(), DRAGON.Queue()
    p = DRAGON.Process(target=write_then_report, args=(raw, lock, out), node=1)
    p.start()
    out.get(timeout=30)
    p.join(30)
    assert p.exitcode == 0 and raw[0] == p.pid


def test_an_objects_kernel_files_go_with_its_last_handle_wherever_it_was(rt):
    lock, held, go = DRAGON.Lock(), DRAGON.Event(), DRAGON.Event()
    files = kernel_files(lock)
    p = DRAGON.Process(target=hold_until, args=(lock, held, go))
    p.start()
    assert held.wait(30)
    del lock
    gc.collect()
    assert all(os.path.exists(f) for f in files), "the Process still has a handle"
    go.set()
    p.join(30)
    assert p.exitcode == 0
    wait_until(lambda: not any(os.path.exists(f) for f in files), 10,
               "the host removing the lock's semaphore")


def test_a_value_and_its_lock_travel_through_a_queue_and_stay_one_value(rt):
    v = DRAGON.Value("i", 0)
    q = DRAGON.Queue()
    q.put(v)
    other = q.get(timeout=10)
    with other.get_lock():
        other.value += 5
    assert v.value == 5 and other.get_lock()._name == v.get_lock()._name


def test_a_semaphore_released_past_its_bound_raises_as_the_stdlibs(rt):
    sem = DRAGON.BoundedSemaphore(1)
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()


# -- queues ------------------------------------------------------------------------------

def echo_once(inbox, outbox):
    outbox.put(inbox.get(timeout=30))


def make_a_queue_then_wait(back, go):
    q = DRAGON.Queue()
    q.put("made on node 1")
    back.put(q)
    go.wait(60)


def test_on_one_host_a_queue_is_a_ring_in_shared_memory_gone_with_its_last_handle(rt):
    inbox, outbox = DRAGON.Queue(), DRAGON.JoinableQueue(2)
    assert isinstance(inbox, shm_queues.Queue) and isinstance(outbox, shm_queues.JoinableQueue)
    assert isinstance(DRAGON.SimpleQueue(), shm_queues.SimpleQueue)
    files = Ring.files(inbox._name)
    assert files and all(os.path.basename(f).removeprefix("sem.").startswith(
        os.path.basename(rt.rundir)) for f in files), "named after the runtime's folder"
    p = DRAGON.Process(target=echo_once, args=(inbox, outbox), node=1)
    p.start()
    inbox.put(b"x" * (3 << 20))                # bigger than the ring: a file of its own
    assert outbox.get(timeout=30) == b"x" * (3 << 20)
    outbox.task_done()
    outbox.join()
    p.join(30)
    assert p.exitcode == 0
    del inbox
    gc.collect()
    wait_until(lambda: not any(os.path.exists(f) for f in files), 10,
               "the host removing the queue's ring")


def test_an_item_that_cannot_be_pickled_raises_in_put_and_the_queue_is_unharmed(rt):
    q = DRAGON.Queue()
    with pytest.raises(TypeError, match="lock"):
        q.put(threading.Lock())
    assert q.empty() and q.qsize() == 0
    q.put(lambda: "defined here, sent by value")
    assert q.get(timeout=10)() == "defined here, sent by value"


def test_a_plain_ctypes_object_of_a_shared_type_still_pickles_by_value(rt):
    import pickle
    DRAGON.RawValue("i", 1)                # registers the type's reducer
    assert pickle.loads(pickle.dumps(ctypes.c_int(7))).value == 7
    assert isinstance(shm_ctypes.synchronized(DRAGON.RawValue("i", 3), DRAGON.RLock()).value,
                      int)


def test_a_runtime_over_tcp_keeps_its_objects_in_the_hosts():
    dragon_nb.stop()
    try:
        with dragon_nb.start(nodes=1, listen="127.0.0.1"):
            assert not shm.enabled()
            assert type(DRAGON.Lock()) is synchronize.Lock
            assert type(DRAGON.Queue()) is queues.Queue
            assert isinstance(DRAGON.Value("i", 1), sharedctypes.SynchronizedValue)
    finally:
        dragon_nb.stop()


def test_a_queue_in_shared_memory_outlives_the_node_that_made_it_and_goes_with_the_runtime():
    dragon_nb.stop()
    with dragon_nb.start(nodes=2) as runtime:
        back, go = DRAGON.Queue(), DRAGON.Event()
        p = DRAGON.Process(target=make_a_queue_then_wait, args=(back, go), node=1)
        p.start()
        made = back.get(timeout=30)
        files = Ring.files(made._name)
        agent = next(n["agent_pid"] for n in runtime.nodes(refresh=True) if n["id"] == 1)
        os.kill(agent, signal.SIGKILL)
        p.join(15)
        assert p.exitcode == -signal.SIGKILL
        assert made.get(timeout=10) == "made on node 1"      # the memory is the host's
        made.put("still here")
        assert made.get(timeout=10) == "still here"
    assert files and not any(os.path.exists(f) for f in files), "swept with the runtime"
