"""The wire protocol: every message kind and how a message becomes zmq frames.

A message is a multipart zmq message::

    [identity]  kind  body  [buffer ...]

* ``identity`` only on ROUTER sockets (added/stripped by zmq routing);
* ``kind`` is one of the short byte strings below;
* ``body`` is a pickle (protocol 5) of plain built-in values (dicts, tuples,
  numbers, strings, bytes) -- never user objects; user payloads are opaque
  ``bytes`` inside it or travel as the trailing ``buffer`` frames, zero-copy.
  Bodies are read by an unpickler that refuses every global, so a body can
  build nothing but built-in data, whoever sent it;
* when the runtime has a key (TCP transports), a ``sig`` frame with an
  HMAC-SHA256 over kind, body and buffers follows ``kind``; a frame that fails
  the check is dropped before anything is unpickled. Raw DDict frames carry
  a ``seq`` and the signature as their last two frames (``FrameSigner``).

Control plane (client/agent <-> head, caller -> stage workers) uses REQ/REP/EVT
with an ``op`` field in the body, every op named in ``Op`` below with who sends
it to whom; the data plane (pool <-> worker, stage -> stage) has its own kinds
so the hot path never looks inside a dict to dispatch. Each role reads what it
receives through one ``Handlers`` table (``@HANDLERS.on(kind, op)`` on its
methods), so where a message is handled is one search away from where it is
sent.

A keyed message also carries a ``seq`` frame (the sender's random session id
and a counter), covered by the HMAC: a receiver drops a message whose ``seq``
it has seen (``ReplayGuard``), so a captured frame cannot be played again.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import logging
import os
import pickle
import struct
import time
from collections import OrderedDict

import zmq

log = logging.getLogger("dragon_nb.wire")

# --- control plane ---------------------------------------------------------
REQ = b"req"          # request; body: {"op": str, "rid": int, ...}
REP = b"rep"          # reply;   body: {"rid": int, "ok": bool, ...}
EVT = b"evt"          # one-way event; body: {"op": str, ...}


class Op:
    """Every control operation: the ``op`` of a REQ or EVT body.

    Plain strings (a body may hold built-in values only). Each line says who
    sends it to whom and what the body holds besides ``op`` (and ``rid`` for a
    REQ, whose REP carries ``ok`` and, when not ok, ``error``).
    """
    # client -> head (REQ)
    READY = "ready"          # -> nodes, events (PUB address), tcp_address, tcp_events (the PUB
                             #    on TCP, for processes on other hosts); once all nodes are up
    NODES = "nodes"          # -> nodes: the node table
    SPAWN = "spawn"          # entry, spec, count, owner, nodes, within -> procs [(node, pid)]
    KILL = "kill"            # procs [(node, pid)], sig: answered once the agents sent it
    PROCS = "procs"          # -> procs [(node, pid, owner)]
    STATS = "stats"          # -> dropped (malformed, unsigned, unknown), replayed, pending
                             #    [(op, nodes it waits on)]: spawns and kills not answered yet
    SHUTDOWN = "shutdown"    # answered when every agent has stopped
    # client -> head (EVT): a kill nobody waits for (the pool's I/O thread)
    SIGNAL = "signal"        # procs, sig
    # head -> agent: SPAWN (REQ: count, entry, owner, spec -> pids), KILL (REQ: pids,
    # sig -> confirmed; or EVT: the head's own clean-ups, unanswered), and (EVT):
    WELCOME = "welcome"      # node, preload, telemetry_interval: a joining agent is named
    GOODBYE = "goodbye"      # why: stop and exit (lost, unknown, or the runtime stopped)
    PING = "ping"            # (nothing): an agent on another host hears from the head
    # agent -> head (EVT)
    REGISTER = "register"    # node (None: joining), name, hostname, pid, pid_space, cpus, ...
    EXITED = "exited"        # node, procs [(pid, exit code)]
    TELEMETRY = "telemetry"  # node's figures, owners {owner: counters}, pids: every live child
    LEAVING = "leaving"      # why: a joined agent stops
    # pipeline caller -> its stage workers (EVT on the control PUB)
    STOP = "stop"            # (nothing): every stage worker exits
    REWIRE = "rewire"        # stage, old, new: send to ``new`` instead of ``old``
    # any runtime process -> an object host (dragon_nb.mp); replies carry s (status), v
    MP_CREATE = "mp.create"  # kind, params -> v: the object id
    MP_CALL = "mp.call"      # oid, method, args, timeout, caller (client, thread, proc)
                             #   -> s, v: answered when the call completes
    MP_CANCEL = "mp.cancel"  # what: the rid of a call given up on (its own answer, if it
                             #   was waiting: s "cancelled"), answered after that one
    MP_REFS = "mp.refs"      # (EVT) changes [(oid, "hold"|"pin"|"adopt"|"release")]
    MP_STATS = "mp.stats"    # -> v: the host's object table figures

# --- data plane: pool <-> worker -------------------------------------------
HELLO = b"hi"         # worker -> pool: {"wid", "pid", "node"}
TASKS = b"tk"         # pool -> worker: {"funcs": {fid: bytes}, "tasks": [...]} + buffers
RESULTS = b"rs"       # worker -> pool: {"results": [...], "busy": float} + buffers
CANCEL = b"cx"        # pool -> worker: {"jobs": [job, ...]}
INIT_FAILED = b"if"   # worker -> pool: {"error": str}
STOP = b"st"          # pool -> worker: finish queued work and exit
OUTPUT = b"io"        # worker -> pool: {"lines": [(job, stream, text)], "dropped": int}

# --- data plane: pipeline stages (PUSH/PULL, worker to worker) ----------------
PIPE_ITEMS = b"pi"    # a batch: {"seq", "start"} + pickled (values, {i: failure}) + buffers
PIPE_END = b"pe"      # node source -> caller: {"batches", "items"} + pickled failure or None
PIPE_LINK = b"pl"     # stage worker or node source -> caller: {"stage", "to"}: its TCP link
                      # to ``to`` was cut and dialled again, what was on it may be lost

# --- services -> their creator --------------------------------------------------
BOUND = b"bd"         # the address a service bound where it runs: pipeline stage workers
                      # {"stage", "index", "input"}, DDict managers on TCP {"manager", "address"}

# --- multiprocessing on the runtime (dragon_nb.mp) ------------------------------
# a Process -> the hub of the process that started it
MP_OUTPUT = b"mo"     # {"pid", "stream", "text"}: what it printed
MP_BYE = b"mb"        # {"pid", "code"}: it finished (its output is all sent); the exit
                      # itself is the head's ``exit.<owner>`` event. On the hub's own
                      # host both go as packets on a Unix socket (``encode_packet``)
# an object host -> whoever started it: BOUND {"address", "node", "pid", "pid_space",
# "start_time"}. Any process of the runtime <-> an object host: REQ/REP/EVT with the
# ``Op.MP_*`` ops.

# --- data plane: DDict client <-> manager ------------------------------------
# Not Codec messages: the hot path has no pickle and no dict. A request is one
# frame, a fixed header then the key's pickle then the value's inline pickle:
#     DD_REQUEST (op, flags, vflags, nbufs, rid, klen, arg) + key + value
# followed (zmq only) by ``nbufs`` frames: the value's out-of-band buffers.
# A reply is one frame, DD_REPLY (status, vflags, nbufs, rid, arg) + payload,
# plus ``nbufs`` buffer frames. The manager never unpickles: keys and values
# are opaque bytes to it. Requests go to the manager's zmq ROUTER; on the same
# host, small synchronous ones may take its SOCK_SEQPACKET *lane* instead (one
# datagram per message, at most DD_LANE_MAX bytes, never buffer frames), which
# wakes one thread each way instead of zmq's three.
DD_REQUEST = struct.Struct("<BBBxIIIq")
DD_REPLY = struct.Struct("<BBxxIIq")
DD_ENTRY = struct.Struct("<IIIBBxx")   # one put of a DD_BATCH: klen, inline len, nbufs, vflags, flags
DD_ITEM = struct.Struct("<qIBxxx")     # one value of a DD_MGET reply: inline len (-1: missing), nbufs, vflags
DD_LANE_MAX = (64 << 10) + 512

(DD_PING,          # -> arg: the manager's pid
 DD_PUT,           # key + value
 DD_GET,           # key -> value
 DD_CONTAINS,      # key -> OK or MISSING
 DD_POP,           # key -> value (none with DDF_NO_VALUE)
 DD_LEN,           # -> arg: keys held (bput copies excluded)
 DD_KEYS,          # -> arg: count; payload: count uint32 lengths + the keys
 DD_MGET,          # key region: uint32 lengths; value region: the keys -> arg: values
                   #   served (a prefix); payload: DD_ITEM each + inline parts; buffers
 DD_CLEAR,
 DD_STATS,         # -> payload: pickle of a dict of built-in values
 DD_FREEZE, DD_UNFREEZE,
 DD_IS_FROZEN,     # -> arg: 0 or 1
 DD_FETCH_ADD,     # key, arg: amount -> arg: the value before
 DD_WAIT_FOR,      # key [+ value with DDF_MATCH], arg: ms (-1: no limit); zmq only
 DD_BATCH,         # arg: batch id; value region: (DD_ENTRY + key + inline) each; no reply
 DD_BATCH_END,     # arg: batch id, key: uint64 puts sent -> status of the first failure
                   #   (or of puts that never arrived), arg: failures, payload: why
 DD_DESTROY,       # the manager answers, then exits
 ) = range(1, 19)
DD_OP_NAMES = {v: k[3:].lower() for k, v in list(globals().items())
               if k.startswith("DD_") and isinstance(v, int) and k != "DD_LANE_MAX"}

DDF_REPLICA = 1       # put: a bput copy, kept apart (not counted, listed, popped)
DDF_ANY_COPY = 2      # get: a bput copy will do
DDF_NO_VALUE = 4      # pop: do not send the value back
DDF_MATCH = 8         # wait_for: wait for this value, not only for the key

DDV_RAW = 1           # value flag: a ``bytes`` value, sent as is (inline or one buffer)

(DDS_OK, DDS_MISSING, DDS_FULL, DDS_FROZEN, DDS_TIMEOUT, DDS_TOO_BIG, DDS_BAD,
 DDS_ERROR) = range(8)   # reply statuses; DDS_TOO_BIG: ask again over zmq

# --- pub/sub topics (head PUB) ----------------------------------------------
TOPIC_TELEMETRY = b"tel."      # + node id; body: per-node figures
TOPIC_EXIT = b"exit."          # + owner; body: {"procs": [(node, pid, code)]}
TOPIC_NODES = b"nodes"         # node joined/left; body: {"event", "node"}

PICKLE_PROTOCOL = 5


class ProtocolError(Exception):
    """A frame that is malformed or fails authentication."""


class ReplayError(ProtocolError):
    """A correctly signed message seen before: dropped, and counted."""


class UnknownMessage(ProtocolError):
    """A well-formed message no handler of this role takes."""


class Handlers:
    """One role's table of handlers, filled by decorating its methods::

        HANDLERS = Handlers("head")

        class Head:
            @HANDLERS.on(P.REQ, P.Op.SPAWN)
            def spawn(self, body, ident): ...

        dispatch = HANDLERS.bind(head)      # once per instance
        dispatch(kind, body, ident)         # -> spawn(body, ident)

    Control kinds (REQ, EVT) are looked up by ``(kind, body["op"])``; data kinds
    (and REP, matched by rid) by ``(kind, None)``. A message no handler takes
    raises ``UnknownMessage``, which the role drops like a malformed one.
    """

    def __init__(self, role: str):
        self.role = role
        self.table: dict[tuple, object] = {}

    def on(self, kind: bytes, op: str | None = None):
        def register(func):
            key = (kind, op)
            if key in self.table:
                raise ValueError(f"{self.role}: two handlers for {key}")
            self.table[key] = func
            return func
        return register

    def bind(self, obj) -> "Dispatch":
        return Dispatch(self.role, {key: func.__get__(obj) for key, func in self.table.items()})


class Dispatch:
    """A ``Handlers`` table bound to one object; call it with a received message."""

    __slots__ = ("role", "bound")

    def __init__(self, role: str, bound: dict):
        self.role, self.bound = role, bound

    def __call__(self, kind: bytes, body, *args):
        op = body.get("op") if kind in (REQ, EVT) and isinstance(body, dict) else None
        handler = self.bound.get((kind, op))
        if handler is None:
            raise UnknownMessage(f"the {self.role} takes no {kind!r} message"
                                 + (f" with op {op!r}" if op is not None else ""))
        return handler(body, *args)


class DropLog:
    """Logs dropped messages, at most one line per ``every_s`` however many
    arrive, so that a flood of bad frames cannot flood the log as well."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0):
        self.logger, self.every_s = logger, every_s
        self.unreported = 0
        self.next_report = 0.0

    def __call__(self, fmt: str, *args) -> None:
        self.unreported += 1
        now = time.monotonic()
        if now < self.next_report:
            return
        more = self.unreported - 1
        self.logger.warning(fmt + (f" (and {more} more dropped since the last report)"
                                   if more else ""), *args)
        self.unreported = 0
        self.next_report = now + self.every_s


