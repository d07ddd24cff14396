"""multiprocessing's ``Process`` (start method "dragon") inside a real ipykernel,
driven through jupyter_client as a notebook would.

Checks what a user sees: a Process's prints appear under the cell that started
it, also when they come while a later cell runs; killing the kernel (kill -9)
while a Process sleeps leaves no process of the runtime and no file.
"""
import os
import queue
import shutil
import signal
import tempfile
import time

import psutil
import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")
from jupyter_client.manager import start_new_kernel  # noqa: E402

from conftest import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SETUP = """
%load_ext dragon_nb
%dragon start --nodes 2
import multiprocessing as mp, os, time, dragon_nb
mp.set_start_method("dragon", force=True)
"""


@pytest.fixture
def rundirs():
    """A folder of the kernel's own for its runtime directories: every process the
    kernel starts inherits ``DRAGON_NB_TMPDIR`` naming it, which is how the test
    finds them (short: ipc socket paths must fit in 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="dnb-mpk-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def kernel(env_with_pkg, tmp_path, rundirs):
    env = dict(env_with_pkg, DRAGON_NB_TMPDIR=rundirs)
    env.pop("DRAGON_NB_PROGRESS", None)
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(tmp_path))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


class Iopub:
    """Every iopub message the kernel sends, in order, whatever cell it belongs to."""

    def __init__(self, kc):
        self.kc = kc
        self.msgs = []

    def read_until(self, done, timeout, what):
        """Read messages until ``done(self.msgs)`` is true; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not done(self.msgs):
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout} s; got {self.summary()}")
            try:
                self.msgs.append(self.kc.get_iopub_msg(timeout=0.5))
            except queue.Empty:
                pass

    def of(self, msg_id) -> list:
        return [m for m in self.msgs if m["parent_header"].get("msg_id") == msg_id]

    def idle(self, msg_id) -> bool:
        return any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                   for m in self.of(msg_id))

    def text(self, msg_id, stream="stdout") -> str:
        return "".join(m["content"]["text"] for m in self.of(msg_id)
                       if m["msg_type"] == "stream" and m["content"]["name"] == stream)

    def summary(self) -> list:
        return [(m["parent_header"].get("msg_id", "")[-6:], m["msg_type"],
                 m["content"].get("text") or m["content"].get("execution_state")
                 or m["content"].get("ename")) for m in self.msgs]


def shell_reply(kc, msg_id, timeout):
    """The reply to ``msg_id`` on the shell channel, past any kernel_info replies
    (start_new_kernel may ask for kernel_info more than once and read one answer)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["msg_type"] != "kernel_info_reply":
            assert reply["parent_header"].get("msg_id") == msg_id, reply
            return reply["content"]


def run(kc, iopub, code, timeout=60):
    """Run a cell to its end; its msg_id (the iopub messages stay in ``iopub``)."""
    msg_id = kc.execute(code)
    iopub.read_until(lambda _: iopub.idle(msg_id), timeout, f"the end of the cell {code!r}")
    reply = shell_reply(kc, msg_id, timeout)
    assert reply["status"] == "ok", (reply, iopub.text(msg_id, "stderr"))
    return msg_id


def test_a_process_prints_under_the_cell_that_started_it_even_while_a_later_cell_runs(kernel):
    km, kc = kernel
    iopub = Iopub(kc)
    run(kc, iopub, SETUP)
    # a target defined in a cell (it travels by value); it prints when told to
    run(kc, iopub, "def hello(word, go=None):\n"
                   "    if go is not None:\n"
                   "        go.get(timeout=30)\n"
                   "    print('hello', word, 'from', os.getpid())\n")
    # cell A: one process printing at once (joined here), one that waits for cell B
    cell_a = run(kc, iopub, "p = mp.Process(target=hello, args=('now',))\n"
                            "p.start()\n"
                            "p.join(30)\n"
                            "print('A: exit code', p.exitcode)\n"
                            "go = mp.Queue()\n"
                            "late = mp.Process(target=hello, args=('later', go))\n"
                            "late.start()\n"
                            "print('A: late process started')\n")
    text_a = iopub.text(cell_a)
    assert text_a.index("hello now from") < text_a.index("A: exit code 0"), text_a
    assert "hello later" not in text_a, text_a

    # cell B: lets the waiting process print, and waits for it to end
    cell_b = run(kc, iopub, "go.put('go')\n"
                            "late.join(30)\n"
                            "print('B: exit code', late.exitcode)\n")
    assert iopub.text(cell_b) == "B: exit code 0\n", iopub.summary()
    # the late print came while cell B ran (join returns once the process's prints
    # are out), and it is cell A's
    iopub.read_until(lambda _: "hello later" in iopub.text(cell_a), 10,
                     "the late print under cell A")
    late = next(i for i, m in enumerate(iopub.msgs)
                if m["msg_type"] == "stream" and "hello later" in m["content"]["text"])
    b_busy = next(i for i, m in enumerate(iopub.msgs)
                  if m["parent_header"].get("msg_id") == cell_b
                  and m["msg_type"] == "status" and m["content"]["execution_state"] == "busy")
    b_idle = next(i for i, m in enumerate(iopub.msgs)
                  if m["parent_header"].get("msg_id") == cell_b
                  and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
    assert b_busy < late < b_idle, iopub.summary()
    assert iopub.msgs[late]["parent_header"]["msg_id"] == cell_a
    # nothing of it on stderr, in either cell
    assert not iopub.text(cell_a, "stderr") and not iopub.text(cell_b, "stderr"), \
        iopub.summary()


def processes_with_env(name: str, value: str) -> list:
    """Live processes, anywhere, whose environment has ``name=value``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(name) == value and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_killing_the_kernel_while_a_process_sleeps_leaves_no_runtime_process(kernel,
                                                                             rundirs):
    km, kc = kernel
    iopub = Iopub(kc)
    run(kc, iopub, SETUP)
    cell = run(kc, iopub, "def nap(started):\n"
                          "    started.put(os.getpid())\n"
                          "    time.sleep(60)\n"
                          "started = mp.Queue()\n"
                          "sleeper = mp.Process(target=nap, args=(started,))\n"
                          "sleeper.start()\n"
                          "assert started.get(timeout=30) == sleeper.pid\n"
                          "print(sleeper.pid, dragon_nb.get_runtime().rundir)\n")
    pid, rundir = iopub.text(cell).split()
    sleeper = psutil.Process(int(pid))           # the nodes are virtual: pids of this machine
    assert sleeper.is_running() and sleeper.status() != psutil.STATUS_ZOMBIE
    assert os.path.dirname(rundir) == rundirs, rundir

    kernel_proc = psutil.Process(km.provisioner.process.pid)
    ours = processes_with_env("DRAGON_NB_TMPDIR", rundirs)
    assert kernel_proc in ours and sleeper in ours, [p.cmdline() for p in ours]
    # kernel, head, two agents, an object host (the queue's), the sleeping process
    assert len(ours) >= 6, [p.cmdline() for p in ours]

    # the kernel is killed while a cell waits on the sleeping process
    waiting = kc.execute("sleeper.join(60)")
    iopub.read_until(lambda _: any(m["msg_type"] == "status" for m in iopub.of(waiting)), 10,
                     "the join cell running")
    os.kill(kernel_proc.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(ours, timeout=10)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    assert not processes_with_env("DRAGON_NB_TMPDIR", rundirs)
    wait_until(lambda: not os.path.exists(rundir), 10, f"{rundir} removed")
    assert not os.listdir(rundirs), os.listdir(rundirs)
