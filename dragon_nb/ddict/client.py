"""``DDict``: Dragon's distributed dictionary on the runtime's nodes.

``DDict(managers_per_node, n_nodes, total_mem)`` asks the node agents to fork
``managers_per_node`` managers on each of ``n_nodes`` nodes, each holding a
shard of the keys within an equal share of ``total_mem``. A key belongs to the
manager ``crc32(pickled key) % managers`` (a stable hash, the same in every
process), and a handle talks to that manager directly; nothing passes through
the head. The handle pickles (Pool arguments, initargs) and needs no runtime
where it is unpickled: it carries the managers' addresses.
"""
from __future__ import annotations

import array
import base64
import binascii
import collections.abc
import json
import multiprocessing
import operator
import os
import pickle
import zlib
from dataclasses import dataclass

from dragon_nb.ddict import connection as C
from dragon_nb.ddict import lifecycle as L
from dragon_nb.ddict.errors import (DDictError, DDictFullError, DDictKeyError,
                                    DDictTimeoutError)
from dragon_nb.ddict.pickling import dumps_key, dumps_value, loads_key, loads_value
from dragon_nb.ddict.records import records
from dragon_nb.ddict.views import DDictItemsView, DDictKeysView, DDictValuesView
from dragon_nb.runtime.client import get_runtime
from dragon_nb.tunables import DEFAULT_TIMEOUT, WAIT_GRACE_S
from dragon_nb.wire import protocol as P

DDICT_MIN_SIZE = 3 * 1024 ** 2    # Dragon's default total_mem
MGET_KEYS = 512                   # values fetched per request when iterating
_MISSING = object()


@dataclass
class DDictManagerStats:
    """One manager's figures (``DDict.stats``); ``pool_utilization`` in percent."""
    manager_id: int
    node: int
    hostname: str
    pid: int
    total_bytes: int
    total_used_bytes: int
    pool_free_space: int
    pool_utilization: float
    num_keys: int
    num_bput_copies: int
    frozen: bool


@dataclass(frozen=True)
class ManagerNode:
    """Where a manager runs (``DDict.manager_nodes``): the fields of a Node that
    Dragon code reads, without needing a runtime in the process that asks."""
    h_uid: int
    name: str
    hostname: str


class _Life:
    """Shared by a handle and the ``manager(i)`` handles made from it."""
    __slots__ = ("destroyed",)

    def __init__(self):
        self.destroyed = False


