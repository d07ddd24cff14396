"""Bad input, as a specification (see docs/reliability.md's catalogue): every public
constructor given the wrong types, oversize values, a DDict after destroy(), magics
with wrong options. Each: a clear error naming the problem, nothing lost, nothing left
running. The functions workers run and the helpers come from test_faults.py."""
import os
import textwrap

import psutil
import pytest
from IPython.core.error import UsageError

import dragon_nb
from dragon_nb import DDict, DDictError, DDictFullError, Pool
from dragon_nb.pipeline import Pipeline, on_node, stage
from dragon_nb.runtime import get_runtime
from dragon_nb.telemetry import TelemetryMonitor

from conftest import describe

from test_faults import (
    MiB, a_generator, our_processes, put_value, read_key, run_script_checked, square)

pytestmark = pytest.mark.timeout(90)


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


def _head_procs() -> set:
    """(node, pid, owner) of every process the current runtime's head has started
    and not yet seen exit (none without a runtime)."""
    rt = get_runtime(auto_start=False)
    return {tuple(p) for p in rt.request("procs")["procs"]} if rt is not None else set()


def _started_nothing(before: set, head_before: set, what: str) -> None:
    """No process runs now that did not before ``what`` was refused. Every start is
    synchronous (a Runtime forks its head before it returns; a spawn request returns
    once the agents have forked), so whatever the refused call started is there when
    it has raised: no wait is needed to see it. The head is asked too: it answers
    after every request the call made, and its table would list what it started."""
    new = our_processes() - before
    assert not new, f"{what} left processes behind: {_cmdlines(new)}"
    started = _head_procs() - head_before
    assert not started, f"{what} left processes in the head's table: {started}"


def _cmdlines(pids) -> list:
    out = []
    for pid in pids:
        try:
            out.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            out.append(f"pid {pid} (gone)")
    return out


def _refused(make, exc, match):
    """``make()`` raises ``exc`` naming the problem, and starts no process."""
    before, head_before = our_processes(), _head_procs()
    with pytest.raises(exc, match=match):
        make()
    _started_nothing(before, head_before, "a refused constructor")


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
    before, head_before = our_processes(), _head_procs()
    with pytest.raises(UsageError) as info:       # IPython shows it and stops "Run all"
        ip.run_line_magic("dragon", line)
    assert LINE_MAGICS[line] in str(info.value), info.value
    assert "_dragon_map" not in ip.user_ns
    _started_nothing(before, head_before, f"%dragon {line}")


@pytest.mark.parametrize("case", CELL_MAGICS)
def test_a_pipeline_cell_with_wrong_options_stops_the_cell_saying_what_is_wrong_and_starts_nothing(
        runtime, ip, case):
    line, cell, expected = CELL_MAGICS[case]
    ip.user_ns.pop("_dragon_pipeline", None)
    before, head_before = our_processes(), _head_procs()
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("dragon", line, cell)
    assert expected in str(info.value), info.value
    assert "_dragon_pipeline" not in ip.user_ns
    _started_nothing(before, head_before, f"%%dragon {line}")


# --- found by this catalogue, and fixed -------------------------------------------------

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
    deadline = time.monotonic() + 20
    while rt.alive:
        assert time.monotonic() < deadline, "the killed head is still there after 20 s"
        time.sleep(0.05)
    print("dead runtime's folder there before:", os.path.exists(old))
    with dragon_nb.Pool(1) as p:                 # a new runtime, started on first use
        assert p.map(abs, [-1]) == [1]
    # no wait: starting the new runtime removed the dead one's folder before it
    # returned (nothing else would: the head was killed, its agents die with it)
    print("dead runtime's folder left:", os.path.exists(old))
''')


def test_a_runtime_started_after_the_head_died_removes_the_dead_ones_folder(env_with_pkg):
    proc = run_script_checked(DEAD_HEAD_SCRIPT, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    assert "dead runtime's folder there before: True" in proc.stdout, describe(proc)
    assert "dead runtime's folder left: False" in proc.stdout, describe(proc)
