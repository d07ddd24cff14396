"""Where the benchmark scripts keep their figures, and how ``plot.py`` reads them.

A full run of ``bench_pool.py``, ``bench_pipeline.py`` or ``bench_ddict.py``
(what ``make bench`` does) writes ``benchmarks/results/<name>.json``; a
``--quick`` run does not, so a smoke run never replaces real figures.
``--json PATH`` writes the same record to PATH as well, quick or not.
``make plot`` (``benchmarks/plot.py``) draws docs/img/benchmarks.svg from the
files in ``benchmarks/results/``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAMES = ("pool", "pipeline", "ddict")


def results_path(name: str) -> str:
    return os.path.join(RESULTS, f"{name}.json")


def _write(path: str, record: dict) -> None:
    tmp = path + ".tmp"                 # never a half-written file under the real name
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def save_results(name: str, figures: dict, json_path: str | None = None,
                 quick: bool = False) -> dict:
    """Record one benchmark run: ``figures`` plus when and where it ran."""
    record = {"benchmark": name,
              "date": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds"),
              "quick": quick,
              "host": {"cores": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "loadavg": os.getloadavg()[0]},
              **figures}
    if json_path:
        _write(json_path, record)
    if not quick:
        os.makedirs(RESULTS, exist_ok=True)
        _write(results_path(name), record)
        print(f"figures written to {os.path.relpath(results_path(name))}")
    return record


def load_results(folder: str = RESULTS) -> dict:
    """``{name: record}`` for every benchmark with a file in ``folder``."""
    out = {}
    for name in NAMES:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
    return out
