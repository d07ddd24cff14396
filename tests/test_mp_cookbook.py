"""The cookbook-shaped multiprocessing examples, run as a user runs them.

``examples/merge_sort.py`` (one Process per sub-list, results on Queues) and
``examples/prime_sieve.py`` (a chain of Processes joined by bounded Queues,
each stage starting the next at run time) are Dragon scripts (``import
dragon``), run with ``dragon-nb run --nodes 4``: each must print its result
line, exit 0, have run its Processes on every node (the examples print the
nodes their Processes ran on, from ``DRAGON_NB_NODE``), and leave no runtime
process or folder behind. Then the same across three network-namespace hosts
(as tests/test_hosts.py makes them): the caller's node on h1, one node each
on h2 and h3, and the Processes must have run on all three.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import describe, dragon_nb_command, run_checked, short_dirs

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
sys.path.insert(0, str(HERE / "hosts"))
import netns  # noqa: E402

RUN_TIMEOUT = 60

# example -> the line it ends with (the nodes it ran on as a group), for its defaults:
# merge sort of 2000 values, cut off at 250: 1 + 2 + 4 + 8 = 15 processes;
# sieve up to 200: one stage per prime, 46 of them, the last 199
RESULT = {
    "merge_sort.py": re.compile(r"sorted 2000 values with 15 processes on nodes (?P<nodes>[\d,]+); "
                                r"exit code 0"),
    "prime_sieve.py": re.compile(r"46 primes up to 200, one stage process each, on nodes "
                                 r"(?P<nodes>[\d,]+) of (?P<hosts>\d+) host\(s\); the last is "
                                 r"199; exit code 0"),
}


@pytest.fixture
def work():
    """(a working folder, a runtime folder of the run's own)."""
    with short_dirs("dnbc-", "work") as dirs:
        yield dirs


def result_of(proc, example: str) -> dict:
    """The example's last line, parsed: {"nodes": [ids], "hosts": n or None}."""
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.strip().splitlines()
    assert lines, describe(proc)
    m = RESULT[example].fullmatch(lines[-1])
    assert m, f"{example} did not end with its result line\n" + describe(proc)
    nodes = sorted(int(n) for n in m["nodes"].split(","))
    return {"nodes": nodes, "hosts": int(m["hosts"]) if "hosts" in m.groupdict() else None}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("example", list(RESULT))
def test_a_cookbook_example_runs_with_dragon_nb_run_its_processes_on_all_four_nodes(
        example, work, env_with_pkg):
    data, rtdir = work
    proc = run_checked([*dragon_nb_command(), "run", "--nodes", "4", str(EXAMPLES / example)],
                       data, rtdir, env_with_pkg, timeout=RUN_TIMEOUT)
    r = result_of(proc, example)
    # Dragon's default placement, round-robin: each process's children start on the
    # nodes after its own, so the processes cover all four
    assert r["nodes"] == [0, 1, 2, 3], describe(proc)
    if r["hosts"] is not None:
        assert r["hosts"] == 1


# --- across three hosts --------------------------------------------------------------------

needs_hosts = pytest.mark.skipif(netns.available() is not None,
                                 reason=f"no test hosts here: {netns.available()}")


@pytest.fixture
def hosts():
    with netns.NamespaceHosts(["h1", "h2", "h3"]) as net:
        yield net


@needs_hosts
@pytest.mark.timeout(150)
@pytest.mark.parametrize("example", list(RESULT))
def test_a_cookbook_example_runs_its_processes_on_every_one_of_three_hosts(
        example, hosts, work, env_with_pkg):
    """``dragon-nb run --nodes 1 --hosts h2,h3`` on h1: three nodes, one per host; the
    example's Processes ran on all three nodes, so on every host."""
    from test_hosts import run_on_h1        # checks that nothing is left on any host
    data, rtdir = work
    argv = [*dragon_nb_command(), "run", str(EXAMPLES / example), "--nodes", "1",
            "--hosts", "h2,h3", "--listen", hosts.address["h1"], "--launcher", hosts.launcher]
    proc = run_on_h1(hosts, argv, data, rtdir, env_with_pkg, timeout=120)
    r = result_of(proc, example)
    assert len(r["nodes"]) == 3, describe(proc)
    if r["hosts"] is not None:
        assert r["hosts"] == 3, describe(proc)
