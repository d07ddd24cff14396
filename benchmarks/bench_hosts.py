#!/usr/bin/env python3
"""dragon-nb across hosts: three network-namespace hosts on this machine (as root).

Measures, in one run:

* CPU-bound ``map`` throughput with one worker on each of 1, 2 and 3 hosts
  (the curve; all the hosts share this machine's cores, so it can rise only as
  far as the cores allow), beside the stdlib's fork ``Pool`` with as many
  workers on the same work;
* per-task overhead: tiny tasks through two workers on the other hosts (signed
  TCP) against two workers of a runtime on one host (ipc), as microseconds per
  task and their ratio (the goal: within 2x);
* bench_mp.py's figures across hosts: queues between a process on h2 and one on
  h3 (the queues in the object host of h1, the caller's node: over TCP objects
  live in the hosts), Process start+join round-robin over the three hosts, a
  lock of h1's host taken from h1; beside the stdlib's fork on h1, as ratios.

    sudo python benchmarks/bench_hosts.py [--quick] [--json PATH]

The hosts are made by tests/hosts/netns.py and removed at the end. A full run
also writes benchmarks/results/hosts.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "hosts"))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import save_results  # noqa: E402

# bench_mp's cases across hosts: case -> (count for dragon-nb, for the stdlib); fewer than
# on one host, every operation being a signed TCP round trip to an object host
MP_COUNTS = {"queue_64B": (1000, 20000), "queue_pingpong": (300, 2500),
             "queue_1MiB": (40, 400), "process_seq": (30, 200),
             "process_batch8": (32, 240), "lock": (600, 2000000)}


def spin(n: int) -> int:
    """About ``n`` microseconds of pure Python work (roughly; the same for every pool)."""
    x = 0
    for i in range(n * 12):
        x += i * i
    return x & 0xFF


def noop(x):
    return x


def best_rate(run, items: int, repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        best = max(best, items / (time.perf_counter() - t))
    return best


def mp_across_hosts(stdlib, nodes: tuple, quick: bool, repeat: int) -> dict:
    """bench_mp's cases on the running TCP runtime, processes on ``nodes``, and the
    stdlib's in ``stdlib`` (a bench_mp.StdlibSide), alternating: {case: figures}."""
    import statistics

    import bench_mp
    ctx = multiprocessing.get_context("dragon")
    out = {}
    for case, counts in MP_COUNTS.items():
        ours, theirs = (max(1, c // (5 if quick else 1)) for c in counts)
        if case == "process_batch8":
            ours, theirs = (max(8, n - n % 8) for n in (ours, theirs))
        samples = {"dragon-nb": [], "stdlib": []}
        for _ in range(repeat):
            samples["dragon-nb"].append(bench_mp.measure(case, ctx, nodes, ours)["rate"])
            samples["stdlib"].append(stdlib.measure(case, theirs)["rate"])
        label, unit, target = bench_mp.CASES[case][:3]
        med = {side: statistics.median(v) for side, v in samples.items()}
        out[case] = {"label": label, "unit": unit, "target": target, "counts": [ours, theirs],
                     "median": med, "samples": samples,
                     "ratio": med["dragon-nb"] / med["stdlib"]}
    return out


def driver(quick: bool) -> dict:
    """Runs on host h1 (inside its namespace): every figure from one runtime."""
    import cloudpickle

    import bench_mp
    import dragon_nb
    from dragon_nb import Pool
    from dragon_nb.native.machine import Node, System

    cloudpickle.register_pickle_by_value(bench_mp)   # the other hosts cannot import it
    stdlib_mp = bench_mp.StdlibSide()                # forked before any runtime thread

    cpu_items, cpu_us = (200, 2000) if quick else (600, 5000)
    tiny = 20_000 if quick else 100_000
    repeat = 2 if quick else 3
    t = time.perf_counter()
    for _ in range(20):
        spin(cpu_us)
    out = {"cpu_task_us": round((time.perf_counter() - t) / 20 * 1e6),   # as measured here
           "cpu_items": cpu_items, "tiny_items": tiny}

    big = [bytes(1 << 20)] * (16 if quick else 64)     # 1 MiB values, there and back
    mib = 2 * len(big)

    # one host, ipc: the per-task baseline
    with dragon_nb.Runtime(nodes=2) as rt:
        with Pool(2, runtime=rt) as p:
            p.map(noop, range(1000))
            out["one_host_tiny_per_s"] = best_rate(
                lambda: p.map(noop, range(tiny), chunksize=1), tiny, repeat)
            out["one_host_mib_per_s"] = best_rate(lambda: p.map(noop, big, chunksize=1),
                                                  mib, repeat)

    dragon_nb.start(nodes=1, hosts=["h2", "h3"], listen=os.environ["DNB_LISTEN"],
                    launcher=os.environ["DNB_LAUNCHER"])
    ids = {Node(h).hostname: h for h in System().nodes}
    with Pool(2, nodes=[ids["h2"], ids["h3"]]) as p:
        p.map(noop, range(1000))
        out["across_hosts_tiny_per_s"] = best_rate(
            lambda: p.map(noop, range(tiny), chunksize=1), tiny, repeat)
        out["across_hosts_mib_per_s"] = best_rate(lambda: p.map(noop, big, chunksize=1),
                                                  mib, repeat)
    curve = {}
    for k, names in ((1, ["h2"]), (2, ["h2", "h3"]), (3, ["h1", "h2", "h3"])):
        with Pool(k, nodes=[ids[n] for n in names]) as p:
            p.map(spin, [10] * 20)
            curve[k] = best_rate(lambda: p.map(spin, [cpu_us] * cpu_items, chunksize=1),
                                 cpu_items, repeat)
    out["dragon_nb_cpu_tasks_per_s"] = curve
    try:
        out["mp"] = mp_across_hosts(stdlib_mp, (ids["h2"], ids["h3"]), quick, repeat)
    finally:
        stdlib_mp.stop()
    dragon_nb.stop()

    stdlib = {}
    ctx = multiprocessing.get_context("fork")
    for k in (1, 2, 3):
        with ctx.Pool(k) as p:
            p.map(spin, [10] * 20)
            stdlib[k] = best_rate(lambda: p.map(spin, [cpu_us] * cpu_items, chunksize=1),
                                  cpu_items, repeat)
    out["stdlib_cpu_tasks_per_s"] = stdlib
    return out


def report(r: dict) -> None:
    print(f"CPU-bound map, {r['cpu_items']} tasks of ~{r['cpu_task_us']} us, "
          f"one worker per host (stdlib: as many workers on this host)")
    print(f"{'hosts':>5}  {'dragon-nb tasks/s':>18}  {'speed-up':>8}  "
          f"{'stdlib tasks/s':>15}  {'ratio':>6}")
    base = r["dragon_nb_cpu_tasks_per_s"]["1"]
    for k in ("1", "2", "3"):
        d, s = r["dragon_nb_cpu_tasks_per_s"][k], r["stdlib_cpu_tasks_per_s"][k]
        print(f"{k:>5}  {d:>18,.0f}  {d / base:>7.2f}x  {s:>15,.0f}  {d / s:>5.2f}x")
    one, across = r["one_host_tiny_per_s"], r["across_hosts_tiny_per_s"]
    print(f"\nper-task overhead, {r['tiny_items']:,} tiny tasks, 2 workers, chunksize=1:")
    print(f"  one host (ipc):             {1e6 / one:.1f} us/task")
    print(f"  across hosts (TCP, signed): {1e6 / across:.1f} us/task   "
          f"{one / across:.2f}x one host's (goal: within 2x)")
    one, across = r["one_host_mib_per_s"], r["across_hosts_mib_per_s"]
    print(f"\n1 MiB values to two workers and back: one host {one:,.0f} MiB/s, across "
          f"hosts (encrypted, signed) {across:,.0f} MiB/s ({across / one:.2f}x)")
    print("\nmultiprocessing across hosts (processes on h2 and h3, objects in h1's host; "
          "stdlib: fork on h1):")
    print("| case | unit | dragon-nb | stdlib (fork) | dragon-nb/stdlib |")
    print("| --- | --- | ---: | ---: | ---: |")
    for fig in r["mp"].values():
        ours, theirs = fig["median"]["dragon-nb"], fig["median"]["stdlib"]
        print(f"| {fig['label']} | {fig['unit']} | {ours:,.1f} | {theirs:,.0f} | "
              f"{fig['ratio']:.2g}x |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        print("RESULT " + json.dumps(driver(args.quick)), flush=True)
        return 0
    import netns
    why = netns.available()
    if why:
        print(f"bench_hosts: skipped: {why}")
        return 0
    with netns.NamespaceHosts(["h1", "h2", "h3"]) as hosts:
        env = dict(os.environ, DNB_LISTEN=hosts.address["h1"], DNB_LAUNCHER=hosts.launcher,
                   PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."), HERE]))
        proc = subprocess.run(hosts.on("h1", [sys.executable, os.path.abspath(__file__),
                                              "--driver", *(["--quick"] if args.quick else [])]),
                              env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return 1
    figures = json.loads(lines[-1][len("RESULT "):])
    figures = json.loads(json.dumps(figures))          # int keys -> str, as in the file
    report(figures)
    save_results("hosts", figures, args.json, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
