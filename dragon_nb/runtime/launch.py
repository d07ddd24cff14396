"""Starting runtime processes so that none of them can outlive its parent.

Two mechanisms, each where it is safe:

* a *lifeline pipe*: the parent keeps the write end, the child polls the read
  end and exits on EOF. Works whatever thread started the child, so the
  client (a kernel full of threads) uses it to tie the head to itself, and
  the head uses it for agents;
* ``PR_SET_PDEATHSIG``: the kernel kills the child when the parent *thread*
  exits. Agents fork workers from their only thread, so it is exact there.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

_PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


IPC_PATH_MAX = 107          # sun_path; our socket names add up to ~40 characters


def make_runtime_dir() -> str:
    """A private (0700) directory for this runtime's ipc sockets and files."""
    base = os.environ.get("DRAGON_NB_TMPDIR") or tempfile.gettempdir()
    path = os.path.join(base, f"dnb-{os.getuid()}-{uuid.uuid4().hex[:10]}")
    if len(path) + 40 > IPC_PATH_MAX:
        raise ValueError(f"the runtime directory {path!r} is too long for ipc socket paths "
                         f"(at most {IPC_PATH_MAX - 40} characters): set DRAGON_NB_TMPDIR "
                         f"to a shorter folder, such as /tmp")
    os.mkdir(path, 0o700)
    return path


SHM_DIR = "/dev/shm"


def shm_prefix(rundir: str) -> str:
    """What the names of a runtime's shared-memory objects start with (segments
    ``/dev/shm/<prefix>*``, semaphores ``/dev/shm/sem.<prefix>*``): its folder's name."""
    return os.path.basename(os.path.abspath(rundir)) + "-"


def shm_files(rundir: str) -> list[str]:
    prefix = shm_prefix(rundir)
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [os.path.join(SHM_DIR, n) for n in names
            if n.startswith(prefix) or n.startswith("sem." + prefix)]


def remove_runtime_dir(path: str) -> None:
    """The runtime's folder, and whatever its processes left in shared memory."""
    shutil.rmtree(path, ignore_errors=True)
    for leftover in shm_files(path):
        try:
            os.unlink(leftover)
        except OSError:
            pass


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_child(module: str, args: list[str], *, lifeline: bool = True,
                env: dict | None = None) -> tuple[subprocess.Popen, int | None]:
    """Start ``python -m module args`` tied to this process.

    Returns the Popen and the write end of its lifeline (keep it open for as
    long as the child may live; closing it tells the child to exit).
    """
    fds = ()
    wfd = None
    if lifeline:
        rfd, wfd = os.pipe()
        os.set_inheritable(rfd, True)
        fds = (rfd,)
        args = [*args, "--lifeline-fd", str(rfd)]
    child_env = dict(os.environ if env is None else env)
    # the child imports dragon_nb from wherever this process did
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_root, child_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        python_command(module, *args), pass_fds=fds, env=child_env,
        stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    if lifeline:
        os.close(fds[0])
        os.set_inheritable(wfd, False)
    return proc, wfd


def caller_environment() -> dict:
    """What a service process needs to unpickle the caller's objects by reference."""
    return {"sys_path": list(sys.path), "cwd": os.getcwd()}


def adopt_caller_environment(env: dict) -> None:
    """In a service process: take the caller's ``sys.path`` and working directory."""
    for path in reversed(env.get("sys_path", ())):
        if path not in sys.path:
            sys.path.insert(0, path)
    cwd = env.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
