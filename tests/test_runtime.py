"""The node runtime: lifecycle, private files, telemetry, and no leftovers."""
import os
import signal
import stat
import subprocess
import textwrap
import time

import psutil
import pytest

import dragon_nb
from dragon_nb.runtime import get_runtime
from dragon_nb.telemetry import TelemetryMonitor
from dragon_nb.wire import protocol as P

from conftest import PYTHON, leftover_processes, wait_until

pytestmark = pytest.mark.timeout(60)


def test_start_stop_as_a_context_manager_leaves_nothing():
    with dragon_nb.start(nodes=3) as rt:
        assert rt.alive
        mode = stat.S_IMODE(os.stat(rt.rundir).st_mode)
        assert mode == 0o700                     # private runtime directory
        assert [n["id"] for n in rt.nodes()] == [0, 1, 2]
        head = psutil.Process(rt._proc.pid)
        family = [head, *head.children(recursive=True)]
        assert len(family) == 1 + 3              # the head and one agent per node
    assert not rt.alive
    assert not os.path.exists(rt.rundir)
    for p in family:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    dragon_nb.stop()


def test_a_second_start_says_one_is_running():
    with dragon_nb.start(nodes=1):
        with pytest.raises(RuntimeError, match="already running"):
            dragon_nb.start(nodes=1)
    dragon_nb.stop()


def test_bad_node_counts_are_refused():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="nodes"):
            dragon_nb.Runtime(nodes=bad)


def test_started_on_first_use():
    dragon_nb.stop()
    assert get_runtime(auto_start=False) is None
    with dragon_nb.Pool(1) as p:
        assert p.apply(abs, (-3,)) == 3
    assert get_runtime(auto_start=False) is not None
    dragon_nb.stop()
    assert get_runtime(auto_start=False) is None


