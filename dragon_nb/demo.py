"""The README's demo: count words in generated files across virtual nodes.

It follows the seed's "filesystem visible only on one node" example: the
caller reads files lazily and streams them through ``Pool.imap``; a bar per
node shows each node's progress, then a summary.
"""
from __future__ import annotations

import collections
import random
import tempfile
import time
from pathlib import Path

import dragon_nb
from dragon_nb.telemetry import TextProgress, TelemetryMonitor, owner_progress

WORDS = ("dragon node pool worker task chunk result memory kernel notebook "
         "stream pipeline dictionary shard manager agent head").split()


def make_files(folder: Path, n: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2000, 6000)))
        (folder / f"doc{i:04d}.txt").write_text(text)


def count_words(text: str) -> collections.Counter:
    for _ in range(40):                # stands in for real parsing: ~10 ms a file
        counts = collections.Counter(text.split())
    return counts


class FileReader:
    """The seed's lazy reader: one file read per item the pool asks for."""

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.txt"))
        self.idx = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.idx >= len(self.files):
            raise StopIteration
        text = self.files[self.idx].read_text()
        self.idx += 1
        return text


def main(nodes: int = 4, files: int = 400) -> int:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dragon-nb-demo-") as tmp:
        folder = Path(tmp)
        make_files(folder, files)
        with dragon_nb.start(nodes=nodes) as rt:
            t_start = time.perf_counter()
            print(f"runtime: {nodes} virtual nodes, {rt.cpu_count()} cores, "
                  f"up in {t_start - t0:.2f} s (including {files} generated files)")
            total = collections.Counter()
            with dragon_nb.Pool(nodes) as pool:
                with TextProgress(pool):
                    for counts in pool.imap(count_words, FileReader(folder), chunksize=4,
                                           progress=False):   # the per-node bars above
                        total.update(counts)
                elapsed = time.perf_counter() - t_start
                with TelemetryMonitor(rt) as mon:
                    mon.wait_for_nodes(nodes)
                    time.sleep(0.3)
                    per_node = owner_progress(mon.snapshot(), pool.owner)
            print(f"\nprocessed {files} files, {sum(total.values()):,} words "
                  f"in {elapsed:.2f} s ({files / elapsed:.0f} files/s)")
            print("files per node: " + ", ".join(
                f"node {n}: {p['done']}" for n, p in sorted(per_node.items())))
            print("top words: " + ", ".join(f"{w} {c:,}" for w, c in total.most_common(3)))
        dragon_nb.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
