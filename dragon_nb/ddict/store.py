"""One DDict manager's shard: its keys and values, its budget, its operations.

No sockets here: ``Shard.handle`` takes one request (the frame and its buffer
frames, see the DDict section of ``wire/protocol.py``) and returns the reply
frames, or None when there is none to send (a batch, a parked ``wait_for``).
Replies to parked waiters go to ``outbox`` for the manager loop to send.

Keys and values stay the opaque bytes the client sent: a value is
``(vflags, inline, buffers, size)``, buffers being zmq frames kept as received
(zero-copy). Stored bytes (keys plus values) are counted against ``budget``; a
put that would exceed it is refused with DDS_FULL and changes nothing.
"""
from __future__ import annotations

import array
import collections
import logging
import os
import pickle
import time

from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.ddict")
_dropped = P.DropLog(log)

REQ, REP, ENTRY, ITEM = P.DD_REQUEST, P.DD_REPLY, P.DD_ENTRY, P.DD_ITEM
HDR = REQ.size
MGET_REPLY_BYTES = 16 << 20       # a DD_MGET reply stops after this many value bytes
MAX_OPEN_BATCHES = 4096


class BadRequest(Exception):
    """A request that does not parse; answered with DDS_BAD, or dropped."""


def reply(rid: int, status: int = P.DDS_OK, payload: bytes = b"", arg: int = 0,
          vflags: int = 0, bufs=()) -> tuple:
    return REP.pack(status, vflags, len(bufs), rid, arg) + payload, bufs


def pickled_int(data: bytes):
    """The int a protocol-5 pickle holds, read without unpickling; else None."""
    i = 2 if data[:1] == b"\x80" else 0
    if data[i:i + 1] == b"\x95":                     # FRAME + 8-byte length
        i += 9
    op, body = data[i:i + 1], data[i + 1:]
    if not body.endswith(b"."):
        return None
    body = body[:-1]
    if op == b"K" and len(body) == 1:
        return body[0]
    if op == b"M" and len(body) == 2:
        return int.from_bytes(body, "little")
    if op == b"J" and len(body) == 4:
        return int.from_bytes(body, "little", signed=True)
    if op == b"\x8a" and body and len(body) == body[0] + 1:
        return int.from_bytes(body[1:], "little", signed=True)
    return None


