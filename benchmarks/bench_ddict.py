"""DDict benchmark: dragon-nb's DDict against ``multiprocessing.Manager().dict()``
(and Dragon's own DDict where ``dragon`` is installed), side by side in one run.

    python benchmarks/bench_ddict.py [--quick] [--json PATH] [--no-dragon]

A full run also writes benchmarks/results/ddict.json (see common.py).

Measured, single client unless said otherwise:

* put / get of 64-byte values (ops/s), one synchronous request each;
* batched puts of 64-byte values (``start_batch_put``/``end_batch_put``; the
  Manager has no batch put, so its one-by-one put rate is the reference);
* ``update()`` with a dict of pairs (the Manager's batch-like call);
* put / get of 1 MiB ``bytes`` values (GB/s);
* two client processes, each on its own manager (the Manager: two Manager
  processes), against one client alone: the aggregate ops/s and the scaling.

Each figure is the best of a few rounds, dragon-nb and the Manager taking turns,
so a burst of load on the machine does not favour either. Dragon's column comes
from a separate ``dragon`` run (its DDict is slow, so smaller counts) found
through ``DRAGON_BIN`` or ``PATH``; that run is killed, with everything it
started (by pid), if it outlives its timeout.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dragon_nb  # noqa: E402
from dragon_nb import DDict  # noqa: E402

from common import save_results  # noqa: E402

FULL = dict(rounds=3, small=20000, batch=200000, update=50000, big=200, big_keys=16,
            clients=20000, dragon_small=300, dragon_big=20)
QUICK = dict(rounds=2, small=3000, batch=30000, update=10000, big=40, big_keys=8,
             clients=3000, dragon_small=100, dragon_big=5)
SMALL = os.urandom(64)
MIB = 1 << 20
FORK = multiprocessing.get_context("fork")

# the targets: ratio to mp (put/get), to mp's put (batched), GB/s (1 MiB),
# scaling from one client to two (two_clients)
CRITERIA = {"put_64B": 1.0, "get_64B": 1.0, "batch_put_64B": 10.0, "put_1MiB": 1.0,
            "get_1MiB": 1.0, "two_clients": 1.5}


# -- the measurements -------------------------------------------------------------------
def put_small(d, n):
    t = time.perf_counter()
    for i in range(n):
        d[i] = SMALL
    return n / (time.perf_counter() - t)


def get_small(d, n):
    t = time.perf_counter()
    for i in range(n):
        d[i]
    return n / (time.perf_counter() - t)


def batch_put(d, n):
    t = time.perf_counter()
    d.start_batch_put()
    for i in range(n):
        d[i] = SMALL
    d.end_batch_put()
    return n / (time.perf_counter() - t)


def update(d, n):
    pairs = {("u", i): SMALL for i in range(n)}
    t = time.perf_counter()
    d.update(pairs)
    return n / (time.perf_counter() - t)


def put_big(d, n, keys, value):
    t = time.perf_counter()
    for i in range(n):
        d[("big", i % keys)] = value
    return n * len(value) / (time.perf_counter() - t) / 1e9


def get_big(d, n, keys):
    t = time.perf_counter()
    for i in range(n):
        d[("big", i % keys)]
    return n * MIB / (time.perf_counter() - t) / 1e9


def _client(d, n, barrier, out):
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(n):
        d[("c", i)] = SMALL
    for i in range(n):
        d[("c", i)]
    out.put((t0, time.perf_counter()))


def clients(handles, n) -> float:
    """Each handle in a process of its own, all at once: n puts then n gets each.
    -> aggregate ops/s from the first start to the last finish."""
    barrier = FORK.Barrier(len(handles))
    out = FORK.Queue()
    procs = [FORK.Process(target=_client, args=(h, n, barrier, out)) for h in handles]
    for p in procs:
        p.start()
    times = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return 2 * n * len(handles) / (max(e for _, e in times) - min(s for s, _ in times))


# -- the run -----------------------------------------------------------------------------
def run_ours_and_manager(sz, log) -> dict:
    # Keep a reference: with only dragon_nb's own, a fork (multiprocessing.Manager,
    # the client processes) drops it in the child, whose finalizer then removes
    # the runtime directory (a runtime bug, reported with this benchmark).
    rt = dragon_nb.start(nodes=2)
    best: dict = {}

    def keep(key, value):
        best[key] = max(best.get(key, 0.0), value)

    big = os.urandom(MIB)
    manager = multiprocessing.Manager()
    managers2 = [multiprocessing.Manager(), multiprocessing.Manager()]
    try:
        d = DDict(1, 1, 1 << 30, runtime=rt)
        d2 = DDict(1, 2, 1 << 30, runtime=rt)    # one manager on each node, for two clients
        md = manager.dict()
        mds = [m.dict() for m in managers2]
        for r in range(sz["rounds"]):
            log(f"round {r + 1}/{sz['rounds']}")
            for name, target in (("ddict", d), ("mp", md)):
                keep(f"{name}.put_64B", put_small(target, sz["small"]))
                keep(f"{name}.get_64B", get_small(target, sz["small"]))
                target.clear()
                keep(f"{name}.update", update(target, sz["update"]))
                target.clear()
                keep(f"{name}.put_1MiB", put_big(target, sz["big"], sz["big_keys"], big))
                keep(f"{name}.get_1MiB", get_big(target, sz["big"], sz["big_keys"]))
                target.clear()
            keep("ddict.batch_put_64B", batch_put(d, sz["batch"]))
            d.clear()
            keep("ddict.one_client", clients([d2.manager(0)], sz["clients"]))
            keep("ddict.two_clients", clients([d2.manager(0), d2.manager(1)], sz["clients"]))
            d2.clear()
            keep("mp.one_client", clients([mds[0]], sz["clients"]))
            keep("mp.two_clients", clients(mds, sz["clients"]))
            for m in mds:
                m.clear()
        d.destroy()
        d2.destroy()
    finally:
        manager.shutdown()
        for m in managers2:
            m.shutdown()
        dragon_nb.stop()
    return best


DRAGON_SCRIPT = textwrap.dedent('''
    import dragon
    import json, os, sys, time
    import multiprocessing as mp
    from dragon.data.ddict import DDict

    def main():
        mp.set_start_method("dragon")
        n, nbig = int(sys.argv[1]), int(sys.argv[2])
        small, big = os.urandom(64), os.urandom(1 << 20)
        d = DDict(1, 1, 1 << 30)
        res = {}
        t = time.perf_counter()
        for i in range(n):
            d[i] = small
        res["put_64B"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            d[i]
        res["get_64B"] = n / (time.perf_counter() - t)
        d.clear()
        t = time.perf_counter()
        d.start_batch_put()
        for i in range(n):
            d[i] = small
        d.end_batch_put()
        res["batch_put_64B"] = n / (time.perf_counter() - t)
        d.clear()
        t = time.perf_counter()
        for i in range(nbig):
            d[("big", i % 4)] = big
        res["put_1MiB"] = nbig * len(big) / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        for i in range(nbig):
            d[("big", i % 4)]
        res["get_1MiB"] = nbig * len(big) / (time.perf_counter() - t) / 1e9
        d.destroy()
        print("RESULT " + json.dumps(res), flush=True)

    if __name__ == "__main__":
        main()
''')


def find_dragon():
    exe = os.environ.get("DRAGON_BIN") or shutil.which("dragon")
    return exe if exe and os.access(exe, os.X_OK) else None


def run_dragon(exe, sz, log, timeout=180.0) -> dict | None:
    """Dragon's DDict in a ``dragon`` run of its own; None if it fails."""
    folder = tempfile.mkdtemp(prefix="bench-dragon-")
    script = os.path.join(folder, "dragon_ddict.py")
    with open(script, "w") as f:
        f.write(DRAGON_SCRIPT)
    env = dict(os.environ)
    # dragon runs helpers (dragon-config...) from its own bin directory
    env["PATH"] = os.path.dirname(os.path.abspath(exe)) + os.pathsep + env.get("PATH", "")
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    log(f"Dragon: {exe} ({sz['dragon_small']} small ops, {sz['dragon_big']} x 1 MiB)")
    out_path = os.path.join(folder, "out.txt")
    # A process group of its own, to find all it started; not a session of its own:
    # Dragon 0.15's launcher hangs at start-up when it leads a new session.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with open(out_path, "w") as out:
        proc = subprocess.Popen([exe, script, str(sz["dragon_small"]), str(sz["dragon_big"])],
                                cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, **group)
        killed = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
        finally:
            killed |= _kill_all(proc)
    with open(out_path) as f:
        text = f.read()
    shutil.rmtree(folder, ignore_errors=True)
    if killed and os.path.isdir("/dev/shm"):     # its shared-memory pools, if it left any
        for name in set(os.listdir("/dev/shm")) - shm_before:
            if name.startswith("D"):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    log("Dragon run failed" + (" (timed out, killed)" if killed else "") + ":\n" +
        textwrap.indent(text[-2000:], "    "))
    return None


