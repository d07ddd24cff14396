"""How a runtime's processes reach each other: ipc on one host, signed TCP across hosts.

A runtime on one host (the default) puts every endpoint in its private 0700
directory as an ``ipc://`` socket and signs nothing: the directory's
permissions are the authentication. A runtime that other hosts may join binds
TCP on one named interface and signs every message with a per-runtime key
(HMAC-SHA256, as Jupyter does) kept in a 0600 *connection file*; a message that
fails the check is dropped before anything in it is unpickled.

Every process of a runtime has one ``Network``: the client builds it, the head
and agents get it on their command line (the key through a file, never argv),
and service processes inherit their agent's through ``ServiceContext`` and
``current()``. Features never build addresses themselves: they call
``bind(sock, name)`` and pass the returned address on.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
from dataclasses import dataclass

import zmq

from dragon_nb.wire import protocol as P

CONNECTION_FILE = "connection.json"


@dataclass(frozen=True)
class Network:
    rundir: str                  # this host's private directory for this runtime
    host: str | None = None      # the address TCP endpoints bind on; None: ipc only
    key: bytes | None = None     # the per-runtime signing key; None: nothing signed

    @property
    def tcp(self) -> bool:
        return self.host is not None

    def codec(self) -> P.Codec:
        return P.Codec(self.key)

    def bind(self, sock: zmq.Socket, name: str) -> str:
        """Bind ``sock`` to a fresh endpoint called ``name``; -> its address."""
        if self.host is None:
            address = f"ipc://{self.rundir}/{name}"
            sock.bind(address)
            return address
        host = f"[{self.host}]" if ":" in self.host else self.host
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    def prepare(self, sock: zmq.Socket) -> zmq.Socket:
        """Socket options every connecting socket of this network needs."""
        if self.host is not None and ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def on_host(self, rundir: str, host: str | None) -> "Network":
        """The same runtime seen from another host (another directory and address)."""
        return Network(rundir, host if self.tcp else None, self.key)

    def describe(self) -> dict:
        """What a child process needs to rebuild this (the key stays out: see key files)."""
        return {"rundir": self.rundir, "host": self.host}


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
            return str(ipaddress.ip_address(listen))
        except ValueError:
            pass
        import psutil
        addrs = psutil.net_if_addrs().get(listen)
        if addrs:
            for a in addrs:
                if a.family == socket.AF_INET:
                    return a.address
        try:
            return socket.gethostbyname(listen)
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
