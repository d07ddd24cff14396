#!/usr/bin/env python3
"""Bar chart of dragon-nb's speed-up over the standard library, from the figures the
benchmarks wrote (benchmarks/results/*.json, written by a full run of each
bench_*.py, i.e. ``make bench``) into docs/img/benchmarks.svg.

    python benchmarks/plot.py [--results DIR] [--out PATH]      (= make plot)

Every bar is a ratio measured within one run, so above 1 means dragon-nb was faster:
Pool throughput is dragon-nb/stdlib ``Pool``; Pool first result is stdlib/dragon-nb
time; streaming is against the stdlib's chained ``imap``; DDict is against
``multiprocessing.Manager().dict()`` (batched put: against its one-by-one put).
"""
from __future__ import annotations

import argparse
import os
import sys

from common import RESULTS, load_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "img", "benchmarks.svg")

DDICT_ROWS = [  # key in results, label, the Manager figure it is compared with
    ("put_64B", "put, 64 B values", "put_64B"),
    ("get_64B", "get, 64 B values", "get_64B"),
    ("batch_put_64B", "batched put, 64 B (vs put)", "put_64B"),
    ("update", "update() with a dict", "update"),
    ("put_1MiB", "put, 1 MiB values", "put_1MiB"),
    ("get_1MiB", "get, 1 MiB values", "get_1MiB"),
    ("one_client", "1 client, 1 manager", "one_client"),
    ("two_clients", "2 clients, 2 managers", "two_clients"),
]


def ratios(results: dict) -> list:
    """[(group, label, ratio)], top to bottom, from whatever results there are."""
    rows = []
    pool = results.get("pool")
    if pool:
        group = "Pool vs multiprocessing.Pool"
        for case, r in pool["throughput"].items():
            rows.append((group, case.replace(" chunksize=", ", chunksize="),
                         r["dragon-nb"]["best"] / r["stdlib"]["best"]))
        first = pool["first_result"]
        rows.append((group, "first result, 4 nodes (time)",
                     first["stdlib"]["first"] / first["dragon-nb"]["first"]))
    pipe = results.get("pipeline")
    if pipe:
        group = "streaming vs stdlib chained imap"
        rates = pipe["rates"]
        std = rates["stdlib chained imap"]
        rows.append((group, "chained imap", rates["dragon-nb chained imap"] / std))
        rows.append((group, "Pipeline", rates["dragon-nb Pipeline"] / std))
    ddict = results.get("ddict")
    if ddict:
        group = "DDict vs Manager().dict()"
        res = ddict["results"]
        for key, label, ref in DDICT_ROWS:
            ours, theirs = res.get(f"ddict.{key}"), res.get(f"mp.{ref}")
            if ours and theirs:
                rows.append((group, label, ours / theirs))
    return rows


def draw(results: dict, out: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    matplotlib.rcParams["svg.hashsalt"] = "dragon-nb"     # the same figures, the same file
    matplotlib.rcParams["svg.fonttype"] = "none"          # text stays text
    rows = ratios(results)
    if not rows:
        raise SystemExit("no benchmark results: run `make bench` first")
    groups = list(dict.fromkeys(g for g, _, _ in rows))
    colours = dict(zip(groups, ("#4c72b0", "#55a868", "#c44e52", "#8172b2")))

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.8))
    ys = list(range(len(rows)))[::-1]
    values = [r for _, _, r in rows]
    # each bar runs from 1x to its ratio: right is faster, left is slower
    ax.barh(ys, [v - 1 for v in values], left=1, height=0.7,
            color=[colours[g] for g, _, _ in rows])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, [label for _, label, _ in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(min(0.5, min(values) / 2.5), max(2.0, max(values)) * 3)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    for y, v in zip(ys, values):
        text = f"{v:.2f}x" if v < 10 else f"{v:.0f}x"
        if v >= 1:
            ax.text(v * 1.06, y, text, va="center", ha="left", fontsize=8)
        else:
            ax.text(v / 1.06, y, text, va="center", ha="right", fontsize=8)
    for y in range(1, len(rows)):               # a thin line between groups
        if rows[len(rows) - y][0] != rows[len(rows) - y - 1][0]:
            ax.axhline(y - 0.5, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("dragon-nb's speed-up over the stdlib (log scale; right of 1x: dragon-nb is faster)")
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups],
               labels=groups, loc="lower center", ncol=len(groups), fontsize=8, frameon=False)
    dates = sorted(r["date"][:10] for r in results.values())
    host = next(iter(results.values()))["host"]
    ax.set_title(f"dragon-nb / stdlib, measured in the same run ({dates[0]}"
                 f"{' to ' + dates[-1] if dates[-1] != dates[0] else ''}; "
                 f"{host['cores']} cores, Python {host['python']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, metadata={"Date": None})
    plt.close(fig)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=RESULTS, help="folder of <name>.json files")
    ap.add_argument("--out", default=OUT, help="image to write (.svg or .png)")
    args = ap.parse_args(argv)
    results = load_results(args.results)
    rows = draw(results, args.out)
    for group, label, ratio in rows:
        print(f"{group:34} {label:30} {ratio:7.2f}x")
    print(f"wrote {os.path.relpath(args.out)} from {', '.join(sorted(results))} results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
