"""Soak: mixed work on one runtime for a long time, watching every process's memory.

    python benchmarks/soak.py                  # 30 minutes
    python benchmarks/soak.py --minutes 3      # a quick check
    python benchmarks/soak.py --minutes 0.5 --interval 2 --json soak.json

Not part of the test suite. In a loop, until the time is up, each round:

* on a long-lived ``Pool``: ``map``, ``imap``, ``imap_unordered`` and a burst of
  ``apply_async``, every result checked;
* on a long-lived ``DDict``: puts (one by one or as a batch) of mixed values,
  some of them 64 KiB and up (zero-copy frames), gets, pops and deletes, a
  ``fetch_add``, puts from the pool's workers; a fixed set of keys written at the
  start is read back every round; the DDict holds the same keys after each round;
* a two-stage ``Pipeline`` (every 5th round storing into the DDict instead);
* every 10th round a new ``Pool`` (with the DDict in its ``initargs``) does a
  ``map`` and is closed; every 20th round a short-lived DDict is made and destroyed.

Every ``--interval`` seconds a sampler thread records the RSS and open file
descriptors of every runtime process: the caller, the head, the node agents,
and the processes the head lists (``procs``: pool workers, DDict managers,
pipeline stages), labelled by their owner; the descendants of the caller are
walked too, so a process the head has forgotten is still seen. A row per sample
is printed for the long-lived processes.

The sampler also reads each node's telemetry record (``TelemetryMonitor``): how
many owners (pools, DDicts, pipeline stages) it carries and its pickled size,
since every record goes to the head and every subscriber four times a second.

At the end, a verdict per process seen in both the first and the last third of
the run: its RSS growth is the median of its samples in the last third minus
the median in the first third; *flat* when under ``--threshold-mib``. Open file
descriptors are judged the same way (``--threshold-fds``), so are the owners in
each node's telemetry record (``--threshold-owners``), and the number of
runtime processes once the work has stopped must be what it was before it started.
Rounds per minute in the first and last thirds are printed (a slowdown is a
leak of time).
Exit status: 0 all flat, 1 something grew, 2 a wrong result or an error,
3 no round finished within ``--stall`` seconds (every thread's stack is printed).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import pickle
import statistics
import sys
import threading
import time
import traceback

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dragon_nb  # noqa: E402
from dragon_nb import DDict, Pool  # noqa: E402
from dragon_nb.pipeline import Pipeline, stage  # noqa: E402
from dragon_nb.telemetry import TelemetryMonitor  # noqa: E402

MiB = 1 << 20
PERMANENT_KEYS = 1000


# --- the work (functions run in pool workers and stage workers) -----------------------------
def square(x):
    return x * x


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def add(a, b):
    return a + b


def init_worker(d):
    import multiprocessing
    multiprocessing.current_process().stash = {"ddict": d}


def put_from_worker(args):
    import multiprocessing
    round_no, i = args
    d = multiprocessing.current_process().stash["ddict"]
    d[f"w{round_no}-{i}"] = (round_no, i)
    return i


def value_for(round_no, i):
    """Mixed values: small ints, strings, tuples, 1 KiB bytes, every 97th 64 KiB."""
    kind = i % 5
    if i % 97 == 0:
        return bytes([i % 256]) * (64 << 10)
    if kind == 0:
        return i * round_no
    if kind == 1:
        return f"value {round_no} {i}"
    if kind == 2:
        return (round_no, i, [i] * 3)
    if kind == 3:
        return bytes([i % 256]) * 1024
    return {"i": i, "r": round_no}


def permanent_value(i):
    return (i, f"permanent {i}", bytes([i % 256]) * (i % 300))


class Failed(Exception):
    """A result was wrong."""


def check(cond, what):
    if not cond:
        raise Failed(what)


# --- one round of mixed work ------------------------------------------------------------------
class Work:
    def __init__(self, args):
        self.args = args
        self.d = DDict(1, args.nodes, 512 * MiB, timeout=30)
        self.pool = Pool(2, initializer=init_worker, initargs=(self.d,))
        self.d.update({("perm", i): permanent_value(i) for i in range(PERMANENT_KEYS)})
        self.d["counter"] = 0
        self.round = 0
        self.items = 0
        self.timeout = args.op_timeout

    def owners(self) -> dict:
        return {self.pool.owner: "pool", self.d.owner: "ddict"}

    def known(self) -> dict:
        """pid -> label of the long-lived pool's workers and DDict's managers."""
        out = {h.pid: f"pool w{i} n{h.node}" for i, h in enumerate(self.pool._pool)}
        out.update({m.pid: f"ddict m{m.manager_id} n{m.node}" for m in self.d.stats})
        return out

    def one_round(self):
        r = self.round = self.round + 1
        t = self.timeout
        p, d = self.pool, self.d
        n = self.args.items
        # Pool
        check(p.map_async(square, range(n), chunksize=100).get(t) ==
              [x * x for x in range(n)], "map(square)")
        it = p.imap(inc, range(n), chunksize=50)
        check(sum(it.next(t) for _ in range(n)) == n * (n + 1) // 2, "imap(inc)")
        check(sorted(p.imap_unordered(double, range(n // 10), chunksize=7)) ==
              [2 * x for x in range(n // 10)], "imap_unordered(double)")
        pending = [p.apply_async(add, (i, r)) for i in range(200)]
        check([a.get(t) for a in pending] == [i + r for i in range(200)], "apply_async(add)")
        self.items += n + n + n // 10 + 200
        # DDict churn
        keys = [f"r{r}-{i}" for i in range(self.args.keys)]
        batch = r % 2 == 0
        if batch:
            d.start_batch_put()
        for i, k in enumerate(keys):
            d[k] = value_for(r, i)
        if batch:
            d.end_batch_put()
        check(len(d) == PERMANENT_KEYS + 1 + len(keys), f"len after puts (round {r})")
        for i, k in enumerate(keys):
            check(d[k] == value_for(r, i), f"get {k}")
        for i, k in enumerate(keys[::2]):
            check(d.pop(k) == value_for(r, 2 * i), f"pop {k}")
        for k in keys[1::2]:
            del d[k]
        check(d.fetch_add("counter", 1) == r - 1, "fetch_add")
        worker_keys = p.map_async(put_from_worker, [(r, i) for i in range(200)],
                                  chunksize=10).get(t)
        check(worker_keys == list(range(200)), "puts from workers")
        for i in range(200):
            check(d.pop(f"w{r}-{i}") == (r, i), "a worker's put")
        for i in range(r % 10, PERMANENT_KEYS, 10):             # a tenth of them each round
            check(d[("perm", i)] == permanent_value(i), f"permanent key {i}")
        check(len(d) == PERMANENT_KEYS + 1, f"len after the round's keys went (round {r})")
        # Pipeline
        m = self.args.items
        if r % 5 == 0:
            with Pipeline(range(m), stage(inc), stage(double, workers=2), into=d) as pipe:
                check(pipe.run() == m, "pipeline into the DDict")
            check(len(d) == PERMANENT_KEYS + 1 + m, "pipeline keys in the DDict")
            check(all(d.pop(i) == 2 * (i + 1) for i in range(m)), "pipeline values")
        else:
            with Pipeline(range(m), stage(inc), stage(double, workers=2)) as pipe:
                check(sum(pipe) == m * (m + 1), "pipeline sum")
        self.items += m
        # re-creations
        if r % 10 == 0:
            with Pool(2, initializer=init_worker, initargs=(d,)) as q:
                check(q.map_async(square, range(1000)).get(t) ==
                      [x * x for x in range(1000)], "map on a new pool")
                q.map_async(put_from_worker, [(-r, i) for i in range(50)]).get(t)
                for i in range(50):
                    check(d.pop(f"w{-r}-{i}") == (-r, i), "a new pool's puts")
        if r % 20 == 0:
            with DDict(1, self.args.nodes, 16 * MiB, timeout=30) as e:
                e.update({i: str(i) for i in range(1000)})
                check(len(e) == 1000 and e[999] == "999", "a short-lived DDict")
                e.destroy()

    def close(self):
        try:
            self.pool.terminate()
        finally:
            self.d.destroy()


# --- sampling ----------------------------------------------------------------------------------
class Sampler:
    """Every ``interval`` seconds: RSS and fds of every runtime process, labelled."""

    def __init__(self, rt, work: Work, interval: float):
        self.rt, self.work, self.interval = rt, work, interval
        self.samples: list[dict] = []          # {"t", "round", "procs": {key: (rss, fds)}}
        self.labels: dict[int, str] = {}       # pid -> label, first label given sticks
        self.seen_first: dict = {}              # key -> time first seen
        self._stop = threading.Event()
        self._numbers: dict[str, int] = {}
        self.known = work.known()
        self.thread = threading.Thread(target=self._run, name="soak sampler", daemon=True)
        self.t0 = time.monotonic()
        self.monitor = TelemetryMonitor(rt)

    def start(self):
        self.sample()
        self.thread.start()

    def stop(self):
        self._stop.set()
        self.thread.join()
        self.monitor.close()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:                       # the runtime stopping under us, say
                traceback.print_exc()

    def _label(self, pid, owner_of, agent_node) -> str:
        if pid in self.labels:
            return self.labels[pid]
        if pid == os.getpid():
            label = "caller"
        elif pid == self.rt._proc.pid:
            label = "head"
        elif pid in agent_node:
            label = f"agent{agent_node[pid]}"
        elif pid in self.known:
            label = self.known[pid]
        elif pid in owner_of:
            node, owner = owner_of[pid]
            role = self.work.owners().get(owner)
            if role is None:
                role = ("pipeline" if owner.startswith("pipe-") else
                        "ddict*" if owner.startswith("ddict-") else "pool*")
                label = f"{role} n{node}"                 # transient: no number
            else:                                         # a replacement
                k = self._numbers.get(role, 0)
                self._numbers[role] = k + 1
                label = f"{role} new{k} n{node}"
        else:
            label = "other"
        self.labels[pid] = label
        return label

    def sample(self):
        me = psutil.Process()
        procs = [me] + me.children(recursive=True)
        owner_of = {}
        if self.rt.alive:
            try:
                owner_of = {p: (n, o) for n, p, o in self.rt.request("procs", timeout=10)["procs"]}
            except Exception:
                pass
        agent_node = {}
        for p in procs:
            try:
                cmd = p.cmdline()
                if "dragon_nb.runtime.agent" in cmd and p.ppid() == self.rt._proc.pid:
                    agent_node[p.pid] = cmd[cmd.index("--node") + 1]
            except (psutil.Error, ValueError, IndexError):
                pass
        row = {}
        for p in procs:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                rss, fds = p.memory_info().rss, p.num_fds()
            except psutil.Error:
                continue
            label = self._label(p.pid, owner_of, agent_node)
            if label == "other" and "resource_tracker" in " ".join(p.cmdline() or ()):
                continue
            key = f"{label} [{p.pid}]"
            self.seen_first.setdefault(key, time.monotonic())
            row[key] = (rss, fds)
        tel = {str(node): (len(rec.get("owners", {})), len(pickle.dumps(rec)))
               for node, rec in self.monitor.snapshot().items()}
        self.samples.append({"t": time.monotonic() - self.t0, "round": self.work.round,
                             "items": self.work.items, "procs": row, "telemetry": tel})


def runtime_processes() -> dict:
    """pid -> command line of this process's live descendants (not the stdlib's
    resource tracker, which lives as long as Python)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(cmd):
                out[p.pid] = cmd
        except psutil.Error:
            pass
    return out


