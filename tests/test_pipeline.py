"""Pipelines: stages wired worker to worker, bounded queues, errors with stage and item."""
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dragon_nb.pipeline import Pipeline, PipelineError, on_node, stage
from dragon_nb.telemetry import TelemetryMonitor

pytestmark = pytest.mark.timeout(60)


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def slow_double(x):
    time.sleep(0.01)
    return 2 * x


def bad_on_13(x):
    if x == 13:
        raise ValueError("13 is unlucky")
    return x


def numbers(n):
    yield from range(n)


def where(x):
    import multiprocessing
    return multiprocessing.current_process().node if hasattr(
        multiprocessing.current_process(), "node") else os.getpid()


def wait_until(condition, timeout: float, what: str):
    """Wait for ``condition()`` to be true (-> its value), failing after ``timeout``
    seconds with a message saying what was waited for."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)
    return value


def wait_until_steady(read, steady_s: float, timeout: float, what: str):
    """Wait for ``read()`` to stay the same for ``steady_s`` -> that value."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < steady_s:
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; still moving: {value}")
        time.sleep(0.02)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


class FileStore:
    """A picklable mapping that writes each item to a file (stands in for a DDict)."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __setitem__(self, key, value):
        Path(self.folder, str(key)).write_text(repr(value))


def test_results_come_in_input_order(runtime):
    with Pipeline(range(500), stage(inc, workers=2), stage(double, workers=2)) as pipe:
        assert list(pipe) == [2 * (x + 1) for x in range(500)]


def test_unordered_mode_yields_everything(runtime):
    with Pipeline(range(300), stage(slow_double, workers=2), ordered=False) as pipe:
        assert sorted(pipe) == [2 * x for x in range(300)]


def test_stage_workers_are_placed_on_the_nodes_asked(runtime):
    with Pipeline(range(10), stage(inc, workers=2, nodes=[1]), stage(double, nodes=[0])) as pipe:
        list(pipe)
        assert sorted(node for k, node, _ in pipe.procs if k == 0) == [1, 1]
        assert [node for k, node, _ in pipe.procs if k == 1] == [0]


def test_a_generator_can_run_on_a_node_as_the_source(runtime):
    with Pipeline(on_node(numbers, 1000, node=1), stage(inc)) as pipe:
        assert list(pipe) == list(range(1, 1001))


def test_a_slow_stage_slows_the_source(runtime):
    pulled = [0]

    def endless():
        for i in itertools.count():
            pulled[0] += 1
            yield i

    with Pipeline(endless(), stage(inc), stage(slow_double)) as pipe:
        first = list(itertools.islice(pipe, 50))
        # the source may run ahead only as far as the bounded queues let it: it stops
        taken = wait_until_steady(lambda: pulled[0], 0.5, 20,
                                  "the source to stop running ahead of a slow stage")
    assert first == [2 * (x + 1) for x in range(50)]
    assert taken < 50 + 4 * 3 * 256           # queue_depth x links x the largest batch


def test_an_error_names_the_stage_and_the_item_after_the_items_before_it(runtime):
    out = []
    with Pipeline(range(40), stage(inc), stage(bad_on_13, workers=2)) as pipe:
        with pytest.raises(ValueError, match="13 is unlucky") as info:
            for x in pipe:
                out.append(x)
    assert out == list(range(1, 13))
    if sys.version_info >= (3, 11):
        assert "dragon-nb: stage 1 (bad_on_13) on node" in info.value.__notes__[-1]
        assert info.value.__notes__[-1].endswith("failed on item 12")


def test_a_source_that_raises_ends_the_pipeline_with_that_error(runtime):
    def source():
        yield from range(25)
        raise OSError("the socket went away")

    with Pipeline(source(), stage(inc)) as pipe:
        got = []
        with pytest.raises(OSError, match="socket went away"):
            for x in pipe:
                got.append(x)
    assert got == list(range(1, 26))


@pytest.mark.parametrize("stage_index, workers", [(1, 2), (0, 1)])
def test_a_killed_stage_worker_is_replaced_and_what_it_held_runs_again(
        runtime, stage_index, workers):
    stages = [stage(inc, workers=1 if stage_index == 0 else 1),
              stage(slow_double, workers=workers if stage_index == 1 else 1)]
    with Pipeline(range(600), *stages) as pipe:
        got = [next(pipe) for _ in range(20)]
        _, node, pid = next(p for p in pipe.procs if p[0] == stage_index)
        os.kill(pid, signal.SIGKILL)
        got += list(pipe)
        assert not any(p[2] == pid for p in pipe.procs)          # a new worker in its place
    assert got == [2 * (x + 1) for x in range(600)]               # each once, in order


def kill_a_worker_expecting(pipe, stage_index: int, name: str, outcome: str) -> None:
    """Kill one worker of ``stage_index`` mid-stream; the pipeline must fail naming the
    stage, the worker, its node and ``outcome`` (a regex)."""
    try:
        next(pipe)
        _, node, pid = next(p for p in pipe.procs if p[0] == stage_index)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PipelineError, match=rf"stage {stage_index} \({name}\): worker pid "
                                                rf"{pid} on node {node} was killed by SIGKILL; "
                                                + outcome):
            for _ in pipe:
                pass
    finally:
        pipe.close()


def test_a_killed_stage_worker_past_task_retries_fails_naming_items_stage_and_node(runtime):
    kill_a_worker_expecting(
        Pipeline(itertools.count(), stage(inc), stage(slow_double, workers=2), task_retries=0),
        1, "slow_double", r"items \d+ to \d+ were fed in 1 time\(s\) and lost")


def test_a_killed_stage_worker_stops_a_pipeline_whose_source_runs_on_a_node(runtime):
    kill_a_worker_expecting(Pipeline(on_node(numbers_forever), stage(slow_double, workers=2)),
                            0, "slow_double", "a source run on a node cannot be fed again")


def numbers_forever():
    yield from itertools.count()


def test_close_stops_every_stage(runtime):
    pipe = Pipeline(itertools.count(), stage(inc), stage(double))
    assert next(pipe) == 2
    pids = [p for _, _, p in pipe.procs]
    pipe.close()
    wait_until(lambda: not any(_alive(p) for p in pids), 5,
               f"the stage workers {pids} to exit after close()")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_last_stage_can_store_results_itself(runtime, tmp_path):
    with Pipeline(range(20), stage(double, workers=2), into=FileStore(tmp_path)) as pipe:
        assert pipe.run() == 20
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(20))
    assert (tmp_path / "7").read_text() == "14"


def test_stage_telemetry_counts_items_in_and_out(runtime):
    with TelemetryMonitor(runtime) as mon, \
            Pipeline(range(2000), stage(inc), stage(double, workers=2)) as pipe:
        assert len(list(itertools.islice(pipe, 2000))) == 2000
        stats = []

        def counted():
            stats[:] = pipe.stats(mon.snapshot())
            return all(s["out"] == 2000 for s in stats)
        try:
            wait_until(counted, 5, "telemetry to count 2000 items out of every stage")
        except AssertionError:
            pass                               # the assertion below says what it saw
    assert [(s["name"], s["in"], s["out"], s["workers"], s["queued"]) for s in stats] == \
        [("inc", 2000, 2000, 1, 0), ("double", 2000, 2000, 2, 0)]


def test_bad_stages_are_refused():
    with pytest.raises(TypeError, match="stage"):
        stage(42)
    with pytest.raises(ValueError, match="workers"):
        stage(inc, workers=0)


def test_argument_mistakes_raise_the_errors_a_pools_do():
    with pytest.raises(ValueError, match="task_retries"):       # as Pool(task_retries=-1)
        Pipeline(range(3), stage(inc), task_retries=-1)
    with pytest.raises(TypeError, match="task_retries"):
        Pipeline(range(3), stage(inc), task_retries=1.5)
    with pytest.raises(TypeError, match="key"):
        Pipeline(range(3), stage(inc), key=5)
    with pytest.raises(TypeError, match="runtime"):
        Pipeline(range(3), stage(inc), runtime="x")


def test_an_interrupt_while_iterating_stops_every_stage(runtime):
    import threading
    pipe = Pipeline(itertools.count(), stage(inc), stage(slow_double))
    pids = [p for _, _, p in pipe.procs]
    timer = threading.Timer(0.5, signal.pthread_kill,
                            (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in pipe:
            pass
    try:
        wait_until(lambda: not any(_alive(p) for p in pids), 5,
                   "every stage worker to exit after the interrupt")
    except AssertionError:
        pass                                   # the assertion below names them
    alive = [p for p in pids if _alive(p)]
    assert not alive


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_long_stream_keeps_the_callers_memory_flat(runtime):
    import psutil
    me = psutil.Process()
    with Pipeline(range(300_000), stage(inc), stage(double)) as pipe:
        samples = []
        for i, _ in enumerate(pipe):
            if i % 50_000 == 0:
                samples.append(me.memory_info().rss)
    # after warm-up the caller holds only the bounded queues: growth stays small
    assert max(samples[1:]) - samples[1] < 20 << 20, [s >> 20 for s in samples]


def test_a_pipeline_drains_into_a_ddict_without_passing_through_the_caller(runtime):
    from dragon_nb import DDict
    with DDict(1, 2, 64 << 20) as d:
        with Pipeline(range(100), stage(inc), stage(double, workers=2), into=d) as pipe:
            assert pipe.run() == 100
        assert len(d) == 100
        assert d[7] == 16 and sorted(d.keys()) == list(range(100))
        d.destroy()
