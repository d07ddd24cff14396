#!/usr/bin/env python3
"""Throughput and start-up time of dragon-nb's Pool against multiprocessing's.

One run measures, with 2 workers each, dragon-nb's ``Pool`` (runtime started
with ``dragon_nb.start(nodes=2)``) and the stdlib's fork ``Pool`` on tiny
tasks, where the pool's own overhead is all there is to see; plus the time
from a cold interpreter to the first result. If the real Dragon is installed
(``$DRAGON_BIN`` or ``dragon`` on ``PATH``), the same cases run under it too,
with far fewer items since it is much slower.

    python benchmarks/bench_pool.py [--quick] [--json PATH] [--no-dragon]
                                    [--dragon-timeout S]

A full run also writes benchmarks/results/pool.json (see common.py).

See docs/benchmarks.md for what the numbers mean and the latest results.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

from common import save_results

WORKERS = 2            # the machine this is sized for has 2 cores
DRAGON_NB_NODES = 2
FIRST_RESULT_NODES = 4  # the target: first result with 4 virtual nodes
FIRST_RESULT_WORKERS = 4


def tiny(x):
    """A task that costs next to nothing, so the pool's overhead is what is timed."""
    return x * x


# name, method, chunksize, items for a full run (~1 s on the stdlib here),
# for --quick, and for Dragon (a few hundred to a few thousand tasks/s at chunksize=1).
CASES = [
    ("map chunksize=1", "map", 1, 80_000, 8_000, 1_000),
    ("map chunksize=100", "map", 100, 3_000_000, 300_000, 20_000),
    ("imap chunksize=1", "imap", 1, 80_000, 8_000, 500),
    ("imap chunksize=10", "imap", 10, 600_000, 60_000, 3_000),
    ("imap_unordered chunksize=1", "imap_unordered", 1, 80_000, 8_000, 500),
]


def run_case(pool, method: str, chunksize: int, n: int) -> list:
    """One call the way user code makes it; imap results are consumed fully."""
    if method == "map":
        return pool.map(tiny, range(n), chunksize=chunksize)
    return list(getattr(pool, method)(tiny, range(n), chunksize=chunksize))


def check(out: list, n: int, ordered: bool) -> None:
    """A fast pool that returns wrong results is not fast."""
    if len(out) != n:
        raise AssertionError(f"got {len(out)} results, expected {n}")
    if ordered:
        if out[:3] != [tiny(i) for i in range(min(3, n))] or out[-1] != tiny(n - 1):
            raise AssertionError("results out of order")
    if sum(out) != (n - 1) * n * (2 * n - 1) // 6:
        raise AssertionError("wrong results")


# --- throughput ------------------------------------------------------------------------
def measure_throughput(pools: dict, sizes: dict, reps: int) -> dict:
    """tasks/s per case and pool: best of ``reps``, the pools taking turns.

    Taking turns (and alternating who goes first) spreads any background load
    on the machine over both pools instead of penalising whichever ran then.
    """
    for pool in pools.values():                         # warm-up: workers, caches
        check(pool.map(tiny, range(1000)), 1000, True)
        check(list(pool.imap(tiny, range(200))), 200, True)
    results = {}
    for name, method, chunksize, *_ in CASES:
        n = sizes[name]
        samples = {label: [] for label in pools}
        for rep in range(reps):
            order = list(pools) if rep % 2 == 0 else list(reversed(pools))
            for label in order:
                t0 = time.perf_counter()
                out = run_case(pools[label], method, chunksize, n)
                samples[label].append(time.perf_counter() - t0)
                check(out, n, ordered=(method != "imap_unordered"))
                del out
        results[name] = {label: _rates(n, s) for label, s in samples.items()}
    return results


def _rates(n: int, seconds: list) -> dict:
    return {"items": n, "seconds": seconds, "best": n / min(seconds),
            "median": n / statistics.median(seconds)}


# --- time to first result ------------------------------------------------------------
# Each runs in a fresh interpreter. "first" starts the clock at the script's very
# first line (the definition); "launch" starts it in the parent just
# before the interpreter is launched, so it also counts interpreter start-up.
FIRST_RESULT_SCRIPTS = {
    "dragon-nb": f"""
        import time; t0 = time.perf_counter()
        import json, os
        import dragon_nb
        dragon_nb.start(nodes={FIRST_RESULT_NODES})
        p = dragon_nb.Pool({FIRST_RESULT_WORKERS})
        p.apply(abs, (-1,))
        first, launch = time.perf_counter() - t0, time.time() - float(os.environ["BENCH_T0"])
        print(json.dumps({{"first": first, "launch": launch}}), flush=True)
        p.terminate(); dragon_nb.stop()
    """,
    "stdlib": f"""
        import time; t0 = time.perf_counter()
        import json, os
        import multiprocessing as mp
        p = mp.get_context("fork").Pool({FIRST_RESULT_WORKERS})
        p.apply(abs, (-1,))
        first, launch = time.perf_counter() - t0, time.time() - float(os.environ["BENCH_T0"])
        print(json.dumps({{"first": first, "launch": launch}}), flush=True)
        p.terminate()
    """,
}


