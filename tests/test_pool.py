"""Pool beyond CPython's suite: placement, Dragon's additions, bad input, faults.

(The stdlib semantics themselves are checked by test_cpython_pool.py.)
"""
import itertools
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import dragon_nb
from dragon_nb import Pool, PoolBrokenError, WorkerLostError

from conftest import PYTHON, wait_until

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def slow_square(x, delay=0.05):
    time.sleep(delay)
    return x * x


def sleep_then_return(x):
    time.sleep(30)
    return x


def where_am_i(_):
    me = multiprocessing.current_process()
    return me.node, os.getpid()


def init_stash():
    multiprocessing.current_process().stash = {"calls": 0}


def count_calls(_):
    stash = multiprocessing.current_process().stash
    stash["calls"] += 1
    return os.getpid(), stash["calls"]


def failing_init():
    raise RuntimeError("initializer says no")


def kill_myself(_):
    os.kill(os.getpid(), signal.SIGKILL)


def nbytes(b):
    return len(b)


# --- placement and Dragon's additions ------------------------------------------------

def test_workers_are_spread_over_all_nodes(runtime):
    with Pool(4) as p:
        assert sorted(h.node for h in p._pool) == [0, 0, 1, 1]
        nodes = {node for node, _pid in p.map(where_am_i, range(40), chunksize=1)}
    assert nodes == {0, 1}


def test_workers_can_be_pinned_to_nodes(runtime):
    with Pool(2, nodes=[1]) as p:
        assert {node for node, _ in p.map(where_am_i, range(10))} == {1}


def test_pinning_to_a_missing_node_is_a_clear_error(runtime):
    with pytest.raises(RuntimeError, match="no such live node"):
        Pool(1, nodes=[7])


def test_chunk_size_is_an_alias_of_chunksize(runtime):
    with Pool(2) as p:
        assert list(p.imap(square, range(10), chunk_size=4)) == [x * x for x in range(10)]
        assert p.map(square, range(10), chunk_size=3) == [x * x for x in range(10)]
        with pytest.raises(TypeError, match="not both"):
            p.map(square, range(3), chunksize=1, chunk_size=2)


def test_current_process_stash_survives_between_tasks(runtime):
    with Pool(2, initializer=init_stash) as p:
        seen = p.map(count_calls, range(20), chunksize=1)
    by_pid = {}
    for pid, calls in seen:
        by_pid.setdefault(pid, []).append(calls)
    for calls in by_pid.values():      # each worker counted 1, 2, 3, ... in order
        assert calls == list(range(1, len(calls) + 1))
    assert sum(len(c) for c in by_pid.values()) == 20


def test_lambdas_and_closures_work(runtime):
    offset = 10
    with Pool(2) as p:
        assert p.map(lambda x: x + offset, range(5)) == [10, 11, 12, 13, 14]


def test_large_bytes_and_numpy_arrays_round_trip(runtime):
    np = pytest.importorskip("numpy")
    blob = os.urandom(8 << 20)
    arr = np.arange(2_000_000, dtype=np.float64)
    with Pool(2) as p:
        assert p.map(nbytes, [blob, blob[:5]]) == [8 << 20, 5]
        out = p.apply(np.multiply, (arr, 2.0))
    assert out.shape == arr.shape and float(out[-1]) == 2 * float(arr[-1])


def test_imap_reads_an_endless_input_lazily(runtime):
    pulled = itertools.count()

    def endless():
        for i in itertools.count():
            next(pulled)
            yield i

    with Pool(2) as p:
        it = p.imap(square, endless())
        first = list(itertools.islice(it, 2000))
        it.close()
        taken = next(pulled)
    assert first == [i * i for i in range(2000)]
    # the feeder runs at most one window (1024 chunks) ahead of the consumer
    assert taken <= 2000 + 1024 + 2


def test_imap_of_one_pool_feeds_another(runtime):
    with Pool(1) as producers, Pool(2) as consumers:
        staged = producers.imap(square, range(500), 4)
        out = list(consumers.imap(square, staged, 2))
    assert out == [x ** 4 for x in range(500)]


# --- bad input ------------------------------------------------------------------------

def test_unpicklable_closure_names_the_variable(runtime):
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with Pool(1) as p:
        with pytest.raises(TypeError, match="closure variable 'lock'"):
            p.map(uses_lock, [1, 2])
        assert p.map(square, [3]) == [9]        # nothing was sent; the pool is fine


