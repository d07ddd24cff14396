"""dragon-nb inside a real ipykernel, driven through jupyter_client as a notebook would.

Checks what a user sees: the progress widget updates while the cell is still
running and leaves its final state as HTML; the interrupt button cancels the
work and the pool stays usable; killing or restarting the kernel leaves no
runtime process and no file.
"""
import os
import queue
import signal
import time

import psutil
import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipywidgets")
pytest.importorskip("ipykernel")
from jupyter_client.manager import start_new_kernel  # noqa: E402

from conftest import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SETUP = """
%load_ext dragon_nb
%dragon start --nodes 2
import os, time, dragon_nb
def slow(x):
    time.sleep(0.05)
    return x * x
MARKS = os.getcwd()
def forever(x):
    open(os.path.join(MARKS, f"forever-{x}"), "w").close()   # the test sees it running
    time.sleep(60)
    return x
pool = dragon_nb.Pool(2)
"""


@pytest.fixture
def kernel(env_with_pkg, tmp_path):
    km, kc = start_new_kernel(kernel_name="python3", env=env_with_pkg, cwd=str(tmp_path))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


def execute(kc, code, timeout=60):
    """Run ``code``; return (reply content, iopub messages with their arrival times)."""
    msg_id = kc.execute(code)
    msgs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append((time.monotonic(), msg))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    else:
        raise AssertionError(f"cell did not finish in {timeout} s: {code!r}")
    reply = shell_reply(kc, timeout)
    assert reply["parent_header"].get("msg_id") == msg_id, reply
    return reply["content"], msgs


def shell_reply(kc, timeout):
    """The next reply on the shell channel, past any kernel_info replies: when the
    kernel starts slowly, start_new_kernel asks for kernel_info more than once and
    reads one answer, leaving the others queued before the replies to our cells."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["msg_type"] != "kernel_info_reply":
            return reply


def widget_values(msgs) -> list:
    """The ``value`` of every widget update the kernel sent for a cell."""
    return [m["content"]["data"]["state"]["value"] for _, m in msgs
            if m["msg_type"] == "comm_msg"
            and m["content"]["data"].get("method") == "update"
            and "value" in m["content"]["data"].get("state", {})]


def final_html(msgs) -> str:
    """The HTML a live view left behind in the cell (its last display update)."""
    finals = [m for _, m in msgs if m["msg_type"] == "update_display_data"]
    assert finals, "the view never replaced itself with its final table"
    return finals[-1]["content"]["data"]["text/html"]


def kernel_family(km) -> list:
    kernel = psutil.Process(km.provisioner.process.pid)
    return [kernel, *kernel.children(recursive=True)]


def test_progress_widget_updates_while_the_cell_runs(kernel):
    km, kc = kernel
    reply, _ = execute(kc, SETUP)
    assert reply["status"] == "ok", reply
    reply, msgs = execute(kc, "r = pool.map(slow, range(60), chunksize=1)\nlen(r)")
    assert reply["status"] == "ok", reply
    # task-count bars: widget updates carrying a "value", seen before the cell ended
    values = widget_values(msgs)
    assert len(set(values)) >= 3, values
    # the final state stays in the notebook as a static table
    assert "map(slow): 60/60 items" in final_html(msgs)


def test_interrupt_cancels_the_work_and_the_pool_stays_usable(kernel, tmp_path):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    msg_id = kc.execute("pool.map(forever, range(4), chunksize=1)")
    # the interrupt comes while the map runs: both workers are in forever() (each
    # has written its file, in the kernel's folder), so the cell waits in the map
    wait_until(lambda: len(list(tmp_path.glob("forever-*"))) >= 2, 30,
               lambda: f"both workers running forever(): {sorted(os.listdir(tmp_path))}")
    km.interrupt_kernel()
    reply = shell_reply(kc, 30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # had the running tasks not been interrupted, both workers would sleep another minute
    reply, _ = execute(kc, "assert pool.map_async(slow, range(6)).get(timeout=10) == "
                           "[0, 1, 4, 9, 16, 25]", timeout=30)
    assert reply["status"] == "ok", reply


def test_killing_the_kernel_leaves_no_runtime_behind(kernel):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    reply, msgs = execute(kc, "print(dragon_nb.get_runtime().rundir)")
    rundir = next(m["content"]["text"].strip() for _, m in msgs if m["msg_type"] == "stream")
    family = kernel_family(km)
    assert len(family) >= 1 + 1 + 2 + 2          # kernel, head, agents, workers
    os.kill(family[0].pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not os.path.exists(rundir)


def test_restarting_the_kernel_stops_its_runtime(kernel):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    family = kernel_family(km)[1:]                  # the runtime's processes
    km.restart_kernel(now=False)
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_worker_prints_appear_under_the_cell_that_made_the_call(kernel):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    code = ("def chatty(x):\n"
            "    print('working on', x)\n"
            "    return x\n"
            "pool.map(chatty, range(4), chunksize=1)")
    reply, msgs = execute(kc, code)
    assert reply["status"] == "ok", reply
    text = "".join(m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream")
    for x in range(4):
        assert f"working on {x}\n" in text
    assert "[node" in text and "pid" in text      # prefixed with node and worker


def test_pipeline_cell_shows_live_per_stage_figures(kernel):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    code = ("%%dragon pipeline -o out\n"
            "source: range(120)\n"
            "stage: slow workers=2\n")
    reply, msgs = execute(kc, code)
    assert reply["status"] == "ok", reply
    values = widget_values(msgs)
    assert len(set(values)) >= 3, values
    assert "pipeline: 120 items" in final_html(msgs)


def test_ddict_view_updates_live_with_keys_and_bytes_per_node(kernel):
    km, kc = kernel
    assert execute(kc, SETUP)[0]["status"] == "ok"
    code = ("%dragon ddict create store --mem 64MiB\n"
            "%dragon ddict show store\n"
            "for i in range(12):\n"
            "    store[i] = b'x' * 200_000\n"
            "    time.sleep(0.1)\n"
            # the cell ends once its live view has shown all 12 keys (from telemetry)
            "from kernel_ext.magics import DragonMagics\n"
            "view, deadline = DragonMagics.views['ddict:store'], time.monotonic() + 30\n"
            "while 'DDict store</b>: 12 keys' not in view.title.value:\n"
            "    assert time.monotonic() < deadline, f'the view shows {view.title.value}'\n"
            "    time.sleep(0.05)\n")
    reply, msgs = execute(kc, code)
    assert reply["status"] == "ok", reply
    values = widget_values(msgs)
    assert len(set(values)) >= 3, values        # the bytes bars filled while the cell ran
    titles = [m["content"]["data"]["state"]["value"] for _, m in msgs
              if m["msg_type"] == "comm_msg"
              and "DDict store</b>: 12 keys" in str(m["content"]["data"].get("state", {}))]
    assert titles