class _PlainUnpickler(pickle.Unpickler):
    """Loads built-in data only: any reference to a class or function is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} refused in a message body")


def loads_body(data) -> object:
    """Unpickle a message body that may only hold built-in values."""
    return _PlainUnpickler(io.BytesIO(data)).load()


_FRAME_LEN = struct.Struct("<Q")
_SEQ = struct.Struct("<8sQ")          # a sender's session id, its message number

# Per sender, a receiver remembers this many message numbers below the highest it
# has seen, for this many senders (the least recently heard from is forgotten):
# a replay is dropped while its sender is among them, as Jupyter's digest history
# drops one while its digest is kept.
REPLAY_WINDOW = 1024
REPLAY_SENDERS = 4096


def _mac(key: bytes, frames, domain: bytes) -> bytes:
    """HMAC over what the message is (``domain``), how many frames it has and each
    frame's length and bytes: frames split or merged after signing no longer verify,
    and a message of one kind cannot pass for another's."""
    mac = hmac.new(key, domain, digestmod=hashlib.sha256)
    mac.update(_FRAME_LEN.pack(len(frames)))
    for f in frames:
        mac.update(_FRAME_LEN.pack(memoryview(f).nbytes))
        mac.update(f)
    return mac.digest()


_CODEC_DOMAIN = b"dragon-nb/2 message"
_RAW_DOMAIN = b"dragon-nb/2 ddict frames"


