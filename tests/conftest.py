"""Shared fixtures: a runtime per module, and a check that nothing is left behind.

Every test module ends with no descendant process of the test run still alive
(except the stdlib's own resource tracker, which lives as long as Python)
and no runtime directory left on disk.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import dragon_nb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """Each test session keeps its runtime directories in a folder of its own,
    so leftovers are ours to find (and another session's are not)."""
    if "DRAGON_NB_TMPDIR" not in os.environ:
        os.environ["DRAGON_NB_TMPDIR"] = tempfile.mkdtemp(prefix="dnb-tests-")
        config._dnb_tmpdir = os.environ["DRAGON_NB_TMPDIR"]


def pytest_unconfigure(config):
    folder = getattr(config, "_dnb_tmpdir", None)
    if folder:
        os.environ.pop("DRAGON_NB_TMPDIR", None)
        try:
            os.rmdir(folder)          # empty unless something was left behind
        except OSError:
            pass


def _ours(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" not in cmd


def leftover_processes(timeout: float = 10.0) -> list:
    """Descendants of this process still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in psutil.Process().children(recursive=True)
                 if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and _ours(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def runtime_leftovers(rtdir: str, timeout: float = 10.0):
    """Processes whose command line names ``rtdir`` (a runtime's head and agents)
    and entries in ``rtdir``, still there after ``timeout`` seconds. For runs in a
    subprocess, whose runtimes are not our descendants."""
    deadline = time.monotonic() + timeout
    while True:
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if rtdir in " ".join(p.info["cmdline"] or ()) and \
                        p.status() != psutil.STATUS_ZOMBIE:
                    procs.append(p.info["cmdline"])
            except psutil.Error:
                pass
        entries = os.listdir(rtdir)
        if (not procs and not entries) or time.monotonic() > deadline:
            return procs, entries
        time.sleep(0.1)


def run_checked(cmd, cwd, rtdir, env, extra_env=None, timeout=45):
    """Run ``cmd`` as a user would, its runtimes kept in ``rtdir``; then check that
    none of its runtime processes or directories is left. Runtime settings of
    this session's environment do not leak in, except those in ``extra_env``."""
    env = dict(env, DRAGON_NB_TMPDIR=rtdir, **(extra_env or {}))
    for var in ("DRAGON_NB_NODES", "DRAGON_NB_WORKERS_PER_NODE", "DRAGON_NB_CPUS_PER_NODE"):
        if not extra_env or var not in extra_env:
            env.pop(var, None)
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        procs, entries = runtime_leftovers(rtdir)
        assert not procs, f"runtime processes outlived {cmd}: {procs}"
        assert not entries, f"runtime directories left behind by {cmd}: {entries}"
    return proc


def describe(proc) -> str:
    """A finished subprocess, for assertion messages."""
    return f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@contextlib.contextmanager
def short_dirs(prefix: str, name: str):
    """(a folder called ``name``, a runtime folder), under one short temporary
    folder (ipc socket paths must stay short), removed afterwards."""
    top = tempfile.mkdtemp(prefix=prefix)
    work, rtdir = os.path.join(top, name), os.path.join(top, "rt")
    os.mkdir(work)
    os.mkdir(rtdir)
    try:
        yield work, rtdir
    finally:
        shutil.rmtree(top, ignore_errors=True)


def dragon_nb_command() -> list:
    """The installed ``dragon-nb`` command (or the module, from a plain checkout)."""
    exe = os.path.join(os.path.dirname(sys.executable), "dragon-nb")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "dragon_nb.cli"]


def runtime_dirs() -> set:
    base = os.environ.get("DRAGON_NB_TMPDIR") or tempfile.gettempdir()
    return set(glob.glob(os.path.join(base, f"dnb-{os.getuid()}-*")))


def shm_files() -> set:
    """This user's runtimes' named semaphores and segments in /dev/shm (their names
    start with the runtime folder's name, see ``launch.shm_prefix``)."""
    return set(glob.glob(f"/dev/shm/dnb-{os.getuid()}-*")
               + glob.glob(f"/dev/shm/sem.dnb-{os.getuid()}-*"))


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    dirs_before, shm_before = runtime_dirs(), shm_files()
    yield
    dragon_nb.stop()
    alive = leftover_processes()
    assert not alive, f"processes outlived the runtime: {[p.cmdline() for p in alive]}"
    # a runtime whose client was killed (a kernel, say) is no longer our descendant:
    # give its head the same 10 seconds to clean up
    deadline = time.monotonic() + 10
    while (runtime_dirs() - dirs_before) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = runtime_dirs() - dirs_before
    assert not left, f"runtime directories left behind: {left}"
    shm_left = shm_files() - shm_before
    assert not shm_left, f"shared memory left behind: {sorted(shm_left)[:10]}"


@pytest.fixture(scope="module")
def runtime():
    """A two-node runtime shared by the tests of one module."""
    dragon_nb.stop()
    rt = dragon_nb.start(nodes=2)
    yield rt
    dragon_nb.stop()


@pytest.fixture
def env_with_pkg():
    """Environment for subprocesses that must import this checkout's dragon_nb."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


PYTHON = sys.executable


# --- waiting on a condition instead of sleeping (issue 12) ----------------------------

def wait_until(predicate, timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.05):
    """Poll ``predicate`` until it returns something true, and return that; fail
    the test, saying ``what`` did not happen, if ``timeout`` seconds pass first.
    ``what`` may be a callable, called for the message (to show the state then)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what() if callable(what) else what}: not within {timeout} s")
        time.sleep(interval)


def thread_in(thread, *where: str) -> bool:
    """True if ``thread`` (a running threading.Thread of this process) is, right now,
    inside one of the functions ``where`` names: ``"file.py:function"``, matched
    against the end of each of its frames' ``path:function``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        here = f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
        if any(here.endswith(w) for w in where):
            return True
        frame = frame.f_back
    return False