def test_unpicklable_argument_names_the_argument(runtime):
    with Pool(1) as p:
        with pytest.raises(TypeError, match=r"item 1 of the input \(lock: .*square\(\)"):
            p.map(square, [1, threading.Lock()])
        with pytest.raises(TypeError, match="lock"):
            p.apply_async(square, (threading.Lock(),))


def test_failing_initializer_is_an_error_not_a_respawn_loop(runtime):
    p = Pool(2, initializer=failing_init)
    try:
        with pytest.raises(PoolBrokenError, match="initializer says no"):
            p.map(square, range(4))
        d = p._dispatcher
        # a replacement would be started as the failed workers are reaped: wait until
        # both were, then until the I/O thread has gone round once more
        wait_until(lambda: not d.workers, 20, lambda: f"the workers whose initializer "
                   f"failed were not reaped (left: {list(d.workers)})")
        d.repopulate()                          # a no-op on a broken pool: a barrier
        assert d.spawned == 2                   # no replacement was started
        with pytest.raises(PoolBrokenError):
            p.apply(square, (2,))
    finally:
        p.terminate()
        p.join()


def test_unpicklable_result_is_a_maybe_encoding_error(runtime):
    with Pool(1) as p:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            p.apply(threading.Lock)
        assert p.apply(square, (4,)) == 16


# --- faults ---------------------------------------------------------------------------

def test_killed_worker_is_replaced_and_its_tasks_rerun(runtime):
    with Pool(2) as p:
        result = p.map_async(slow_square, range(60), chunksize=1)
        workers = p._dispatcher.workers

        def victim_busy():          # both workers up, the first running chunks of the map
            return len(p._pool) == 2 and any(
                w.pid == p._pool[0].pid and w.outstanding for w in list(workers.values()))
        wait_until(victim_busy, 20, "the map's chunks did not reach the first worker")
        victim = p._pool[0].pid
        os.kill(victim, signal.SIGKILL)
        assert result.get(timeout=30) == [x * x for x in range(60)]
        wait_until(lambda: len(p._pool) == 2 and victim not in [w.pid for w in p._pool], 10,
                   lambda: f"the killed worker {victim} was not replaced: {p._pool}")
        assert len(p._pool) == 2 and victim not in [w.pid for w in p._pool]
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_a_task_that_kills_every_worker_fails_naming_worker_and_node(runtime):
    with Pool(2) as p:
        with pytest.raises(WorkerLostError, match=r"pool worker pid \d+ on node \d+ was killed"
                                                  r".*ran 2 time"):
            p.apply(kill_myself, (1,))
        assert p.map(square, range(4)) == [0, 1, 4, 9]


def test_how_often_a_lost_task_runs_again_is_configurable(runtime):
    with Pool(2, task_retries=0) as p:
        with pytest.raises(WorkerLostError, match="no retries were allowed"):
            p.map(kill_myself, [1])
        assert p.map(square, [3]) == [9]
    with pytest.raises(ValueError, match="task_retries"):
        Pool(1, task_retries=-1)


def exits_with_os_exit(_):
    os._exit(3)


def raises_system_exit(_):
    raise SystemExit(4)


def recurses(n):
    return recurses(n + 1)


def allocates_too_much(_):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))
    try:
        return len(bytearray(8 << 30))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_tasks_that_misbehave_get_a_clear_error_and_the_pool_stays_usable(runtime):
    from dragon_nb.pool import TaskExitError
    with Pool(2) as p:
        with pytest.raises(WorkerLostError, match="exited with code 3"):
            p.apply(exits_with_os_exit, (0,))
        with pytest.raises(TaskExitError, match="SystemExit"):
            p.apply(raises_system_exit, (0,))
        with pytest.raises(RecursionError):
            p.apply(recurses, (0,))
        with pytest.raises(MemoryError):
            p.apply(allocates_too_much, (0,))
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]


def _interrupt_main_after(delay):
    main = threading.main_thread().ident
    timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("call", ["map", "imap", "apply"])
def test_keyboard_interrupt_cancels_the_call_and_the_pool_stays_usable(runtime, call):
    with Pool(2) as p:
        _interrupt_main_after(0.5)
        with pytest.raises(KeyboardInterrupt):
            if call == "map":
                p.map(sleep_then_return, range(8), chunksize=1)
            elif call == "imap":
                list(p.imap(sleep_then_return, range(8)))
            else:
                p.apply(sleep_then_return, (1,))
        # were the running tasks not interrupted, both workers would sleep 30 s more
        assert p.map_async(square, range(6)).get(timeout=10) == [0, 1, 4, 9, 16, 25]


