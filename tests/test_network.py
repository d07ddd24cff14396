"""How a runtime's processes reach each other: nothing on TCP unless asked; when
asked, one named interface, a 0600 key file, signed messages, and launchers that
show what they would run."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import psutil
import pytest

import dragon_nb
from dragon_nb.runtime import hosts, network

from conftest import describe, dragon_nb_command


def tcp_listeners(rt) -> list:
    head = psutil.Process(rt._proc.pid)
    found = []
    for p in [psutil.Process(), head, *head.children(recursive=True)]:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                found.append(c.laddr)
    return found


@pytest.mark.timeout(60)
def test_a_runtime_on_one_host_binds_no_tcp_port():
    with dragon_nb.Runtime(nodes=2) as rt:
        with dragon_nb.Pool(2, runtime=rt) as p:
            assert p.map(abs, [-1, -2]) == [1, 2]
            assert tcp_listeners(rt) == []
        assert rt.tcp_address is None and rt.join_command() is None


@pytest.mark.timeout(60)
def test_a_listening_runtime_binds_only_the_named_address_and_keeps_its_key_0600():
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        with dragon_nb.Pool(2, runtime=rt) as p:
            assert p.map(abs, [-1, -2]) == [1, 2]
            listeners = tcp_listeners(rt)
        assert listeners and {a.ip for a in listeners} == {"127.0.0.1"}
        mode = stat.S_IMODE(os.stat(rt.connection_file).st_mode)
        assert mode == 0o600
        info = json.load(open(rt.connection_file))
        assert info["head"] == rt.tcp_address and len(bytes.fromhex(info["key"])) == 32
        assert rt.join_command() == (f"dragon-nb agent --connect {rt.tcp_address} "
                                     f"--key-file {rt.connection_file}")


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text(os.urandom(32).hex())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        network.read_key_file(str(path))
    os.chmod(path, 0o600)
    assert len(network.read_key_file(str(path))[0]) == 32


def test_a_key_file_that_is_not_one_is_refused(tmp_path):
    for text, why in (("not hex at all", "not a dragon-nb connection file"),
                      ('{"head": "tcp://x:1"}', "not a dragon-nb connection file"),
                      ("abcd", "too short")):
        path = tmp_path / "key"
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(ValueError, match=why):
            network.read_key_file(str(path))


@pytest.mark.parametrize("everywhere", ["0.0.0.0", "::", "224.0.0.1"])
def test_listening_on_every_interface_or_a_group_is_refused(everywhere):
    with pytest.raises(ValueError, match="is not one interface"):
        network.resolve_interface(everywhere)
    with pytest.raises(ValueError, match="is not one interface"):
        dragon_nb.Runtime(nodes=1, listen=everywhere)


@pytest.mark.timeout(60)
def test_the_key_is_in_no_command_line_environment_or_repr():
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        key = rt.network.key.hex()
        head = psutil.Process(rt._proc.pid)
        for p in [head, *head.children(recursive=True)]:
            assert key not in " ".join(p.cmdline())
            assert key not in repr(p.environ())
        assert key not in repr(rt) and key not in repr(rt.network)


@pytest.mark.timeout(60)
def test_a_stranger_without_the_key_cannot_even_connect():
    import zmq
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        from zmq.utils.monitor import recv_monitor_message
        failed = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        mon = sock.get_monitor_socket(failed | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(rt.tcp_address)
        try:                                            # queued, never delivered; or
            sock.send_multipart([b"x" * (1 << 20)] * 4, zmq.NOBLOCK)
        except zmq.Again:                               # the handshake already failed
            pass                                        # and zmq dropped the pipe
        events = []
        while mon.poll(5000):
            events.append(recv_monitor_message(mon)["event"])
            if events[-1] & failed:
                break
        sock.disable_monitor()
        sock.close()
        assert events and events[-1] & failed, events           # refused at the handshake
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
        assert len(rt.request("nodes")["nodes"]) == 1          # and the head serves on


def test_an_interface_that_does_not_exist_is_named_in_the_error():
    with pytest.raises(ValueError, match="no-such-if0"):
        network.resolve_interface("no-such-if0.invalid")
    assert network.resolve_interface("127.0.0.1") == "127.0.0.1"
    assert network.resolve_interface("lo") == "127.0.0.1"


def test_ssh_launches_one_agent_per_host_with_the_key_on_standard_input():
    cmds = hosts.launch_commands(["a", "b"], "ssh", "tcp://10.0.0.1:5555", "/x/conn.json",
                                 python="/opt/py")
    assert [c[0] for c in cmds] == ["a", "b"] and all(c[2] for c in cmds)
    argv = cmds[0][1]
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", "a"]
    assert argv[4] == ("/opt/py -m dragon_nb.cli agent --connect tcp://10.0.0.1:5555 "
                       "--key-file - --name a")


def test_srun_launches_every_agent_in_one_step_reading_a_shared_key_file():
    [(host, argv, on_stdin)] = hosts.launch_commands(["n1", "n2", "n3"], "srun",
                                                     "tcp://10.0.0.1:5555", "/home/u/k.json",
                                                     python="/opt/py")
    assert host is None and not on_stdin
    assert argv[:5] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--nodelist=n1,n2,n3",
                        "--kill-on-bad-exit=0"]
    assert argv[5:] == ["/opt/py", "-m", "dragon_nb.cli", "agent", "--connect",
                        "tcp://10.0.0.1:5555", "--key-file", "/home/u/k.json"]


def test_a_template_launcher_and_a_bad_one():
    [(_, argv, on_stdin)] = hosts.launch_commands(["h2"], "ip netns exec ns-{host} {command}",
                                                  "tcp://10.0.0.1:1", "f", python="/opt/py")
    assert argv[:4] == ["ip", "netns", "exec", "ns-h2"] and argv[4] == "/opt/py" and on_stdin
    with pytest.raises(ValueError, match="launcher must be"):
        hosts.launch_commands(["h2"], "telnet", "tcp://10.0.0.1:1", "f")
    with pytest.raises(ValueError, match="launcher must be"):
        dragon_nb.Runtime(hosts=["h2"], listen="127.0.0.1", launcher="telnet")


@pytest.mark.timeout(60)
def test_dragon_nb_dry_run_shows_the_launch_commands_and_starts_nothing(env_with_pkg):
    proc = subprocess.run([*dragon_nb_command(), "info", "--hosts", "n1,n2", "--launcher",
                           "srun", "--listen", "127.0.0.1", "--dry-run"], env=env_with_pkg,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith("srun --nodes=2 --ntasks-per-node=1 --nodelist=n1,n2 "), \
        describe(proc)
    assert "agent --connect 'tcp://127.0.0.1:<port>' --key-file" in proc.stdout


@pytest.mark.timeout(60)
def test_an_agent_without_a_key_or_with_a_wrong_one_says_why(tmp_path, env_with_pkg):
    agent = [*dragon_nb_command(), "agent", "--connect", "tcp://127.0.0.1:9"]
    proc = subprocess.run(agent, env=env_with_pkg, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "needs the runtime's key" in proc.stderr, describe(proc)
    key = tmp_path / "k"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        proc = subprocess.run([*dragon_nb_command(), "agent", "--connect", rt.tcp_address,
                               "--key-file", str(key)], env=env_with_pkg,
                              capture_output=True, text=True, timeout=40)
        assert proc.returncode == 2 and "did not welcome" in proc.stderr, describe(proc)
        assert len(rt.nodes(refresh=True)) == 1


def dashboard_rows(dash, timeout=10.0, until=lambda rows: True):
    import time
    deadline = time.monotonic() + timeout
    while True:
        dash.refresh()
        rows = dash.rows()
        if until(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_an_agent_joining_by_hand_is_a_node_until_it_leaves(env_with_pkg):
    from dragon_nb.widgets.live import Dashboard
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1") as rt:
        dash = Dashboard(rt)
        assert [r.node for r in dashboard_rows(dash)] == [0]
        agent = subprocess.Popen([*dragon_nb_command(), "agent", "--connect", rt.tcp_address,
                                  "--key-file", rt.connection_file, "--name", "extra"],
                                 env=env_with_pkg)
        try:
            import time
            deadline = time.monotonic() + 30
            while len([n for n in rt.nodes(refresh=True) if n["alive"]]) < 2:
                assert time.monotonic() < deadline, "the agent did not join"
                time.sleep(0.1)
            joined = [n for n in rt.nodes() if n["name"] == "extra"][0]
            assert joined["remote"] and joined["num_cpus"] == len(os.sched_getaffinity(0))
            assert joined["physical_mem"] == psutil.virtual_memory().total
            with dragon_nb.Pool(1, nodes=[joined["id"]], runtime=rt) as p:
                assert p.map(abs, [-5]) == [5]
            rows = dashboard_rows(dash, until=lambda rows: len(rows) == 2)
            assert [r.node for r in rows] == [0, joined["id"]] and not any(r.lost for r in rows)
            assert "2 node(s)" in dash.title.value
        finally:
            agent.terminate()
            agent.wait(20)
        assert agent.returncode == 0
        deadline = time.monotonic() + 10
        while [n for n in rt.nodes(refresh=True) if n["name"] == "extra" and n["alive"]]:
            assert time.monotonic() < deadline, "the node was not marked lost"
            time.sleep(0.1)
        rows = dashboard_rows(dash, until=lambda rows: any(r.lost for r in rows))
        assert [r.node for r in rows if r.lost] == [joined["id"]]
        assert f"lost: node {joined['id']}" in dash.title.value
        dash.finish()


def test_the_magic_shows_launch_commands_with_dry_run(capsys):
    from IPython.testing import globalipapp
    ip = globalipapp.start_ipython() or globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_line_magic("dragon", "start --hosts a,b --listen 127.0.0.1 --dry-run")
    out = capsys.readouterr().out
    assert out.count("ssh -o BatchMode=yes") == 2 and "--name b" in out
    assert dragon_nb.runtime.get_runtime(auto_start=False) is None


def test_the_copy_of_the_key_for_srun_agents_is_0600_and_goes_with_the_runtime(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGON_NB_SHARED_DIR", str(tmp_path / "shared"))
    rundir = tmp_path / "dnb-0-abc"
    rundir.mkdir()
    conn = network.write_connection_file(str(rundir / "connection.json"), b"k" * 32)
    copy = hosts.shared_copy(conn)
    assert copy == hosts.shared_copy_path(str(rundir))
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    assert network.read_key_file(copy)[0] == b"k" * 32
    from dragon_nb.runtime.client import _finalize
    _finalize(None, None, str(rundir))          # what runs when a runtime ends, however
    assert not os.path.exists(copy) and not rundir.exists()


@pytest.mark.timeout(60)
def test_the_head_takes_the_port_it_is_given():
    import socket
    with socket.socket() as s:              # a port free right now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dragon_nb.Runtime(nodes=1, listen="127.0.0.1", port=port) as rt:
        assert rt.tcp_address == f"tcp://127.0.0.1:{port}"
        with dragon_nb.Pool(1, runtime=rt) as p:
            assert p.map(abs, [-3]) == [3]


@pytest.mark.timeout(60)
def test_a_pid_space_is_shared_by_processes_of_one_pid_namespace_and_no_other():
    """What decides whether a pid may be looked at here: not the hostname."""
    import shutil
    import sys
    ask = [sys.executable, "-c",
           "from dragon_nb.runtime import network; print(network.pid_space())"]
    here = network.pid_space()
    assert subprocess.run(ask, capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip() == here
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a PID namespace of its own needs root and unshare")
    other = subprocess.run(["unshare", "--pid", "--fork", *ask], capture_output=True,
                           text=True, timeout=30, check=True).stdout.strip()
    assert other and other != here
    assert other.split("/")[0] == here.split("/")[0]        # the same kernel boot
