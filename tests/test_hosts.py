"""Several hosts: agents on three network-namespace hosts joined over signed TCP.

Each test makes three hosts (h1, h2, h3: namespaces with their own addresses
on a private bridge, each under its own hostname), runs a scenario from
tests/hosts/scenarios.py on h1 -- the caller, the head and one node there,
agents launched on h2 and h3 through a launcher template -- and checks what
it reports, then that no process of that runtime is left on any host.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import describe, dragon_nb_command, run_checked, short_dirs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "hosts"))
import netns  # noqa: E402

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"no test hosts here: {netns.available()}")

SEED = HERE / "seed"


@pytest.fixture
def hosts():
    with netns.NamespaceHosts(["h1", "h2", "h3"]) as net:
        yield net


@pytest.fixture
def work():
    with short_dirs("dnbh-", "work") as (data, rtdir):
        yield data, rtdir


def processes_of(rtdir: str) -> list:
    """Every process whose environment names ``rtdir``: runtime processes on any of
    the hosts (they inherit it from the caller, through the launcher too)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("DRAGON_NB_TMPDIR") == rtdir and p.pid != os.getpid():
                found.append((p.pid, p.info["cmdline"]))
        except psutil.Error:
            pass
    return found


def run_on_h1(hosts, argv, data, rtdir, env, timeout=90):
    extra = {"DNB_LISTEN": hosts.address["h1"], "DNB_HOSTS": "h2,h3",
             "DNB_LAUNCHER": hosts.launcher, "DNB_WORK": data,
             **{f"DNB_NS_{h.upper()}": ns for h, ns in hosts.ns.items()}}
    try:
        return run_checked(hosts.on("h1", argv), data, rtdir, env, extra, timeout=timeout)
    finally:
        left = processes_of(rtdir)
        assert not left, f"runtime processes left on the hosts: {left}"


def scenario(hosts, name, work, env):
    data, rtdir = work
    proc = run_on_h1(hosts, [sys.executable, str(HERE / "hosts" / "scenarios.py"), name],
                     data, rtdir, env)
    assert proc.returncode == 0, describe(proc)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, describe(proc)
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.timeout(120)
def test_pool_workers_and_ddict_managers_run_on_every_host(hosts, work, env_with_pkg):
    r = scenario(hosts, "spread", work, env_with_pkg)
    assert r["nodes"] == ["h1", "h2", "h3"]
    assert r["workers"] == ["h1", "h2", "h3"]
    assert r["managers"] == ["h1", "h2", "h3"]
    assert r["writers"] == ["h1", "h2", "h3"]
    assert r["values_ok"] and r["count"] == 300


@pytest.mark.timeout(120)
def test_a_pipeline_runs_with_its_stages_on_different_hosts(hosts, work, env_with_pkg):
    r = scenario(hosts, "pipeline", work, env_with_pkg)
    assert r["values_ok"]
    assert r["stage_hosts"] == [["h2", "h3"]]


@pytest.mark.timeout(150)
def test_an_agent_without_the_key_is_refused_and_one_with_it_joins_and_leaves(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "join", work, env_with_pkg)
    assert r["before"] == ["h1", "h2"]
    assert r["refused_code"] == 2
    assert "did not welcome" in r["refused_says"][0], r
    assert r["after_refusal"] == ["h1", "h2"]
    assert r["with_h3"] == ["h1", "h2", "h3"]
    assert r["ran_on"] == ["h3"]
    assert r["after_leaving"] == ["h1", "h2"]


@pytest.mark.timeout(150)
def test_pulling_a_hosts_link_down_mid_map_is_survived(hosts, work, env_with_pkg):
    r = scenario(hosts, "link_down", work, env_with_pkg)
    assert r["values_ok"]
    assert r["nodes_after"] == ["h1", "h2"]


@pytest.mark.timeout(150)
def test_pool_connections_cut_while_the_host_stays_are_redialled_and_nothing_is_lost(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "redial", work, env_with_pkg)
    assert r["cut"] >= 1, r                  # the connections really were cut
    assert r["redials"], r                   # and the workers said hello again
    assert r["values_ok"] and r["nodes_after"] == ["h1", "h2", "h3"], r


@pytest.mark.timeout(150)
def test_pipeline_links_cut_while_the_hosts_stay_are_redialled_and_nothing_is_lost(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "pipeline_redial", work, env_with_pkg)
    assert all(r["cuts"].values()), r        # every link really was cut
    said = " ".join(r["redials"])
    assert "the feeder's link" in said and "a stage 0 worker's link" in said and \
        "a stage 1 worker's link" in said, r
    assert r["values_ok"] and r["count"] == 600, r


@pytest.mark.timeout(150)
def test_a_pipeline_whose_node_source_loses_a_cut_link_fails_naming_it_not_hangs(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "pipeline_node_source_cut", work, env_with_pkg)
    assert r["done"] >= 1, r                 # the link really was cut
    assert r["error"] and re.search(r"the source's link to stage 0 \(slow_square\) worker 0 "
                                    r"on node \d+ \(tcp://.*\) was cut and dialled again: "
                                    r"the items on it may have been lost", r["error"]), r
    assert r["took"] < 10, r                 # at once, not when someone gives up waiting