def test_pool_of_a_stopped_runtime_fails_instead_of_hanging():
    rt = dragon_nb.Runtime(nodes=1)     # a runtime of its own, not the current one
    try:
        p = Pool(1, runtime=rt)
        assert p.apply(square, (3,)) == 9
        pending = p.map_async(sleep_then_return, range(2))
    finally:
        rt.stop()
    with pytest.raises(PoolBrokenError):
        pending.get(timeout=10)
    with pytest.raises((PoolBrokenError, ValueError)):
        p.apply(square, (2,))
    p.terminate()
    p.join()


# --- code defined in __main__ (a script, as a notebook cell would be) -------------------

MAIN_SCRIPT = textwrap.dedent('''
    import dragon_nb
    from dragon_nb import Pool

    SCALE = 3

    class Point:
        def __init__(self, x):
            self.x = x

    def scaled(p):
        return Point(p.x * SCALE)

    def broken(x):
        return 1 / x  # the line users look for

    if __name__ == "__main__":
        with dragon_nb.start(nodes=2), Pool(2) as p:
            pts = p.map(scaled, [Point(i) for i in range(5)])
            assert [q.x for q in pts] == [0, 3, 6, 9, 12]
            assert isinstance(pts[0], Point)
            assert p.map(lambda x: x + SCALE, [1]) == [4]
            try:
                p.apply(broken, (0,))
            except ZeroDivisionError as e:
                print("CAUSE", e.__cause__.tb)
        print("OK")
''')


