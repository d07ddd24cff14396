"""Test hosts on one machine: network namespaces on a private bridge.

``NamespaceHosts(["h1", "h2", "h3"])`` makes, as root, one namespace per host,
each with its own address on a bridge that lives in a namespace of its own
(nothing is added to the machine's own network), and removes them all on
``down()``. ``on(host, argv)`` runs a command there under its own hostname
(a UTS namespace), so each host reports a name of its own, as real hosts do;
``launcher`` is the same as a dragon-nb launcher template, and makes the agents'
hosts more separate still: each also gets a PID namespace of its own (the pids it
reports mean nothing on the caller's host) and a private, empty runtime folder
(``$DRAGON_NB_TMPDIR`` or /tmp: nothing of the caller's files is there), as on a
real other machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.213.7"      # only ever used inside the namespaces made here


def available() -> str | None:
    """None if test hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, util-linux)"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class NamespaceHosts:
    def __init__(self, names, tag: str | None = None):
        self.tag = tag or f"dnb{os.getpid()}"
        self.names = list(names)
        self.switch = f"{self.tag}-sw"
        self.ns = {h: f"{self.tag}-{h}" for h in self.names}
        self.address = {h: f"{SUBNET}.{11 + i}" for i, h in enumerate(self.names)}
        self.made: list[str] = []

    def up(self) -> "NamespaceHosts":
        try:
            _ip("netns", "add", self.switch)
            self.made.append(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for h in self.names:
                ns = self.ns[h]
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("-n", self.switch, "link", "add", f"v-{h}", "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"v-{h}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address[h]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made.clear()

    def link(self, host: str, up: bool) -> None:
        """Pull a host's cable (or plug it back)."""
        _ip("-n", self.ns[host], "link", "set", "eth0", "up" if up else "down")

    def on(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``: in its namespace, under its hostname."""
        return ["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host, *argv]

    @property
    def launcher(self) -> str:
        """A dragon-nb launcher template that starts agents on these hosts."""
        return (f"ip netns exec {self.tag}-{{host}} unshare --uts --pid --fork --mount "
                f"--mount-proc sh -c 'hostname \"$0\" && "
                f"mount -t tmpfs tmpfs \"${{{{DRAGON_NB_TMPDIR:-/tmp}}}}\" && exec \"$@\"' "
                f"{{host}} {{command}}")

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()
