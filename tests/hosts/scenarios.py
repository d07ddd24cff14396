"""What tests/test_hosts.py runs on host h1 (``python scenarios.py NAME``).

The environment says where the other hosts are: DNB_LISTEN (h1's address),
DNB_HOSTS (the hosts to launch agents on), DNB_LAUNCHER (the launcher
template), DNB_NS_<HOST> (each host's namespace). Each scenario prints one
line ``RESULT <json>`` for the test to check.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import dragon_nb
from dragon_nb import DDict, Pipeline, Pool, on_node, stage
from dragon_nb.native.machine import Node, System


def hostname(_=None) -> str:
    time.sleep(0.05)          # long enough that every worker gets some of the work
    return socket.gethostname()


def slow_square(x):
    time.sleep(0.02)
    return x * x


def put_here(args):
    d, i = args
    d[i] = (i * 7, socket.gethostname())
    return i


def first_stage(x):
    return (x, socket.gethostname())


def second_stage(pair):
    x, first = pair
    return (x * 3, first, socket.gethostname())


def numbers(n):
    yield from range(n)


def start(hosts=None, **kw):
    hosts = os.environ["DNB_HOSTS"].split(",") if hosts is None else hosts
    return dragon_nb.start(nodes=1, hosts=hosts, listen=os.environ["DNB_LISTEN"],
                           launcher=os.environ["DNB_LAUNCHER"], **kw)


def logged(logger: str) -> list:
    """The messages ``logger`` logs from now on, down to INFO."""
    import logging
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger(logger).addHandler(handler)
    logging.getLogger(logger).setLevel(logging.INFO)
    return said


def copy_connection_file(rt) -> str:
    """As a user copies the connection file to another host: -> the copy's path."""
    copy = os.path.join(os.environ["DNB_WORK"], "connection.json")
    shutil.copy(rt.connection_file, copy)
    os.chmod(copy, 0o600)
    return copy


def node_hosts() -> dict:
    return {Node(h).h_uid: Node(h).hostname for h in System().nodes}


def spread():
    """Pool workers and DDict managers on every host; values from all hosts read back."""
    start()
    hosts = node_hosts()
    with Pool(6) as p:
        workers = sorted(set(p.map(hostname, range(60), chunksize=1)))
    d = DDict(1, len(hosts), 64 << 20)
    with Pool(6) as p:
        p.map(put_here, [(d, i) for i in range(300)], chunksize=5)
    values = [d[i] for i in range(300)]
    managers = sorted({s.hostname for s in d.stats})
    ok = all(v[0] == i * 7 for i, v in enumerate(values))
    writers = sorted({v[1] for v in values})
    d.destroy()
    dragon_nb.stop()
    return {"nodes": sorted(hosts.values()), "workers": workers, "managers": managers,
            "writers": writers, "values_ok": ok, "count": len(values)}


def pipeline():
    """A source on h1's node, stage 1 on h2, stage 2 on h3."""
    start()
    ids = {name: nid for nid, name in node_hosts().items()}
    with Pipeline(on_node(numbers, 500, node=ids["h1"]),
                  stage(first_stage, workers=1, nodes=[ids["h2"]]),
                  stage(second_stage, workers=2, nodes=[ids["h3"]])) as pipe:
        out = list(pipe)
    dragon_nb.stop()
    return {"values_ok": [o[0] for o in out] == [3 * i for i in range(500)],
            "stage_hosts": sorted({(o[1], o[2]) for o in out})}


def join():
    """An agent without the key is refused; one with it joins and can leave."""
    rt = start(hosts=os.environ["DNB_HOSTS"].split(",")[:1])
    before = sorted(node_hosts().values())
    on_h3 = ["ip", "netns", "exec", os.environ["DNB_NS_H3"], "unshare", "--uts", "sh", "-c",
             'hostname h3 && exec "$@"', "h3"]
    agent = [sys.executable, "-m", "dragon_nb.cli", "agent", "--connect", rt.tcp_address]
    wrong = os.path.join(os.environ["DNB_WORK"], "wrong.key")
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    refused = subprocess.run(on_h3 + agent + ["--key-file", wrong], capture_output=True,
                             text=True, timeout=60)
    after_refusal = sorted(node_hosts().values())
    right = copy_connection_file(rt)
    joined = subprocess.Popen(on_h3 + agent + ["--key-file", right])
    deadline = time.monotonic() + 30
    while "h3" not in node_hosts().values() and time.monotonic() < deadline:
        time.sleep(0.2)
    with_h3 = sorted(node_hosts().values())
    h3 = [nid for nid, name in node_hosts().items() if name == "h3"]
    with Pool(2, nodes=h3) as p:
        ran_on = sorted(set(p.map(hostname, range(8))))
    joined.send_signal(signal.SIGTERM)        # the host goes away
    joined.wait(30)
    deadline = time.monotonic() + 30
    while "h3" in node_hosts().values() and time.monotonic() < deadline:
        time.sleep(0.2)
    after_leaving = sorted(node_hosts().values())
    dragon_nb.stop()
    return {"before": before, "refused_code": refused.returncode,
            "refused_says": refused.stderr.strip().splitlines()[-1:],
            "after_refusal": after_refusal, "with_h3": with_h3, "ran_on": ran_on,
            "after_leaving": after_leaving}


