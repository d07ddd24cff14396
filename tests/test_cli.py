"""The ``dragon-nb`` command, run as a user runs it (a subprocess), and
``import dragon_nb`` as a script in a terminal does it. Mistakes in the
options, which stop the command before any runtime starts, are checked by
calling ``cli.main`` in this process.

Each run gets its own DRAGON_NB_TMPDIR so the test can check that no runtime
process or directory outlived the command (runtime processes start in their
own session, so they are not children of the test run).
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import describe, dragon_nb_command, run_checked, short_dirs

PYTHON = sys.executable
RUN_TIMEOUT = 45


@pytest.fixture
def workdir():
    """(a directory for scripts, runtime tmpdir)."""
    with short_dirs("dnbc-", "work") as dirs:
        yield dirs


def dragon_nb(args, cwd, rtdir, env):
    return run_checked([*dragon_nb_command(), *args], cwd, rtdir, env, timeout=RUN_TIMEOUT)


@pytest.mark.timeout(60)
def test_info_prints_a_table_of_the_nodes(workdir, env_with_pkg):
    work, rtdir = workdir
    proc = dragon_nb(["info", "--nodes", "3"], work, rtdir, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["node", "name", "host", "cpus", "memory", "state"], describe(proc)
    table = lines[1:lines.index("")] if "" in lines else lines[1:]
    rows = [line.split() for line in table]
    assert [r[0] for r in rows] == ["0", "1", "2"], describe(proc)
    assert [r[1] for r in rows] == ["node0", "node1", "node2"], describe(proc)
    assert all(r[-1] == "up" for r in rows), describe(proc)
    m = re.search(r"^3 node\(s\), (\d+) core\(s\) in all$", proc.stdout, re.M)
    assert m and int(m.group(1)) >= 1, describe(proc)


# -- run -----------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""\
    import dragon
    import os
    import sys
    from multiprocessing import set_start_method, Pool, cpu_count
    from dragon.native.machine import System


    def square_and_pid(x):
        return x * x, os.getpid()


    if __name__ == "__main__":
        set_start_method("dragon")
        with Pool(2) as p:
            out = p.map(square_and_pid, range(10))
        print("argv=" + repr(sys.argv[1:]))
        print("squares=" + repr([sq for sq, _ in out]))
        print("in_workers=" + repr(os.getpid() not in {pid for _, pid in out}))
        print("nnodes=" + repr(System().nnodes))
        print("module=" + dragon.__name__)
    """)


