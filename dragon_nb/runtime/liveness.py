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


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc, or None when
    no process has that pid. Ticks since boot, not psutil's create time: that is
    ticks plus the boot time read from the wall clock, which moves when the clock is
    stepped (NTP, a VM resumed) and would make every process look like another."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:                       # not Linux, or no /proc: psutil's view
        try:
            proc = psutil.Process(pid)
            return ("Z" if proc.status() == psutil.STATUS_ZOMBIE else "R",
                    int(proc.create_time() * 100))
        except psutil.NoSuchProcess:
            return None
    fields = data[data.rindex(b")") + 2:].split()     # after "pid (comm) "
    return fields[0].decode(), int(fields[19])


@dataclass(frozen=True)
class ProcessRef:
    """One process of the runtime, as this process can reach it."""
    node: int
    pid: int
    pid_space: str = ""        # its node's pid space ("" if unknown: treated as elsewhere)
    start_time: float = 0.0    # ``start_time(pid)`` when it was made (0: no reuse check)

    @property
    def local(self) -> bool:
        """Can this process look at it by pid?"""
        return bool(self.pid_space) and self.pid_space == network.pid_space()

    @property
    def key(self) -> tuple[int, int]:
        """``(node, pid)``: how the head and exit events name it."""
        return (self.node, self.pid)

    def _look(self) -> str | None:
        """Its state letter, or None if no process is left under its pid (exited and
        reaped, or the pid now another process's)."""
        stat = _stat(self.pid)
        if stat is None or (self.start_time and stat[1] != self.start_time):
            return None
        return stat[0]

    def alive(self) -> bool | None:
        """True or False where it can be told from here; None elsewhere (its exit
        event, or its connection, will tell). A zombie is not alive."""
        if not self.local:
            return None
        state = self._look()
        return state is not None and state != "Z"

    def gone(self) -> bool:
        """Is it known here that no process is left under its pid (exited and reaped,
        or the pid reused)? A zombie is not gone: its agent has yet to reap it and
        say how it ended. False where it cannot be told."""
        return self.local and self._look() is None

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
    """When ``pid`` started, in clock ticks since boot (0.0 if there is none)."""
    stat = _stat(pid)
    return float(stat[1]) if stat is not None else 0.0


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
