"""How a runtime's processes reach each other: ipc on one host, signed TCP across hosts.

A runtime on one host (the default) puts every endpoint in its private 0700
directory as an ``ipc://`` socket and signs nothing: the directory's
permissions are the authentication. A runtime that other hosts may join binds
TCP on one named interface, with a per-runtime key kept in a 0600 *connection
file*, used twice:

* CurveZMQ on every socket: servers hold a key pair derived from the runtime
  key, so only a peer that holds the key can finish a handshake (nothing a
  stranger sends is even buffered), and everything on the wire is encrypted;
* an HMAC-SHA256 in every message (as Jupyter does), checked before anything
  in it is unpickled: a second lock, and the one that holds on ipc endpoints
  of the same runtime too.

Every process of a runtime has one ``Network``: the client builds it, the head
and agents get it on their command line (the key through a file, never argv),
and service processes inherit their agent's through ``ServiceContext`` and
``current()``. Features never build addresses or set security options
themselves: they call ``bind(sock, name)`` and ``connect(sock, address)``.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
from dataclasses import dataclass, field

import psutil
import zmq
import zmq.utils.monitor
import zmq.utils.z85

from dragon_nb.tunables import HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS, REFUSALS_DEAD
from dragon_nb.wire import protocol as P

CONNECTION_FILE = "connection.json"


@dataclass(frozen=True)
class Network:
    rundir: str                  # this host's private directory for this runtime
    host: str | None = None      # the address TCP endpoints bind on; None: ipc only
    key: bytes | None = field(default=None, repr=False)   # the per-runtime key; None: none

    @property
    def tcp(self) -> bool:
        return self.host is not None

    def codec(self) -> P.Codec:
        return P.Codec(self.key)

    def bind(self, sock: zmq.Socket, name: str, port: int = 0,
             heartbeats: bool = True) -> str:
        """Bind ``sock`` to a fresh endpoint called ``name`` (on TCP: ``port``, or any
        free one); -> its address. ``heartbeats=False`` for a receiver whose reader
        may fall behind (see ``_common``)."""
        self.serve(sock, heartbeats)
        if self.host is None:
            address = f"ipc://{self.rundir}/{name}"
            sock.bind(address)
            return address
        host = f"[{self.host}]" if ":" in self.host else self.host
        if port:
            sock.bind(f"tcp://{host}:{port}")
        else:
            port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    def serve(self, sock: zmq.Socket, heartbeats: bool = True) -> zmq.Socket:
        """Options of a socket that binds (call before its first bind)."""
        self._common(sock, heartbeats)
        if self.key is not None:
            sock.curve_server = True
            sock.curve_secretkey = _server_keys(self.key)[0]
        return sock

    def connect(self, sock: zmq.Socket, address: str, heartbeats: bool = True) -> zmq.Socket:
        """Connect ``sock`` to an endpoint of this runtime, with the options it needs
        (``heartbeats=False``: a data link whose receiver may stall, see ``_common``)."""
        self._common(sock, heartbeats)
        if self.key is not None and not sock.curve_server:
            public, secret = _client_keys()
            sock.curve_serverkey = _server_keys(self.key)[1]
            sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.connect(address)
        return sock

    def watch_links(self, sock: zmq.Socket) -> "LinkWatch | None":
        """On TCP, watch the links ``sock`` dials (call before its first connect);
        on ipc, None: those links are never cut."""
        return LinkWatch(sock) if self.tcp else None

    def _common(self, sock: zmq.Socket, heartbeats: bool = True) -> None:
        """On TCP, heartbeats (a connection nobody uses must not die unseen) and
        keepalive. Not on either end of a data link whose receiver may stall (a
        pipeline stage held back by a slower one, a caller reading slowly): a
        receiver whose queue is full stops reading its connection, so it sees no
        heartbeat for as long as it stalls. Its own heartbeat (or the TTL its
        sender announces) then times the connection out, and libzmq 4.3 aborts the
        whole process (``Assertion failed: !_io_error``, zeromq/libzmq#4767, open);
        the sender's times it out too, and everything on it is fed in again. Such
        links rely on TCP keepalive, and on the runtime's own liveness (a node
        silent 3 s is lost, its processes' exits published)."""
        if self.host is not None and ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        if self.host is None:
            return
        if heartbeats:
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


class LinkWatch:
    """What happened to the links a connecting socket dials: made, lost, refused,
    made again. The one watcher of every sender (pool workers, pipeline stages and
    feeders, DDict clients).

    zmq redials a cut TCP connection by itself, but what was on its way over it
    is gone, and only the sender's socket sees it happen: a CONNECTED after a
    DISCONNECTED, or a second one for an endpoint (libzmq may name an endpoint
    differently the second time: resolved, or IPv4-mapped). Whoever holds the
    sender is told (``poll``), and sends again; a new endpoint connected after an
    old one was lost also counts: one send too many, never one too few. A link
    refused ``refusals`` times in a row while not connected (lost, or never made)
    has nobody listening at its other end (``gone``): its peer exited, or its
    host went. A refusal is an answer (a reset), not silence: a host that stops
    answering altogether is left to timeouts and node liveness.
    """

    EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.watch = sock.get_monitor_socket(self.EVENTS)
        self.seen: set[str] = set()
        self.down = 0                  # links lost and not made again yet
        self.connected = False         # the last event said so (one endpoint: exact)
        self.refused = 0               # attempts failed since the last success
        self.redials = 0               # links cut and made again, in all
        self.again: list[str] = []     # endpoints dialled again, not yet taken by ``poll``

    def update(self) -> None:
        """Read the socket's events so far."""
        while self.watch.poll(0):
            msg = zmq.utils.monitor.recv_monitor_message(self.watch)
            event, endpoint = msg["event"], msg["endpoint"]
            endpoint = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
            if event == zmq.EVENT_DISCONNECTED:
                self.down += 1
                self.connected = False
            elif event == zmq.EVENT_CONNECT_RETRIED:
                if not self.connected:      # also before a first connection: a peer
                    self.refused += 1       # already gone is never reached at all
            elif event == zmq.EVENT_CONNECTED:
                if endpoint in self.seen or self.down:
                    self.again.append(endpoint)
                    self.redials += 1
                    self.down = max(0, self.down - 1)
                self.seen.add(endpoint)
                self.connected = True
                self.refused = 0

    def poll(self) -> list[str]:
        """The endpoints dialled again since the last call."""
        self.update()
        again, self.again = self.again, []
        return again

    def gone(self, refusals: int = REFUSALS_DEAD) -> bool:
        """Was the link refused ``refusals`` times in a row while not connected?"""
        self.update()
        return self.refused >= refusals

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.watch.close(linger=0)


def _server_keys(key: bytes) -> tuple[bytes, bytes]:
    """The CurveZMQ key pair every server of the runtime uses (z85): derived from the
    runtime key, so holding the key is what it takes to finish a handshake."""
    secret = hmac.new(key, b"dragon-nb curve server key", hashlib.sha256).digest()
    secret_z85 = zmq.utils.z85.encode(secret)
    return secret_z85, zmq.curve_public(secret_z85)


_client_keypair: tuple = (None, None)


def _client_keys() -> tuple[bytes, bytes]:
    """This process's own CurveZMQ key pair as a client (fresh after a fork)."""
    global _client_keypair
    pid, pair = _client_keypair
    if pid != os.getpid():
        pair = zmq.curve_keypair()
        _client_keypair = (os.getpid(), pair)
    return pair


_current: Network | None = None


def current() -> Network | None:
    """This process's network: set in the head, agents and the services they fork."""
    return _current


def set_current(net: Network | None) -> None:
    global _current
    _current = net


# --- keys and connection files -------------------------------------------------------
def new_key() -> bytes:
    return secrets.token_bytes(32)


def write_connection_file(path: str, key: bytes, **fields) -> str:
    """Write a 0600 JSON file with the key and the addresses to join with."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key.hex(), "signature_scheme": "hmac-sha256", **fields}, f,
                  indent=1)
    return path


def read_key_file(path: str) -> tuple[bytes, dict]:
    """-> (key, the file's other fields). ``-`` reads standard input.

    Accepts a connection file (JSON with ``key``) or a file holding the key in hex.
    Refuses a file that others can read: a key they can read is a key they hold.
    """
    if path == "-":
        import sys
        text = sys.stdin.readline()
    else:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {mode & 0o777:o}); "
                                  f"chmod 600 it")
        with open(path) as f:
            text = f.read()
    text = text.strip()
    try:
        fields = json.loads(text) if text.startswith("{") else {"key": text}
        key = bytes.fromhex(fields.pop("key"))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a dragon-nb connection file or hex key") from None
    if len(key) < 16:
        raise ValueError(f"{path}: the key is too short ({len(key)} bytes; at least 16)")
    return key, fields


# --- where this process is ---------------------------------------------------------------
@functools.cache
def pid_space() -> str:
    """Which processes this one can look at by pid: one kernel boot and one PID
    namespace. A hostname does not say it: a container on the host's network has
    the host's name but pids of its own."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{boot}/{namespace}"


# --- interfaces --------------------------------------------------------------------------
def route_source(peer: str) -> str:
    """The address of this host's interface that routes to ``peer`` (nothing is sent)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def resolve_interface(listen: str | None, hosts=()) -> str:
    """The address the head binds on: ``listen`` (an address, or an interface name
    such as ``eth0``), else the interface that routes to the first host."""
    if listen:
        try:
            address = str(ipaddress.ip_address(listen))
        except ValueError:
            address = None                 # an interface or host name
        if address is not None:
            return _one_interface(address)
        addrs = psutil.net_if_addrs().get(listen)
        if addrs:
            for a in addrs:
                if a.family == socket.AF_INET:
                    return a.address
        try:
            return _one_interface(socket.gethostbyname(listen))
        except OSError:
            raise ValueError(f"--listen {listen!r} is neither an address, an interface "
                             f"of this host nor a resolvable name") from None
    for h in hosts:
        try:
            return route_source(socket.gethostbyname(h))
        except OSError:
            continue
    raise ValueError("name the interface other hosts reach this one on (listen=...): "
                     "no host given to find the route to")


def _one_interface(address: str) -> str:
    """``address``, if it names one interface (not 0.0.0.0, ::, or a multicast group)."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"listen={address!r} is not one interface: name the address other "
                         f"hosts reach this one on (binding every interface is not done "
                         f"unasked, and not at all by dragon-nb)")
    return address