class _Numbering:
    """One sender's numbering of what it signs: a random session id and a counter,
    fresh in a forked child (which must not reuse its parent's numbers).

    A receiver expects one sender's numbers in order, give or take its window,
    and zmq keeps order only on one connection: so each socket signs with its
    own numbering (a Codec or FrameSigner per socket). Threads may share one:
    the state is one tuple, read at once, and ``next`` on a counter is atomic
    (two threads renewing it at once each get a session of their own)."""

    def __init__(self):
        self.state = (None, b"", None)      # (pid, session, counter)

    def next(self) -> bytes:
        pid, session, count = self.state
        if pid != os.getpid():
            session, count = os.urandom(8), itertools.count(1)
            self.state = (os.getpid(), session, count)
        return _SEQ.pack(session, next(count))


class ReplayGuard:
    """Which signed messages a receiver has already taken: per sender session, the
    highest number seen and a bit for each of the ``window`` numbers below it.
    Gaps are fine (a sender signs for many receivers); a number seen twice, or
    older than the window, is a replay."""

    def __init__(self, window: int = REPLAY_WINDOW, senders: int = REPLAY_SENDERS):
        self.window, self.senders = window, senders
        self.sessions: OrderedDict[bytes, list] = OrderedDict()   # session -> [highest, bits]
        self.replays = 0

    def admit(self, seq) -> None:
        """Take ``seq`` (a ``_SEQ``), or raise ReplayError."""
        try:
            session, n = _SEQ.unpack(_bytes(seq))
        except struct.error:
            raise ProtocolError("malformed sequence frame") from None
        state = self.sessions.get(session)
        if state is None:
            self.sessions[session] = [n, 1]
            if len(self.sessions) > self.senders:
                self.sessions.popitem(last=False)
            return
        self.sessions.move_to_end(session)
        highest, bits = state
        if n > highest:
            shift = n - highest
            state[0] = n
            state[1] = 1 if shift >= self.window else \
                ((bits << shift) | 1) & ((1 << self.window) - 1)
            return
        back = highest - n
        if back >= self.window or (bits >> back) & 1:
            self.replays += 1
            raise ReplayError(f"replayed message (number {n} of a sender already seen)")
        state[1] = bits | (1 << back)


