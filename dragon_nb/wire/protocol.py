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
  the same signature as their *last* frame (``sign_frames``/``verify_frames``).

Control plane (client/agent <-> head) uses REQ/REP/EVT with an ``op`` field in
the body; the data plane (pool <-> worker) has its own kinds so the hot path
never looks inside a dict to dispatch.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import pickle
import logging
import struct
import time

import zmq

log = logging.getLogger("dragon_nb.wire")

# --- control plane ---------------------------------------------------------
REQ = b"req"          # request; body: {"op": str, "rid": int, ...}
REP = b"rep"          # reply;   body: {"rid": int, "ok": bool, ...}
EVT = b"evt"          # one-way event; body: {"op": str, ...}

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


_CODEC_DOMAIN = b"dragon-nb/1 message"
_RAW_DOMAIN = b"dragon-nb/1 ddict frames"


def sign_frames(key: bytes | None, frames: list) -> list:
    """Raw frames (DDict) -> the same plus an HMAC as the last frame, when keyed."""
    if key is None:
        return frames
    return [*frames, _mac(key, frames, _RAW_DOMAIN)]


def verify_frames(key: bytes | None, frames: list) -> list:
    """Check and strip the HMAC that ``sign_frames`` added; ProtocolError if wrong."""
    if key is None:
        return frames
    if len(frames) < 2:
        raise ProtocolError("unsigned message")
    *rest, sig = frames
    if not hmac.compare_digest(_bytes(sig), _mac(key, [memoryview(f) for f in rest],
                                                 _RAW_DOMAIN)):
        raise ProtocolError("bad signature")
    return rest


class Codec:
    """Turns (kind, body, buffers) into frames and back; signs when keyed."""

    def __init__(self, key: bytes | None = None):
        self.key = key

    def _sign(self, frames) -> bytes:
        return _mac(self.key, frames, _CODEC_DOMAIN)

    def encode(self, kind: bytes, body, buffers=()) -> list:
        frames = [kind, pickle.dumps(body, protocol=PICKLE_PROTOCOL),
                  *(b.raw() if isinstance(b, pickle.PickleBuffer) else b for b in buffers)]
        if self.key is not None:
            frames.insert(1, self._sign(frames))
        return frames

    def decode(self, frames: list):
        """frames (zmq.Frame or bytes) -> (kind, body, buffers)."""
        if self.key is not None:
            if len(frames) < 3:
                raise ProtocolError("short message")
            kind, sig, rest = frames[0], frames[1], frames[2:]
            expected = self._sign([_bytes(kind), *(memoryview(f) for f in rest)])
            if not hmac.compare_digest(_bytes(sig), expected):
                raise ProtocolError("bad signature")
            frames = [kind, *rest]
        if len(frames) < 2:
            raise ProtocolError("short message")
        kind = _bytes(frames[0])
        try:
            body = loads_body(frames[1])
        except Exception as e:  # malformed body: report, never crash the peer
            raise ProtocolError(f"undecodable body: {e!r}") from None
        return kind, body, frames[2:]


def _bytes(f) -> bytes:
    return f.bytes if isinstance(f, zmq.Frame) else bytes(f)


class Channel:
    """A zmq socket plus a codec: send/recv whole messages.

    ``routed`` is True for ROUTER sockets: ``recv`` then returns the peer
    identity first and ``send`` takes it as ``to``.
    """

    def __init__(self, sock: zmq.Socket, codec: Codec, routed: bool = False):
        self.sock = sock
        self.codec = codec
        self.routed = routed

    def send(self, kind: bytes, body=None, buffers=(), to: bytes | None = None,
             copy_threshold: int = 65536):
        frames = self.codec.encode(kind, body, buffers)
        if self.routed:
            frames.insert(0, to)
        # small frames are copied (cheaper than tracking); big ones go zero-copy
        self.sock.send_multipart(frames, copy=_all_small(frames, copy_threshold))

    def recv(self, flags: int = 0):
        """-> (identity, kind, body, buffers); identity is None when not routed.

        Raises ProtocolError for a frame that must be dropped.
        """
        frames = self.sock.recv_multipart(flags, copy=False)
        ident = None
        if self.routed:
            ident, frames = frames[0].bytes, frames[1:]
        kind, body, buffers = self.codec.decode(frames)
        return ident, kind, body, buffers

    def close(self, linger: int = 0):
        self.sock.close(linger=linger)


def _all_small(frames, threshold) -> bool:
    for f in frames:
        if memoryview(f).nbytes >= threshold:
            return False
    return True
