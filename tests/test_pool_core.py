"""The pool on the runtime core (issue 12): liveness through ProcessRef, handler
tables, shared argument checks. Mostly unit tests: no runtime unless named."""
import collections
import os
import subprocess
import sys
import threading
import types

import pytest

from dragon_nb import Pool, checks
from dragon_nb.pool import dispatcher as D
from dragon_nb.pool import worker as W
from dragon_nb.pool.state import WorkerState, lost
from dragon_nb.runtime import network
from dragon_nb.runtime.liveness import ProcessRef, start_time
from dragon_nb.wire import protocol as P

pytestmark = pytest.mark.timeout(60)

HERE = network.pid_space()
ME = start_time(os.getpid())       # clock ticks since boot


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- liveness -----------------------------------------------------------------------

def test_a_worker_whose_pid_now_names_another_process_is_lost():
    reused = WorkerState(ProcessRef(0, os.getpid(), HERE, ME - 5.0))    # our pid, not our start
    same = WorkerState(ProcessRef(0, os.getpid(), HERE, ME))
    assert lost([reused, same]) == [reused]


def test_a_worker_gone_is_lost_one_elsewhere_is_not_looked_at():
    gone = WorkerState(ProcessRef(0, _gone_pid(), HERE, ME))
    elsewhere = WorkerState(ProcessRef(1, _gone_pid(), "another-host", 0.0))
    unknown_space = WorkerState(ProcessRef(2, _gone_pid(), "", 0.0))
    assert lost([gone, elsewhere, unknown_space]) == [gone]


def test_a_worker_whose_exit_is_known_is_not_lost_again():
    w = WorkerState(ProcessRef(0, _gone_pid(), HERE, ME))
    w.exit_deadline = 0.0
    assert lost([w]) == []


def _bare_dispatcher(workers):
    """A Dispatcher with only what its liveness check touches (no runtime, no thread)."""
    d = D.Dispatcher.__new__(D.Dispatcher)
    d.runtime = types.SimpleNamespace(alive=True)
    d.workers = {w.wid: w for w in workers}
    d.state, d.broken, d.processes = "run", None, len(workers)
    d.early_deaths, d.handles, d.jobs = [], [], {}
    d.ready = collections.deque()
    return d


def test_the_dispatchers_liveness_check_takes_a_reused_pid_for_an_exit():
    reused = WorkerState(ProcessRef(0, os.getpid(), HERE, ME - 5.0))
    live = WorkerState(ProcessRef(0, os.getpid(), HERE, ME))
    live.wid = b"w0-live"               # two states for one pid: distinct identities
    d = _bare_dispatcher([reused, live])
    d._update_handles()
    d._check_liveness()
    assert reused.exit_deadline is not None and not reused.handle.is_alive()
    assert live.exit_deadline is None and live.handle.is_alive()
    assert d.handles == [live.handle]


def test_pool_workers_are_referenced_with_their_pid_space_and_start_time(runtime):
    with Pool(2) as p:
        assert p.map(abs, [-1, -2]) == [1, 2]
        refs = [w.ref for w in list(p._dispatcher.workers.values())]
        assert len(refs) == 2
        for ref in refs:
            assert ref.local and ref.alive() is True
            assert ref.start_time == start_time(ref.pid) > 0


# --- handler tables -----------------------------------------------------------------

def test_every_worker_message_and_command_has_one_handler():
    assert set(D.MESSAGES.table) == {(k, None) for k in (P.RESULTS, P.OUTPUT, P.HELLO,
                                                          P.INIT_FAILED)}
    assert set(W.HANDLERS.table) == {(k, None) for k in (P.TASKS, P.CANCEL, P.STOP)}
    names = {D.SUBMIT, D.FEED, D.END, D.FEED_ERROR, D.CANCEL, D.CLOSE, D.TERMINATE,
             D.REPOPULATE}
    assert len(names) == 8 and set(D.COMMANDS.table) == {(n, None) for n in names}


def test_an_unknown_command_or_message_is_refused_by_name():
    d = _bare_dispatcher([])
    with pytest.raises(P.UnknownMessage, match="pool I/O thread"):
        D.COMMANDS.bind(d)("resize", 3)
    with pytest.raises(P.UnknownMessage, match="pool"):
        D.MESSAGES.bind(d)(P.TASKS, {}, None, [])


def test_commands_run_through_the_table():
    d = _bare_dispatcher([])
    on_command = D.COMMANDS.bind(d)
    on_command(D.CLOSE, None)
    assert d.state == "close"
    on_command(D.TERMINATE, None)
    assert d.state == "terminate"
    done = threading.Event()
    on_command(D.REPOPULATE, done)          # a terminated pool starts nobody
    assert done.is_set()


# --- argument checks ------------------------------------------------------------------

@pytest.mark.parametrize("value, exc", [(-1, ValueError), ("x", TypeError), (1.0, TypeError),
                                        (True, TypeError)])
def test_task_retries_is_checked_like_everywhere_else(value, exc):
    with pytest.raises(exc, match="task_retries must be an int >= 0"):
        Pool(1, task_retries=value)
    with pytest.raises(exc, match="task_retries must be an int >= 0"):
        checks.non_negative_int("task_retries", value)


def test_the_shared_checks():
    assert checks.non_negative_int("n", 0) == 0
    assert checks.optional(checks.positive_int, "n", None) is None
    assert checks.optional(checks.positive_int, "n", 3) == 3
    assert checks.callable_or_none("f", None) is None
    with pytest.raises(TypeError, match="f must be a callable"):
        checks.callable_or_none("f", 5)
    assert checks.arguments("initargs", [1, 2], "the initializer") == (1, 2)
    with pytest.raises(TypeError, match="initargs must be a tuple of arguments"):
        checks.arguments("initargs", 5, "the initializer")
    with pytest.raises(TypeError, match="runtime must be a thing or None"):
        checks.instance_or_none("runtime", "x", int, "a thing")


def test_pool_argument_mistakes_keep_the_stdlibs_types_and_words():
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        Pool(0)
    with pytest.raises(TypeError, match="processes"):
        Pool("2")
    for value in (0, -1, 0.5, "12"):       # CPython's test_pool_maxtasksperchild_invalid
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(3, maxtasksperchild=value)