def wait_and_read(args):
    """In a worker: wait for ``key`` (a request that outlasts liveness checks), read it."""
    d, key = args
    try:
        d.wait_for(key, timeout=30)
        return ["read", d[key]]
    except Exception as e:
        return [type(e).__name__, str(e)]


def twin():
    """An agent under this host's own name but in a PID namespace of its own (as a
    container sharing the host's network is): its workers cannot look at this host's
    pids, so they must not judge a DDict manager here dead by its pid."""
    rt = start(hosts=[])
    right = copy_connection_file(rt)
    agent = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                              "-m", "dragon_nb.cli", "agent", "--connect", rt.tcp_address,
                              "--key-file", right, "--name", "twin"])
    try:
        deadline = time.monotonic() + 30
        while len(node_hosts()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        names = {Node(h).name: Node(h) for h in System().nodes}
        twin_node = names["twin"]
        d = DDict(1, 1, 64 << 20, nodes=[0])
        with Pool(1, nodes=[twin_node.h_uid]) as p:
            waiting = p.apply_async(wait_and_read, ((d, "later"),))
            time.sleep(1.0)
            d["later"] = "written"
            got = waiting.get(60)
        d.destroy()
        hostnames = sorted(n.hostname for n in names.values())
    finally:
        dragon_nb.stop()
        agent.wait(30)
    return {"got": got, "hostnames": hostnames}


def link_down():
    """h3's cable pulled mid-map: its tasks run elsewhere, the result is whole."""
    start()
    with Pool(6) as p:
        it = p.imap(slow_square, range(300), chunksize=2)
        got = [next(it) for _ in range(40)]
        subprocess.run(["ip", "-n", os.environ["DNB_NS_H3"], "link", "set", "eth0", "down"],
                       check=True, timeout=20)
        got += list(it)
        after = sorted(node_hosts().values())
    dragon_nb.stop()
    return {"values_ok": got == [x * x for x in range(300)], "nodes_after": after}


def redial():
    """The pool's TCP connections to h2's workers cut (as a firewall resetting them
    would) while the host itself stays: the workers dial again, and the chunks that
    were on the cut connections are sent again."""
    redials = logged("dragon_nb.pool")
    start()
    h2 = [nid for nid, name in node_hosts().items() if name == "h2"]
    with Pool(2, nodes=h2) as p:
        port = p._dispatcher.address.rsplit(":", 1)[1]
        it = p.imap(slow_square, range(200), chunksize=1)
        got = [next(it) for _ in range(20)]
        cut = subprocess.run(["ss", "-K", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=20)
        got += list(it)
        after = sorted(node_hosts().values())
    dragon_nb.stop()
    return {"values_ok": got == [x * x for x in range(200)], "cut": cut.stdout.count(":" + port),
            "redials": [m for m in redials if "reconnected" in m],
            "nodes_after": after}


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def cut(ns: str | None, ss_filter: str) -> int:
    """Reset the established TCP connections matching ``ss_filter`` on a host (as a
    firewall would); -> how many were cut."""
    where = ["ip", "netns", "exec", ns] if ns else []
    proc = subprocess.run([*where, "ss", "-K", "-H", "state", "established", ss_filter],
                          capture_output=True, text=True, timeout=20)
    return len(proc.stdout.splitlines())


def pipeline_redial():
    """Every TCP link of a pipeline cut mid-stream while the hosts stay (caller on h1
    -> stage 0 on h2 -> stage 1 on h3 -> caller): the senders dial again, the batches
    that were on the links are fed in again, and the results come out whole, in order."""
    said = logged("dragon_nb.pipeline")
    start()
    ids = {name: nid for nid, name in node_hosts().items()}
    with Pipeline(range(600), stage(slow_square, workers=1, nodes=[ids["h2"]]),
                  stage(first_stage, workers=1, nodes=[ids["h3"]])) as pipe:
        stage0, stage1 = pipe.stage_inputs[0][0], pipe.stage_inputs[1][0]
        got = [next(pipe) for _ in range(60)]
        cuts = {"feeder": cut(None, f"( dport = :{port_of(stage0)} )"),
                "stage0": cut(os.environ["DNB_NS_H2"], f"( dport = :{port_of(stage1)} )"),
                "stage1": cut(None, f"( sport = :{port_of(pipe.sink_address)} )")}
        got += list(pipe)
    dragon_nb.stop()
    return {"values_ok": [g[0] for g in got] == [x * x for x in range(600)],
            "count": len(got), "cuts": cuts,
            "redials": [m for m in said if "cut and dialled again" in m]}


def slow_cube(x):
    time.sleep(0.1)
    return x ** 3


def pipeline_until_error(pipe, watchdog_s: float, act) -> dict:
    """Read ``pipe``; after 30 results, ``act(pipe)`` (-> what it did); -> how the
    pipeline ended: its error, how long after ``act`` it came, and what ``act`` did.
    A pipeline still running after ``watchdog_s`` is closed (its error then says so)."""
    import threading
    from dragon_nb import PipelineError
    watchdog = threading.Timer(watchdog_s, pipe.close)
    watchdog.start()
    out = {"error": None, "took": None, "done": None, "finished": False}
    try:
        for _ in range(30):
            next(pipe)
        out["done"] = act(pipe)
        began = time.monotonic()
        try:
            for _ in pipe:
                pass
            out["finished"] = True
        except PipelineError as e:
            out["error"], out["took"] = str(e), time.monotonic() - began
    finally:
        watchdog.cancel()
        pipe.close()
    return out


def pipeline_node_source_cut():
    """A node source's TCP link into stage 0 cut mid-stream (source on h1's node,
    stage 0 on h2) while the hosts stay: what was on it cannot be fed again, so the
    pipeline fails at once, naming the link, instead of waiting for ever for batches
    that never come."""
    start()
    ids = {name: nid for nid, name in node_hosts().items()}
    pipe = Pipeline(on_node(numbers, 2000, node=ids["h1"]),
                    stage(slow_square, workers=1, nodes=[ids["h2"]]))
    out = pipeline_until_error(
        pipe, 25.0, lambda p: cut(None, f"( dport = :{port_of(p.stage_inputs[0][0])} )"))
    dragon_nb.stop()
    return out


def pipeline_flapping_link():
    """The feeder's TCP link into stage 0 (on h2) cut again and again while the same
    batches are in flight: each cut feeds them in again, but only LINK_REFEEDS times
    (3 here); then the pipeline fails naming the link, instead of feeding for ever."""
    import dragon_nb.pipeline.pipeline as pipeline_module
    pipeline_module.LINK_REFEEDS = 3
    start()
    ids = {name: nid for nid, name in node_hosts().items()}
    pipe = Pipeline(range(100_000), stage(slow_cube, workers=1, nodes=[ids["h2"]]))

    def flap(p):
        port, cuts = port_of(p.stage_inputs[0][0]), 0
        for _ in range(12):
            if p._closed:
                break
            cuts += cut(None, f"( dport = :{port} )")
            time.sleep(1.2)      # further apart than REFEED_MERGE_S: each cut counts
        return cuts

    out = pipeline_until_error(pipe, 60.0, flap)
    dragon_nb.stop()
    return out


def ddict_cut():
    """The connection to a DDict manager on h3 cut while requests wait on it: they are
    sent again on the new connection (a wait_for, 32 MiB gets), not timed out."""
    import threading
    start()
    d = DDict(1, 1, 256 << 20, nodes=[next(n for n, h in node_hosts().items() if h == "h3")],
              timeout=20)
    port = port_of(d._managers[0].address)
    cuts = []

    def cut_then_write():
        time.sleep(0.5)
        cuts.append(cut(None, f"( dport = :{port} )"))
        time.sleep(1.0)
        d["later"] = "written"

    writer = threading.Thread(target=cut_then_write)
    began = time.monotonic()
    writer.start()
    try:
        d.wait_for("later", timeout=15)
        waited = ["ok", d["later"], time.monotonic() - began]
    except Exception as e:
        waited = [type(e).__name__, str(e), time.monotonic() - began]
    writer.join()
    big = os.urandom(32 << 20)
    d["big"] = big
    cutter = threading.Timer(0.3, lambda: cuts.append(cut(None, f"( dport = :{port} )")))
    cutter.start()
    gets = []
    for _ in range(12):
        t = time.monotonic()
        try:
            gets.append(["ok" if d["big"] == big else "wrong", time.monotonic() - t])
        except Exception as e:
            gets.append([type(e).__name__, time.monotonic() - t])
    cutter.join()
    d.destroy()
    dragon_nb.stop()
    return {"cuts": cuts, "waited": waited, "gets": gets}


N_BATCH = 2000


def ddict_batch_cut():
    """The connection to a DDict manager on h3 cut while a batch of puts streams to it
    (batches have no replies): whatever did not arrive is reported by end_batch_put,
    never lost silently."""
    import threading
    start()
    d = DDict(1, 1, 1024 << 20, nodes=[next(n for n, h in node_hosts().items() if h == "h3")])
    port = port_of(d._managers[0].address)
    value = b"v" * (256 << 10)
    cuts = []
    cutter = threading.Timer(0.1, lambda: cuts.append(cut(None, f"( dport = :{port} )")))
    cutter.start()
    error = None
    d.start_batch_put()
    try:
        for i in range(N_BATCH):
            d[i] = value
    finally:
        try:
            d.end_batch_put()
        except Exception as e:
            error = [type(e).__name__, str(e)]
    cutter.join()
    stored = sum(1 for i in range(N_BATCH) if i in d)
    right = all(d[i] == value for i in range(N_BATCH) if i in d)
    d.destroy()
    dragon_nb.stop()
    return {"cut": sum(cuts), "error": error, "sent": N_BATCH, "stored": stored,
            "values_right": right}


def touch_later(args):
    """In a worker: wait, then read ``key``; -> what happened and how long it took."""
    d, key, delay = args
    time.sleep(delay)
    began = time.monotonic()
    try:
        d[key]
        return ["read", "", 0.0]
    except Exception as e:
        return [type(e).__name__, str(e), time.monotonic() - began]


def key_held_on(d, hostname):
    mid = next(m.mid for m in d._managers if m.hostname == hostname)
    return next(("k", i) for i in range(10_000) if d.which_manager(("k", i)) == mid)


def ddict_gone():
    """A DDict manager killed on another host, and a DDict destroyed while a worker on
    a third host still holds it: named at once, not found by the timeout."""
    rt = start()
    hosts = node_hosts()
    d = DDict(1, len(hosts), 64 << 20)
    k3, k2 = key_held_on(d, "h3"), key_held_on(d, "h2")
    d[k3], d[k2] = "on h3", "on h2"
    manager = next((m.node, m.pid) for m in d._managers if m.hostname == "h3")
    rt.kill([manager], signal.SIGKILL)
    began = time.monotonic()
    try:
        d[k3]
        killed = ["read", "", 0.0]
    except Exception as e:
        killed = [type(e).__name__, str(e), time.monotonic() - began]
    others = d[k2]
    d.destroy()
    d2 = DDict(1, len(hosts), 64 << 20)
    k3 = key_held_on(d2, "h3")
    d2[k3] = 1
    h2 = [nid for nid, name in hosts.items() if name == "h2"]
    with Pool(1, nodes=h2) as p:
        later = p.apply_async(touch_later, ((d2, k3, 1.5),))
        time.sleep(0.5)
        d2.destroy()
        destroyed = later.get(60)
    dragon_nb.stop()
    return {"killed": killed, "others": others, "destroyed": destroyed}


def serve():
    """The seed's example 5 reads a socket: serve it one stream on this host's
    127.0.0.1:9000 (the seed's port), then exit. The payload comes in on stdin."""
    payload = sys.stdin.buffer.read()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 9000))
        s.listen(1)
        s.settimeout(90)
        print("listening", flush=True)
        conn, _ = s.accept()
        with conn:
            conn.sendall(payload)
    return {"served": len(payload)}


if __name__ == "__main__":
    result = globals()[sys.argv[1]]()
    print("RESULT " + json.dumps(result), flush=True)