class DDict:
    """A dict spread over manager processes on the runtime's nodes.

    ``timeout`` (seconds, default 30) bounds every operation of this handle;
    ``nodes=[ids]`` places the managers on those nodes instead of the first
    ``n_nodes``; ``runtime`` defaults to the current one (started on first
    use). Dragon's other options are accepted where they do not ask for
    checkpointing or persistence.
    """

    def __init__(self, managers_per_node: int = 1, n_nodes: int = 1,
                 total_mem: int = DDICT_MIN_SIZE, *, name: str = "", timeout=None,
                 nodes=None, runtime=None, **options):
        L.check_options(options)
        sizes, nodes = L.check_arguments((managers_per_node, n_nodes, total_mem), name,
                                         timeout, nodes, runtime)
        rt = runtime or get_runtime()
        state, conn = L.start_managers(rt, *sizes, name=name, timeout=timeout, nodes=nodes)
        self._setup(state, creator=True)
        self._runtime = rt
        self._conn, self._conn_pid = conn, os.getpid()

    def _setup(self, state: dict, creator: bool, chosen=None, life=None):
        self._state = state
        self._owner = state["owner"]
        self._managers = records(state["managers"])    # ManagerRecords
        self._n = len(self._managers)
        t = state.get("timeout")
        self._timeout = DEFAULT_TIMEOUT if t is None else float(t)
        self._creator = creator
        self._chosen = chosen
        self._life = life or _Life()
        self._detached = False
        self._conn = None
        self._conn_pid = None
        self._batch = None
        self._runtime = None

    # -- handles ------------------------------------------------------------------------
    def __getstate__(self):
        return {"state": self._state, "chosen": self._chosen}

    def __setstate__(self, s):
        self._setup(s["state"], creator=False, chosen=s["chosen"])

    def serialize(self) -> str:
        """A string from which ``DDict.attach`` makes a handle, in any process of
        the runtime (or any program on the host, given the string)."""
        return base64.b64encode(json.dumps(self._state).encode()).decode()

    @classmethod
    def attach(cls, serialized_dict: str, *, timeout=None, trace: bool = False) -> "DDict":
        """A handle from ``serialize()``; ``timeout`` replaces the creator's."""
        try:
            state = json.loads(base64.b64decode(serialized_dict, validate=True))
            if not isinstance(state, dict) or not {"owner", "managers"} <= set(state):
                raise ValueError("missing fields")
        except (ValueError, TypeError, binascii.Error) as e:
            raise DDictError(f"not a serialized DDict: {e}") from None
        L.check_endpoints(state)
        L.check_timeout(timeout)
        if timeout is not None:
            state = dict(state, timeout=timeout)
        handle = cls.__new__(cls)
        handle._setup(state, creator=False)
        return handle

    def detach(self) -> None:
        """Stop using the DDict from this handle; it lives on for the others."""
        if not self._detached:
            self._detached = True
            self._batch = None
            self._conn = None
            C.forget(self._owner)

    def destroy(self) -> None:
        """End the managers (their memory goes with them). Idempotent; afterwards
        every operation, from any handle, raises DDictError."""
        if self._life.destroyed:
            return
        self._life.destroyed = True
        self._batch = None
        self._conn = None
        conn = C.connection_for(self._owner, self._managers, self.get_name(),
                                self._state["tombstone"])
        try:
            for link in conn.links:
                if link.dead is None and conn.alive(link):
                    try:
                        conn.request(link.mid, P.DD_DESTROY, timeout=min(self._timeout, 5.0),
                                     lane=False)
                    except DDictError:
                        pass
        finally:
            C.forget(self._owner)
            if self._runtime is not None:
                L.reap_managers(self._runtime, self._managers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._creator:
            self.destroy()
        else:
            self.detach()

    def _c(self) -> C.Connection:
        """This process's connection (made on first use after a fork or unpickling)."""
        conn = self._conn
        if conn is not None and self._conn_pid == os.getpid() and not self._life.destroyed:
            return conn
        if self._life.destroyed:
            raise DDictError(f"the DDict {self.get_name()!r} has been destroyed")
        if self._detached:
            raise DDictError("this DDict handle was detached; use another handle, or "
                             "DDict.attach(serialized) for a new one")
        self._conn = C.connection_for(self._owner, self._managers, self.get_name(),
                                      self._state["tombstone"])
        self._conn_pid = os.getpid()
        self._batch = None            # a batch does not survive a fork
        return self._conn

    def _request(self, mid: int, op: int, key: bytes = b"", value: bytes = b"", bufs=(),
                 flags: int = 0, vflags: int = 0, arg: int = 0, lane: bool = True):
        conn = self._c()
        if self._batch is not None:
            self._batch.flush(mid)     # so this request sees the batch's puts
        return conn.request(mid, op, key, value, bufs, flags, vflags, arg, self._timeout, lane)

    def _request_all(self, mids, op: int, **kw) -> list:
        conn = self._c()
        if self._batch is not None:
            for mid in mids:
                self._batch.flush(mid)
        return conn.request_many(list(mids), op, timeout=self._timeout, **kw)

    def _fail(self, rep, mid: int, key=_MISSING):
        status = rep.status
        why = bytes(rep.payload).decode(errors="replace")
        if status == P.DDS_MISSING:
            raise DDictKeyError(key)
        if status == P.DDS_FULL:
            raise DDictFullError(why)
        if status == P.DDS_FROZEN:
            raise DDictError(f"the DDict {self.get_name()!r} is frozen: writes are "
                             f"refused until unfreeze()")
        if status == P.DDS_TIMEOUT:
            raise DDictTimeoutError(why or "timed out")
        raise DDictError(f"DDict manager {mid}: {why or f'status {status}'}")

    def _mid(self, kb: bytes) -> int:
        return self._chosen if self._chosen is not None else zlib.crc32(kb) % self._n

    def _scope(self) -> list:
        return [self._chosen] if self._chosen is not None else list(range(self._n))

    # -- the dict protocol ---------------------------------------------------------------
    def __setitem__(self, key, value) -> None:
        kb = dumps_key(key)
        vflags, inline, bufs = dumps_value(value)
        mid = self._mid(kb)
        conn = self._c()
        batch = self._batch
        if batch is not None:
            batch.add(mid, kb, vflags, inline, bufs)
            return
        rep = conn.request(mid, P.DD_PUT, kb, inline, bufs, 0, vflags, 0, self._timeout)
        if rep.status:
            self._fail(rep, mid, key)

    pput = __setitem__    # persistent put: every key persists here (no checkpoints)

    def __getitem__(self, key):
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_GET, kb)
        if rep.status:
            self._fail(rep, mid, key)
        return loads_value(rep.vflags, rep.payload, rep.bufs)

    def get(self, key, default=None):
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_GET, kb)
        if rep.status == P.DDS_MISSING:
            return default
        if rep.status:
            self._fail(rep, mid, key)
        return loads_value(rep.vflags, rep.payload, rep.bufs)

    def __contains__(self, key) -> bool:
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_CONTAINS, kb)
        if rep.status not in (P.DDS_OK, P.DDS_MISSING):
            self._fail(rep, mid, key)
        return rep.status == P.DDS_OK

    def __delitem__(self, key) -> None:
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_POP, kb, flags=P.DDF_NO_VALUE)
        if rep.status:
            self._fail(rep, mid, key)

    def pop(self, key, default=_MISSING):
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_POP, kb)
        if rep.status == P.DDS_MISSING and default is not _MISSING:
            return default
        if rep.status:
            self._fail(rep, mid, key)
        return loads_value(rep.vflags, rep.payload, rep.bufs)

    def __len__(self) -> int:
        return self._length(self._scope())

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> DDictKeysView:
        return DDictKeysView(self, self._scope())

    def values(self) -> DDictValuesView:
        return DDictValuesView(self, self._scope())

    def items(self) -> DDictItemsView:
        return DDictItemsView(self, self._scope())

    def clear(self) -> None:
        mids = self._scope()
        for mid, rep in zip(mids, self._request_all(mids, P.DD_CLEAR)):
            if rep.status:
                self._fail(rep, mid)

    def update(self, other=(), /, **kwargs) -> None:
        """Put every pair of ``other`` (a mapping or pairs) and ``kwargs``, streamed as
        one batch; a failure is raised after the rest were stored."""
        own = self._batch is None
        if own:
            self.start_batch_put()
        try:
            if hasattr(other, "keys"):
                for k in other.keys():
                    self[k] = other[k]
            else:
                for k, v in other:
                    self[k] = v
            for k, v in kwargs.items():
                self[k] = v
        except BaseException:
            if own:
                try:
                    self.end_batch_put()
                except DDictError:
                    pass
            raise
        if own:
            self.end_batch_put()

    def popitem(self):
        raise NotImplementedError("DDict has no order, so no popitem (as in Dragon)")

    # -- what views use ------------------------------------------------------------------
    def _length(self, mids) -> int:
        if len(mids) == 1:
            rep = self._request(mids[0], P.DD_LEN)
            if rep.status:
                self._fail(rep, mids[0])
            return rep.arg
        total = 0
        for mid, rep in zip(mids, self._request_all(mids, P.DD_LEN)):
            if rep.status:
                self._fail(rep, mid)
            total += rep.arg
        return total

    def _raw_keys(self, mid: int) -> list:
        rep = self._request(mid, P.DD_KEYS, lane=False)
        if rep.status:
            self._fail(rep, mid)
        n, payload = rep.arg, rep.payload
        lengths = array.array("I")
        lengths.frombytes(payload[:lengths.itemsize * n])
        out, pos = [], lengths.itemsize * n
        for length in lengths:
            out.append(payload[pos:pos + length])
            pos += length
        return out

    def _iter_keys(self, mids):
        for mid in mids:
            for kb in self._raw_keys(mid):
                yield loads_key(kb)

    def _iter_items(self, mids):
        for mid in mids:
            keys = self._raw_keys(mid)
            start = 0
            while start < len(keys):
                chunk = keys[start:start + MGET_KEYS]
                lengths = array.array("I", map(len, chunk)).tobytes()
                rep = self._request(mid, P.DD_MGET, lengths, b"".join(chunk), lane=False)
                if rep.status:
                    self._fail(rep, mid)
                served, payload = rep.arg, rep.payload
                pos, nbuf = served * P.DD_ITEM.size, 0
                for i, (ilen, nb, vfl) in enumerate(P.DD_ITEM.iter_unpack(
                        payload[:served * P.DD_ITEM.size])):
                    if ilen < 0:
                        continue          # deleted since the keys were listed
                    value = loads_value(vfl, payload[pos:pos + ilen], rep.bufs[nbuf:nbuf + nb])
                    pos += ilen
                    nbuf += nb
                    yield loads_key(chunk[i]), value
                start += max(served, 1)

    # -- placement --------------------------------------------------------------------------
    def which_manager(self, key) -> int:
        """The id of the manager that holds (or would hold) ``key``."""
        return self._mid(dumps_key(key))

    def manager(self, id: int) -> "DDict":
        """A handle whose every operation goes to manager ``id`` (its len, keys,
        clear are that manager's)."""
        if not isinstance(id, int) or not 0 <= id < self._n:
            raise DDictError(f"{id!r} is not a manager id: they are 0..{self._n - 1}")
        handle = DDict.__new__(DDict)
        handle._setup(self._state, creator=False, chosen=id, life=self._life)
        return handle

    @property
    def local_managers(self) -> list[int]:
        """Ids of the managers on this process's node (node 0 in the client)."""
        here = _local_node()
        return [m.mid for m in self._managers if m.node == here]

    @property
    def local_manager(self):
        local = self.local_managers
        return local[0] if local else None

    @property
    def main_manager(self) -> int:
        """The local manager if there is one, else one picked for this process."""
        local = self.local_manager
        return local if local is not None else os.getpid() % self._n

    @property
    def manager_nodes(self) -> list[ManagerNode]:
        return [ManagerNode(m.node, f"node{m.node}", m.hostname) for m in self._managers]

    def local_keys(self) -> DDictKeysView:
        return DDictKeysView(self, self.local_managers, local=True)

    def local_values(self) -> DDictValuesView:
        return DDictValuesView(self, self.local_managers, local=True)

    def local_items(self) -> DDictItemsView:
        return DDictItemsView(self, self.local_managers, local=True)

    def local_len(self) -> int:
        return self._length(self.local_managers)

    # -- inspection ----------------------------------------------------------------------
    @property
    def dstats(self) -> dict[int, DDictManagerStats]:
        """{manager id: its figures}."""
        mids = self._scope()
        out = {}
        for mid, rep in zip(mids, self._request_all(mids, P.DD_STATS)):
            if rep.status:
                self._fail(rep, mid)
            body = pickle.loads(rep.payload)
            out[mid] = DDictManagerStats(**{f: body[f] for f in
                                            DDictManagerStats.__dataclass_fields__})
        return out

    @property
    def stats(self) -> list[DDictManagerStats]:
        return list(self.dstats.values())

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def owner(self) -> str:
        """The id under which the managers run (telemetry groups figures by it)."""
        return self._owner

    def get_name(self) -> str:
        return self._state.get("name", "")

    checkpoint_id = 0           # no checkpoints: always the first
    wait_for_keys = False

    # -- beyond the dict -----------------------------------------------------------------
    def start_batch_put(self, persist: bool = False) -> None:
        """Until ``end_batch_put()``, puts (and ``bput``) are streamed to the managers
        with no reply each; failures are raised by ``end_batch_put``."""
        if self._batch is not None:
            raise DDictError("a batch put is already in progress on this handle")
        self._batch = C.BatchWriter(self._c(), self._timeout)

    def end_batch_put(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            raise DDictError("end_batch_put() without start_batch_put()")
        failures = [(mid, rep) for mid, rep in batch.end() if rep.status]
        if failures:
            mid, rep = failures[0]
            if len(failures) > 1:
                more = ", ".join(str(m) for m, _ in failures[1:])
                rep = rep._replace(payload=bytes(rep.payload) +
                                   f" (managers {more} had failures too)".encode())
            self._fail(rep, mid)

    def bput(self, key, value) -> None:
        """Put a copy of the pair in every manager, for ``bget`` to read nearby. The
        key counts once (at its own manager); update it with ``bput`` again."""
        kb = dumps_key(key)
        vflags, inline, bufs = dumps_value(value)
        home = self._mid(kb)
        self._c()                      # first: it drops a batch a fork inherited
        if self._batch is not None:
            for mid in range(self._n):
                self._batch.add(mid, kb, vflags, inline, bufs,
                                0 if mid == home else P.DDF_REPLICA)
            return
        reps = self._request_all(range(self._n), P.DD_PUT, key=kb, value=inline, bufs=bufs,
                                 vflags=vflags,
                                 flags_for=lambda m: 0 if m == home else P.DDF_REPLICA)
        for mid, rep in enumerate(reps):
            if rep.status:
                self._fail(rep, mid, key)

    def bget(self, key):
        """Read a ``bput`` key from the nearest manager (this node's, if any)."""
        kb = dumps_key(key)
        mid = self._chosen if self._chosen is not None else self.main_manager
        rep = self._request(mid, P.DD_GET, kb, flags=P.DDF_ANY_COPY)
        if rep.status:
            self._fail(rep, mid, key)
        return loads_value(rep.vflags, rep.payload, rep.bufs)

    def freeze(self) -> None:
        """Refuse writes (put, pop, del, clear...) until ``unfreeze()``; reads go on."""
        self._for_all(P.DD_FREEZE)

    def unfreeze(self) -> None:
        self._for_all(P.DD_UNFREEZE)

    @property
    def is_frozen(self) -> bool:
        mid = self.main_manager
        rep = self._request(mid, P.DD_IS_FROZEN)
        if rep.status:
            self._fail(rep, mid)
        return bool(rep.arg)

    def _for_all(self, op: int):
        for mid, rep in enumerate(self._request_all(range(self._n), op)):
            if rep.status:
                self._fail(rep, mid)

    def fetch_add(self, key, val: int = 1) -> int:
        """Add ``val`` to the int at ``key`` atomically (a missing key counts as 0);
        -> the value before."""
        val = operator.index(val)
        if not -2 ** 63 <= val < 2 ** 63:
            raise OverflowError("fetch_add adds a 64-bit integer at most")
        kb = dumps_key(key)
        mid = self._mid(kb)
        rep = self._request(mid, P.DD_FETCH_ADD, kb, arg=val)
        if rep.status:
            self._fail(rep, mid, key)
        return rep.arg

    def wait_for(self, key, value=_MISSING, timeout=None) -> None:
        """Block until ``key`` is in the DDict (with ``value``, if given; values
        compare by their pickles). ``timeout`` defaults to the handle's; when it
        runs out: DDictTimeoutError."""
        kb = dumps_key(key)
        mid = self._mid(kb)
        flags, vflags, inline, bufs = 0, 0, b"", []
        if value is not _MISSING:
            vflags, inline, bufs = dumps_value(value)
            flags = P.DDF_MATCH
        wait_s = self._timeout if timeout is None else float(timeout)
        conn = self._c()
        if self._batch is not None:
            self._batch.flush(mid)
        rep = conn.wait(mid, kb, inline, bufs, flags, vflags, wait_s, WAIT_GRACE_S)
        if rep.status == P.DDS_TIMEOUT:
            what = "did not appear" if value is _MISSING else "did not get the awaited value"
            raise DDictTimeoutError(f"{key!r} {what} in the DDict within {wait_s:g} s")
        if rep.status:
            self._fail(rep, mid, key)

    def __repr__(self):
        state = "destroyed" if self._life.destroyed else "detached" if self._detached else ""
        name = f" {self.get_name()!r}" if self.get_name() else ""
        nodes = sorted({m.node for m in self._managers})
        one = f" manager={self._chosen}" if self._chosen is not None else ""
        return (f"<dragon_nb.DDict{name} {self._owner} managers={self._n} nodes={nodes}"
                f"{one}{' ' + state if state else ''}>")


collections.abc.MutableMapping.register(DDict)


def _unsupported(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"DDict.{name}() is not supported by dragon-nb "
                                  f"(no checkpoints or persistence)")
    method.__name__ = name
    return method


for _name in ("checkpoint", "rollback", "sync_to_newest_checkpoint", "advance", "persist",
              "restore", "persisted_ids", "filter", "clone", "copy", "pickler", "sync"):
    setattr(DDict, _name, _unsupported(_name))


def _local_node() -> int:
    """The node this process runs on: a Pool worker's, else the primary node."""
    return getattr(multiprocessing.current_process(), "node", 0)
