"""A recursive merge sort with one Process per sub-list, in the shape of
Dragon's cookbook (examples/multiprocessing/merge_sort.py): each process
sorts its list by starting two child processes on the halves, which send
their sorted halves back on a Queue, and merges them. Under ``dragon-nb run``
(or Dragon's launcher) the processes spread over the nodes.

    dragon-nb run --nodes 4 examples/merge_sort.py --size 2000 --cutoff 250
"""
import argparse
import os
import random

import dragon  # noqa: F401  (dragon-nb run makes this dragon_nb)
import multiprocessing as mp


def merge(left, right):
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            out.append(left[i])
            i += 1
        else:
            out.append(right[j])
            j += 1
    return out + left[i:] + right[j:]


def sort(values, cutoff, result: "mp.queues.Queue", side: str, where: "mp.queues.Queue"):
    where.put(os.environ.get("DRAGON_NB_NODE", "?"))     # the node it runs on
    if len(values) <= cutoff:
        result.put((side, sorted(values)))
        return
    middle = len(values) // 2
    halves = mp.Queue()
    children = [mp.Process(target=sort, args=(part, cutoff, halves, name, where))
                for name, part in (("left", values[:middle]), ("right", values[middle:]))]
    for child in children:
        child.start()
    got = dict(halves.get(timeout=120) for _ in children)
    for child in children:
        child.join(120)
    result.put((side, merge(got["left"], got["right"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--cutoff", type=int, default=250)
    args = ap.parse_args()
    mp.set_start_method("dragon")
    values = [random.randrange(10**6) for _ in range(args.size)]
    result, where = mp.Queue(), mp.Queue()
    root = mp.Process(target=sort, args=(values, args.cutoff, result, "all", where))
    root.start()
    side, ordered = result.get(timeout=300)
    root.join(60)
    started = []
    while not where.empty():
        started.append(where.get())
    assert ordered == sorted(values), "the merge sort is wrong"
    print(f"sorted {len(values)} values with {len(started)} processes "
          f"on nodes {','.join(sorted(set(started)))}; exit code {root.exitcode}")


if __name__ == "__main__":
    main()
