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

import dragon_nb
from dragon_nb import DDict, DDictError, Pool, PoolBrokenError, WorkerLostError
from dragon_nb.pipeline import Pipeline, PipelineError, stage
from dragon_nb.telemetry import TelemetryMonitor

from conftest import PYTHON, describe, run_checked, short_dirs, thread_in, wait_until

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


def node_lost(rt, node: int) -> bool:
    return any(n["id"] == node and not n["alive"] for n in rt.nodes(refresh=True))


def run_script_checked(source: str, env):
    """Run ``source`` as a user's script in a fresh folder; conftest's run_checked then
    checks that no runtime process or folder of it is left."""
    with short_dirs("dnb-faults-", "work") as (work, rtdir):
        script = os.path.join(work, "script.py")
        with open(script, "w") as f:
            f.write(source)
        return run_checked([PYTHON, script], work, rtdir, env, timeout=60)


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
        pid = d._managers[1].pid
        if call == "wait_for":
            never = key_on(d, 1, "never")
            waiting = Waiting(lambda: d.wait_for(never, timeout=30))
        else:
            os.kill(pid, signal.SIGSTOP)
            waiting = Waiting(lambda: d[k1])
        # the call has sent its request and waits for manager 1's reply (on the
        # manager's lane or its zmq socket), so the kill lands under a waiting call
        wait_until(lambda: thread_in(waiting.thread, "ddict/connection.py:_zrecv",
                                     "ddict/connection.py:_lane_request"),
                   what=f"the {call} call waiting on manager 1")
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
    # all three are waiting now: the map for its results, with its first two tasks
    # running (one per worker: the pool's telemetry counts them), the wait_for for
    # the manager's reply, the pipeline for its next batch
    waits_in = {"map": "pool/results.py:wait", "wait_for": "ddict/connection.py:_zrecv",
                "pipeline": "pipeline/pipeline.py:__next__"}
    for name, where in waits_in.items():
        call = calls[name]
        wait_until(lambda: thread_in(call.thread, where),
                   what=lambda: f"the {name} call waiting in {where} (it ended with "
                                f"{call.outcome!r})" if call.ended else
                                f"the {name} call waiting in {where}")
    wait_until(lambda: _running(rt, p.owner) == 2,
               what=lambda: f"both pool workers running a task (running: "
                            f"{_running(rt, p.owner)})")
    return p, d, pipe, calls


def _running(rt, owner) -> int:
    """Tasks of ``owner`` running now, over all nodes, as their telemetry has it."""
    from dragon_nb.machine import Node
    return sum(Node(n["id"], runtime=rt).telemetry(timeout=10).get("owners", {})
               .get(owner, {}).get("running", 0) for n in rt.nodes() if n["alive"])


def _end_all(rt, p, d, pipe):
    """Whatever _calls_in_flight made, ended, then the runtime stopped."""
    for thing, end in ((p, "terminate"), (pipe, "close"), (d, "destroy")):
        if thing is not None:
            getattr(thing, end)()
    rt.stop()


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
        _end_all(rt, p, d, pipe)
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
        _end_all(rt, p, d, pipe)


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
    proc = run_script_checked(HEAD_KILLED_SCRIPT, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    assert "pool: the dragon-nb runtime stopped" in proc.stdout, describe(proc)
    assert "ddict: DDict manager" in proc.stdout and "done" in proc.stdout, describe(proc)
