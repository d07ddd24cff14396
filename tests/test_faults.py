"""Faults and bad input, as a specification (see docs/reliability.md).

Each test names the fault or the bad input and the outcome the user gets. The
faults that take a node, the head or the whole runtime away use runtimes of
their own; the others share the module's two-node runtime. Every test runs
under pytest-timeout, and conftest checks that each module ends with no
process and no runtime directory left.
"""
import itertools
import os
import re
import signal
import textwrap
import threading
import time

import psutil
import pytest
from IPython.core.error import UsageError

import dragon_nb
from dragon_nb import (DDict, DDictError, DDictFullError, Pool, PoolBrokenError,
                       WorkerLostError)
from dragon_nb.pipeline import Pipeline, PipelineError, on_node, stage
from dragon_nb.telemetry import TelemetryMonitor

from conftest import PYTHON, describe, run_checked, short_dirs

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20


# --- functions the workers run ---------------------------------------------------------

def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.05)
    return x * x


def slow_inc(x):
    time.sleep(0.01)
    return x + 1


def sleep_then_return(x):
    time.sleep(60)
    return x


def kill_on_six(x):
    time.sleep(0.05)
    if x == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfaults(_):
    import ctypes
    return ctypes.string_at(0)


def grows_forever(_):
    hoard = []
    while True:
        hoard.append(b"x" * (8 << 20))      # written, so resident
        time.sleep(0.005)


def put_value(args):
    dd, key, nbytes = args
    dd[key] = os.urandom(nbytes)


def read_key(args):
    dd, key = args
    return dd[key]


def a_generator():
    yield 1


# --- helpers ----------------------------------------------------------------------------

