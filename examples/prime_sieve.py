"""A prime sieve whose stages are Processes joined by bounded Queues, in the
shape of Dragon's cookbook (examples/multiprocessing/prime_numbers.py): the
source sends 2, 3, 4, ... into the first stage; a stage keeps the first number
it receives (a prime), drops its multiples, and sends the rest on; when it
first has something to send it starts the next stage itself, at run time.
Each stage reports its prime and where it ran on a results Queue.

    dragon-nb run --nodes 4 examples/prime_sieve.py --limit 200
"""
import argparse
import os
import socket

import dragon  # noqa: F401  (dragon-nb run makes this dragon_nb)
import multiprocessing as mp

END = None
QUEUE_SIZE = 8          # bounded: a fast stage waits for a slow one


def stage(inbox: "mp.queues.Queue", results: "mp.queues.Queue"):
    prime = inbox.get(timeout=120)
    if prime is END:
        return
    results.put((prime, os.environ.get("DRAGON_NB_NODE", "?"), socket.gethostname()))
    outbox = child = None
    while True:
        n = inbox.get(timeout=120)
        if n is END:
            break
        if n % prime == 0:
            continue
        if child is None:                       # the next stage, started when needed
            outbox = mp.Queue(QUEUE_SIZE)
            child = mp.Process(target=stage, args=(outbox, results))
            child.start()
        outbox.put(n, timeout=120)
    if child is not None:
        outbox.put(END, timeout=120)
        child.join(120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    mp.set_start_method("dragon")
    first, results = mp.Queue(QUEUE_SIZE), mp.Queue()
    head = mp.Process(target=stage, args=(first, results))
    head.start()
    for n in range(2, args.limit + 1):
        first.put(n, timeout=120)
    first.put(END, timeout=120)
    head.join(300)
    found = []
    while not results.empty():
        found.append(results.get())
    primes = sorted(p for p, _, _ in found)
    expected = [n for n in range(2, args.limit + 1)
                if all(n % d for d in range(2, int(n ** 0.5) + 1))]
    assert primes == expected, f"wrong primes: {primes}"
    hosts = sorted({h for _, _, h in found})
    nodes = sorted({n for _, n, _ in found})
    print(f"{len(primes)} primes up to {args.limit}, one stage process each, on nodes "
          f"{','.join(nodes)} of {len(hosts)} host(s); the last is {primes[-1]}; "
          f"exit code {head.exitcode}")


if __name__ == "__main__":
    main()
