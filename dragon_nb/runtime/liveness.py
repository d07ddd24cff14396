"""Is a runtime process alive, and how to signal it: the one place that knows.

A pool's workers, a pipeline's stage workers, a DDict's managers and the
coming ``Process`` objects are all processes an agent started on some node.
Whoever holds one asks three things of it: is it alive, signal it, wait for it
to go. The answers depend on where it runs:

* in this process's *pid space* (same kernel boot, same PID namespace:
  ``network.pid_space``): look at the pid, guarding against its reuse with the
  start time taken when the reference was made; signal it directly (a few
  microseconds, no message);
* anywhere else (another host, a container), or when the pid is another
  user's: through its node's agent (``Runtime.kill``), and alive means "no
  exit event yet", which the head publishes for every process it started.

So a ``ProcessRef`` knows its node, pid, pid space and start time; it says
``alive()`` is None when it cannot tell from here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil

from dragon_nb.runtime import network

log = logging.getLogger("dragon_nb.liveness")

REUSE_TOLERANCE_S = 0.01      # create times differ by more than this: another process


@dataclass(frozen=True)
class ProcessRef:
    """One process of the runtime, as this process can reach it."""
    node: int
    pid: int
    pid_space: str = ""        # its node's pid space ("" if unknown: treated as elsewhere)
    start_time: float = 0.0    # its create time (0.0: not known, no reuse check)

    @property
    def local(self) -> bool:
        """Can this process look at it by pid?"""
        return bool(self.pid_space) and self.pid_space == network.pid_space()

    @property
    def key(self) -> tuple[int, int]:
        """``(node, pid)``: how the head and exit events name it."""
        return (self.node, self.pid)

    def alive(self) -> bool | None:
        """True or False where it can be told from here; None elsewhere (its exit
        event, or its connection, will tell)."""
        if not self.local:
            return None
        try:
            proc = psutil.Process(self.pid)
            if self.start_time and abs(proc.create_time() - self.start_time) > REUSE_TOLERANCE_S:
                return False                      # the pid was reused
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:                      # there, but not ours to look at
            return True

    def gone(self) -> bool:
        """Is it known here that no process is left under its pid (exited and reaped,
        or the pid reused)? A zombie is not gone: its agent has yet to reap it and
        say how it ended. False where it cannot be told."""
        if not self.local:
            return False
        try:
            proc = psutil.Process(self.pid)
            return bool(self.start_time) and \
                abs(proc.create_time() - self.start_time) > REUSE_TOLERANCE_S
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def signal_here(self, sig: int) -> bool:
        """Send ``sig`` directly; True if sent or nothing is left to signal, False if
        it must go through the agent (not local, or another user's process)."""
        if not self.local:
            return False
        if self.alive() is False:
            return True                           # gone (or its pid reused): nothing to do
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:                   # another user's agent on this host
            return False
        return True


def refs(runtime, procs) -> list[ProcessRef]:
    """``[(node, pid)]`` just started by ``runtime`` -> references, with each node's
    pid space and, for processes here, their start time."""
    wanted = {node for node, _ in procs}
    table = runtime.nodes()
    if not wanted <= {n["id"] for n in table}:      # a node that joined since: ask again
        table = runtime.nodes(refresh=True)
    spaces = {n["id"]: n.get("pid_space") or "" for n in table}
    here = network.pid_space()
    out = []
    for node, pid in procs:
        space = spaces.get(node, "")
        out.append(ProcessRef(node, pid, space, start_time(pid) if space == here else 0.0))
    return out


def start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def signal_all(runtime, procs, sig: int, wait: bool = True) -> None:
    """Signal every process: directly where possible, the rest through their agents
    (``wait``: return once the agents have sent it; else do not block on the head,
    as the pool's I/O thread must not). A runtime that has gone is not an error:
    its processes went with it."""
    remote = [p.key for p in procs if not p.signal_here(sig)]
    if remote and runtime.alive:
        try:
            runtime.kill(remote, sig, wait=wait)
        except Exception as e:        # the runtime going away: the exits will tell
            log.info("could not signal %s: %r", remote, e)


def any_alive(procs) -> bool:
    """Is any of the local ones still alive? (The others cannot be looked at.)"""
    return any(p.alive() for p in procs)


def wait_gone(procs, timeout: float) -> list[ProcessRef]:
    """Wait up to ``timeout`` for the local ones to exit; -> those still alive.
    Processes elsewhere are not waited for (their exit events say when)."""
    watched = {}
    for p in procs:
        if p.alive():
            try:
                watched[psutil.Process(p.pid)] = p
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(list(watched), timeout=timeout)
    return [watched[ps] for ps in alive]
