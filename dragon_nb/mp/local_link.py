"""How a Process talks to its parent's hub when both run on one host: a Unix
``SOCK_SEQPACKET`` socket instead of a zmq link.

Why: a child's zmq link cost it ~2.3 ms of CPU (measured 2026-12-04, 2 cores:
a Process that prints nothing used 6.2 ms of CPU with it and 3.8 ms without),
for a context whose I/O thread is started, connected, then terminated while
the bye leaves; a start+join costs every process involved ~10 ms of CPU in
all, on a machine of two cores. A connect, a send and a close on a Unix socket
cost tens of microseconds, and the child starts no thread.

How: the hub listens on a name in the abstract namespace (no file, gone with
the hub's process) and admits only connections of its own user, as the kernel
reports them (``SO_PEERCRED``): the guarantee the 0700 runtime folder gives
the ipc sockets. A packet is one whole message (``protocol.encode_packet``), so
a child killed halfway through a send leaves no half message to parse, and
the prints and the bye of one child arrive in the order sent. Abstract names
belong to a network namespace: a child elsewhere (another host, or a
namespace host of the tests) finds none and uses the zmq link.
"""
from __future__ import annotations

import os
import socket
import struct

from dragon_nb.wire import protocol as P

OUTPUT_PIECE_CHARS = 16384       # a print is sent in pieces of at most this many characters
_UCRED = struct.Struct("3i")     # pid, uid, gid


def net_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _packet_socket(blocking: bool) -> socket.socket:
    kind = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
    return socket.socket(socket.AF_UNIX, kind if blocking else kind | socket.SOCK_NONBLOCK)


class Listener:
    """The hub's end: ``accept()`` the children that connect, ``read(conn)`` their
    packets as (kind, body)."""

    def __init__(self):
        self.name = f"dragon-nb-hub-{os.getpid()}-{os.urandom(8).hex()}"
        self.sock = _packet_socket(blocking=False)
        self.sock.bind("\0" + self.name)
        self.sock.listen(256)
        self.where = (self.name, net_namespace())   # what a child needs to find it
        self.conns: dict[int, socket.socket] = {}  # by descriptor: what zmq.Poller reports

    def accept(self) -> list[socket.socket]:
        """The new connections of this user; others are closed at once."""
        new = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return new
            _pid, uid, _gid = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid != os.getuid():
                conn.close()
                continue
            conn.setblocking(False)
            self.conns[conn.fileno()] = conn
            new.append(conn)

    def read(self, conn: socket.socket) -> tuple[list, bool]:
        """-> ([(kind, body)], open): what ``conn`` has sent so far, and whether it is
        still open (closed here when it is not). A packet that is not one is skipped."""
        messages = []
        while True:
            try:
                data = conn.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return messages, True
            except OSError:
                data = b""
            if not data:
                del self.conns[conn.fileno()]
                conn.close()
                return messages, False
            try:
                messages.append(P.decode_packet(data))
            except P.ProtocolError:
                continue

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.sock.close()


class Sender:
    """A child's end. ``send`` blocks while the hub's socket is full (prints are
    held up as by a full pipe, not dropped); once the hub is gone it sends nothing."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.gone = False

    @classmethod
    def connect(cls, where) -> "Sender | None":
        """A sender to the hub ``where`` names; None if it cannot be reached from here."""
        if not where or where[1] != net_namespace():
            return None
        sock = _packet_socket(blocking=True)
        try:
            sock.connect("\0" + where[0])
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def send(self, kind: bytes, body) -> None:
        if self.gone:
            return
        try:
            self.sock.send(P.encode_packet(kind, body))
        except OSError:                  # the hub's process ended: nobody to tell
            self.gone = True

    def send_output(self, body: dict) -> None:
        text = body["text"]
        for at in range(0, max(len(text), 1), OUTPUT_PIECE_CHARS):
            self.send(P.MP_OUTPUT, {**body, "text": text[at:at + OUTPUT_PIECE_CHARS]})

    def last(self, kind: bytes, body, timeout: float) -> None:
        """Send the last message, waiting at most ``timeout`` s for room, and close."""
        self.sock.settimeout(timeout)
        self.send(kind, body)
        self.sock.close()
