"""The ``dragon-nb`` command, run as a user runs it (a subprocess).

Each run gets its own DRAGON_NB_TMPDIR so the test can check that no runtime
process or directory outlived the command (runtime processes start in their
own session, so they are not children of the test run).
"""
from __future__ import annotations

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
