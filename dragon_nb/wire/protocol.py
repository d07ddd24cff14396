"""The wire protocol: every message kind and how a message becomes zmq frames.

A message is a multipart zmq message::

    [identity]  kind  body  [buffer ...]

* ``identity`` only on ROUTER sockets (added/stripped by zmq routing);
* ``kind`` is one of the short byte strings below;
* ``body`` is a pickle (protocol 5) of plain built-in values (dicts, tuples,
  numbers, strings, bytes) -- never user objects; user payloads are opaque
  ``bytes`` inside it or travel as the trailing ``buffer`` frames, zero-copy;
* when the runtime has a key (TCP transports), a ``sig`` frame with an
  HMAC-SHA256 over kind, body and buffers follows ``kind``; a frame that fails
  the check is dropped before anything is unpickled.

Control plane (client/agent <-> head) uses REQ/REP/EVT with an ``op`` field in
the body; the data plane (pool <-> worker) has its own kinds so the hot path
never looks inside a dict to dispatch.
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
import logging

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

# --- pub/sub topics (head PUB) ----------------------------------------------
TOPIC_TELEMETRY = b"tel."      # + node id; body: per-node figures
TOPIC_EXIT = b"exit."          # + owner; body: {"procs": [(node, pid, code)]}
TOPIC_NODES = b"nodes"         # node joined/left; body: {"event", "node"}

PICKLE_PROTOCOL = 5


class ProtocolError(Exception):
    """A frame that is malformed or fails authentication."""


class Codec:
    """Turns (kind, body, buffers) into frames and back; signs when keyed."""

    def __init__(self, key: bytes | None = None):
        self.key = key

    def _sign(self, frames) -> bytes:
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for f in frames:
            mac.update(f)
        return mac.digest()

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
            body = pickle.loads(frames[1])
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