def _kill_all(proc) -> bool:
    """Kill, by pid, every process the run started: its descendants, and anything
    left in its process group. -> whether anything had to be killed."""
    victims = {}
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            victims[p.pid] = p
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getpgid(p.pid) == proc.pid:
                victims[p.pid] = p
        except (OSError, psutil.Error):
            pass
    if proc.poll() is None:
        try:
            victims[proc.pid] = psutil.Process(proc.pid)
        except psutil.Error:
            pass
    for p in victims.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    proc.wait()
    return bool(victims)


# -- the table ------------------------------------------------------------------------
ROWS = [  # key, label, unit, what the ratio compares with
    ("put_64B", "put, 64 B values", "ops/s", "mp.put_64B"),
    ("get_64B", "get, 64 B values", "ops/s", "mp.get_64B"),
    ("batch_put_64B", "batched put, 64 B values", "ops/s", "mp.put_64B"),
    ("update", "update() with a dict of pairs", "ops/s", "mp.update"),
    ("put_1MiB", "put, 1 MiB values", "GB/s", "mp.put_1MiB"),
    ("get_1MiB", "get, 1 MiB values", "GB/s", "mp.get_1MiB"),
    ("one_client", "1 client on 1 manager (put+get)", "ops/s", "mp.one_client"),
    ("two_clients", "2 clients on 2 managers (put+get)", "ops/s", "mp.two_clients"),
]