def measure_first_result(reps: int) -> dict:
    """Seconds from nothing to the first result: median of ``reps`` fresh runs."""
    samples = {label: [] for label in FIRST_RESULT_SCRIPTS}
    for rep in range(reps):
        labels = list(FIRST_RESULT_SCRIPTS)
        for label in labels if rep % 2 == 0 else reversed(labels):
            env = dict(os.environ, BENCH_T0=repr(time.time()))
            proc = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(FIRST_RESULT_SCRIPTS[label])],
                env=env, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"first-result run for {label} failed:\n{proc.stderr}")
            samples[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {label: {"first": statistics.median(s["first"] for s in runs),
                    "launch": statistics.median(s["launch"] for s in runs),
                    "runs": runs}
            for label, runs in samples.items()}


# --- the real Dragon -------------------------------------------------------------------
DRAGON_SCRIPT = """
import time, json, os, sys
import dragon
import multiprocessing as mp


def tiny(x):
    return x * x


def run_case(pool, method, chunksize, n):
    if method == "map":
        return pool.map(tiny, range(n), chunksize=chunksize)
    return list(getattr(pool, method)(tiny, range(n), chunksize=chunksize))


if __name__ == "__main__":
    mp.set_start_method("dragon")
    cfg = json.loads(os.environ["BENCH_CONFIG"])
    out = {"cases": {}}

    pool = mp.Pool(cfg["first_workers"])          # from `dragon` launched to first result
    pool.apply(abs, (-1,))
    out["launch"] = time.time() - cfg["t0"]
    pool.close(); pool.join()

    pool = mp.Pool(cfg["workers"])
    pool.map(tiny, range(100)); list(pool.imap(tiny, range(20)))
    for name, method, chunksize, n in cfg["cases"]:
        seconds = []
        for _ in range(cfg["reps"]):
            t0 = time.perf_counter()
            res = run_case(pool, method, chunksize, n)
            seconds.append(time.perf_counter() - t0)
            assert sorted(res) == [tiny(i) for i in range(n)], name
        out["cases"][name] = {"items": n, "seconds": seconds}
    pool.close(); pool.join()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


def find_dragon() -> str | None:
    """The `dragon` launcher to compare with, if any (never a hard-coded path)."""
    return os.environ.get("DRAGON_BIN") or shutil.which("dragon")


def measure_dragon(dragon_bin: str, quick: bool, reps: int, timeout: float) -> dict:
    """Run the cases under ``dragon`` in a temporary script; its numbers or an error."""
    cases = [(name, method, cs, n_dragon // (5 if quick else 1))
             for name, method, cs, _, _, n_dragon in CASES]
    with tempfile.TemporaryDirectory(prefix="bench-dragon-") as tmp:
        script, result, log = (os.path.join(tmp, f) for f in ("bench.py", "out.json", "log"))
        with open(script, "w") as f:
            f.write(DRAGON_SCRIPT)
        env = dict(os.environ)
        # Dragon shells out to its own tools (dragon-config) by name.
        env["PATH"] = os.path.dirname(os.path.abspath(dragon_bin)) + os.pathsep + env["PATH"]
        env["BENCH_CONFIG"] = json.dumps({"t0": time.time(), "workers": WORKERS,
                                          "first_workers": FIRST_RESULT_WORKERS,
                                          "reps": reps, "cases": cases})
        try:
            with open(log, "w") as logf:
                rc = _run_contained([dragon_bin, script, result], tmp, env, logf, timeout)
        except OSError as e:                    # e.g. DRAGON_BIN names no executable
            return {"error": f"cannot run {dragon_bin}: {e}"}
        if rc != 0 or not os.path.exists(result):
            with open(log) as f:
                tail = f.read()[-2000:]
            why = "timed out" if rc is None else f"exited with code {rc}"
            return {"error": f"dragon {why}", "log_tail": tail}
        with open(result) as f:
            out = json.load(f)
    out["cases"] = {name: _rates(c["items"], c["seconds"]) for name, c in out["cases"].items()}
    return out


def _run_contained(cmd, cwd, env, logf, timeout) -> int | None:
    """Run ``cmd``; afterwards kill everything it started. None on timeout.

    Dragon's processes busy-poll, so one left behind spins a core for ever.
    The run gets its own process group (not its own session: Dragon calls
    setpgid(0, 0), which a session leader may not do, and then hangs), and
    every descendant seen while it ran is killed by PID at the end, as is
    anything still in its process group. Killed processes cannot clean up, so
    the /dev/shm segments they had mapped (gigabytes, if sparse) are removed.
    """
    group = ({"process_group": 0} if sys.version_info >= (3, 11)
             else {"preexec_fn": os.setpgrp})
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, **group)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    rc = None
    try:
        root = psutil.Process(proc.pid)
        seen[root.pid] = root
        while time.monotonic() < deadline:
            try:
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
    except psutil.NoSuchProcess:
        rc = proc.wait()
    finally:
        shm = set()
        for p in seen.values():
            try:
                shm.update(_shm_files(p))
                p.kill()          # psutil checks the PID still names the same process
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(seen.values()), timeout=5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for path in shm:
            try:
                os.unlink(path)
            except OSError:
                pass
    return rc


def _shm_files(p: psutil.Process) -> set:
    """The /dev/shm files a process has open or mapped."""
    files = set()
    try:
        files.update(f.path for f in p.open_files())
        files.update(m.path for m in p.memory_maps())
    except psutil.AccessDenied:
        pass
    return {f for f in files if f.startswith("/dev/shm/")}


# --- report ------------------------------------------------------------------------------
def print_table(tput: dict, first: dict, dragon: dict | None, skipped: str = "") -> None:
    with_dragon = dragon is not None and "error" not in dragon
    head = f"{'case':<28} {'dragon-nb':>12} {'stdlib':>12} {'ratio':>7}"
    if with_dragon:
        head += f" {'Dragon':>10} {'vs Dragon':>10}"
    print(head)
    print("-" * len(head))
    for name, r in tput.items():
        ours, std = r["dragon-nb"]["best"], r["stdlib"]["best"]
        line = f"{name:<28} {ours:>12,.0f} {std:>12,.0f} {ours / std:>6.2f}x"
        if with_dragon:
            theirs = dragon["cases"][name]["best"]
            line += f" {theirs:>10,.0f} {ours / theirs:>9.0f}x"
        print(line)
    for key, label in (("first", "first result, s"), ("launch", "  incl. python launch, s")):
        ours, std = first["dragon-nb"][key], first["stdlib"][key]
        line = f"{label:<28} {ours:>12.3f} {std:>12.3f} {std / ours:>6.2f}x"
        if with_dragon and key == "launch":
            line += f" {dragon['launch']:>10.3f} {dragon['launch'] / ours:>9.1f}x"
        print(line)
    print("\ntasks/s, best of the repetitions (higher is better), ratio = dragon-nb/stdlib;"
          "\nfirst result: median seconds (lower is better), ratio = stdlib/dragon-nb;"
          "\nso a ratio above 1 means dragon-nb is faster.")
    if with_dragon:
        print("Dragon: its first result is timed from launching `dragon` (one run);"
              " 'vs Dragon' = how many times faster dragon-nb is.")
    elif dragon is None:
        print(f"Dragon column skipped: {skipped}.")
    else:
        print(f"Dragon column skipped: {dragon['error']}\n{dragon.get('log_tail', '')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    ap.add_argument("--no-dragon", action="store_true", help="skip the real Dragon")
    ap.add_argument("--dragon-timeout", type=float, default=None, metavar="S",
                    help="seconds before the Dragon run is killed (default 300, quick 120)")
    args = ap.parse_args(argv)

    reps = 2 if args.quick else 5
    sizes = {name: quick if args.quick else full for name, _, _, full, quick, _ in CASES}

    load = os.getloadavg()[0]       # other work on the machine makes the numbers noisy
    print(f"{WORKERS} workers; {os.cpu_count()} cores; Python {platform.python_version()};"
          f" load average {load:.2f}{' (quick)' if args.quick else ''}", flush=True)
    print("time to first result...", flush=True)
    first = measure_first_result(1 if args.quick else 3)

    import dragon_nb
    # The stdlib pool forks before the dragon-nb runtime starts its threads.
    std = multiprocessing.get_context("fork").Pool(WORKERS)
    assert type(std) is multiprocessing.pool.Pool
    dragon_nb.start(nodes=DRAGON_NB_NODES)
    ours = dragon_nb.Pool(WORKERS)
    print("throughput...", flush=True)
    try:
        tput = measure_throughput({"dragon-nb": ours, "stdlib": std}, sizes, reps)
    finally:
        for pool in (ours, std):
            pool.terminate()
            pool.join()
        dragon_nb.stop()

    dragon, skipped = None, "--no-dragon given"
    dragon_bin = None if args.no_dragon else find_dragon()
    if not args.no_dragon and not dragon_bin:
        skipped = "no `dragon` found (set DRAGON_BIN or put it on PATH)"
    if dragon_bin:
        print(f"Dragon ({dragon_bin})...", flush=True)
        timeout = args.dragon_timeout or (120 if args.quick else 300)
        dragon = measure_dragon(dragon_bin, args.quick, reps, timeout)
    print()
    print_table(tput, first, dragon, skipped)

    save_results("pool", {"machine": {"cores": os.cpu_count(),
                                      "python": platform.python_version(),
                                      "platform": platform.platform(),
                                      "loadavg": [load, os.getloadavg()[0]]},
                          "config": {"workers": WORKERS, "nodes": DRAGON_NB_NODES,
                                     "reps": reps, "quick": args.quick},
                          "throughput": tput, "first_result": first, "dragon": dragon,
                          "dragon_bin": dragon_bin}, args.json, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