class FrameSigner:
    """Signs and checks raw frames (DDict requests and replies): a ``seq`` and an
    HMAC as the last two frames, when keyed; without a key, frames pass as they are.
    One per socket (see ``_Numbering``)."""

    def __init__(self, key: bytes | None):
        self.key = key
        self.numbering = _Numbering()
        self.guard = ReplayGuard()

    def sign(self, frames: list) -> list:
        if self.key is None:
            return frames
        frames = [*frames, self.numbering.next()]
        return [*frames, _mac(self.key, frames, _RAW_DOMAIN)]

    def verify(self, frames: list) -> list:
        """Check and strip what ``sign`` added; ProtocolError (ReplayError) if wrong."""
        if self.key is None:
            return frames
        if len(frames) < 3:
            raise ProtocolError("unsigned message")
        *signed, sig = frames
        if not hmac.compare_digest(_bytes(sig), _mac(self.key, [memoryview(f) for f in signed],
                                                     _RAW_DOMAIN)):
            raise ProtocolError("bad signature")
        self.guard.admit(signed[-1])
        return signed[:-1]


class Codec:
    """Turns (kind, body, buffers) into frames and back; signs when keyed.

    Keyed frames are ``kind, sig, seq, body, buffers...``; the HMAC covers all
    but itself, and ``decode`` refuses a ``seq`` it has seen (``replays`` counts
    them). One per socket: its numbering and its guard are that socket's."""

    def __init__(self, key: bytes | None = None):
        self.key = key
        self.numbering = _Numbering()
        self.guard = ReplayGuard()

    @property
    def replays(self) -> int:
        return self.guard.replays

    def encode(self, kind: bytes, body, buffers=()) -> list:
        frames = [kind, pickle.dumps(body, protocol=PICKLE_PROTOCOL),
                  *(b.raw() if isinstance(b, pickle.PickleBuffer) else b for b in buffers)]
        if self.key is not None:
            frames.insert(1, self.numbering.next())
            frames.insert(1, _mac(self.key, frames, _CODEC_DOMAIN))
        return frames

    def decode(self, frames: list):
        """frames (zmq.Frame or bytes) -> (kind, body, buffers)."""
        if self.key is not None:
            if len(frames) < 4:
                raise ProtocolError("short message")
            kind, sig, rest = frames[0], frames[1], frames[2:]
            expected = _mac(self.key, [_bytes(kind), *(memoryview(f) for f in rest)],
                            _CODEC_DOMAIN)
            if not hmac.compare_digest(_bytes(sig), expected):
                raise ProtocolError("bad signature")
            self.guard.admit(rest[0])
            frames = [kind, *rest[1:]]
        if len(frames) < 2:
            raise ProtocolError("short message")
        kind = _bytes(frames[0])
        try:
            body = loads_body(frames[1])
        except Exception as e:  # malformed body: report, never crash the peer
            raise ProtocolError(f"undecodable body: {e!r}") from None
        return kind, body, frames[2:]