def transient(key: str) -> bool:
    return key.startswith(("pipeline", "pool*", "ddict*", "other"))


def print_row(sample, columns, header: bool):
    if header:
        print(f"{'t (s)':>7} {'round':>6} {'procs':>5}  " +
              " ".join(f"{c.split(' [')[0]:>12}" for c in columns) + f" {'others':>14}"
              f" {'tel. owners':>12}", flush=True)
    procs = sample["procs"]
    cells = []
    for c in columns:
        cells.append(f"{procs[c][0] / MiB:12.1f}" if c in procs else f"{'-':>12}")
    others = [v[0] for k, v in procs.items() if k not in columns]
    other = f"{len(others)}: {sum(others) / MiB:.0f} MiB" if others else "0"
    tel = "/".join(str(sample["telemetry"][n][0]) for n in sorted(sample["telemetry"]))
    print(f"{sample['t']:7.0f} {sample['round']:6d} {len(procs):5d}  " + " ".join(cells) +
          f" {other:>14} {tel:>12}", flush=True)


def verdicts(samples, threshold_mib, threshold_fds):
    """Per process seen in the first and last thirds: (key, first, last, growth, fds...)."""
    first, last = thirds(samples)
    keys = sorted({k for s in samples for k in s["procs"]},
                  key=lambda k: (transient(k), k))
    out = []
    for k in keys:
        a = [s["procs"][k] for s in first if k in s["procs"]]
        b = [s["procs"][k] for s in last if k in s["procs"]]
        if len(a) < 2 or len(b) < 2:
            continue
        rss_a = statistics.median(v[0] for v in a) / MiB
        rss_b = statistics.median(v[0] for v in b) / MiB
        fd_a = statistics.median(v[1] for v in a)
        fd_b = statistics.median(v[1] for v in b)
        flat = rss_b - rss_a < threshold_mib and fd_b - fd_a < threshold_fds
        out.append((k, rss_a, rss_b, rss_b - rss_a, fd_a, fd_b, flat))
    return out


