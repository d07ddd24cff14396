"""DDict: Dragon's distributed dictionary, as a specification.

Most tests use a fresh DDict with one manager on each of the two nodes of the
module's runtime; those about lifetimes start runtimes of their own.
"""
import multiprocessing
import os
import pickle
import signal
import subprocess
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
import zmq

import dragon_nb
from dragon_nb import DDict, DDictError, DDictFullError, DDictKeyError, DDictTimeoutError, Pool
from dragon_nb.ddict import connection as ddict_connection
from dragon_nb.telemetry import TelemetryMonitor
from dragon_nb.wire import protocol as P

from conftest import PYTHON, wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


@pytest.fixture
def d(runtime):
    """One manager on each node, 16 MiB in all, a 10 s timeout."""
    dd = DDict(1, 2, 16 * MiB, timeout=10)
    yield dd
    dd.destroy()


def manager_pids(dd):
    return [m.pid for m in dd._managers]


def keys_on(dd, mid, count, prefix="k"):
    """``count`` distinct keys that manager ``mid`` holds."""
    out, i = [], 0
    while len(out) < count:
        if dd.which_manager((prefix, i)) == mid:
            out.append((prefix, i))
        i += 1
    return out


class Point:                      # importable: workers unpickle it by reference
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


# --- worker functions (run in Pool workers) ---------------------------------------------
def init_worker(the_ddict):
    multiprocessing.current_process().stash = {"ddict": the_ddict}


def store_square(i):
    dd = multiprocessing.current_process().stash["ddict"]
    dd[("sq", i)] = i * i
    return multiprocessing.current_process().node


def read_with(args):
    dd, key = args
    return dd[key]


def add_many(args):
    dd, n = args
    for _ in range(n):
        dd.fetch_add("counter", 1)
    return n


def where_are_local_keys(dd):
    me = multiprocessing.current_process()
    return me.node, dd.local_managers, sorted(dd.local_keys()), dd.local_len()


def which_from_worker(args):
    dd, keys = args
    return [dd.which_manager(k) for k in keys]


def bget_from_worker(args):
    dd, key = args
    return multiprocessing.current_process().node, dd.main_manager, dd.bget(key)


def put_later(args):
    dd, key, value, delay = args
    time.sleep(delay)
    dd[key] = value
    return True


# --- names ------------------------------------------------------------------------------
def test_ddict_is_importable_where_dragon_code_looks_for_it():
    from dragon_nb.data.ddict import DDict as alias, DDictKeyError as alias_key_error
    from dragon_nb.ddict import DDict as direct
    assert alias is direct is dragon_nb.DDict
    assert alias_key_error is DDictKeyError


def test_errors_are_also_the_builtin_exceptions_they_stand_for():
    assert issubclass(DDictKeyError, KeyError) and issubclass(DDictKeyError, DDictError)
    assert issubclass(DDictTimeoutError, TimeoutError)
    assert issubclass(DDictTimeoutError, DDictError)
    assert issubclass(DDictFullError, DDictError)


# --- the dict protocol --------------------------------------------------------------------
def test_a_value_put_is_the_value_got(d):
    d["a"] = 1
    d[("tuple", 2)] = {"nested": [1, 2.5, None]}
    d[None] = "none as a key"
    d[Point(1, 2)] = Point(3, 4)
    assert d["a"] == 1
    assert d[("tuple", 2)] == {"nested": [1, 2.5, None]}
    assert d[None] == "none as a key"
    assert d[Point(1, 2)] == Point(3, 4)


def test_putting_a_key_again_replaces_its_value(d):
    d["k"] = "first"
    d["k"] = "second"
    assert d["k"] == "second" and len(d) == 1