def test_virtual_nodes_share_the_host():
    with dragon_nb.start(nodes=2) as rt:
        nodes = rt.nodes()
        total_mem = psutil.virtual_memory().total
        assert all(n["physical_mem"] == total_mem // 2 for n in nodes)
        host_cpus = len(os.sched_getaffinity(0))
        # the host's cores are dealt out; a node gets at least one
        assert rt.cpu_count() == sum(n["num_cpus"] for n in nodes) == max(host_cpus, 2)
    with dragon_nb.start(nodes=2, cpus_per_node=3) as rt:
        assert [n["num_cpus"] for n in rt.nodes()] == [3, 3]
        assert rt.cpu_count() == 6
    dragon_nb.stop()


def busy(n):
    s = 0
    for i in range(n):
        s += i * i
    return s


def test_agents_publish_per_node_telemetry_with_pool_progress():
    with dragon_nb.start(nodes=2) as rt, TelemetryMonitor(rt) as mon:
        assert mon.wait_for_nodes(2)
        with dragon_nb.Pool(2) as p:
            p.map(busy, [200_000] * 40, chunksize=1)
            deadline = time.monotonic() + 5
            done = 0
            while time.monotonic() < deadline and done < 40:
                snap = mon.snapshot()
                done = sum(r["owners"].get(p.owner, {}).get("done", 0) for r in snap.values())
                time.sleep(0.1)
        assert done == 40
        rec = mon.snapshot()[0]
        for key in ("procs", "done", "running", "cpu_percent", "rss", "physical_mem"):
            assert key in rec
    dragon_nb.stop()


def test_malformed_messages_to_the_head_are_dropped():
    import zmq
    with dragon_nb.start(nodes=1) as rt:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(rt.address)
        sock.send_multipart([P.REQ, b"\x80\x05not a pickle"])
        sock.send_multipart([b"garbage"])
        sock.close(linger=500)
        assert [n["id"] for n in rt.nodes(refresh=True)] == [0]   # still answering
    dragon_nb.stop()


CALLER = textwrap.dedent('''
    import sys, time
    import dragon_nb
    rt = dragon_nb.start(nodes=2)
    p = dragon_nb.Pool(2)
    p.map(abs, range(10))
    print(rt.rundir, flush=True)
    time.sleep(60)
''')


def test_a_caller_killed_with_sigkill_leaves_no_process_and_no_file(tmp_path, env_with_pkg):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    caller = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env_with_pkg)
    try:
        rundir = caller.stdout.readline().strip()
        assert os.path.isdir(rundir)
        family = psutil.Process(caller.pid).children(recursive=True)
        assert len(family) >= 1 + 2 + 2          # head, agents, workers
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(10)
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
        deadline = time.monotonic() + 10
        while os.path.exists(rundir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(rundir)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert not leftover_processes(timeout=1)


def slow_id(x):
    time.sleep(0.05)
    return x


def test_a_killed_agent_is_a_lost_node_and_its_work_moves_elsewhere():
    from dragon_nb.native.machine import System
    with dragon_nb.start(nodes=2) as rt, TelemetryMonitor(rt) as mon:
        assert mon.wait_for_nodes(2)
        with dragon_nb.Pool(2) as p:
            assert sorted(h.node for h in p._pool) == [0, 1]
            pending = p.map_async(slow_id, range(60), chunksize=1)
            # the map is under way on node 1: its worker there has done tasks of it
            # (and, while the map is not done, holds more), so there is work to move
            wait_until(lambda: mon.snapshot().get(1, {}).get("owners", {})
                       .get(p.owner, {}).get("done", 0) > 0,
                       what="node 1's worker doing tasks of the map")
            assert not pending.ready(), "the map was done before node 1 was lost"
            agent = next(n["agent_pid"] for n in rt.nodes() if n["id"] == 1)
            os.kill(agent, signal.SIGKILL)
            assert pending.get(timeout=30) == list(range(60))
            assert {h.node for h in p._pool} == {0}      # replacements on the live node
            assert p.map(abs, [-1]) == [1]
        assert System().nnodes == 1
        lost = [n for n in rt.nodes(refresh=True) if not n["alive"]]
        assert [n["id"] for n in lost] == [1]
    dragon_nb.stop()


def test_a_forked_child_leaves_its_parents_runtime_alone():
    import multiprocessing
    rt = dragon_nb.start(nodes=1)
    rundir = rt.rundir
    del rt                                 # only the module keeps it: a child may not end it
    child = multiprocessing.get_context("fork").Process(target=print, args=("child",))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert os.path.isdir(rundir)
    with dragon_nb.Pool(1) as p:
        assert p.apply(abs, (-2,)) == 2
    dragon_nb.stop()


FORKING_CALLER = textwrap.dedent('''
    import os, time
    import dragon_nb
    rt = dragon_nb.start(nodes=1)
    if os.fork() == 0:          # a child that outlives its parent
        time.sleep(30)
        os._exit(0)
    print(rt._proc.pid, flush=True)
    time.sleep(60)
''')


def test_a_forked_child_does_not_keep_a_killed_callers_runtime_alive(tmp_path, env_with_pkg):
    script = tmp_path / "forking_caller.py"
    script.write_text(FORKING_CALLER)
    caller = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, text=True,
                              env=env_with_pkg)
    child = None
    try:
        head = psutil.Process(int(caller.stdout.readline()))
        child = next(p for p in psutil.Process(caller.pid).children()
                     if p.pid != head.pid)
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(10)
        gone, alive = psutil.wait_procs([head], timeout=10)
        assert not alive
    finally:
        if child is not None and child.is_running():
            child.kill()
        if caller.poll() is None:
            caller.kill()
            caller.wait()


def _manager_spec(rt, name):
    import pickle
    return pickle.dumps({"first_id": 0, "prefix": f"{rt.rundir}/{name}", "budget": 1 << 20,
                         "name": name, "tombstone": f"{rt.rundir}/{name}.gone"}, 5)


def _agent_children(rt) -> dict:
    head = psutil.Process(rt._proc.pid)
    return {a.pid: [c.pid for c in a.children()] for a in head.children()}


