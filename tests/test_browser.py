"""The live progress widget in a real browser: JupyterLab + headless Chromium.

The kernel-level tests check the widget messages; this one checks what a
user actually sees. It starts JupyterLab on 127.0.0.1, opens a notebook that
starts a two-node runtime and maps a slow function over 80 items, runs its
cells from the page, and checks that the per-node "tasks" bars grow while
the cell runs and that the static final table replaces the widget at the end.

Needs Debian's Chromium (``apt-get install -y chromium``, done by .ci/run) and
the ``test`` extra (jupyterlab, playwright). Never ``playwright install``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from conftest import wait_until

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

CELLS = [
    "%load_ext dragon_nb\n%dragon start --nodes 2",
    "import time\nimport dragon_nb\n\n"
    "def slow(x):\n    time.sleep(0.1)\n    return x * x",
    "with dragon_nb.Pool(2) as pool:\n"
    "    r = pool.map(slow, range(80), chunksize=1)\n"
    "len(r), r[-1]",
]

# Every ipywidgets 8 progress bar in the page: its description ("total",
# "tasks", "cpu", "mem"), the node label of its row, and the bar's width (%).
READ_BARS = """() => Array.from(document.querySelectorAll('.widget-hprogress')).map(el => {
    const row = el.closest('.widget-hbox');
    const node = row ? row.querySelector('.widget-html-content') : null;
    return {
        label: (el.querySelector('.widget-label') || {}).textContent || '',
        node: node ? node.textContent.trim() : '',
        width: parseFloat(el.querySelector('.progress-bar').style.width || '0'),
    };
})"""


def _need(what: str, how: str):
    pytest.fail(f"{what} is missing: {how}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _stop_tree(proc: subprocess.Popen, base: str, token: str) -> list:
    """Shut JupyterLab down: its kernels first (which stop their runtimes), then
    the server, by PID. Returns the command lines of whatever had to be killed."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        for k in _get(f"{base}/api/kernels?token={token}"):
            req = urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}",
                                         method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()
    except (OSError, ValueError):
        pass                                        # the server's own shutdown does it too
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(family, timeout=15)
    killed = []
    for p in alive:
        try:
            killed.append(p.cmdline())
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return killed


@pytest.fixture
def chromium():
    path = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        _need("Chromium", "run the install step `apt-get install -y chromium` "
                          "(as .ci/run does); do not use `playwright install`")
    if importlib.util.find_spec("playwright") is None:
        _need("playwright", "pip install -e '.[test]'")
    return path


@pytest.fixture
def jupyter_lab(tmp_path, env_with_pkg):
    """A JupyterLab server on a free loopback port serving tmp_path/nb."""
    if importlib.util.find_spec("jupyterlab") is None:
        _need("jupyterlab", "pip install -e '.[test]'")
    root = tmp_path / "nb"
    root.mkdir()
    home = tmp_path / "jupyter"
    env = dict(env_with_pkg)
    env.update(JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"),
               IPYTHONDIR=str(home / "ipython"))
    # no "official Jupyter news?" toast over the screenshots
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token = secrets.token_hex(24)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "jupyterlab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={home / 'workspaces'}",
         "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=str(root), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n"
                                     + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            try:
                _get(f"{base}/api/status?token={token}", timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise AssertionError("JupyterLab did not answer in 60 s:\n"
                                         + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.2)
        yield {"base": base, "token": token, "root": root}
    finally:
        killed = _stop_tree(proc, base, token)
        log.close()
    assert not killed, f"JupyterLab left processes that had to be killed: {killed}"


def write_notebook(path, cells):
    nb = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                    "language": "python"}},
        "cells": [{"id": f"cell{i}", "cell_type": "code", "metadata": {}, "source": src,
                   "outputs": [], "execution_count": None} for i, src in enumerate(cells)],
    }
    path.write_text(json.dumps(nb, indent=1))


def tasks_bars(bars) -> dict:
    return {b["node"].split()[1]: b["width"] for b in bars
            if b["label"] == "tasks" and b["node"].startswith("node ")}


def _grown(now: dict, before: dict) -> bool:
    """Every node of ``before`` has a tasks bar in ``now``, wider than it was."""
    return bool(before) and all(now.get(node, -1) > width for node, width in before.items())


@pytest.mark.timeout(180)
def test_live_widget_advances_in_the_browser(jupyter_lab, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    write_notebook(jupyter_lab["root"] / "live.ipynb", CELLS)
    url = f"{jupyter_lab['base']}/lab/tree/live.ipynb?token={jupyter_lab['token']}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            page.goto(url)
            # the notebook is open and its kernel is up and idle
            page.wait_for_selector(".jp-Notebook .jp-Cell >> nth=2")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()
            # Run > Run All Cells
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            map_cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
            # the live widget: a title, a total bar, then per node tasks, cpu and mem
            # bars: wait for the seventh bar (the second node's), or for a traceback
            error = page.locator(".jp-OutputArea-output[data-mime-type="
                                 "'application/vnd.jupyter.stderr']")
            map_cell.locator(".widget-hprogress").nth(6).or_(error).first.wait_for()
            assert error.count() == 0, "a cell failed:\n" + "\n".join(error.all_inner_texts())
            samples = []
            for i in (1, 2):
                if i == 2:
                    # the map moves on: wait until every node's tasks bar has grown
                    # since the first sample (what is checked below), the page polled
                    # as it redraws, not a fixed time that a slow machine may not fill
                    first = samples[0][0]
                    wait_until(lambda: _grown(tasks_bars(page.evaluate(READ_BARS)), first),
                               30, lambda: f"the tasks bars growing on every node since "
                                           f"{first}: now {page.evaluate(READ_BARS)}",
                               interval=0.1)
                bars = page.evaluate(READ_BARS)
                title = map_cell.locator(".widget-vbox .widget-html-content").first.inner_text()
                page.screenshot(path=str(shots / f"running-{i}.png"))
                samples.append((tasks_bars(bars), title, bars))
            (first, title1, bars1), (second, title2, bars2) = samples
            print("screenshots in", shots)
            print("sample 1:", title1, first)
            print("sample 2:", title2, second)
            assert "running" in title1 and "running" in title2, (title1, title2)
            assert sorted(first) == sorted(second) == ["0", "1"], (bars1, bars2)
            for node in first:
                assert second[node] > first[node], (node, first, second)
            total = [b["width"] for b in bars1 + bars2 if b["label"] == "total"]
            assert len(total) == 2 and total[1] > total[0] and total[1] < 100, total

            # at the end, the widget is replaced by the static table of the final state
            final = map_cell.get_by_text("map(slow): 80/80 items")
            final.wait_for(state="visible")
            assert map_cell.locator(".widget-hprogress").count() == 0
            map_cell.locator(".jp-OutputArea-output", has_text="(80, 6241)").wait_for()
            page.screenshot(path=str(shots / "final.png"))
        except Exception:
            page.screenshot(path=str(shots / "failure.png"))
            print("failure screenshot:", shots / "failure.png")
            print("status bar:", page.locator(".jp-StatusBar-Widget").all_inner_texts())
            for i, cell in enumerate(page.locator(".jp-Notebook .jp-Cell").all()):
                print(f"cell {i}:", cell.locator(".jp-InputPrompt").inner_text(),
                      cell.locator(".jp-OutputArea").all_inner_texts())
            raise
        finally:
            browser.close()