def test_functions_and_classes_defined_in_main(tmp_path, env_with_pkg):
    script = tmp_path / "main_defs.py"
    script.write_text(MAIN_SCRIPT)
    out = subprocess.run([PYTHON, str(script)], capture_output=True, text=True,
                         timeout=60, env=env_with_pkg, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    # the remote traceback shows the user's own source line
    assert "return 1 / x  # the line users look for" in out.stdout


def test_a_function_whose_module_workers_cannot_import_fails_clearly(tmp_path, runtime):
    # a module importable here (its folder is on sys.path) but gone once workers look
    (tmp_path / "vanishing_mod.py").write_text("def f(x):\n    return x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_mod
        with Pool(1) as p:
            (tmp_path / "vanishing_mod.py").unlink()
            with pytest.raises(ModuleNotFoundError, match="vanishing_mod"):
                p.apply(vanishing_mod.f, (1,))
            assert p.apply(square, (5,)) == 25
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_mod", None)


def shout(x):
    print("item", x)
    print("warning", x, file=sys.stderr)
    return x


def test_worker_output_reaches_the_caller_prefixed_with_node_and_pid(runtime, capsys):
    printed = ["", ""]

    def shown(*patterns):               # what the workers printed, up to now
        o, e = capsys.readouterr()
        printed[0] += o
        printed[1] += e
        return all(re.search(pt, printed[i], re.M) for i, pt in patterns)

    with Pool(2) as p:
        p.map(shout, range(3))
        wait_until(lambda: shown(*[(0, rf"^\[node\d pid\d+\] item {x}$") for x in range(3)],
                                 *[(1, rf"^\[node\d pid\d+\] warning {x}$") for x in range(3)]),
                   10, lambda: f"the workers' output did not all arrive: {printed}")
    shown()
    out, err = printed
    for x in range(3):
        assert re.search(rf"^\[node\d pid\d+\] item {x}$", out, re.M), out
        assert re.search(rf"^\[node\d pid\d+\] warning {x}$", err, re.M), err


def flood(_):
    for i in range(200_000):
        print("spam", i)
    return "done"


def test_an_output_flood_is_rate_limited_and_says_so(runtime, capsys):
    printed = ["", ""]

    def dropped_said():
        o, e = capsys.readouterr()
        printed[0] += o
        printed[1] += e
        return "characters of output dropped" in printed[1]

    with Pool(1) as p:
        assert p.apply(flood, (0,)) == "done"
        wait_until(dropped_said, 10, lambda: f"no word of dropped output in {printed[1][-500:]!r}")
    dropped_said()
    out, err = printed
    assert out.count("\n") < 200_000
    assert "characters of output dropped" in err


def test_map_calls_report_progress_per_node_to_observers(runtime):
    from dragon_nb.pool import progress as PG
    seen = []
    def observer(pool, prog):
        seen.append(prog)
    PG.add_observer(observer)
    try:
        with Pool(2) as p:
            p.map(square, range(50), chunksize=1)
            list(p.imap(square, iter(range(30)), 3))
            p.map(square, range(5), progress=False)    # opted out
            p.apply(square, (1,))                      # apply shows no progress
    finally:
        PG.remove_observer(observer)
    assert [s.name for s in seen] == ["map(square)", "imap(square)"]
    mapped, imapped = seen
    assert mapped.total == 50 and mapped.done == 50 and sum(mapped.by_node.values()) == 50
    assert set(mapped.by_node) <= {0, 1} and mapped.finished and mapped.error is None
    assert imapped.total == 30 and imapped.done == 30


def test_text_progress_bars_in_a_terminal(tmp_path, env_with_pkg):
    script = tmp_path / "bars.py"
    script.write_text("import dragon_nb\n"
                      "with dragon_nb.start(nodes=2), dragon_nb.Pool(2) as p:\n"
                      "    p.map(abs, range(300), chunksize=1)\n")
    env = dict(env_with_pkg, DRAGON_NB_PROGRESS="text")
    out = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "map(abs)" in out.stderr and "300/300" in out.stderr


def fail_on_seven(x):
    if x == 7:
        raise ValueError("seven is bad")
    return x


def test_a_task_error_names_the_function_and_the_input_item(runtime):
    with Pool(2) as p:
        with pytest.raises(ValueError, match="seven is bad") as info:
            list(p.imap(fail_on_seven, iter(range(20)), 4))
        if sys.version_info >= (3, 11):
            assert "dragon-nb: raised by fail_on_seven() on input item 7" in info.value.__notes__
        # a chained imap: the failing item is the fourth one the second stage saw
        with pytest.raises(ValueError) as info:
            list(p.imap(fail_on_seven, p.imap(abs, [0, 1, 2, 7, 3])))
        if sys.version_info >= (3, 11):
            assert "dragon-nb: raised by fail_on_seven() on input item 3" in info.value.__notes__
        with pytest.raises(ValueError) as info:
            p.map(fail_on_seven, range(20), chunksize=3)
        if sys.version_info >= (3, 11):
            assert "dragon-nb: raised by fail_on_seven() on input item 7" in info.value.__notes__


def test_chained_imap_keeps_the_callers_memory_flat(runtime):
    import psutil
    me = psutil.Process()
    with Pool(1) as a, Pool(1) as b:
        samples = []
        for i, _ in enumerate(b.imap(square, a.imap(square, range(150_000)))):
            if i % 30_000 == 0:
                samples.append(me.memory_info().rss)
    # both windows are bounded: after warm-up the caller's memory barely moves
    assert max(samples[1:]) - samples[1] < 20 << 20, [s >> 20 for s in samples]


def test_an_abandoned_imap_does_not_keep_the_pool_from_closing(runtime):
    import gc
    p = Pool(2)
    for i, _ in enumerate(p.imap(square, range(50_000))):
        if i == 3:
            break                      # the iterator is dropped here
    gc.collect()
    p.close()
    done = threading.Event()
    threading.Thread(target=lambda: (p.join(), done.set()), daemon=True).start()
    assert done.wait(15), "join() hung on an abandoned imap"


def test_a_cancelled_call_ends_with_an_error_instead_of_waiting_forever(runtime):
    from dragon_nb.pool import CallCancelledError
    with Pool(2) as p:
        r = p.map_async(sleep_then_return, range(4), chunksize=1)
        _interrupt_main_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            r.get()
        with pytest.raises(CallCancelledError):
            r.get(timeout=10)
        it = p.imap(sleep_then_return, range(4))
        it.close()
        with pytest.raises(StopIteration):
            it.next(timeout=10)


def dies_in_initializer():
    os._exit(7)


def test_workers_that_die_while_starting_break_the_pool_instead_of_respawning(runtime):
    p = Pool(2, initializer=dies_in_initializer)
    try:
        with pytest.raises(PoolBrokenError, match="keep dying before they start"):
            p.map_async(square, range(4)).get(timeout=20)
        assert p._dispatcher.spawned < 10
    finally:
        p.terminate()
        p.join()