@pytest.mark.timeout(60)
def test_a_spawn_one_node_cannot_answer_fails_whole_and_leaves_no_process():
    with dragon_nb.Runtime(nodes=2) as rt:
        stuck = next(n["agent_pid"] for n in rt.nodes() if n["id"] == 1)
        os.kill(stuck, signal.SIGSTOP)
        try:
            with pytest.raises(RuntimeError, match="node 1 did not start the processes in time"):
                rt.spawn("dragon_nb.ddict.manager:main", _manager_spec(rt, "t"), 2, "test-owner",
                         nodes=[0, 1], timeout=2.0)
        finally:
            os.kill(stuck, signal.SIGCONT)
        deadline = time.monotonic() + 10     # node 1 answers late: its processes are killed too
        while any(_agent_children(rt).values()):
            assert time.monotonic() < deadline, f"processes left: {_agent_children(rt)}"
            time.sleep(0.1)
        assert rt.request("procs")["procs"] == []


def _pending_at_the_head(rt) -> list:
    """What the head waits on agents for, asked on a connection of its own (the
    runtime's handle is busy with the request under test)."""
    import zmq
    chan = P.Channel(zmq.Context.instance().socket(zmq.DEALER), rt.network.codec())
    try:
        rt.network.connect(chan.sock, rt.address)
        chan.send(P.REQ, {"op": P.Op.STATS, "rid": 1})
        assert chan.poll(10_000), "the head did not answer stats"
        _, _, reply, _ = chan.recv()
        return [(op, list(nodes)) for op, nodes in reply["pending"]]
    finally:
        chan.close()


def test_kill_returns_once_the_agent_has_sent_the_signal():
    """What the caller does after kill() meets the process already signalled: the head
    answers when the agent confirms, not when it has passed the request on."""
    import threading
    with dragon_nb.Runtime(nodes=2) as rt:
        (node, pid), = rt.spawn("dragon_nb.ddict.manager:main", _manager_spec(rt, "k"), 1,
                                "test-owner", nodes=[1])
        agent = next(n["agent_pid"] for n in rt.nodes() if n["id"] == 1)
        manager = psutil.Process(pid)
        os.kill(agent, signal.SIGSTOP)
        done = threading.Event()
        killer = threading.Thread(target=lambda: (rt.kill([(node, pid)], signal.SIGKILL),
                                                  done.set()))
        try:
            killer.start()
            # the head holds the kill until node 1's agent, stopped, confirms it
            wait_until(lambda: (P.Op.KILL, [1]) in _pending_at_the_head(rt),
                       what="the kill waiting on node 1 at the head")
            assert not done.is_set(), "kill answered before the agent could send it"
            assert manager.status() != psutil.STATUS_ZOMBIE
        finally:
            os.kill(agent, signal.SIGCONT)
        assert done.wait(10)
        killer.join(10)
        gone, alive = psutil.wait_procs([manager], timeout=10)
        assert not alive or alive[0].status() == psutil.STATUS_ZOMBIE


def test_a_kill_an_agent_never_confirms_fails_naming_the_node():
    with dragon_nb.Runtime(nodes=2) as rt:
        (node, pid), = rt.spawn("dragon_nb.ddict.manager:main", _manager_spec(rt, "k"), 1,
                                "test-owner", nodes=[1])
        agent = next(n["agent_pid"] for n in rt.nodes() if n["id"] == 1)
        os.kill(agent, signal.SIGSTOP)
        try:
            with pytest.raises(RuntimeError, match="node 1 did not confirm the signal in time"):
                rt.kill([(node, pid)], signal.SIGKILL)
        finally:
            os.kill(agent, signal.SIGCONT)


def test_agents_start_only_dragon_nb_entry_points():
    with dragon_nb.Runtime(nodes=1) as rt:
        with pytest.raises(RuntimeError, match="not an entry point of dragon-nb"):
            rt.spawn("builtins:exec", b"print('hello')", 1, "test-owner")
        assert not any(_agent_children(rt).values())
