"""The tutorial notebooks still run top to bottom and still show what they store.

Runs nbval over notebooks/ in a subprocess: every code cell is run in a fresh
kernel and its output compared with the output saved in the notebook, after
the sanitizers of notebooks/sanitize.cfg (times, rates, pids, memory, ...).
notebooks/conftest.py lets nbval apply display updates, as Jupyter does, so
the final tables that progress widgets leave behind are compared too.

Then checks that the kernels left nothing behind: no process that inherited
this run's environment (kernels, heads, agents, workers) and no runtime
directory.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes_with_env(name: str, value: str) -> list:
    """Processes, anywhere, whose environment has ``name=value``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(name) == value and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(360)
def test_notebooks_run_and_match_their_stored_outputs(env_with_pkg):
    # a short folder of its own: ipc socket paths must fit in 107 bytes
    rundirs = tempfile.mkdtemp(prefix="dnb-nb-")
    try:
        env = dict(env_with_pkg)
        env["DRAGON_NB_TMPDIR"] = rundirs       # marks every process the kernels start
        env.pop("DRAGON_NB_PROGRESS", None)
        cmd = [sys.executable, "-m", "pytest", "--nbval", "notebooks/",
               "--nbval-sanitize-with", "notebooks/sanitize.cfg", "-p", "no:cacheprovider",
               "-q", "--color=no"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        report = proc.stdout[-6000:] + proc.stderr[-2000:]
        assert proc.returncode == 0, f"nbval failed:\n{report}"
        assert " passed" in proc.stdout, report

        deadline = time.monotonic() + 10
        while (left := processes_with_env("DRAGON_NB_TMPDIR", rundirs)) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running: {[p.cmdline() for p in left]}"
        assert not os.listdir(rundirs), f"runtime directories left: {os.listdir(rundirs)}"
    finally:
        shutil.rmtree(rundirs, ignore_errors=True)


def test_stored_outputs_carry_no_path_of_the_machine_that_ran_them():
    # error outputs keep their tracebacks; the checkout's location must not leak into them
    for name in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
        if name.endswith(".ipynb"):
            with open(os.path.join(ROOT, "notebooks", name)) as f:
                assert ROOT not in f.read(), f"{name} stores the path {ROOT}"