class Waiting:
    """A blocking call made in a thread of its own: what it returned or raised,
    and when it ended."""

    def __init__(self, fn):
        self.outcome = self.ended = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.outcome = fn()
        except BaseException as e:          # what the caller would see
            self.outcome = e
        self.ended = time.monotonic()

    def result(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still waiting after {timeout} s"
        return self.outcome


def key_on(dd, mid: int, prefix="k"):
    """A key that manager ``mid`` holds."""
    return next((prefix, i) for i in itertools.count() if dd.which_manager((prefix, i)) == mid)


def runtime_family(rt) -> list:
    """The head of ``rt`` and every process under it (agents, workers, managers...)."""
    head = psutil.Process(rt._proc.pid)
    return [head, *head.children(recursive=True)]


def kill_agent(rt, node: int) -> None:
    pid = next(n["agent_pid"] for n in rt.nodes(refresh=True) if n["id"] == node)
    os.kill(pid, signal.SIGKILL)


def wait_until(predicate, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def node_lost(rt, node: int) -> bool:
    return any(n["id"] == node and not n["alive"] for n in rt.nodes(refresh=True))


def our_processes() -> set:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


# --- a worker killed (SIGKILL) ----------------------------------------------------------

@pytest.mark.parametrize("call", ["imap", "imap_unordered"])
def test_a_worker_killed_mid_imap_has_its_tasks_rerun_elsewhere_and_the_result_is_complete(
        runtime, call):
    with Pool(2) as p:
        it = getattr(p, call)(slow_square, range(60))
        got = [next(it) for _ in range(5)]
        victim = p._pool[0].pid
        os.kill(victim, signal.SIGKILL)
        got += list(it)
        expected = [x * x for x in range(60)]
        assert (got if call == "imap" else sorted(got)) == expected
        wait_until(lambda: len(p._pool) == 2 and victim not in [w.pid for w in p._pool],
                   what="a replacement worker")
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_past_task_retries_an_imap_fails_at_the_lost_task_naming_it_its_worker_and_node(
        runtime):
    with Pool(2, task_retries=2) as p:
        got = []
        with pytest.raises(WorkerLostError,
                           match=r"pool worker pid \d+ on node \d+ was killed by SIGKILL while "
                                 r"running chunk 6 \(input items from 6\) of imap\(kill_on_six\); "
                                 r"it ran 3 time"):
            for x in p.imap(kill_on_six, range(12)):
                got.append(x)
        assert got == list(range(len(got))) and len(got) <= 6   # the items before it
        assert p.map(square, range(4)) == [0, 1, 4, 9]


# --- a task that misbehaves -------------------------------------------------------------

def test_a_task_that_segfaults_fails_naming_its_worker_and_node_and_the_pool_stays_usable(
        runtime):
    with Pool(2, task_retries=0) as p:
        with pytest.raises(WorkerLostError,
                           match=r"pool worker pid \d+ on node \d+ was killed by SIGSEGV while "
                                 r"running chunk 0 \(input items from 0\) of apply\(segfaults\)"):
            p.apply(segfaults, (0,))
        assert p.map(square, range(4)) == [0, 1, 4, 9]


def test_a_task_killed_for_its_memory_as_the_oom_killer_does_fails_naming_worker_and_node(
        runtime):
    with Pool(1, task_retries=0) as p:
        pending = p.apply_async(grows_forever, (0,))
        worker = psutil.Process(p._pool[0].pid)
        wait_until(lambda: worker.memory_info().rss > 200 * MiB, 30, "the task's growth")
        os.kill(worker.pid, signal.SIGKILL)          # what the kernel's OOM killer does
        with pytest.raises(WorkerLostError, match=rf"pool worker pid {worker.pid} on node \d+ "
                                                  rf"was killed .*apply\(grows_forever\)"):
            pending.get(timeout=20)
        assert p.apply(square, (3,)) == 9


# --- a node agent killed ----------------------------------------------------------------

def test_a_killed_agent_is_a_lost_node_whose_ddict_managers_raise_ddicterror_naming_them():
    with dragon_nb.Runtime(nodes=2) as rt:
        d = DDict(1, 2, 8 * MiB, runtime=rt, timeout=10)
        k0, k1 = key_on(d, 0), key_on(d, 1)
        d[k0], d[k1] = "kept", "lost"
        with Pool(2, runtime=rt) as p:
            kill_agent(rt, 1)
            wait_until(lambda: node_lost(rt, 1), what="node 1 marked lost")
            for op in (lambda: d[k1], lambda: d.__setitem__(k1, 2), lambda: k1 in d,
                       lambda: len(d), lambda: list(d.keys())):
                t0 = time.monotonic()
                with pytest.raises(DDictError,
                                   match=r"manager 1 \(node 1, pid \d+\) is not running"):
                    op()
                assert time.monotonic() - t0 < d.timeout
            # everything else keeps working
            assert d[k0] == "kept"
            d[k0] = "still served"
            assert d[k0] == "still served"
            assert p.map(square, range(6)) == [0, 1, 4, 9, 16, 25]
            from dragon_nb.native.machine import System
            assert System(runtime=rt).nodes == [0]
            with DDict(1, 1, MiB, runtime=rt) as fresh:
                fresh["x"] = 1
                assert fresh["x"] == 1 and fresh.manager_nodes[0].h_uid == 0
            with pytest.raises(ValueError, match="1 live node"):
                DDict(1, 2, MiB, runtime=rt)
            with pytest.raises(RuntimeError, match="no such live node"):
                Pool(1, nodes=[1], runtime=rt)
        d.destroy()
    assert not os.path.exists(rt.rundir)


def test_a_killed_agent_stops_a_pipeline_with_a_stage_worker_there_naming_stage_and_node():
    with dragon_nb.Runtime(nodes=2) as rt:
        pipe = Pipeline(itertools.count(), stage(slow_inc, nodes=[1]), runtime=rt)
        try:
            assert next(pipe) == 1
            kill_agent(rt, 1)
            with pytest.raises(PipelineError, match=r"stage 0 \(slow_inc\): worker pid \d+ "
                                                    r"on node 1 was lost with its node"):
                for _ in pipe:
                    pass
        finally:
            pipe.close()
        with Pipeline(range(20), stage(slow_inc), runtime=rt) as again:   # on node 0
            assert list(again) == list(range(1, 21))


def test_a_lost_node_is_shown_lost_by_the_dashboard_the_node_table_and_telemetry():
    pytest.importorskip("ipywidgets")
    from dragon_nb.machine import node_table
    from dragon_nb.widgets.live import Dashboard
    from dragon_nb.widgets.view import rows_html
    with dragon_nb.Runtime(nodes=2) as rt:
        dash = Dashboard(rt)                  # not displayed: refreshed by hand here
        try:
            assert dash.monitor.wait_for_nodes(2)
            dash.refresh()
            assert "2 node(s)" in dash.title.value
            assert "lost" not in dash.lines[1].label.value
            kill_agent(rt, 1)
            wait_until(lambda: 1 in dash.monitor.lost_nodes(), what="the monitor seeing the loss")
            dash.refresh()
            assert "lost" in dash.lines[1].label.value and "lost" in dash.lines[1].text.value
            assert "lost" not in dash.lines[0].label.value
            assert "1 node(s)" in dash.title.value and "lost: node 1" in dash.title.value
            rows = dash.rows()
            assert [r.node for r in rows if r.lost] == [1]
            assert rows[1].workers == rows[1].running == rows[1].rss == 0
            assert "1 (lost)" in rows_html("runtime", rows)
            table = dict((line.split()[0], line) for line in node_table(rt).splitlines())
            assert table["1"].endswith("lost") and table["0"].endswith("up")
            with TelemetryMonitor(rt) as late:          # started after the loss: knows it too
                wait_until(lambda: 1 in late.lost_nodes(), what="a later monitor")
                assert 0 not in late.lost_nodes()
        finally:
            dash.stop()
            dash.monitor.close()


# --- a DDict manager killed under a waiting call ---------------------------------------

@pytest.mark.parametrize("call", ["wait_for", "get_from_a_stuck_manager"])
def test_a_call_waiting_on_a_ddict_manager_that_is_killed_raises_ddicterror_naming_it(
        runtime, call):
    with DDict(1, 2, 8 * MiB, timeout=10) as d:
        k0, k1 = key_on(d, 0), key_on(d, 1)
        d[k0] = d[k1] = "v"
        pid = d._managers[1][5]
        if call == "wait_for":
            never = key_on(d, 1, "never")
            waiting = Waiting(lambda: d.wait_for(never, timeout=30))
        else:
            os.kill(pid, signal.SIGSTOP)
            waiting = Waiting(lambda: d[k1])
        time.sleep(0.3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        err = waiting.result(15)
        assert isinstance(err, DDictError) and not isinstance(err, TimeoutError), err
        assert re.search(r"manager 1 \(node 1, pid \d+\) is not running", str(err)), err
        assert waiting.ended - killed < 3
        assert d[k0] == "v"                         # the other manager serves on


# --- the head killed, the runtime stopped, with calls waiting ---------------------------

def _calls_in_flight(rt):
    """A pool map, a DDict wait_for and a pipeline, each blocked in a thread."""
    p = Pool(2, runtime=rt)
    d = DDict(1, 2, 8 * MiB, runtime=rt, timeout=10)
    d["k"] = 1
    pipe = Pipeline(itertools.count(), stage(slow_inc), runtime=rt)
    assert next(pipe) == 1
    calls = {"map": Waiting(lambda: p.map(sleep_then_return, range(4), chunksize=1)),
             "wait_for": Waiting(lambda: d.wait_for("never", timeout=30)),
             "pipeline": Waiting(lambda: list(pipe))}
    time.sleep(0.5)                               # all three are waiting now
    return p, d, pipe, calls


def _check_every_call_failed(calls, since):
    outcomes = {name: call.result(20) for name, call in calls.items()}
    assert isinstance(outcomes["map"], PoolBrokenError), outcomes
    assert isinstance(outcomes["wait_for"], DDictError), outcomes
    assert not isinstance(outcomes["wait_for"], TimeoutError), outcomes   # not the timeout
    assert isinstance(outcomes["pipeline"], PipelineError), outcomes
    for name, call in calls.items():
        assert call.ended - since < 5, (name, call.ended - since)


def test_when_the_head_is_killed_every_waiting_call_fails_within_its_timeout_and_nothing_is_left():
    rt = dragon_nb.Runtime(nodes=2)
    p = d = pipe = None
    try:
        p, d, pipe, calls = _calls_in_flight(rt)
        family = runtime_family(rt)
        assert len(family) >= 1 + 2 + 2 + 2 + 1      # head, agents, workers, managers, stage
        killed = time.monotonic()
        os.kill(rt._proc.pid, signal.SIGKILL)
        _check_every_call_failed(calls, killed)
        with pytest.raises(DDictError):
            d["k"]
        with pytest.raises(PoolBrokenError):
            p.apply(square, (2,))
        with pytest.raises(RuntimeError, match="head exited"):
            Pool(1, runtime=rt)
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [q.cmdline() for q in alive]
    finally:
        for thing, end in ((p, "terminate"), (pipe, "close"), (d, "destroy")):
            if thing is not None:
                getattr(thing, end)()
        rt.stop()
    assert not os.path.exists(rt.rundir)


def test_stopping_the_runtime_fails_every_waiting_call_within_its_timeout_and_leaves_nothing():
    rt = dragon_nb.Runtime(nodes=2)
    p = d = pipe = None
    try:
        p, d, pipe, calls = _calls_in_flight(rt)
        family = runtime_family(rt)
        stopped = time.monotonic()
        rt.stop()
        assert not os.path.exists(rt.rundir)
        _check_every_call_failed(calls, stopped)
        with pytest.raises(DDictError):
            d["k"]
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [q.cmdline() for q in alive]
    finally:
        for thing, end in ((p, "terminate"), (pipe, "close"), (d, "destroy")):
            if thing is not None:
                getattr(thing, end)()
        rt.stop()


HEAD_KILLED_SCRIPT = textwrap.dedent('''
    import os, signal, time
    import dragon_nb
    from dragon_nb import DDict, Pool, PoolBrokenError

    def slow(x):
        time.sleep(60)
        return x

    rt = dragon_nb.start(nodes=2)
    d = DDict(1, 2, 1 << 22)
    d["k"] = 1
    p = Pool(2)
    pending = p.map_async(slow, range(4))
    os.kill(rt._proc.pid, signal.SIGKILL)
    try:
        pending.get(timeout=20)
    except PoolBrokenError as e:
        print("pool:", e)
    try:
        d["k"]
    except dragon_nb.DDictError as e:
        print("ddict:", e)
    print("done")
''')


def test_a_script_whose_head_was_killed_gets_errors_and_exits_leaving_no_process_or_file(
        env_with_pkg):
    with short_dirs("dnb-faults-", "work") as (work, rtdir):
        script = os.path.join(work, "head_killed.py")
        with open(script, "w") as f:
            f.write(HEAD_KILLED_SCRIPT)
        proc = run_checked([PYTHON, script], work, rtdir, env_with_pkg, timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert "pool: the dragon-nb runtime stopped" in proc.stdout, describe(proc)
    assert "ddict: DDict manager" in proc.stdout and "done" in proc.stdout, describe(proc)


# --- bad input ----------------------------------------------------------------------------

def test_an_input_iterable_that_raises_gives_its_error_at_its_position_and_the_pool_stays_usable(
        runtime):
    def reader():
        yield from range(5)
        raise OSError("the reader broke")

    with Pool(2) as p:
        got = []
        with pytest.raises(OSError, match="the reader broke"):
            for x in p.imap(square, reader()):
                got.append(x)
        assert got == [0, 1, 4, 9, 16]
        with pytest.raises(OSError, match="the reader broke"):
            p.map(square, reader())
        assert p.map(square, range(3)) == [0, 1, 4]


def test_an_oversize_value_or_key_put_by_a_worker_is_a_ddictfullerror_and_nothing_is_lost(
        runtime):
    with DDict(1, 1, MiB) as d, Pool(1) as p:
        d["kept"] = b"x" * 1000
        with pytest.raises(DDictFullError, match="manager 0 on node 0 is full"):
            p.map(put_value, [(d, "big", 2 * MiB)])
        with pytest.raises(DDictFullError, match="is full"):
            d["k" * (2 * MiB)] = 1                         # an oversize key
        assert "big" not in d and len(d) == 1 and d["kept"] == b"x" * 1000
        assert p.map(put_value, [(d, "small", 10)]) == [None]
        assert len(d["small"]) == 10


def test_a_ddict_used_after_destroy_raises_ddicterror_in_workers_too(runtime):
    d = DDict(1, 2, MiB)
    d["k"] = 1
    with Pool(1) as p:
        d.destroy()
        with pytest.raises(DDictError, match="has been destroyed"):
            p.map(read_key, [(d, "k")])
        assert p.map(square, [2]) == [4]


def _refused(make, exc, match):
    """``make()`` raises ``exc`` naming the problem, and starts no process."""
    before = our_processes()
    with pytest.raises(exc, match=match):
        make()
    time.sleep(0.1)
    assert not our_processes() - before, "a refused constructor left processes behind"


POOL_CASES = {
    'Pool("2")': (lambda: Pool("2"), TypeError, "processes"),
    "Pool(2.5)": (lambda: Pool(2.5), TypeError, "processes"),
    "Pool(True)": (lambda: Pool(True), TypeError, "processes"),
    "Pool(0)": (lambda: Pool(0), ValueError, "processes"),
    "Pool(-1)": (lambda: Pool(-1), ValueError, "processes"),
    "initializer=5": (lambda: Pool(1, initializer=5), TypeError, "initializer"),
    "initargs=5": (lambda: Pool(1, initializer=square, initargs=5), TypeError, "initargs"),
    'maxtasksperchild="1"': (lambda: Pool(1, maxtasksperchild="1"), ValueError,
                             "maxtasksperchild"),
    'task_retries="1"': (lambda: Pool(1, task_retries="1"), TypeError, "task_retries"),
    "task_retries=-1": (lambda: Pool(1, task_retries=-1), ValueError, "task_retries"),
    "nodes=1": (lambda: Pool(1, nodes=1), TypeError, "nodes"),
    'nodes=["0"]': (lambda: Pool(1, nodes=["0"]), TypeError, "nodes"),
    "nodes=[7]": (lambda: Pool(1, nodes=[7]), RuntimeError, "no such live node"),
    'runtime="x"': (lambda: Pool(1, runtime="x"), TypeError, "runtime"),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_wrong_arguments_to_pool_raise_an_error_naming_the_argument(runtime, case):
    _refused(*POOL_CASES[case])


DDICT_CASES = {
    'managers_per_node="1"': (lambda: DDict("1", 1, MiB), ValueError, "managers_per_node"),
    "n_nodes=0": (lambda: DDict(1, 0, MiB), ValueError, "n_nodes"),
    "n_nodes=3": (lambda: DDict(1, 3, MiB), ValueError, "n_nodes=3"),
    'total_mem="1MiB"': (lambda: DDict(1, 1, "1MiB"), ValueError, "total_mem"),
    "total_mem=2.5e6": (lambda: DDict(1, 1, 2.5e6), ValueError, "total_mem"),
    'timeout="x"': (lambda: DDict(1, 1, MiB, timeout="x"), TypeError, "timeout"),
    "timeout=-1": (lambda: DDict(1, 1, MiB, timeout=-1), ValueError, "timeout"),
    "nodes=1": (lambda: DDict(1, 1, MiB, nodes=1), TypeError, "nodes"),
    'nodes=["0"]': (lambda: DDict(1, 1, MiB, nodes=["0"]), TypeError, "nodes"),
    "nodes=[7]": (lambda: DDict(1, 1, MiB, nodes=[7]), ValueError, "nodes"),
    "name=5": (lambda: DDict(1, 1, MiB, name=5), TypeError, "name"),
    'runtime="x"': (lambda: DDict(1, 1, MiB, runtime="x"), TypeError, "runtime"),
    "no_such_option=1": (lambda: DDict(1, 1, MiB, no_such_option=1), TypeError,
                         "no_such_option"),
    "attach(5)": (lambda: DDict.attach(5), DDictError, "not a serialized DDict"),
}


@pytest.mark.parametrize("case", DDICT_CASES)
def test_wrong_arguments_to_ddict_raise_an_error_naming_the_argument(runtime, case):
    _refused(*DDICT_CASES[case])


def test_a_wrong_timeout_to_ddict_attach_is_refused_naming_it(runtime):
    with DDict(1, 1, MiB) as d:
        for timeout, exc in (("x", TypeError), (0, ValueError)):
            with pytest.raises(exc, match="timeout"):
                DDict.attach(d.serialize(), timeout=timeout)


PIPELINE_CASES = {
    "stage(42)": (lambda: stage(42), TypeError, "callable"),
    'workers="2"': (lambda: stage(square, workers="2"), ValueError, "workers"),
    "workers=0": (lambda: stage(square, workers=0), ValueError, "workers"),
    "stage nodes=1": (lambda: stage(square, nodes=1), TypeError, "nodes"),
    'stage nodes=["a"]': (lambda: stage(square, nodes=["a"]), TypeError, "nodes"),
    "on_node(5)": (lambda: on_node(5), TypeError, "generator function"),
    'on_node node="x"': (lambda: on_node(a_generator, node="x"), TypeError, "node"),
    "on_node batch=0": (lambda: on_node(a_generator, batch=0), ValueError, "batch"),
    "no stage": (lambda: Pipeline(range(3)), ValueError, "stage"),
    "a function as a stage": (lambda: Pipeline(range(3), square), TypeError, "stage"),
    "source=5": (lambda: Pipeline(5, stage(square)), TypeError, "source"),
    'queue_depth="x"': (lambda: Pipeline(range(3), stage(square), queue_depth="x"),
                        TypeError, "queue_depth"),
    "queue_depth=0": (lambda: Pipeline(range(3), stage(square), queue_depth=0), ValueError,
                      "queue_depth"),
    "into=5": (lambda: Pipeline(range(3), stage(square), into=5), TypeError, "into"),
    "key=5": (lambda: Pipeline(range(3), stage(square), key=5), TypeError, "key"),
    'runtime="x"': (lambda: Pipeline(range(3), stage(square), runtime="x"), TypeError,
                    "runtime"),
    "stage on node 7": (lambda: Pipeline(range(3), stage(square, nodes=[7])), RuntimeError,
                        "no such live node"),
}


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_wrong_arguments_to_pipelines_raise_an_error_naming_the_argument(runtime, case):
    _refused(*PIPELINE_CASES[case])


def _system(**kw):
    from dragon_nb.native.machine import System
    return System(**kw)


def _node(*a, **kw):
    from dragon_nb.native.machine import Node
    return Node(*a, **kw)


MACHINE_CASES = {
    'System(runtime="x")': (lambda: _system(runtime="x"), TypeError, "runtime"),
    "Node(None)": (lambda: _node(None), TypeError, "node id"),
    "Node(1.5)": (lambda: _node(1.5), TypeError, "node id"),
    "Node(True)": (lambda: _node(True), TypeError, "node id"),
    "Node(9)": (lambda: _node(9), ValueError, "no node 9"),
    'Node("node9")': (lambda: _node("node9"), ValueError, "no node 'node9'"),
    "Node(0, runtime=5)": (lambda: _node(0, runtime=5), TypeError, "runtime"),
    'TelemetryMonitor("x")': (lambda: TelemetryMonitor("x"), TypeError, "runtime"),
    "on_update=5": (lambda: TelemetryMonitor(on_update=5), TypeError, "on_update"),
    'Runtime(nodes="2")': (lambda: dragon_nb.Runtime(nodes="2"), ValueError, "nodes"),
    "Runtime(nodes=2.5)": (lambda: dragon_nb.Runtime(nodes=2.5), ValueError, "nodes"),
    "Runtime(nodes=0)": (lambda: dragon_nb.Runtime(nodes=0), ValueError, "nodes"),
    "Runtime(nodes=True)": (lambda: dragon_nb.Runtime(nodes=True), ValueError, "nodes"),
    'workers_per_node="2"': (lambda: dragon_nb.Runtime(1, workers_per_node="2"), ValueError,
                             "workers_per_node"),
    "cpus_per_node=0": (lambda: dragon_nb.Runtime(1, cpus_per_node=0), ValueError,
                        "cpus_per_node"),
}


@pytest.mark.parametrize("case", MACHINE_CASES)
def test_wrong_arguments_to_the_runtime_system_node_and_telemetry_name_the_argument(
        runtime, case):
    _refused(*MACHINE_CASES[case])


def test_a_runtime_folder_too_long_for_ipc_sockets_is_refused_saying_what_to_set(
        monkeypatch, tmp_path):
    folder = tmp_path / ("x" * 80)
    folder.mkdir()
    monkeypatch.setenv("DRAGON_NB_TMPDIR", str(folder))
    before = our_processes()
    with pytest.raises(ValueError, match="set DRAGON_NB_TMPDIR to a shorter folder"):
        dragon_nb.Runtime(nodes=1)
    assert not os.listdir(folder) and not our_processes() - before


# --- magics with wrong options -----------------------------------------------------------

LINE_MAGICS = {
    "map sq": "%dragon map FUNC ITERABLE",
    "map sq 5": "ITERABLE '5' is a int, which cannot be iterated over",
    "map sq range(": "SyntaxError:",
    "map sq nowhere": "NameError: name 'nowhere' is not defined",
    "map nope range(3)": "name 'nope' is not defined",
    "map not_a_function range(3)": "'not_a_function' is a list, not a function",
    "map sq range(3) --chunksize 0": "--chunksize must be at least 1",
    "map sq range(3) --processes x": "argument --processes: invalid int value",
    "start --nodes x": "argument --nodes: invalid int value",
    "start --nodes 0": "--nodes must be at least 1",
    "start --bogus": "unrecognized arguments: --bogus",
    "nodes extra": "%dragon nodes takes no arguments",
    "bogus": "argument action: invalid choice: 'bogus'",
    "progress maybe": "%dragon progress on|off",
    "ddict": "%dragon ddict create NAME",
    "ddict bogus x": "%dragon ddict create NAME",
    "ddict create 1bad": "'1bad' is not a valid Python name",
    "ddict create x --mem lots": "not a size: 'lots'",
    "ddict create x --mem -5": "a size must be positive",
    "ddict create x --managers-per-node 0": "--managers-per-node must be at least 1",
    "ddict create x --ddict-nodes 3": "n_nodes=3",
    "ddict show nothing_here": "no DDict named 'nothing_here'",
    "ddict show not_a_function": "'not_a_function' is a list, not a DDict",
}

CELL_MAGICS = {
    "no stage": ("pipeline", "source: range(3)\n", "needs a 'source:' line"),
    "workers=0": ("pipeline", "source: range(3)\nstage: sq workers=0\n",
                  "line 2: workers must be at least 1"),
    "workers=x": ("pipeline", "source: range(3)\nstage: sq workers=x\n",
                  "line 2: workers=N takes a positive integer"),
    "nodes=a": ("pipeline", "source: range(3)\nstage: sq nodes=a\n",
                "line 2: workers=N takes a positive integer and nodes=A,B"),
    "threads=2": ("pipeline", "source: range(3)\nstage: sq threads=2\n",
                  "line 2: expected workers=N or nodes=A,B"),
    "nodes=7": ("pipeline", "source: range(3)\nstage: sq nodes=7\n",
                "no such live node"),
    "source: 5": ("pipeline", "source: 5\nstage: sq\n",
                  "line 1: the source '5' is a int"),
    "source: range(": ("pipeline", "source: range(\nstage: sq\n",
                       "line 1: the source 'range(' failed: SyntaxError"),
    "stage: nope": ("pipeline", "source: range(3)\nstage: nope\n",
                    "line 2: name 'nope' is not defined"),
    "stage: a list": ("pipeline", "source: range(3)\nstage: not_a_function\n",
                      "line 2: 'not_a_function' is a list, not a function"),
    "--queue-depth 0": ("pipeline --queue-depth 0", "source: range(3)\nstage: sq\n",
                        "--queue-depth must be at least 1"),
    "--bogus": ("pipeline --bogus", "source: range(3)\nstage: sq\n",
                "unrecognized arguments: --bogus"),
    "not a pipeline": ("stream", "source: range(3)\nstage: sq\n",
                       "argument what: invalid choice: 'stream'"),
}


@pytest.fixture(scope="module")
def ip():
    pytest.importorskip("IPython")
    from IPython.testing import globalipapp
    shell = globalipapp.start_ipython() or globalipapp.get_ipython()   # one per session
    shell.run_line_magic("load_ext", "dragon_nb")
    shell.run_cell("def sq(x):\n    return x * x\nnot_a_function = [1, 2]")
    return shell


@pytest.mark.parametrize("line", LINE_MAGICS)
def test_a_line_magic_with_wrong_options_stops_the_cell_saying_what_is_wrong_and_starts_nothing(
        runtime, ip, line):
    ip.user_ns.pop("_dragon_map", None)
    before = our_processes()
    with pytest.raises(UsageError) as info:       # IPython shows it and stops "Run all"
        ip.run_line_magic("dragon", line)
    assert LINE_MAGICS[line] in str(info.value), info.value
    assert "_dragon_map" not in ip.user_ns
    time.sleep(0.1)
    assert not our_processes() - before


@pytest.mark.parametrize("case", CELL_MAGICS)
def test_a_pipeline_cell_with_wrong_options_stops_the_cell_saying_what_is_wrong_and_starts_nothing(
        runtime, ip, case):
    line, cell, expected = CELL_MAGICS[case]
    ip.user_ns.pop("_dragon_pipeline", None)
    before = our_processes()
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("dragon", line, cell)
    assert expected in str(info.value), info.value
    assert "_dragon_pipeline" not in ip.user_ns
    time.sleep(0.1)
    assert not our_processes() - before


# --- not yet: each of these fails until a fix outside this test's files lands ------------

def big_at_three(x):
    return os.urandom(2 * MiB) if x == 3 else x


def test_an_oversize_value_stored_by_a_pipelines_last_stage_is_a_ddictfullerror_at_its_item(
        runtime):
    # today the stage worker dies of the DDictFullError, and the caller gets a
    # PipelineError "exited with code 1" that names neither the error nor the item
    with DDict(1, 1, MiB) as d:
        with Pipeline(range(10), stage(big_at_three), into=d) as pipe:
            with pytest.raises(DDictFullError, match="is full") as info:
                pipe.run()
        if hasattr(info.value, "__notes__"):
            assert info.value.__notes__[-1].endswith("failed on item 3")
        assert 3 not in d and {0, 1, 2} <= set(d.keys())


RUNTIME_CASES = {
    'timeout="x"': (lambda: dragon_nb.Runtime(1, timeout="x"), TypeError, "timeout"),
    "timeout=0": (lambda: dragon_nb.Runtime(1, timeout=0), ValueError, "timeout"),
    'telemetry_interval="x"': (lambda: dragon_nb.Runtime(1, telemetry_interval="x"),
                               TypeError, "telemetry_interval"),
    "telemetry_interval=0": (lambda: dragon_nb.Runtime(1, telemetry_interval=0), ValueError,
                             "telemetry_interval"),
}


@pytest.mark.parametrize("case", RUNTIME_CASES)
def test_wrong_timeouts_and_intervals_to_the_runtime_are_refused_naming_them(runtime, case):
    _refused(*RUNTIME_CASES[case])


DEAD_HEAD_SCRIPT = textwrap.dedent('''
    import os, signal, time
    import dragon_nb
    rt = dragon_nb.start(nodes=1)
    old = rt.rundir
    os.kill(rt._proc.pid, signal.SIGKILL)
    while rt.alive:
        time.sleep(0.05)
    with dragon_nb.Pool(1) as p:                 # a new runtime, started on first use
        assert p.map(abs, [-1]) == [1]
    time.sleep(0.5)
    print("dead runtime's folder left:", os.path.exists(old))
''')


def test_a_runtime_started_after_the_head_died_removes_the_dead_ones_folder(env_with_pkg):
    with short_dirs("dnb-faults-", "work") as (work, rtdir):
        script = os.path.join(work, "dead_head.py")
        with open(script, "w") as f:
            f.write(DEAD_HEAD_SCRIPT)
        proc = run_checked([PYTHON, script], work, rtdir, env_with_pkg, timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert "dead runtime's folder left: False" in proc.stdout, describe(proc)