def thirds(samples):
    end = samples[-1]["t"]
    return ([s for s in samples if s["t"] <= end / 3],
            [s for s in samples if s["t"] >= 2 * end / 3])


def telemetry_verdicts(samples, threshold_owners):
    """Per node: owners and bytes of its telemetry record, first third against last."""
    first, last = thirds(samples)
    out = []
    for node in sorted({n for s in samples for n in s["telemetry"]}):
        a = [s["telemetry"][node] for s in first if node in s["telemetry"]]
        b = [s["telemetry"][node] for s in last if node in s["telemetry"]]
        if not a or not b:
            continue
        oa, ob = (statistics.median(v[0] for v in x) for x in (a, b))
        ba, bb = (statistics.median(v[1] for v in x) for x in (a, b))
        out.append((node, oa, ob, ba, bb, ob - oa < threshold_owners))
    return out


def round_rates(samples):
    """Rounds per minute in the first and the last third of the run."""
    first, last = thirds(samples)
    rates = []
    for part in (first, last):
        if len(part) < 2 or part[-1]["t"] <= part[0]["t"]:
            return None
        rates.append((part[-1]["round"] - part[0]["round"]) * 60 / (part[-1]["t"] - part[0]["t"]))
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=None,
                    help="seconds between samples (default: about 60 samples in the run, "
                         "2 to 30 s apart)")
    ap.add_argument("--threshold-mib", type=float, default=5.0,
                    help="RSS growth, last third over first third, that counts as not flat")
    ap.add_argument("--threshold-fds", type=float, default=8,
                    help="growth in open file descriptors that counts as not flat")
    ap.add_argument("--threshold-owners", type=float, default=16,
                    help="growth in the owners a node's telemetry record carries that "
                         "counts as not flat")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--items", type=int, default=20_000, help="tasks per Pool call per round")
    ap.add_argument("--keys", type=int, default=2_000, help="DDict keys churned per round")
    ap.add_argument("--op-timeout", type=float, default=120.0,
                    help="seconds any one call may take before the round counts as failed")
    ap.add_argument("--stall", type=float, default=300.0,
                    help="seconds without a finished round before giving up (exit 3)")
    ap.add_argument("--json", help="write every sample to this file")
    args = ap.parse_args(argv)
    duration = args.minutes * 60
    interval = args.interval or min(30.0, max(2.0, duration / 60))

    print(f"soak: {args.minutes:g} min on {args.nodes} virtual nodes, a sample every "
          f"{interval:g} s; load average {os.getloadavg()[0]:.2f}; "
          f"{psutil.cpu_count()} cores; Python {sys.version.split()[0]}", flush=True)
    rt = dragon_nb.start(nodes=args.nodes)
    baseline_procs = runtime_processes()           # the head and its agents
    work = Work(args)
    sampler = Sampler(rt, work, interval)
    last_progress = [time.monotonic()]
    stalled = threading.Event()

    def watchdog():
        while not stalled.wait(5):
            if time.monotonic() - last_progress[0] > args.stall:
                print(f"\nsoak: no round finished for {args.stall:g} s; every thread:",
                      flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)               # the runtime's lifeline ends every process it has

    threading.Thread(target=watchdog, name="soak watchdog", daemon=True).start()

    status, error = 0, None
    printed = 0
    columns = None
    t_start = time.monotonic()
    try:
        work.one_round()                           # warm: every kind of process has run once
        sampler.start()
        order = ("caller", "head", "agent", "pool", "ddict")
        columns = sorted((k for k in sampler.samples[0]["procs"] if not transient(k)),
                         key=lambda k: (next(i for i, o in enumerate(order + ("",))
                                             if k.startswith(o)), k))
        print_row(sampler.samples[0], columns, True)
        printed = 1
        while time.monotonic() - t_start < duration:
            work.one_round()
            last_progress[0] = time.monotonic()
            while printed < len(sampler.samples):
                print_row(sampler.samples[printed], columns, printed % 20 == 0)
                printed += 1
    except KeyboardInterrupt:
        print("soak: interrupted; judging what was sampled", flush=True)
    except Exception as e:
        status, error = 2, e
        print(f"\nsoak: round {work.round} FAILED:", flush=True)
        traceback.print_exc()
    finally:
        stalled.set()
        if sampler.thread.is_alive():
            sampler.sample()                       # the state at the end of the work
            sampler.stop()
        while columns is not None and printed < len(sampler.samples):
            print_row(sampler.samples[printed], columns, False)
            printed += 1
        try:
            work.close()
        except Exception:
            traceback.print_exc()

    elapsed = time.monotonic() - t_start
    print(f"\n{work.round} rounds, {work.items:,} pool and pipeline items in {elapsed / 60:.1f} "
          f"min; load average {os.getloadavg()[0]:.2f}", flush=True)
    if len(sampler.samples) >= 6:
        rows = verdicts(sampler.samples, args.threshold_mib, args.threshold_fds)
        print(f"\n{'process':26} {'RSS first 1/3':>13} {'last 1/3':>9} {'growth':>8} "
              f"{'fds':>9}  verdict (flat: < {args.threshold_mib:g} MiB, "
              f"< {args.threshold_fds:g} fds)")
        for k, a, b, g, fa, fb, flat in rows:
            print(f"{k:26} {a:10.1f} MiB {b:9.1f} {g:+8.1f} {fa:4.0f}>{fb:<4.0f}  "
                  f"{'flat' if flat else 'GROWS'}")
            if not flat and status == 0:
                status = 1
        for node, a, b, ba, bb, flat in telemetry_verdicts(sampler.samples,
                                                           args.threshold_owners):
            print(f"node {node} telemetry record: {a:.0f} > {b:.0f} owners, "
                  f"{ba / 1024:.1f} > {bb / 1024:.1f} KiB  {'flat' if flat else 'GROWS'}")
            if not flat and status == 0:
                status = 1
        rates = round_rates(sampler.samples)
        if rates:
            print(f"rounds per minute: {rates[0]:.0f} in the first third, "
                  f"{rates[1]:.0f} in the last")
        seen = {k for s in sampler.samples for k in s["procs"]}
        short = [k for k in seen if transient(k)]
        peak = max((v[0] for s in sampler.samples for k, v in s["procs"].items()
                    if transient(k)), default=0)
        print(f"short-lived processes sampled: {len(short)} (pipeline stages, re-created "
              f"pools and DDicts), peak RSS {peak / MiB:.1f} MiB")
    else:
        print("too few samples for a verdict: run longer or lower --interval")
        if status == 0:
            status = 1
    deadline = time.monotonic() + 10
    while True:                     # pools and DDicts just closed may need a moment
        after = runtime_processes()
        if len(after) <= len(baseline_procs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    flat = len(after) <= len(baseline_procs)
    print(f"runtime processes once the work stopped: {len(after)} (before it started: "
          f"{len(baseline_procs)}) -> {'flat' if flat else 'GROWS'}")
    if not flat:
        print("  left: " + "; ".join(f"pid {pid} ({sampler.labels.get(pid, ' '.join(cmd))})"
                                     for pid, cmd in after.items()
                                     if pid not in baseline_procs))
        if status == 0:
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": work.round, "items": work.items,
                       "samples": sampler.samples}, f)
    dragon_nb.stop()
    verdict = {0: "FLAT", 1: "NOT FLAT", 2: f"FAILED ({error!r})"}[status]
    print(f"soak verdict: {verdict}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
