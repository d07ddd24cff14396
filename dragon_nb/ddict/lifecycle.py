"""A DDict's managers: placing and starting them on the nodes, and reaping them.

``start_managers`` asks the runtime to fork ``managers_per_node`` managers on
each chosen node (one spawn request per node, so ``ctx.index`` runs 0.. on
every node and each manager's addresses follow from its node and index), waits
until every one answers, and returns the state a handle carries, with one ``ManagerRecord`` per manager
(``records.py``: in the state, as a list of built-in values). Managers are
processes of the liveness layer (``runtime/liveness.py``): reaped and killed
through their ``ProcessRef``. On TCP, each manager reports the address it bound
over a ``protocol.Channel`` (BOUND). If anything fails, the managers already
started are killed.
"""
from __future__ import annotations

import os
import stat
import pickle
import signal
import time
import uuid

import zmq

from dragon_nb.checks import instance_or_none, node_ids, positive_int, positive_seconds
from dragon_nb.ddict import connection as C
from dragon_nb.ddict.errors import DDictError
from dragon_nb.ddict.records import ManagerRecord, records, to_state
from dragon_nb.runtime import liveness, network
from dragon_nb.runtime.client import Runtime, zmq_context
from dragon_nb.tunables import DEFAULT_TIMEOUT, DESTROY_EXIT_WAIT_S
from dragon_nb.wire import protocol as P

MANAGER_ENTRY = "dragon_nb.ddict.manager:main"

# Dragon's constructor options: those that only tune Dragon's implementation are
# accepted and ignored; the others must keep their default (no checkpoints here).
_IGNORED_OPTIONS = {"trace", "streams_per_manager", "manager_pool_full_thresh",
                    "persister_class", "orc_policy"}
_DEFAULT_ONLY_OPTIONS = {"working_set_size": 1, "wait_for_keys": False,
                         "wait_for_writers": False, "policy": None, "managers_per_policy": 1,
                         "persist_freq": 0, "restart": False, "read_only": False,
                         "restore_from": None, "persist_count": 0, "persist_path": ""}


def check_options(options: dict) -> None:
    for k, v in options.items():
        if k in _IGNORED_OPTIONS:
            continue
        if k not in _DEFAULT_ONLY_OPTIONS:
            raise TypeError(f"DDict() got an unexpected keyword argument {k!r}")
        if v != _DEFAULT_ONLY_OPTIONS[k]:
            raise NotImplementedError(f"DDict({k}={v!r}) is not supported by dragon-nb "
                                      f"(no checkpoints, persistence or policies)")


def check_timeout(timeout) -> None:
    """``timeout=``: None (the default) or a positive number of seconds."""
    positive_seconds("timeout", timeout, none_ok=True)


def check_sizes(managers_per_node, n_nodes, total_mem) -> tuple[int, int, int]:
    """The constructor's positional arguments, as ints >= 1. A value that is no int
    at all is a ValueError too (as DDict has always said), with checks' message."""
    out = []
    for what, v in (("managers_per_node", managers_per_node), ("n_nodes", n_nodes),
                    ("total_mem", total_mem)):
        try:
            out.append(positive_int(what, v))
        except TypeError as e:
            raise ValueError(str(e)) from None
    return tuple(out)


def check_arguments(sizes, name, timeout, nodes, runtime):
    """The constructor's arguments, before anything is started -> (``sizes``:
    (managers_per_node, n_nodes, total_mem) as ints, ``nodes`` as a list or None)."""
    sizes = check_sizes(*sizes)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {name!r}")
    check_timeout(timeout)
    nodes = node_ids(nodes)
    instance_or_none("runtime", runtime, Runtime, "a dragon_nb.Runtime")
    return sizes, nodes


def _choose_nodes(rt, n_nodes: int, nodes) -> tuple[list, dict]:
    """-> (node ids, {node id: node})."""
    live = sorted((n for n in rt.nodes(refresh=True) if n.get("alive", True)),
                  key=lambda n: n["id"])
    by_id = {n["id"]: n for n in live}
    if nodes is None:
        if n_nodes > len(live):
            raise ValueError(f"n_nodes={n_nodes}, but the runtime has {len(live)} "
                             f"live node(s)")
        return [n["id"] for n in live[:n_nodes]], by_id
    nodes = list(nodes)
    if not nodes or len(set(nodes)) != len(nodes) or any(n not in by_id for n in nodes):
        raise ValueError(f"nodes={nodes!r}: give distinct ids of live nodes "
                         f"{sorted(by_id)}")
    return nodes, by_id