def fmt(v, unit):
    if v is None:
        return "—"
    return f"{v:.2f}" if unit == "GB/s" else f"{v:,.0f}"


def table(res: dict, dragon: dict | None) -> tuple[str, dict]:
    head = ["", "dragon-nb DDict", "mp Manager().dict()", "ratio", "Dragon DDict", "target"]
    rows, verdict = [], {}
    for key, label, unit, ref in ROWS:
        ours = res.get(f"ddict.{key}")
        theirs = res.get(ref) if key != "batch_put_64B" else None
        ratio = ours / res[ref] if ours and res.get(ref) else None
        target = ""
        if key in CRITERIA:
            ok = ratio is not None and ratio >= CRITERIA[key]
            if key == "two_clients":
                scale = ours / res["ddict.one_client"]
                ok = scale >= CRITERIA[key]
                target = f"{scale:.2f}x one client (>= {CRITERIA[key]}x) {'ok' if ok else 'MISSED'}"
            elif key in ("put_1MiB", "get_1MiB"):
                ok = ours is not None and ours >= CRITERIA[key]
                target = f">= {CRITERIA[key]:g} GB/s: {'ok' if ok else 'MISSED'}"
            else:
                target = f">= {CRITERIA[key]:g}x mp put: " if key == "batch_put_64B" else \
                    f">= {CRITERIA[key]:g}x mp: "
                # the verdict compares the unrounded ratio: a MISSED says by how much
                target += "ok" if ok else f"MISSED at {ratio or 0:.3f}x"
            verdict[key] = ok
        if key == "batch_put_64B":
            theirs_txt = f"(no batch; put {fmt(res['mp.put_64B'], unit)})"
        else:
            theirs_txt = fmt(theirs, unit)
        rows.append([f"{label} ({unit})", fmt(ours, unit), theirs_txt,
                     f"{ratio:.2f}x" if ratio else "—",
                     fmt((dragon or {}).get(key), unit), target])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(head), sep, *map(line, rows)]), verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a few seconds)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--no-dragon", action="store_true", help="skip Dragon even if installed")
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else FULL
    log = lambda msg: print(f"# {msg}", file=sys.stderr, flush=True)  # noqa: E731
    res = run_ours_and_manager(sz, log)
    exe = None if args.no_dragon else find_dragon()
    dragon = run_dragon(exe, sz, log) if exe else None
    text, verdict = table(res, dragon)
    import zmq
    about = (f"{platform.python_implementation()} {platform.python_version()}, "
             f"{os.cpu_count()} cores, pyzmq {zmq.__version__}, "
             f"{'quick' if args.quick else 'full'} sizes, best of {sz['rounds']} rounds"
             + (f"; Dragon: {sz['dragon_small']} small ops, {sz['dragon_big']} x 1 MiB, "
                f"one run" if dragon else "; Dragon: not run"))
    print(f"DDict benchmark ({about})\n")
    print(text)
    save_results("ddict", {"about": about, "sizes": sz, "results": res, "dragon": dragon,
                           "criteria_met": verdict}, args.json, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
