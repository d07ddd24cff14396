"""multiprocessing benchmark: the "dragon" start method's queues, processes and
locks against the stdlib's "fork" context, side by side in one run.

    python benchmarks/bench_mp.py [--quick] [--hosted] [--rounds N] [--json PATH]
                                  [--cases process_seq,process_batch8,...]

A full run also writes benchmarks/results/mp.json (see common.py), or
mp-hosted.json with ``--hosted``.

dragon-nb runs on ``dragon_nb.start(nodes=2)`` with
``multiprocessing.get_context("dragon")``; where two processes talk, one is
placed on node 0 and the other on node 1 (``Process(..., node=N)``). Its
objects are made by this script: on one host they are kernel objects in
shared memory (dragon_nb/mp/shm.py), registered with node 0's object host;
with ``--hosted`` (``DRAGON_NB_MP_SHM=0``, what a runtime over TCP does) they
live in node 0's object host and every operation is a request to it.
The stdlib side uses ``multiprocessing.get_context("fork")`` and runs in a
helper process forked before the runtime starts, so its forks copy no zmq
threads and it forks from a small parent, as a plain script would. Measured:

* Queue one way, 64-byte ``bytes`` messages, producer -> consumer (messages/s);
* Queue ping-pong, 64 bytes there and back between two processes (round trips/s);
* Queue one way, 1 MiB ``bytes`` messages (MiB/s);
* Process start + join of ``def nothing(): pass`` (processes/s): one at a
  time, and in batches of 8 started then joined;
* an uncontended ``Lock`` acquire + release in one process (ops/s).

Before each timed part the queues carry one message each way, so that
connections and object hosts are up; the producer times from its first put
to the consumer's "done", and what arrived is checked. Each round runs every
case on both sides, which goes first alternating by round; the table gives
the median over the rounds and the ratio dragon-nb / stdlib (above 1:
dragon-nb is faster). The issue's targets are shown beside the ratios, never
asserted. Counts differ between the two sides, so that each measurement takes
about 0.5-2 s on a 2-core machine.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue
import statistics
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dragon_nb  # noqa: E402  (registers the "dragon" start method)

from common import save_results  # noqa: E402

NODES = 2
SIDES = ("dragon-nb", "stdlib")
MIB = 1 << 20
SMALL = 64
BATCH = 8
WAIT_S = 60.0           # the longest any get or join inside a measurement waits
CASE_TIMEOUT_S = 300.0  # the longest one measurement may take, start to results

# name -> (label, unit, issue's target ratio, count for dragon-nb, for the stdlib)
CASES = {
    "queue_64B":      ("Queue one way, 64 B", "msgs/s", 1.0, 40000, 20000),
    "queue_pingpong": ("Queue ping-pong, 64 B", "round trips/s", 1.0, 5000, 2500),
    "queue_1MiB":     ("Queue one way, 1 MiB", "MiB/s", 1.5, 800, 400),
    "process_seq":    ("Process start+join, one at a time", "procs/s", 0.5, 60, 200),
    "process_batch8": ("Process start+join, batches of 8", "procs/s", 0.5, 64, 240),
    "lock":           ("Lock acquire+release, uncontended", "ops/s", 0.5, 2000000, 2000000),
}
HOSTED_COUNTS = {"queue_64B": 1500, "queue_pingpong": 500, "queue_1MiB": 100, "lock": 1200}
QUICK_DIVISOR = 10


# --- what runs in the processes (module level: both start methods can run them) --------
def _consumer(q, back, n):
    q.get(timeout=WAIT_S)                       # the warm-up message
    back.put("ready")
    got = 0
    for _ in range(n):
        got += len(q.get(timeout=WAIT_S))
    back.put(got)


def _producer(q, back, n, size, results):
    msg = os.urandom(size)
    q.put(msg)
    back.get(timeout=WAIT_S)                    # the consumer is there and has read one
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(msg)
    got = back.get(timeout=WAIT_S)
    results.put((time.perf_counter() - t0, got))


def _ponger(ping, pong, n):
    for _ in range(n + 1):
        pong.put(ping.get(timeout=WAIT_S))


def _pinger(ping, pong, n, results):
    msg = os.urandom(SMALL)
    ping.put(msg)
    pong.get(timeout=WAIT_S)                    # the warm-up round trip
    got = 0
    t0 = time.perf_counter()
    for _ in range(n):
        ping.put(msg)
        got += len(pong.get(timeout=WAIT_S))
    results.put((time.perf_counter() - t0, got))


def _nothing():
    pass


# --- the measurements: the same code for both contexts -------------------------------------
def _process(ctx, target, args, node):
    if node is None:
        return ctx.Process(target=target, args=args)
    return ctx.Process(target=target, args=args, node=node)


def _pair(ctx, nodes, first, first_args, second, second_args) -> tuple:
    """Run ``first`` (which puts (seconds, check) on a results queue) and
    ``second`` in two processes, on ``nodes`` when given; -> (seconds, check)."""
    results = ctx.Queue()
    a, b = nodes if nodes else (None, None)
    procs = [_process(ctx, second, second_args, b),
             _process(ctx, first, (*first_args, results), a)]
    try:
        for p in procs:
            p.start()
        out = _result(results, procs)
        for p in procs:
            p.join(WAIT_S)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} ended with exit code {p.exitcode}")
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(WAIT_S)


def _result(results, procs):
    """What the timing process put on ``results``; raises, rather than wait out
    CASE_TIMEOUT_S, as soon as one of ``procs`` has failed."""
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"{failed[0].name} ended with exit code "
                                   f"{failed[0].exitcode} before the results") from None
    raise RuntimeError(f"no results in {CASE_TIMEOUT_S:.0f} s")


def one_way(ctx, nodes, n, size) -> float:
    q, back = ctx.Queue(), ctx.Queue()
    seconds, got = _pair(ctx, nodes, _producer, (q, back, n, size), _consumer, (q, back, n))
    if got != n * size:
        raise RuntimeError(f"one way: {got} bytes arrived, not {n * size}")
    return seconds


def ping_pong(ctx, nodes, n, size=SMALL) -> float:
    ping, pong = ctx.Queue(), ctx.Queue()
    seconds, got = _pair(ctx, nodes, _pinger, (ping, pong, n), _ponger, (ping, pong, n))
    if got != n * size:
        raise RuntimeError(f"ping-pong: {got} bytes came back, not {n * size}")
    return seconds


def processes(ctx, nodes, n, batch) -> float:
    """Start and join ``n`` processes, ``batch`` at a time (placement: the default)."""
    t0 = time.perf_counter()
    for _ in range(0, n, batch):
        procs = [ctx.Process(target=_nothing) for _ in range(batch)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(WAIT_S)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} ended with exit code {p.exitcode}")
    return time.perf_counter() - t0


def lock(ctx, nodes, n) -> float:
    lk = ctx.Lock()
    lk.acquire()
    lk.release()
    t0 = time.perf_counter()
    for _ in range(n):
        lk.acquire()
        lk.release()
    return time.perf_counter() - t0


MEASURES = {         # case -> how to time it with n messages/round trips/processes/ops
    "queue_64B": lambda ctx, nodes, n: one_way(ctx, nodes, n, SMALL),
    "queue_pingpong": ping_pong,
    "queue_1MiB": lambda ctx, nodes, n: one_way(ctx, nodes, n, MIB),   # msgs/s is MiB/s
    "process_seq": lambda ctx, nodes, n: processes(ctx, nodes, n, 1),
    "process_batch8": lambda ctx, nodes, n: processes(ctx, nodes, n, BATCH),  # n % BATCH == 0
    "lock": lock,
}


def measure(case: str, ctx, nodes, n: int) -> dict:
    """One measurement of ``case`` with ``n`` messages/round trips/processes/ops."""
    s = MEASURES[case](ctx, nodes, n)
    return {"count": n, "seconds": s, "rate": n / s}


# --- the stdlib side, in a process forked before the runtime starts -------------------------
def _stdlib_server(conn) -> None:
    fork = multiprocessing.get_context("fork")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        case, n = msg
        try:
            conn.send(("ok", measure(case, fork, None, n)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class StdlibSide:
    def __init__(self):
        fork = multiprocessing.get_context("fork")
        self.conn, theirs = fork.Pipe()
        self.proc = fork.Process(target=_stdlib_server, args=(theirs,), name="stdlib-side")
        self.proc.start()
        theirs.close()

    def measure(self, case: str, n: int) -> dict:
        self.conn.send((case, n))
        if not self.conn.poll(CASE_TIMEOUT_S):
            raise RuntimeError(f"stdlib {case}: no result in {CASE_TIMEOUT_S:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"stdlib {case}: {value}")
        return value

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


# --- running and reporting ---------------------------------------------------------------------
def run(counts: dict, rounds: int, log=print) -> dict:
    """{case: {side: {"median": rate, "samples": [...]}}}, both sides in each round."""
    stdlib = StdlibSide()           # forked before the runtime's threads exist
    samples = {case: {side: [] for side in SIDES} for case in counts}
    try:
        dragon_nb.start(nodes=NODES)
        ctx = multiprocessing.get_context("dragon")
        for r in range(rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for case, sizes in counts.items():
                for side in order:
                    if side == "stdlib":
                        m = stdlib.measure(case, sizes[side])
                    else:
                        m = measure(case, ctx, (0, 1), sizes[side])
                    samples[case][side].append(m)
            log(f"  round {r + 1}/{rounds} done (load average {os.getloadavg()[0]:.2f})")
    finally:
        stdlib.stop()
        dragon_nb.stop()
    return {case: {side: {"median": statistics.median(m["rate"] for m in ms),
                          "min": min(m["rate"] for m in ms),
                          "max": max(m["rate"] for m in ms),
                          "samples": ms}
                   for side, ms in by_side.items()}
            for case, by_side in samples.items()}


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def table(res: dict) -> str:
    rows = ["| case | unit | dragon-nb | stdlib (fork) | dragon-nb/stdlib | target | met |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for case, r in res.items():
        label, unit, target = CASES[case][:3]
        ours, std = r["dragon-nb"]["median"], r["stdlib"]["median"]
        ratio = ours / std
        shown = f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"
        rows.append(f"| {label} | {unit} | {_fmt(ours)} | {_fmt(std)} | **{shown}x** "
                    f"| >= {target:.1f}x | {'yes' if ratio >= target else 'no'} |")
    return "\n".join(rows)


def leftovers() -> list:
    """Processes this script started that are still there."""
    try:
        return [f"{p.pid} {' '.join(p.cmdline())[:80]}"
                for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one round of a tenth of the counts, a smoke run (writes no results)")
    ap.add_argument("--hosted", action="store_true",
                    help="objects in node 0's object host, not in shared memory")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    ap.add_argument("--cases", metavar="A,B", help="only these cases (of: " + ", ".join(CASES)
                    + "); like --quick, writes no results file but --json's")
    args = ap.parse_args(argv)
    chosen = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        ap.error(f"no such case: {', '.join(unknown)} (cases: {', '.join(CASES)})")

    rounds = args.rounds or (1 if args.quick else 5)
    div = QUICK_DIVISOR if args.quick else 1
    ours = {case: c[3] for case, c in CASES.items()}
    if args.hosted:
        os.environ["DRAGON_NB_MP_SHM"] = "0"
        ours.update(HOSTED_COUNTS)
    counts = {case: {"dragon-nb": max(1, ours[case] // div), "stdlib": max(1, c[4] // div)}
              for case, c in CASES.items() if case in chosen}
    if "process_batch8" in counts:
        counts["process_batch8"] = {side: max(BATCH, n - n % BATCH)
                                    for side, n in counts["process_batch8"].items()}

    load_start = os.getloadavg()
    print(f"{NODES} virtual nodes; {os.cpu_count()} cores; Python {platform.python_version()};"
          f" {rounds} round(s){' (quick)' if args.quick else ''}; load average "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at the start", flush=True)
    t0 = time.monotonic()
    res = run(counts, rounds, log=lambda s: print(s, flush=True))
    load_end = os.getloadavg()
    left = leftovers()
    print()
    print(table(res))
    print(f"\nmedians of {rounds} round(s), {time.monotonic() - t0:.0f} s in all; ratio ="
          f" dragon-nb/stdlib, above 1 means dragon-nb is faster; targets from the issue"
          f" (shown, not asserted).")
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
          f" (1-minute); processes left behind: {len(left) or 'none'}")
    for line in left:
        print(f"  left: {line}")

    save_results("mp-hosted" if args.hosted else "mp", {"machine": {"cores": os.cpu_count(),
                                    "python": platform.python_version(),
                                    "platform": platform.platform(),
                                    "loadavg": [load_start[0], load_end[0]],
                                    "loadavg_start": load_start, "loadavg_end": load_end},
                        "config": {"nodes": NODES, "rounds": rounds, "quick": args.quick,
                                   "counts": counts, "placement": "producer node 0, consumer"
                                   " node 1; objects " + ("in node 0's host" if args.hosted
                                                          else "in shared memory")},
                        "targets": {case: c[2] for case, c in CASES.items() if case in counts},
                        "cases": res, "leftover_processes": left}, args.json,
                 args.quick or args.cases is not None)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