def parse(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def check_script_output(proc, argv, nnodes):
    assert proc.returncode == 0, describe(proc)
    out = parse(proc.stdout)
    assert out.get("squares") == repr([x * x for x in range(10)]), describe(proc)
    assert out.get("in_workers") == "True", describe(proc)
    assert out.get("module") == "dragon_nb", describe(proc)
    assert out.get("argv") == repr(argv), describe(proc)
    assert out.get("nnodes") == repr(nnodes), describe(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--nodes", "2", "script.py"], ["script.py", "--nodes", "2"]],
                         ids=["options_before_script", "options_after_script"])
def test_run_script_with_options_before_or_after_it(args, workdir, env_with_pkg):
    """``dragon-nb run script.py [--nodes N] ... [-- script args]`` is the documented
    form; options before the script work too, and the script gets only its own."""
    work, rtdir = workdir
    Path(work, "script.py").write_text(SCRIPT)
    proc = dragon_nb(["run", *args, "--", "arg1"], work, rtdir, env_with_pkg)
    check_script_output(proc, ["arg1"], 2)


@pytest.mark.timeout(60)
def test_run_missing_script(workdir, env_with_pkg):
    work, rtdir = workdir
    proc = dragon_nb(["run", "no_such_script.py", "--nodes", "2"], work, rtdir, env_with_pkg)
    assert proc.returncode == 2, describe(proc)
    assert "no_such_script.py" in proc.stderr, describe(proc)
    assert "no such script" in proc.stderr.lower(), describe(proc)


@pytest.mark.timeout(60)
def test_run_script_that_raises(workdir, env_with_pkg):
    work, rtdir = workdir
    Path(work, "boom.py").write_text(textwrap.dedent("""\
        import dragon
        from multiprocessing import set_start_method, Pool

        if __name__ == "__main__":
            set_start_method("dragon")
            with Pool(1) as p:
                assert p.map(abs, [-1]) == [1]
            raise ValueError("boom from the script")
        """))
    proc = dragon_nb(["run", "boom.py"], work, rtdir, env_with_pkg)
    assert proc.returncode != 0, describe(proc)
    assert "ValueError: boom from the script" in proc.stderr, describe(proc)


@pytest.mark.timeout(60)
def test_run_script_that_exits_with_a_message(workdir, env_with_pkg):
    """``sys.exit("msg")``: exit code 1 and the message on stderr, as with python."""
    work, rtdir = workdir
    Path(work, "bye.py").write_text('import sys\nsys.exit("bye from the script")\n')
    plain = subprocess.run([PYTHON, "bye.py"], cwd=work, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    assert plain.returncode == 1 and "bye from the script" in plain.stderr
    proc = dragon_nb(["run", "bye.py"], work, rtdir, env_with_pkg)
    assert proc.returncode == 1, describe(proc)
    assert "bye from the script" in proc.stderr, describe(proc)


@pytest.mark.timeout(60)
def test_run_script_that_exits_with_a_code(workdir, env_with_pkg):
    work, rtdir = workdir
    Path(work, "three.py").write_text('import sys\nsys.exit(3)\n')
    proc = dragon_nb(["run", "three.py"], work, rtdir, env_with_pkg)
    assert proc.returncode == 3, describe(proc)


# -- the runtime options -------------------------------------------------------------
def cli_main(capsys, *args):
    """``dragon-nb ARGS`` in this process, for what stops before a runtime starts:
    (exit code, stdout, stderr)."""
    from dragon_nb import cli
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_plain_text_listing_every_command(capsys):
    code, out, err = cli_main(capsys, "--help")
    assert code == 0, err
    assert "``" not in out, out
    for command in ("run", "info", "demo", "agent"):
        assert f"    {command} " in out, out


def test_run_help_says_where_the_scripts_arguments_go(capsys):
    code, out, err = cli_main(capsys, "run", "--help")
    assert code == 0, err
    assert "usage: dragon-nb run script.py [options] [-- args]" in out, out
    assert "--port P" in out and "--listen ADDR" in out and "``" not in out, out


BAD_OPTIONS = {
    "--nodes 0": "--nodes must be at least 1, not 0",
    "--cpus-per-node 0": "--cpus-per-node must be at least 1, not 0",
    "--port 5555": "--port is the head's TCP port for other hosts: give --hosts or --listen",
    "--listen 127.0.0.1 --port 99999": "--port must be a TCP port",
    "--launcher srun": "--launcher says how agents start on --hosts",
    "--timeout 0": "--timeout must be a positive number of seconds",
}


@pytest.mark.parametrize("command", ["info", "run"])
@pytest.mark.parametrize("bad", BAD_OPTIONS)
def test_a_runtime_option_that_cannot_start_a_runtime_is_an_error_naming_the_flag(
        capsys, command, bad):
    script = ["script.py"] if command == "run" else []
    code, out, err = cli_main(capsys, command, *script, *bad.split())
    assert code == 2, (out, err)
    assert f"dragon-nb {command}: error: {BAD_OPTIONS[bad]}" in err, err


def test_demo_refuses_runtime_options_it_does_not_use(capsys):
    code, out, err = cli_main(capsys, "demo", "--hosts", "a,b")
    assert code == 2, (out, err)
    assert "unrecognized arguments: --hosts a,b" in err, err


def test_dry_run_shows_the_launch_commands_with_the_port_and_starts_nothing(capsys):
    code, out, err = cli_main(capsys, "info", "--hosts", "a,b", "--listen", "127.0.0.1",
                              "--port", "5555", "--dry-run")
    assert code == 0, err
    assert out.count("--connect tcp://127.0.0.1:5555") == 2, out


@pytest.mark.timeout(60)
def test_info_with_listen_and_port_binds_the_head_there(workdir, env_with_pkg):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work, rtdir = workdir
    proc = dragon_nb(["info", "--nodes", "1", "--listen", "127.0.0.1", "--port", str(port)],
                     work, rtdir, env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    assert f"other hosts join with: dragon-nb agent --connect tcp://127.0.0.1:{port} " \
        in proc.stdout, describe(proc)


# -- import dragon_nb, as a script in a terminal does ---------------------------------
IMPORTED = ("import dragon_nb, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('dragon_nb')))")


def test_import_in_a_terminal_does_not_import_the_pool(env_with_pkg):
    proc = subprocess.run([PYTHON, "-c", IMPORTED], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=dict(env_with_pkg, DRAGON_NB_PROGRESS="text"))
    assert proc.returncode == 0, describe(proc)
    modules = ast.literal_eval(proc.stdout)
    assert "dragon_nb" in modules, describe(proc)
    assert not [m for m in modules if m == "dragon_nb.pool" or m.startswith("dragon_nb.pool.")], \
        describe(proc)


@pytest.mark.timeout(60)
def test_a_pool_map_in_a_terminal_still_shows_the_text_progress_bar(workdir, env_with_pkg):
    work, rtdir = workdir
    Path(work, "bars.py").write_text(textwrap.dedent("""\
        import sys
        import dragon_nb
        assert "dragon_nb.pool" not in sys.modules
        with dragon_nb.start(nodes=2), dragon_nb.Pool(2) as p:
            p.map(abs, range(300), chunksize=1)
        """))
    proc = run_checked([PYTHON, "bars.py"], work, rtdir, env_with_pkg,
                       extra_env={"DRAGON_NB_PROGRESS": "text"}, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, describe(proc)
    assert "map(abs)" in proc.stderr and "300/300" in proc.stderr, describe(proc)


def test_every_error_class_is_exported_from_the_package_on_first_use(env_with_pkg):
    code = textwrap.dedent("""\
        import json
        import dragon_nb
        loaded_at_import = "CallCancelledError" in vars(dragon_nb)
        from dragon_nb import errors
        print(json.dumps({
            "loaded_at_import": loaded_at_import,
            "names": errors.__all__,
            "not_exported": [n for n in errors.__all__ if n not in dragon_nb.__all__
                             or getattr(dragon_nb, n) is not getattr(errors, n)]}))
        """)
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=env_with_pkg)
    assert proc.returncode == 0, describe(proc)
    found = json.loads(proc.stdout)
    assert {"DragonNbError", "CallCancelledError"} <= set(found["names"]), describe(proc)
    assert found["not_exported"] == [], describe(proc)
    assert found["loaded_at_import"] is False, describe(proc)