# --- packets: one message in one datagram of a local Unix socket -------------------
# What a Process on its parent's host sends to the parent's hub (mp/local_link.py):
# ``len(kind)``, ``kind``, then the body's pickle, read like any body. Unsigned: the
# kernel names the sender's user (SO_PEERCRED) and the hub admits only its own.
_PACKET_HEAD = struct.Struct("<B")


def encode_packet(kind: bytes, body) -> bytes:
    return _PACKET_HEAD.pack(len(kind)) + kind + pickle.dumps(body, protocol=PICKLE_PROTOCOL)


def decode_packet(data: bytes):
    """packet -> (kind, body); ProtocolError if it is not one."""
    if not data or len(data) < 1 + data[0]:
        raise ProtocolError("short packet")
    n = data[0]
    try:
        body = loads_body(data[1 + n:])
    except Exception as e:
        raise ProtocolError(f"undecodable packet body: {e!r}") from None
    return bytes(data[1:1 + n]), body


def _bytes(f) -> bytes:
    return f.bytes if isinstance(f, zmq.Frame) else bytes(f)


class Channel:
    """A zmq socket plus a codec: every message of the runtime is sent and read
    through one.

    ``routed`` (ROUTER sockets): ``recv`` returns the peer identity first and
    ``send`` takes it as ``to``. ``subscribed`` (SUB sockets): ``recv`` returns
    the topic first; a PUB channel sends with ``publish(topic, ...)``. Plain
    channels (DEALER, PUSH, PULL, ...) return None there.
    """

    __slots__ = ("sock", "codec", "routed", "subscribed")

    def __init__(self, sock: zmq.Socket, codec: Codec, routed: bool = False,
                 subscribed: bool = False):
        self.sock = sock
        self.codec = codec
        self.routed = routed
        self.subscribed = subscribed

    def send(self, kind: bytes, body=None, buffers=(), to: bytes | None = None,
             copy_threshold: int = 65536, flags: int = 0):
        frames = self.codec.encode(kind, body, buffers)
        if self.routed:
            frames.insert(0, to)
        # small frames are copied (cheaper than tracking); big ones go zero-copy
        self.sock.send_multipart(frames, flags, copy=_all_small(frames, copy_threshold))

    def publish(self, topic: bytes, kind: bytes, body=None, buffers=()):
        """On a PUB socket: the message, under ``topic``."""
        self.sock.send_multipart([topic, *self.codec.encode(kind, body, buffers)])

    def recv(self, flags: int = 0):
        """-> (identity or topic, kind, body, buffers); None first when neither.

        Raises ProtocolError for a message that must be dropped.
        """
        frames = self.sock.recv_multipart(flags, copy=False)
        first = None
        if self.routed or self.subscribed:
            if len(frames) < 2:
                raise ProtocolError("short message")
            first, frames = frames[0].bytes, frames[1:]
        kind, body, buffers = self.codec.decode(frames)
        return first, kind, body, buffers

    def drain(self, dropped=None, limit: int = 1000):
        """Yield every message waiting, without blocking, at most ``limit``;
        a malformed or replayed one is passed to ``dropped`` (a DropLog) and skipped."""
        for _ in range(limit):
            try:
                yield self.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as e:
                if dropped is not None:
                    dropped("dropped a message: %s", e)

    def poll(self, timeout_ms: float, flags: int = zmq.POLLIN) -> int:
        return self.sock.poll(timeout_ms, flags)

    def close(self, linger: int = 0):
        self.sock.close(linger=linger)


def _all_small(frames, threshold) -> bool:
    for f in frames:
        if memoryview(f).nbytes >= threshold:
            return False
    return True