@pytest.mark.timeout(150)
def test_a_pipeline_link_that_keeps_being_cut_is_fed_again_a_limited_number_of_times(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "pipeline_flapping_link", work, env_with_pkg)
    assert r["done"] >= 4, r                 # the link was cut more often than allowed
    assert not r["finished"] and r["error"], r
    assert re.search(r"the feeder's link to stage 0 \(slow_cube\) worker 0 on node \d+ "
                     r"\(tcp://.*\) was cut and dialled again.*LINK_REFEEDS=3", r["error"]), r


@pytest.mark.timeout(150)
def test_ddict_requests_waiting_on_a_cut_connection_are_sent_again_not_timed_out(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "ddict_cut", work, env_with_pkg)
    assert len(r["cuts"]) == 2 and all(r["cuts"]), r      # both cuts really cut
    kind, value, took = r["waited"]
    assert (kind, value) == ("ok", "written") and took < 10, r    # not its 15 s timeout
    assert [g[0] for g in r["gets"]] == ["ok"] * 12, r


@pytest.mark.timeout(150)
def test_ddict_batch_puts_lost_on_a_cut_connection_are_reported_not_lost_silently(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "ddict_batch_cut", work, env_with_pkg)
    assert r["cut"] >= 1 and r["values_right"], r
    if r["stored"] < r["sent"]:      # some puts were on the cut connection: it says so
        kind, message = r["error"]
        assert kind == "DDictError" and "never reached" in message, r
        assert f"{r['sent'] - r['stored']} of the {r['sent']} puts" in message, r
    else:
        assert r["error"] is None, r


@pytest.mark.timeout(150)
def test_a_ddict_manager_gone_on_another_host_is_named_at_once_not_timed_out(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "ddict_gone", work, env_with_pkg)
    kind, message, took = r["killed"]
    assert kind == "DDictError" and "cannot be reached" in message, r
    assert took < 5 and r["others"] == "on h2"            # the other managers serve on
    kind, message, took = r["destroyed"]                   # seen from a worker on h2
    assert kind == "DDictError" and "was destroyed" in message and took < 5, r


@pytest.mark.timeout(120)
def test_a_node_under_the_same_hostname_in_another_pid_namespace_is_not_taken_for_this_host(
        hosts, work, env_with_pkg):
    r = scenario(hosts, "twin", work, env_with_pkg)
    assert r["hostnames"] == ["h1", "h1"], r       # one name, two PID namespaces
    assert r["got"] == ["read", "written"], r


# -- the seed's examples, with the work spread over the three hosts -------------------
FILES = {f"part{i:02d}.txt": "".join(f"line {j} of file {i}\n" for j in range(i * 3 + 1))
         for i in range(11)}


def seed_run(hosts, script, work, env, *opts):
    data, rtdir = work
    for name, text in FILES.items():
        Path(data, name).write_text(text)
    path = Path(rtdir).parent / f"dragon_{script}"
    path.write_text(re.sub(r"\bdragon_nb\b", "dragon", (SEED / script).read_text()))
    argv = [*dragon_nb_command(), "run", str(path), "--nodes", "1", "--hosts", "h2,h3",
            "--listen", hosts.address["h1"], "--launcher", hosts.launcher, *opts]
    return run_on_h1(hosts, argv, data, rtdir, env)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", ["ex1_read_then_map.py", "ex2_lazy_imap.py",
                                    "ex3_shared_fs_map.py"])
def test_seed_file_examples_run_across_three_hosts(script, hosts, work, env_with_pkg):
    proc = seed_run(hosts, script, work, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    lengths = [len(FILES[p.name]) for p in Path(work[0]).glob("*")]
    assert proc.stdout.strip().splitlines()[-1] == \
        f"results={len(lengths)} total={sum(lengths)} lengths={lengths}", describe(proc)


@pytest.mark.timeout(120)
def test_seed_socket_pipeline_example_runs_across_three_hosts(hosts, work, env_with_pkg):
    """Example 5 needs cpu_count() >= 8: the caller's node claims 4 cores, h2 and h3
    bring their own 2 each."""
    from test_seed_examples import PAYLOAD, check_pipeline
    server = subprocess.Popen(hosts.on("h1", [sys.executable, str(HERE / "hosts" /
                                                                  "scenarios.py"), "serve"]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env_with_pkg)
    try:
        server.stdin.write(PAYLOAD)
        server.stdin.close()
        assert server.stdout.readline() == b"listening\n"
        proc = seed_run(hosts, "ex5_socket_pipeline.py", work, env_with_pkg,
                        "--cpus-per-node", "4")
        check_pipeline(proc)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


@pytest.mark.timeout(120)
def test_seed_ddict_example_puts_managers_on_all_three_hosts(hosts, work, env_with_pkg):
    proc = seed_run(hosts, "ex4_ddict.py", work, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    files = list(Path(work[0]).glob("*"))
    lengths = [len(FILES[f.name]) for f in files]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"processed={len(files)} stored={len(files)} total={sum(lengths)} managers=6"), \
        describe(proc)
