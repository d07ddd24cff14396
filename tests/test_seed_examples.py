"""The seed page's examples 1, 2, 3 and 5, run as a user would run them.

The scripts live in tests/seed/: ``exN_*.py`` (``import dragon_nb``) run with
``python exN_*.py``; the same file with its imports turned back into Dragon's
(``import dragon``) runs with ``dragon-nb run ... --nodes 2``. They differ from
the seed only by ``# seed fix:`` and ``# added for the test`` lines.

Each run happens in a fresh directory holding a few generated text files
(the examples glob '.'), with its own DRAGON_NB_TMPDIR so that the test can
check that the run left no runtime process or directory behind (runtime
processes start in their own session, so they are not the test's children).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import describe, dragon_nb_command, run_checked, short_dirs  # noqa: F401

PYTHON = sys.executable

SEED = Path(__file__).resolve().parent / "seed"
RUN_TIMEOUT = 45

# file name -> content: distinct lengths, newlines, plain ASCII
FILES = {f"part{i:02d}.txt": "".join(f"line {j} of file {i}\n" for j in range(i * 3 + 1))
         for i in range(11)}


@pytest.fixture
def workdir():
    """(data dir with FILES, runtime tmpdir)."""
    with short_dirs("dnbt-", "data") as (data, rtdir):
        for name, text in FILES.items():
            with open(os.path.join(data, name), "w", newline="\n") as f:
                f.write(text)
        yield data, rtdir


def run(cmd, data, rtdir, env, extra_env=None) -> subprocess.CompletedProcess:
    return run_checked(cmd, data, rtdir, env, extra_env, timeout=RUN_TIMEOUT)


def dragon_script(script: str, data: str) -> str:
    """The example as a Dragon user has it: the same file, Dragon's imports."""
    path = Path(data).parent / f"dragon_{script}"
    path.write_text(re.sub(r"\bdragon_nb\b", "dragon", (SEED / script).read_text()))
    return str(path)


# -- examples 1, 2, 3: one result per file, the file's length -----------------------
def expected_lengths(data: str) -> list[int]:
    # map/imap keep the input order, which is the order Path('.').glob('*') lists
    return [len(FILES[p.name]) for p in Path(data).glob("*")]


def check_results(proc, data):
    assert proc.returncode == 0, describe(proc)
    lengths = expected_lengths(data)
    assert sorted(lengths) == sorted(len(t) for t in FILES.values())
    want = f"results={len(lengths)} total={sum(lengths)} lengths={lengths}"
    assert proc.stdout.strip().splitlines()[-1] == want, describe(proc)


EXAMPLES = ["ex1_read_then_map.py", "ex2_lazy_imap.py", "ex3_shared_fs_map.py"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", EXAMPLES)
def test_files_example_with_python(script, workdir, env_with_pkg):
    data, rtdir = workdir
    proc = run([PYTHON, str(SEED / script)], data, rtdir, env_with_pkg)
    check_results(proc, data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", EXAMPLES)
def test_files_example_with_dragon_nb_run(script, workdir, env_with_pkg):
    data, rtdir = workdir
    proc = run([*dragon_nb_command(), "run", dragon_script(script, data), "--nodes", "2"],
               data, rtdir, env_with_pkg)
    check_results(proc, data)


# -- example 5: a socket feeding a two-stage imap pipeline -------------------------------
PAYLOAD = b"".join(b"chunk %04d of the stream: the quick brown fox jumps over the lazy dog\n"
                   % i for i in range(120))           # ~8 KiB: several 1024-byte recvs
PORT = 9000                                           # the seed's default (host 0.0.0.0)

# ex5 computes num_producers = (cpu_count() // 2) // 4, so it needs cpu_count() >= 8.
# This host has fewer cores; the product's way to claim more is cpus-per-node
# (DRAGON_NB_CPUS_PER_NODE / dragon-nb run --cpus-per-node): 2 nodes x 4 = 8.
EX5_NODES, EX5_CPUS_PER_NODE = 2, 4


class OneShotServer:
    """Accepts one connection on 127.0.0.1:PORT, sends PAYLOAD, closes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.bind(("127.0.0.1", PORT))
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    self.sock.close()
                    pytest.fail(f"example 5 connects to port {PORT}, which is busy "
                                f"on this host: {e}")
                time.sleep(0.2)
        self.sock.listen(1)
        self.sock.settimeout(RUN_TIMEOUT)
        self.error = None
        self.served = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.sendall(PAYLOAD)
                conn.shutdown(socket.SHUT_WR)
            self.served = True
        except Exception as e:       # reported by close()
            self.error = e
        finally:
            self.sock.close()

    def close(self):
        if self.thread.is_alive():   # the script never connected: unblock accept()
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
            except OSError:
                pass
        self.thread.join(5)


def check_pipeline(proc):
    if proc.returncode != 0 and "Number of processes must be at least 1" in proc.stderr:
        pytest.fail(
            "example 5 needs cpu_count() >= 8 (num_producers = cpu_count() // 2 // 4) "
            "and the runtime did not provide it: Pool(0) raised ValueError. Options "
            f"tried: {EX5_NODES} nodes with {EX5_CPUS_PER_NODE} cpus per node. (With "
            "dragon-nb run: if the run with the options before the script passes, "
            "the options given after it did not reach the runtime.)\n"
            + describe(proc))
    assert proc.returncode == 0, describe(proc)
    products = re.findall(r"^Pipeline product (\d+)=\((\d+), (\d+)\)$", proc.stdout, re.M)
    assert products, describe(proc)
    assert [int(i) for i, _, _ in products] == list(range(len(products))), describe(proc)
    sizes = [int(n) for _, n, _ in products]
    sums = [int(s) for _, _, s in products]
    # each product is (len, byte sum) of one upper-cased recv() block of <= 1024 bytes
    assert all(0 < n <= 1024 for n in sizes), sizes
    assert len(products) >= -(-len(PAYLOAD) // 1024)
    assert sum(sizes) == len(PAYLOAD)
    assert sum(sums) == sum(PAYLOAD.upper())
    assert proc.stdout.strip().splitlines()[-1] == f"pipeline done: products={len(products)}"


@pytest.mark.timeout(60)
def test_pipeline_example_with_python(workdir, env_with_pkg):
    data, rtdir = workdir
    server = OneShotServer()
    try:
        proc = run([PYTHON, str(SEED / "ex5_socket_pipeline.py")], data, rtdir, env_with_pkg,
                   {"DRAGON_NB_NODES": str(EX5_NODES),
                    "DRAGON_NB_CPUS_PER_NODE": str(EX5_CPUS_PER_NODE)})
    finally:
        server.close()
    check_pipeline(proc)
    assert server.served and server.error is None, server.error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("placement", ["options_after_script", "options_before_script"])
def test_pipeline_example_with_dragon_nb_run(placement, workdir, env_with_pkg):
    """``dragon-nb run`` documents ``run script.py [--nodes N] ...``; both orders
    must give the runtime the options (and not the script)."""
    data, rtdir = workdir
    opts = ["--nodes", str(EX5_NODES), "--cpus-per-node", str(EX5_CPUS_PER_NODE)]
    script = [dragon_script("ex5_socket_pipeline.py", data)]
    args = script + opts if placement == "options_after_script" else opts + script
    server = OneShotServer()
    try:
        proc = run([*dragon_nb_command(), "run", *args], data, rtdir, env_with_pkg)
    finally:
        server.close()
    check_pipeline(proc)
    assert server.served and server.error is None, server.error