def test_large_bytes_and_numpy_arrays_round_trip(d):
    blob = os.urandom(3 * MiB)
    arr = np.arange(MiB // 8, dtype=np.float64).reshape(256, -1)
    d["blob"] = blob
    d["arr"] = arr
    d["text"] = "x" * 200_000               # a big pickle, not a buffer
    assert d["blob"] == blob
    got = d["arr"]
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    got += 1                                # a private, writable copy
    assert np.array_equal(d["arr"], arr)
    assert d["text"] == "x" * 200_000


def test_a_value_too_big_for_the_fast_lane_is_popped_whole(d):
    d["text"] = "y" * 100_000
    assert d.pop("text") == "y" * 100_000
    assert "text" not in d


def test_get_returns_the_default_for_a_missing_key(d):
    d["here"] = 1
    assert d.get("here") == 1
    assert d.get("absent") is None
    assert d.get("absent", "dflt") == "dflt"


def test_a_missing_key_raises_ddictkeyerror_which_is_a_keyerror(d):
    with pytest.raises(KeyError) as info:
        d["absent"]
    assert isinstance(info.value, DDictKeyError)
    assert info.value.key == "absent" and "'absent'" in str(info.value)


def test_del_removes_a_key_and_raises_keyerror_for_a_missing_one(d):
    d["gone"] = 1
    del d["gone"]
    assert "gone" not in d
    with pytest.raises(DDictKeyError):
        del d["gone"]


def test_pop_returns_the_value_or_the_default(d):
    d["p"] = [1, 2]
    assert d.pop("p") == [1, 2]
    assert d.pop("p", "dflt") == "dflt"
    assert d.pop("p", None) is None
    with pytest.raises(KeyError):
        d.pop("p")


def test_contains_len_and_iteration_cover_every_manager(d):
    keys = [f"key-{i}" for i in range(50)]
    for i, k in enumerate(keys):
        d[k] = i
    assert {d.which_manager(k) for k in keys} == {0, 1}
    assert len(d) == 50
    assert sorted(d) == sorted(keys)
    assert "key-7" in d and "key-77" not in d


def test_keys_values_and_items_are_live_views(d):
    keys, values, items = d.keys(), d.values(), d.items()
    assert len(keys) == 0 and list(items) == []
    for i in range(10):
        d[i] = i * 10
    assert len(keys) == len(values) == len(items) == 10
    assert sorted(keys) == list(range(10))
    assert sorted(values) == [i * 10 for i in range(10)]
    assert sorted(items) == [(i, i * 10) for i in range(10)]
    assert 3 in keys and (3, 30) in items and (3, 31) not in items and 90 in values
    del d[3]
    assert 3 not in keys and len(items) == 9
    assert keys.mapping[4] == 40


def test_iterating_values_fetches_them_in_batches(d):
    for i in range(1500):
        d[i] = i
    assert sorted(d.values()) == list(range(1500))


def test_clear_empties_every_manager(d):
    for i in range(20):
        d[i] = i
    d.clear()
    assert len(d) == 0 and list(d.keys()) == []


def test_update_takes_a_mapping_pairs_and_keywords(d):
    d.update({"a": 1, "b": 2})
    d.update([("c", 3)], e=5)
    assert sorted(d.items()) == [("a", 1), ("b", 2), ("c", 3), ("e", 5)]


def test_ddict_counts_as_a_mutable_mapping(d):
    from collections.abc import MutableMapping
    assert isinstance(d, MutableMapping)
    d.update(x=1)
    assert dict(d) == {"x": 1}


# --- errors -------------------------------------------------------------------------------
def test_a_value_over_the_managers_budget_raises_ddictfullerror_and_keeps_the_rest(runtime):
    with DDict(1, 1, 1 * MiB) as dd:            # one manager: a 1 MiB budget
        for i in range(10):
            dd[i] = os.urandom(50_000)
        before = {i: dd[i] for i in range(10)}
        with pytest.raises(DDictFullError, match="manager 0 on node 0 is full"):
            dd["big"] = os.urandom(700_000)
        with pytest.raises(DDictFullError):
            dd[0] = os.urandom(1_000_000)        # replacing: it still has to fit
        assert "big" not in dd
        assert {i: dd[i] for i in range(10)} == before
        dd[0] = b"small"                         # the budget is counted, not used up
        assert dd[0] == b"small"


def test_an_unpicklable_key_raises_typeerror_and_stores_nothing(d):
    with pytest.raises(TypeError, match="key .* cannot be pickled"):
        d[(1, threading.Lock())] = "value"
    with pytest.raises(TypeError):
        (1, threading.Lock()) in d
    assert len(d) == 0


def test_an_unpicklable_value_raises_typeerror_and_stores_nothing(d):
    d["k"] = "old"
    with pytest.raises(TypeError, match="value .*lock.* cannot be pickled"):
        d["k"] = threading.Lock()
    with pytest.raises(TypeError):
        d["other"] = (lambda gen: gen)(x for x in range(3))
    assert d["k"] == "old" and len(d) == 1


def test_a_manager_that_does_not_answer_raises_ddicttimeouterror(runtime):
    with DDict(1, 1, MiB, timeout=0.5) as dd:
        dd["k"] = 1
        pid = manager_pids(dd)[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                dd["k"]
            assert time.monotonic() - t0 < 3
            assert isinstance(info.value, DDictTimeoutError)
            assert "manager 0" in str(info.value)
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_late_reply_is_not_taken_for_the_next_one(runtime):
    with DDict(1, 1, MiB, timeout=0.3) as dd:
        dd["a"], dd["b"] = "A", "B"
        pid = manager_pids(dd)[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(DDictTimeoutError):
                dd["a"]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert dd["b"] == "B"          # the answer about "a" arrives first, and is dropped


def test_a_killed_manager_is_named_within_the_timeout_and_the_others_keep_serving(d):
    k0, = keys_on(d, 0, 1)
    k1, = keys_on(d, 1, 1)
    d[k0], d[k1] = "kept", "lost"
    os.kill(manager_pids(d)[1], signal.SIGKILL)
    for op in (lambda: d[k1], lambda: d.__setitem__(k1, 2), lambda: len(d)):
        t0 = time.monotonic()
        with pytest.raises(DDictError, match=r"manager 1 \(node 1, pid \d+\) is not running"):
            op()
        assert time.monotonic() - t0 < d.timeout
    assert d[k0] == "kept"
    d[k0] = "still served"
    assert d[k0] == "still served"


def test_a_killed_manager_is_named_in_a_worker_too(d):
    k1, = keys_on(d, 1, 1)
    d[k1] = 1
    os.kill(manager_pids(d)[1], signal.SIGKILL)
    with Pool(1) as p:
        with pytest.raises(DDictError, match="manager 1"):
            p.map(read_with, [(d, k1)])


def test_a_malformed_message_does_not_take_a_manager_down(d):
    d["k"] = "v"
    address, lane = d._managers[0].address, d._managers[0].lane_path
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"x")                                                       # too short
    sock.send(P.DD_REQUEST.pack(99, 0, 0, 0, 1, 0, 0))                    # unknown op
    sock.send(P.DD_REQUEST.pack(P.DD_GET, 0, 0, 3, 2, 10**6, 0))          # lies about sizes
    sock.send_multipart([P.DD_REQUEST.pack(P.DD_BATCH, 0, 0, 0, 0, 0, 7) + b"\x01" * 40])
    assert sock.poll(5000)
    status = P.DD_REPLY.unpack_from(sock.recv())[0]
    assert status == P.DDS_BAD
    sock.close(linger=0)
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(lane)
        s.send(b"\x00" * 5)
        s.send(P.DD_REQUEST.pack(P.DD_WAIT_FOR, 0, 0, 0, 3, 0, 0))        # needs zmq
    assert all(m.status() != psutil.STATUS_ZOMBIE for m in map(psutil.Process, manager_pids(d)))
    assert d["k"] == "v" and len(d) == 1


# --- handles --------------------------------------------------------------------------------
def test_workers_use_a_handle_passed_through_initargs(d):
    with Pool(2, initializer=init_worker, initargs=(d,)) as p:
        assert sorted(h.node for h in p._pool) == [0, 1]
        p.map(store_square, range(20), chunksize=1)
    assert [d[("sq", i)] for i in range(20)] == [i * i for i in range(20)]


def test_workers_use_a_handle_passed_as_an_argument(d):
    d.update({("in", i): i for i in range(10)})
    with Pool(2) as p:
        assert p.map(read_with, [(d, ("in", i)) for i in range(10)]) == list(range(10))


def test_every_process_sends_a_key_to_the_same_manager(d):
    keys = ["a", 1, 2.5, ("t", (1, "x")), b"bytes", None, frozenset(), Point(1, 2)]
    with Pool(2) as p:
        from_workers = p.map(which_from_worker, [(d, keys)] * 4, chunksize=1)
    assert all(w == [d.which_manager(k) for k in keys] for w in from_workers)


def test_serialize_and_attach_make_a_working_handle(d):
    d["k"] = "v"
    other = DDict.attach(d.serialize(), timeout=2)
    assert other["k"] == "v" and other.timeout == 2
    other["k2"] = 2
    assert d["k2"] == 2
    with pytest.raises(DDictError, match="not a serialized DDict"):
        DDict.attach("definitely not one")


def test_a_pickled_handle_needs_no_runtime_where_it_is_unpickled(d):
    d["k"] = 41
    code = textwrap.dedent("""
        import pickle, sys
        dd = pickle.loads(sys.stdin.buffer.read())
        dd["k"] = dd["k"] + 1
        import dragon_nb.runtime.client as c
        assert c._current is None
    """)
    subprocess.run([PYTHON, "-c", code], input=pickle.dumps(d), check=True, timeout=30)
    assert d["k"] == 42


def test_detach_leaves_the_ddict_to_the_other_handles(d):
    d["k"] = 1
    other = DDict.attach(d.serialize())
    other.detach()
    with pytest.raises(DDictError, match="detached"):
        other["k"]
    assert d["k"] == 1


def test_destroy_frees_the_managers_and_later_use_raises(runtime):
    dd = DDict(1, 2, MiB)
    dd["k"] = 1
    other = DDict.attach(dd.serialize())
    pids = manager_pids(dd)
    dd.destroy()
    dd.destroy()                                        # idempotent
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    with pytest.raises(DDictError, match="has been destroyed"):
        dd["k"]
    with pytest.raises(DDictError, match="has been destroyed"):
        other["k"]
    with pytest.raises(DDictError, match="has been destroyed"):
        dd.manager(0)["k"]


def test_the_creators_context_manager_destroys_the_ddict(runtime):
    with DDict(1, 1, MiB) as dd:
        dd["k"] = 1
        pid = manager_pids(dd)[0]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(DDictError):
        len(dd)


# --- placement and inspection ------------------------------------------------------------
def test_managers_are_spread_over_the_requested_nodes(runtime):
    with DDict(2, 2, 4 * MiB) as dd:
        assert [n.h_uid for n in dd.manager_nodes] == [0, 0, 1, 1]
        assert [s.node for s in dd.stats] == [0, 0, 1, 1]
        assert all(s.total_bytes == MiB for s in dd.stats)
        assert dd.local_managers == [0, 1]              # the client is on node 0
        assert dd.local_manager == 0 and dd.main_manager == 0


def test_a_manager_handle_sees_and_clears_only_its_manager(d):
    for i in range(40):
        d[i] = i
    on0 = sorted(k for k in range(40) if d.which_manager(k) == 0)
    m0 = d.manager(0)
    assert sorted(m0.keys()) == on0 and len(m0) == len(on0)
    m0["pinned"] = "here"                               # placed on manager 0, whatever its hash
    assert d.manager(0)["pinned"] == "here"
    m0.clear()
    assert len(d) == 40 - len(on0)
    with pytest.raises(DDictError, match="not a manager id"):
        d.manager(2)


def test_local_keys_in_a_worker_are_those_of_its_nodes_managers(d):
    for i in range(30):
        d[i] = i
    with Pool(1, nodes=[1]) as p:
        node, local, keys, n = p.map(where_are_local_keys, [d])[0]
    assert node == 1 and local == [1]
    assert keys == sorted(k for k in range(30) if d.which_manager(k) == 1)
    assert n == len(keys)
    assert sorted(d.local_keys()) == sorted(k for k in range(30) if d.which_manager(k) == 0)
    assert sorted(v for v in d.local_values()) == sorted(d.local_keys())
    assert all(k == v for k, v in d.local_items())


def test_stats_report_each_managers_keys_and_bytes(d):
    k0 = keys_on(d, 0, 3)
    k1 = keys_on(d, 1, 1)
    for k in k0 + k1:
        d[k] = b"x" * 1000
    stats = d.dstats
    assert sorted(stats) == [0, 1]
    assert stats[0].num_keys == 3 and stats[1].num_keys == 1
    assert stats[0].manager_id == 0 and stats[1].node == 1
    assert stats[0].total_bytes == 8 * MiB
    assert 3000 < stats[0].total_used_bytes < 3300
    assert stats[0].pool_free_space == stats[0].total_bytes - stats[0].total_used_bytes
    assert 0 < stats[0].pool_utilization < 1
    assert [s.manager_id for s in d.stats] == [0, 1]


def test_the_node_telemetry_shows_ddict_bytes_and_keys_per_node(runtime, d):
    k0, k1 = keys_on(d, 0, 2), keys_on(d, 1, 1)
    for k in k0 + k1:
        d[k] = b"x" * 10_000
    seen = {}

    def counted():
        seen.clear()
        seen.update({node: rec["owners"].get(d.owner, {})
                     for node, rec in mon.snapshot().items()})
        return seen.get(0, {}).get("keys") == 2 and seen.get(1, {}).get("keys") == 1
    with TelemetryMonitor(runtime) as mon:
        wait_until(counted, 10, lambda: f"the telemetry to count the keys (it shows {seen})")
    assert seen[0]["keys"] == 2 and seen[1]["keys"] == 1
    stats = d.dstats
    assert seen[0]["bytes"] == stats[0].total_used_bytes > 20_000
    assert seen[1]["bytes"] == stats[1].total_used_bytes > 10_000


# --- beyond the dict -------------------------------------------------------------------------
def test_batched_puts_are_all_there_after_end_batch_put(d):
    d.start_batch_put()
    for i in range(10_000):
        d[i] = i
    d.end_batch_put()
    assert len(d) == 10_000 and d[9_999] == 9_999


def test_a_read_during_a_batch_sees_the_batchs_earlier_puts(d):
    d.start_batch_put()
    d["early"] = 1
    assert d["early"] == 1
    d.end_batch_put()


def test_batch_put_failures_surface_at_the_end_and_the_rest_is_stored(runtime):
    with DDict(1, 1, MiB) as dd:
        dd.start_batch_put()
        dd["small"] = 1
        dd["too big"] = os.urandom(2 * MiB)          # no error yet: no reply per put
        dd["after"] = 2
        with pytest.raises(DDictFullError, match="1 of the 3 puts of the batch failed"):
            dd.end_batch_put()
        assert dd["small"] == 1 and dd["after"] == 2 and "too big" not in dd
    with pytest.raises(DDictError, match="without start_batch_put"):
        DDict.end_batch_put(dd)


def test_bput_copies_reach_every_manager_and_bget_reads_the_nearest(d):
    d.bput("shared", {"config": 1})
    assert len(d) == 1 and list(d.keys()) == ["shared"]       # counted once
    assert sum(s.num_bput_copies for s in d.stats) == 1        # plus one copy elsewhere
    assert d.bget("shared") == {"config": 1}
    with Pool(1, nodes=[1]) as p:
        node, main, value = p.map(bget_from_worker, [(d, "shared")])[0]
    assert (node, main, value) == (1, 1, {"config": 1})


def test_pput_stores_like_put(d):
    d.pput("p", 1)
    assert d["p"] == 1


def test_freeze_refuses_writes_and_allows_reads(d):
    d["k"] = 1
    d.freeze()
    assert d.is_frozen
    for write in (lambda: d.__setitem__("k", 2), lambda: d.pop("k"), d.clear,
                  lambda: d.fetch_add("n", 1)):
        with pytest.raises(DDictError, match="frozen"):
            write()
    assert d["k"] == 1 and len(d) == 1
    d.unfreeze()
    assert not d.is_frozen
    d["k"] = 2
    assert d["k"] == 2


def test_fetch_add_from_many_workers_gives_the_exact_sum(d):
    with Pool(4) as p:
        done = p.map(add_many, [(d, 250)] * 8, chunksize=1)
    assert sum(done) == 2000
    assert d.fetch_add("counter", 0) == 2000 and d["counter"] == 2000


def test_fetch_add_returns_the_value_before_and_starts_from_zero(d):
    assert d.fetch_add("n", 5) == 0
    assert d.fetch_add("n", -2) == 5
    d["big"] = 2 ** 40
    assert d.fetch_add("big") == 2 ** 40 and d["big"] == 2 ** 40 + 1
    d["text"] = "not a number"
    with pytest.raises(DDictError, match="needs an int"):
        d.fetch_add("text", 1)
    d["huge"] = 2 ** 63 - 1
    with pytest.raises(DDictError, match="64-bit"):
        d.fetch_add("huge", 1)
    assert d["huge"] == 2 ** 63 - 1


def test_wait_for_returns_once_another_process_puts_the_key(d):
    with Pool(1) as p:
        res = p.map_async(put_later, [(d, "ready", "yes", 0.3)])
        t0 = time.monotonic()
        d.wait_for("ready", timeout=10)
        assert 0.2 < time.monotonic() - t0 < 5
        assert d["ready"] == "yes"
        res.get(10)


def test_wait_for_a_value_waits_for_that_value(d):
    d["state"] = "starting"
    threading.Timer(0.2, d.manager(d.which_manager("state")).__setitem__,
                    ("state", "running")).start()
    d.wait_for("state", "running", timeout=10)
    assert d["state"] == "running"


def test_wait_for_raises_ddicttimeouterror_when_the_key_does_not_come(d):
    t0 = time.monotonic()
    with pytest.raises(DDictTimeoutError, match="'never' did not appear"):
        d.wait_for("never", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 3


def test_requests_work_over_zmq_alone(d, monkeypatch):
    """The path of clients on another host (no fast lane)."""
    monkeypatch.setattr(ddict_connection.Connection, "_open_lane", lambda self, link: None)
    ddict_connection.forget(d.owner)
    d._conn = None
    d["a"] = 1
    assert d["a"] == 1 and "a" in d and d.get("b") is None
    assert d.fetch_add("n", 3) == 0 and d.pop("a") == 1 and len(d) == 1


def test_dragon_options_that_ask_for_checkpoints_are_refused(runtime):
    with pytest.raises(NotImplementedError, match="working_set_size"):
        DDict(1, 1, MiB, working_set_size=2)
    with pytest.raises(TypeError, match="no_such_option"):
        DDict(1, 1, MiB, no_such_option=1)
    with pytest.raises(ValueError, match="n_nodes=3"):
        DDict(1, 3, MiB)


# --- lifetimes --------------------------------------------------------------------------------
def test_managers_exit_when_their_runtime_stops():
    rt = dragon_nb.Runtime(nodes=2)
    try:
        dd = DDict(2, 2, 4 * MiB, runtime=rt)
        dd["k"] = 1
        pids = manager_pids(dd)
    finally:
        rt.stop()
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 5,
               "the managers to exit with their runtime")
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not os.path.exists(rt.rundir)
    with pytest.raises(DDictError, match="is not running"):
        dd["k"]


def test_managers_exit_when_their_creator_is_killed():
    code = textwrap.dedent("""
        import time
        import dragon_nb
        from dragon_nb import DDict
        dd = DDict(1, 1, 1 << 20)
        dd["k"] = 1
        print(dragon_nb.get_runtime().rundir, *(m.pid for m in dd._managers), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        rundir, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert pids and all(psutil.pid_exists(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    wait_until(lambda: not (os.path.exists(rundir) or any(psutil.pid_exists(p) for p in pids)),
               10, "the managers and the runtime directory to go with their creator")
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not os.path.exists(rundir)


def test_attach_refuses_endpoints_outside_this_users_runtime(d):
    import base64
    import json
    state = json.loads(base64.b64decode(d.serialize()))
    state["managers"][0][3] = "tcp://127.0.0.1:9"
    with pytest.raises(DDictError, match="not a serialized DDict of this host"):
        DDict.attach(base64.b64encode(json.dumps(state).encode()).decode())
    state = json.loads(base64.b64decode(d.serialize()))
    state["managers"][0][3] = "ipc:///tmp/elsewhere/sock"
    with pytest.raises(DDictError, match="this user's runtime"):
        DDict.attach(base64.b64encode(json.dumps(state).encode()).decode())
