"""Two-stage streaming: dragon-nb's chained imap and Pipeline vs the stdlib's chained imap.

Same total workers everywhere (one per stage by default, 2 cores here).
Prints items/s and the ratios against the stdlib measured in the same run,
MB/s for 1 MiB items through a two-stage Pipeline, and the caller's peak RSS
for a long stream (each case in a fresh process, so peaks do not mix).

    python benchmarks/bench_pipeline.py [--items N] [--long N] [--quick] [--json PATH]

A full run also writes benchmarks/results/pipeline.json (see common.py).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import save_results  # noqa: E402


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def touch(b):
    return b


def stdlib_chained(n):
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as a, ctx.Pool(1) as b:
        list(b.imap(double, a.imap(inc, range(1000))))
        t = time.perf_counter()
        total = sum(b.imap(double, a.imap(inc, range(n))))
        dt = time.perf_counter() - t
    assert total == sum(2 * (x + 1) for x in range(n))
    return n / dt


def dnb_chained(n):
    import dragon_nb
    with dragon_nb.start(nodes=2), dragon_nb.Pool(1) as a, dragon_nb.Pool(1) as b:
        list(b.imap(double, a.imap(inc, range(1000))))
        t = time.perf_counter()
        total = sum(b.imap(double, a.imap(inc, range(n))))
        dt = time.perf_counter() - t
    dragon_nb.stop()
    assert total == sum(2 * (x + 1) for x in range(n))
    return n / dt


def dnb_pipeline(n):
    import dragon_nb
    from dragon_nb.pipeline import Pipeline, stage
    with dragon_nb.start(nodes=2):
        with Pipeline(range(1000), stage(inc), stage(double)) as p:
            list(p)
        with Pipeline(range(n), stage(inc), stage(double)) as p:
            t = time.perf_counter()
            total = sum(p)
            dt = time.perf_counter() - t
    dragon_nb.stop()
    assert total == sum(2 * (x + 1) for x in range(n))
    return n / dt


def dnb_pipeline_bytes(count, size=1 << 20):
    import dragon_nb
    from dragon_nb.pipeline import Pipeline, stage
    blob = os.urandom(size)
    with dragon_nb.start(nodes=2):
        with Pipeline((blob for _ in range(count)), stage(touch), stage(touch)) as p:
            t = time.perf_counter()            # the stream, not the stages' start-up
            got = sum(len(b) for b in p)
            dt = time.perf_counter() - t
    dragon_nb.stop()
    assert got == count * size
    return count * size / dt / 1e6


def peak_rss_case(case, n):
    """Run one case in a fresh interpreter; return (items/s, peak RSS in MiB)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); "
            f"sys.path.insert(0, {HERE!r}); import bench_pipeline as b, resource; "
            f"r = b.{case}({n}); "
            f"print(r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900, check=True).stdout.split()
    return float(out[0]), int(out[1]) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--long", type=int, default=1_000_000,
                    help="items in the peak-RSS runs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    n, long_n, mib_items = args.items, args.long, 200
    if args.quick:
        n, long_n, mib_items = 20_000, 50_000, 100
    print(f"two stages, one worker each; {n:,} tiny items; load average {os.getloadavg()[0]:.1f}")
    std = stdlib_chained(n)
    chained = dnb_chained(n)
    pipe = dnb_pipeline(n)
    mbs = dnb_pipeline_bytes(mib_items)
    rows = [("stdlib chained imap", std, 1.0), ("dragon-nb chained imap", chained, chained / std),
            ("dragon-nb Pipeline", pipe, pipe / std)]
    print(f"{'case':28} {'items/s':>12} {'vs stdlib':>10}")
    for name, rate, ratio in rows:
        print(f"{name:28} {rate:12,.0f} {ratio:9.2f}x")
    print(f"1 MiB items through a two-stage Pipeline: {mbs:,.0f} MB/s")
    peaks = {}
    for case in ("stdlib_chained", "dnb_chained", "dnb_pipeline"):
        rate, peak = peak_rss_case(case, long_n)
        peaks[case] = (rate, peak)
        print(f"{case:28} {long_n:,} items: {rate:10,.0f} items/s, caller peak RSS {peak:6.0f} MiB")
    save_results("pipeline", {"items": n, "rates": {r[0]: r[1] for r in rows},
                              "mb_per_s_1mib": mbs, "long_items": long_n,
                              "peaks_mib": peaks}, args.json, args.quick)


if __name__ == "__main__":
    main()