def start_managers(rt, managers_per_node: int, n_nodes: int, total_mem: int, *,
                   name: str, timeout, nodes, ping_timeout: float | None = None):
    """Start and ping the managers -> (handle state, this process's Connection).
    The sizes are ``check_arguments``' ints. ``ping_timeout``: how long they may
    take to answer (default: ``timeout``'s)."""
    if ping_timeout is None:
        ping_timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    nodes, by_id = _choose_nodes(rt, n_nodes, nodes)
    count = managers_per_node * len(nodes)
    budget = total_mem // count
    if budget < 1:
        raise ValueError(f"total_mem={total_mem} cannot be shared by {count} managers")
    owner = f"ddict-{uuid.uuid4().hex[:12]}"
    prefix = f"{rt.rundir}/{owner}"
    tombstone = f"{prefix}.destroyed"
    managers: list[ManagerRecord] = []
    report = _bound_report(rt)       # TCP: managers bind where they run and say where
    try:
        for pos, node in enumerate(nodes):
            spec = pickle.dumps({"first_id": pos * managers_per_node,
                                 "prefix": f"{prefix}-{node}", "budget": budget,
                                 "name": name, "tombstone": tombstone,
                                 "report": report and report[1]}, 5)
            procs = rt.spawn(MANAGER_ENTRY, spec, managers_per_node, owner, nodes=[node])
            for index, ref in enumerate(liveness.refs(rt, procs)):
                base = f"{prefix}-{node}-{index}"
                managers.append(ManagerRecord(
                    pos * managers_per_node + index, ref.node, by_id[ref.node]["hostname"],
                    "ipc://" + base, base + ".lane", ref.pid, ref.start_time,
                    ref.pid_space))
        if report is not None:
            for mid, address in _await_bound(report[0], len(managers),
                                             ping_timeout).items():
                managers[mid] = managers[mid]._replace(address=address, lane_path="")
        conn = C.connection_for(owner, managers, name, tombstone, rt.network)
        for mid, rep in enumerate(conn.request_many(range(count), P.DD_PING,
                                                    timeout=ping_timeout)):
            if rep.status != P.DDS_OK:
                raise DDictError(f"DDict manager {mid} failed to start")
    except BaseException:
        kill_managers(rt, managers)
        raise
    finally:
        if report is not None:
            report[0].close(linger=0)
    state = {"owner": owner, "name": name, "timeout": timeout, "managers": to_state(managers),
             "tombstone": tombstone, "budget": budget,
             "managers_per_node": managers_per_node}
    return state, conn


def kill_managers(rt, managers) -> None:
    """SIGKILL them: directly where they are ours to signal, else through their agents."""
    if managers:
        liveness.signal_all(rt, [m.proc for m in managers], signal.SIGKILL)


def reap_managers(rt, managers) -> None:
    """After DD_DESTROY: wait for the managers to exit; SIGKILL the late ones (those
    this process can look at: the others' exits are their agents' to see)."""
    late = liveness.wait_gone([m.proc for m in managers], DESTROY_EXIT_WAIT_S)
    if late:
        liveness.signal_all(rt, late, signal.SIGKILL)


def _bound_report(rt):
    """On a TCP runtime: (Channel on a ROUTER, address) the managers report their
    addresses to."""
    if not rt.network.tcp:
        return None
    sock = zmq_context().socket(zmq.ROUTER)
    address = rt.network.bind(sock, f"ddict-report-{uuid.uuid4().hex[:8]}")
    return P.Channel(sock, rt.network.codec(), routed=True), address


def _await_bound(channel: P.Channel, count: int, timeout: float) -> dict:
    """-> {manager id: address} from each manager's BOUND message."""
    found: dict = {}
    deadline = time.monotonic() + timeout
    while len(found) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not channel.poll(left * 1000):
            raise DDictError(f"{count - len(found)} of {count} DDict managers did not "
                             f"start within {timeout:g} s")
        try:
            _, kind, body, _ = channel.recv()
        except P.ProtocolError:
            continue
        if kind == P.BOUND and isinstance(body, dict):
            try:
                found[int(body["manager"])] = str(body["address"])
            except (KeyError, TypeError, ValueError):
                continue
    return found


def check_endpoints(state: dict) -> None:
    """A serialized DDict may only point at this user's private runtime folders:
    replies are unpickled, so an address from elsewhere would be code from elsewhere."""
    managers = records(state["managers"])
    net = network.current()
    if net is not None and net.key is not None and \
            all(m.address.startswith("tcp://") for m in managers):
        return            # every reply must carry this runtime's signature to be read
    paths = [state.get("tombstone") or ""]
    for m in managers:
        if not m.address.startswith("ipc://"):
            raise DDictError(f"not a serialized DDict of this host: address {m.address!r}")
        paths += [m.address[len("ipc://"):], m.lane_path]
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        ok = os.path.basename(folder).startswith(f"dnb-{os.getuid()}-")
        try:
            st = os.stat(folder)
            ok = ok and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        except OSError:
            ok = False
        if not ok:
            raise DDictError(f"not a serialized DDict of this user's runtime: {path!r}")