class Shard:
    def __init__(self, mid: int, node: int, hostname: str, budget: int, name: str = ""):
        self.mid, self.node, self.hostname, self.budget, self.name = \
            mid, node, hostname, budget, name
        self.data: dict[bytes, tuple] = {}
        self.replicas: dict[bytes, tuple] = {}     # bput copies of other managers' keys
        self.used = 0
        self.frozen = False
        self.destroyed = False
        self.dirty = True                          # figures changed since published
        self.waiters: dict[bytes, list] = {}       # key -> [(ident, rid, deadline, match)]
        self.next_deadline: float | None = None    # the nearest waiter deadline
        self.batches: collections.OrderedDict = collections.OrderedDict()
        # the answers of batches that ended, for a DD_BATCH_END asked again (its reply
        # lost on a cut connection): the same answer, not "none of the puts arrived"
        self.ended: collections.OrderedDict = collections.OrderedDict()
        self.outbox: list = []                     # (ident, frames) for the loop to send
        self.ops = {P.DD_PING: self.ping, P.DD_PUT: self.put, P.DD_GET: self.get,
                    P.DD_CONTAINS: self.contains, P.DD_POP: self.pop, P.DD_LEN: self.length,
                    P.DD_KEYS: self.keys, P.DD_MGET: self.mget, P.DD_CLEAR: self.clear,
                    P.DD_STATS: self.stats, P.DD_FREEZE: self.freeze,
                    P.DD_UNFREEZE: self.unfreeze, P.DD_IS_FROZEN: self.is_frozen,
                    P.DD_FETCH_ADD: self.fetch_add, P.DD_WAIT_FOR: self.wait_for,
                    P.DD_BATCH: self.batch, P.DD_BATCH_END: self.batch_end,
                    P.DD_DESTROY: self.destroy}

    # -- dispatch ----------------------------------------------------------------
    def handle(self, frame: bytes, bufs: list, ident=None, lane: bool = False):
        """One request -> (reply frame, reply buffers), or None for no reply.

        ``lane``: the request came on the lane, so the reply must fit a
        datagram; a bigger one is DDS_TOO_BIG, with nothing changed.
        """
        if len(frame) < HDR:
            _dropped("manager %s: dropped a %d-byte message", self.mid, len(frame))
            return None
        op, flags, vflags, nbufs, rid, klen, arg = REQ.unpack_from(frame)
        try:
            fn = self.ops.get(op)
            if fn is None or nbufs != len(bufs) or HDR + klen > len(frame):
                raise BadRequest(f"op {op}, {nbufs} buffers announced, {len(bufs)} "
                                 f"received, key of {klen} bytes in a {len(frame)}-byte frame")
            key = frame[HDR:HDR + klen]
            out = fn(rid, key, frame, HDR + klen, flags, vflags, bufs, arg, ident, lane)
        except BadRequest as e:
            _dropped("manager %s: bad request: %s", self.mid, e)
            return reply(rid, P.DDS_BAD, str(e).encode())
        except Exception as e:   # never let one request take the manager down
            log.exception("manager %s: %s failed", self.mid, P.DD_OP_NAMES.get(op, op))
            return reply(rid, P.DDS_ERROR, f"manager {self.mid}: {e!r}".encode())
        if out is not None and lane and (out[1] or len(out[0]) > P.DD_LANE_MAX):
            return reply(rid, P.DDS_TOO_BIG)
        return out

    # -- storing -------------------------------------------------------------------
    def _value(self, frame, start, vflags, bufs) -> tuple:
        inline = frame[start:]
        return vflags, inline, tuple(bufs), len(inline) + sum(len(b) for b in bufs)

    def _store(self, table: dict, key: bytes, value: tuple):
        """-> None when stored, else (status, why)."""
        if self.frozen:
            return P.DDS_FROZEN, "the DDict is frozen"
        old = table.get(key)
        need = len(key) + value[3]
        delta = need - (len(key) + old[3] if old is not None else 0)
        if self.used + delta > self.budget:
            return P.DDS_FULL, (f"manager {self.mid} on node {self.node} is full: the key and "
                                f"value need {need} bytes, {self.budget - self.used} of its "
                                f"{self.budget} are free; nothing was stored")
        table[key] = value
        self.used += delta
        self.dirty = True
        if table is self.data and key in self.waiters:
            self._wake(key, value)
        return None

    def put(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        table = self.replicas if flags & P.DDF_REPLICA else self.data
        failed = self._store(table, key, self._value(frame, start, vflags, bufs))
        if failed:
            return reply(rid, failed[0], failed[1].encode())
        return reply(rid)

    def batch(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        state = self.batches.get(arg)
        if state is None:
            state = self.batches[arg] = [0, 0, P.DDS_OK, ""]   # stored, failed, status, why
            if len(self.batches) > MAX_OPEN_BATCHES:
                self.batches.popitem(last=False)               # abandoned by a dead client
        pos, end, nbuf = start, len(frame), 0
        while pos < end:
            if pos + ENTRY.size > end:
                raise BadRequest("truncated batch entry")
            klen, vlen, nb, vfl, fl = ENTRY.unpack_from(frame, pos)
            pos += ENTRY.size
            if pos + klen + vlen > end or nbuf + nb > len(bufs):
                raise BadRequest("batch entry overruns its message")
            k = frame[pos:pos + klen]
            inline = frame[pos + klen:pos + klen + vlen]
            pos += klen + vlen
            vb = tuple(bufs[nbuf:nbuf + nb])
            nbuf += nb
            value = (vfl, inline, vb, vlen + sum(len(b) for b in vb))
            failed = self._store(self.replicas if fl & P.DDF_REPLICA else self.data, k, value)
            if failed is None:
                state[0] += 1
            else:
                state[1] += 1
                if state[2] == P.DDS_OK:
                    state[2], state[3] = failed
        return None

    def batch_end(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        if arg in self.ended:
            status, why, count = self.ended[arg]
            return reply(rid, status, why, arg=count)
        stored, failed, status, why = self.batches.pop(arg, (0, 0, P.DDS_OK, ""))
        sent = int.from_bytes(key, "little") if len(key) == 8 else stored + failed
        if failed:
            why = f"{failed} of the {sent} puts of the batch failed; the first: {why}"
        lost = sent - stored - failed
        if lost > 0:          # never arrived: a connection cut, or the batch abandoned
            status = P.DDS_ERROR
            why = (f"{lost} of the {sent} puts of the batch never reached this manager "
                   f"(lost on the way: a connection cut, say) and were not stored" +
                   (f"; and {why}" if failed else ""))
        self.ended[arg] = (status, why.encode(), failed + max(lost, 0))
        if len(self.ended) > MAX_OPEN_BATCHES:
            self.ended.popitem(last=False)
        return reply(rid, status, why.encode(), arg=failed + max(lost, 0))

    def fetch_add(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        old = self.data.get(key)
        before = 0
        if old is not None:
            before = pickled_int(old[1]) if old[0] == 0 and not old[2] else None
            if before is None:
                return reply(rid, P.DDS_ERROR, b"fetch_add needs an int value; "
                                               b"this key holds something else")
        if not -2 ** 63 <= before + arg < 2 ** 63 or not -2 ** 63 <= before < 2 ** 63:
            return reply(rid, P.DDS_ERROR, b"fetch_add works on 64-bit integers; "
                                           b"nothing was changed")
        inline = pickle.dumps(before + arg, 5)
        failed = self._store(self.data, key, (0, inline, (), len(inline)))
        if failed:
            return reply(rid, failed[0], failed[1].encode())
        return reply(rid, arg=before)

    # -- reading ---------------------------------------------------------------------
    def _lookup(self, key, flags):
        value = self.data.get(key)
        if value is None and flags & P.DDF_ANY_COPY:
            value = self.replicas.get(key)
        return value

    def get(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        value = self._lookup(key, flags)
        if value is None:
            return reply(rid, P.DDS_MISSING)
        return reply(rid, payload=value[1], vflags=value[0], bufs=value[2])

    def contains(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        return reply(rid, P.DDS_OK if key in self.data else P.DDS_MISSING)

    def pop(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        if self.frozen:
            return reply(rid, P.DDS_FROZEN, b"the DDict is frozen")
        value = self.data.get(key)
        if value is None:
            return reply(rid, P.DDS_MISSING)
        if flags & P.DDF_NO_VALUE:
            out = reply(rid)
        else:
            out = reply(rid, payload=value[1], vflags=value[0], bufs=value[2])
            if lane and (value[2] or len(out[0]) > P.DD_LANE_MAX):
                return reply(rid, P.DDS_TOO_BIG)      # not removed: asked again over zmq
        del self.data[key]
        self.used -= len(key) + value[3]
        self.dirty = True
        return out

    def length(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        return reply(rid, arg=len(self.data))

    def keys(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        keys = list(self.data)
        lengths = array.array("I", map(len, keys))
        return reply(rid, payload=lengths.tobytes() + b"".join(keys), arg=len(keys))

    def mget(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        lengths = array.array("I")
        if len(key) % lengths.itemsize:
            raise BadRequest("mget lengths are not uint32")
        lengths.frombytes(key)
        meta, inline, out_bufs, pos, size = [], [], [], start, 0
        for n in lengths:
            if size >= MGET_REPLY_BYTES:
                break
            value = self.data.get(frame[pos:pos + n])
            pos += n
            if value is None:
                meta.append(ITEM.pack(-1, 0, 0))
                continue
            meta.append(ITEM.pack(len(value[1]), len(value[2]), value[0]))
            inline.append(value[1])
            out_bufs.extend(value[2])
            size += value[3]
        return reply(rid, payload=b"".join(meta) + b"".join(inline), arg=len(meta),
                     bufs=out_bufs)

    # -- the whole shard -------------------------------------------------------------
    def clear(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        if self.frozen:
            return reply(rid, P.DDS_FROZEN, b"the DDict is frozen")
        self.data.clear()
        self.replicas.clear()
        self.used = 0
        self.dirty = True
        return reply(rid)

    def stats(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        body = {"manager_id": self.mid, "node": self.node, "hostname": self.hostname,
                "pid": os.getpid(), "total_bytes": self.budget,
                "total_used_bytes": self.used, "pool_free_space": self.budget - self.used,
                "pool_utilization": 100.0 * self.used / self.budget if self.budget else 0.0,
                "num_keys": len(self.data), "num_bput_copies": len(self.replicas),
                "frozen": self.frozen}
        return reply(rid, payload=pickle.dumps(body, 5))

    def ping(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        return reply(rid, arg=os.getpid())

    def freeze(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        self.frozen = True
        return reply(rid)

    def unfreeze(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        self.frozen = False
        return reply(rid)

    def is_frozen(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        return reply(rid, arg=int(self.frozen))

    def destroy(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        self.destroyed = True
        self.data.clear()
        self.replicas.clear()
        self.used = 0
        self.dirty = True
        return reply(rid)

    # -- waiting -----------------------------------------------------------------------
    def wait_for(self, rid, key, frame, start, flags, vflags, bufs, arg, ident, lane):
        if ident is None:
            raise BadRequest("wait_for needs a zmq peer to answer later")
        match = None
        if flags & P.DDF_MATCH:
            match = _content(self._value(frame, start, vflags, bufs))
        value = self.data.get(key)
        if value is not None and (match is None or _content(value) == match):
            return reply(rid)
        deadline = None if arg < 0 else time.monotonic() + arg / 1000
        self.waiters.setdefault(key, []).append((ident, rid, deadline, match))
        if deadline is not None and (self.next_deadline is None or deadline < self.next_deadline):
            self.next_deadline = deadline
        return None

    def _wake(self, key, value):
        content = None
        left = []
        for ident, rid, deadline, match in self.waiters.pop(key):
            if match is not None:
                if content is None:
                    content = _content(value)
                if content != match:
                    left.append((ident, rid, deadline, match))
                    continue
            self.outbox.append((ident, reply(rid)))
        if left:
            self.waiters[key] = left

    def expire(self, now: float) -> None:
        """Answer the waiters whose time is up; find the next deadline."""
        nearest = None
        for key in list(self.waiters):
            left = []
            for w in self.waiters[key]:
                ident, rid, deadline, _ = w
                if deadline is not None and deadline <= now:
                    self.outbox.append((ident, reply(rid, P.DDS_TIMEOUT)))
                else:
                    left.append(w)
                    if deadline is not None and (nearest is None or deadline < nearest):
                        nearest = deadline
            if left:
                self.waiters[key] = left
            else:
                del self.waiters[key]
        self.next_deadline = nearest


def _content(value: tuple) -> tuple:
    """What wait_for compares: the kind and the bytes of a value."""
    return value[0], bytes(value[1]) + b"".join(bytes(b) for b in value[2])
