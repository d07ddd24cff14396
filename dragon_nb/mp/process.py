"""``Process`` on the runtime: its ``Popen`` asks a node agent to start it.

The caller forks nothing. ``Popen`` sends the process object by value
(cloudpickle, so a target defined in ``__main__`` or a notebook cell works)
to ``entry.main`` on the chosen node, and learns its end from the hub
(``hub.py``). Everything else is CPython's ``BaseProcess``: ``join``,
``is_alive``, ``exitcode``, ``terminate``, ``kill``, ``close``,
``active_children`` and the joining of non-daemon children at exit all run
the stdlib's code over this ``Popen``, as they do over fork's.

Placement is Dragon's default, round-robin over the live nodes; a
``Process(..., node=N)`` (of the "dragon" context) picks one.
"""
from __future__ import annotations

import contextvars
import multiprocessing.context as mpctx
import multiprocessing.process as mpproc
import multiprocessing.util as mputil
import os
import pickle
import signal
import threading

import cloudpickle

from dragon_nb.runtime import launch, liveness, network
from dragon_nb.wire import serialization as S

ENTRY = "dragon_nb.mp.entry:main"
START_METHOD = "dragon"


class Popen:
    """What ``BaseProcess`` drives: one process on some node of the runtime."""

    method = START_METHOD

    def __init__(self, process_obj):
        from dragon_nb.mp import hub, object_hosts
        mputil._flush_std_streams()
        self.returncode = None
        self.finalizer = None
        self.why = None                       # how it ended, when it did not say itself
        self._done = threading.Event()
        self.sentinel, self._sentinel_w = os.pipe()
        self._hub = hub.get_hub()
        node = getattr(process_obj, "_dragon_node", None)
        if node is not None:
            node = _check_node(self._hub.runtime, node)
        spec = pickle.dumps({"process": _dump_process(process_obj, self),
                             "hub": self._hub.address, "hub_local": self._hub.local.where,
                             "env": launch.caller_environment(),
                             "parent_space": network.pid_space(),
                             "hosts": object_hosts.known()})
        try:
            self.node, self.pid = self._hub.spawn_placed(ENTRY, spec) if node is None \
                else self._hub.spawn(ENTRY, spec, node)
        except BaseException:
            self._close_fds()
            raise
        self.ref = liveness.refs(self._hub.runtime, [(self.node, self.pid)])[0]
        self._hub.track((self.node, self.pid), self._finished, contextvars.copy_context())

    def _finished(self, code: int, why: str | None) -> None:
        self.returncode, self.why = code, why
        self._done.set()
        try:
            os.close(self._sentinel_w)           # the sentinel reads EOF: "it ended"
        except OSError:
            pass
        self._sentinel_w = None

    # -- the interface BaseProcess uses -------------------------------------------------
    def poll(self, flag=os.WNOHANG):
        if self.returncode is None and flag != os.WNOHANG:
            self._done.wait()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self._done.wait(timeout)
        return self.returncode

    def _send_signal(self, sig: int) -> None:
        if self.returncode is None:
            liveness.signal_all(self._hub.runtime, [self.ref], sig)

    def terminate(self):
        self._send_signal(signal.SIGTERM)

    def kill(self):
        self._send_signal(signal.SIGKILL)

    def interrupt(self):
        self._send_signal(signal.SIGINT)

    def close(self):
        self._close_fds()

    def _close_fds(self):
        for name in ("sentinel", "_sentinel_w"):
            fd = getattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, None)

    def duplicate_for_child(self, fd):
        raise TypeError("a multiprocessing object of another start method (made for fork "
                        "or spawn: it holds a file descriptor) cannot go to a process on "
                        "the dragon-nb runtime; make it under the 'dragon' start method")


class Process(mpproc.BaseProcess):
    """``multiprocessing.Process`` of the "dragon" context; ``node=`` places it."""

    _start_method = START_METHOD

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={}, *,
                 daemon=None, node: int | None = None):
        super().__init__(group, target, name, args, kwargs, daemon=daemon)
        self._dragon_node = node

    @staticmethod
    def _Popen(process_obj):
        return Popen(process_obj)

    @staticmethod
    def _after_fork():
        pass


def _check_node(runtime, node) -> int:
    if isinstance(node, bool) or not isinstance(node, int):
        raise TypeError(f"node must be a node id (int), not {node!r}")
    ids = [n["id"] for n in runtime.nodes(refresh=True) if n.get("alive", True)]
    if node not in ids:
        raise ValueError(f"there is no live node {node} in the runtime (nodes: {ids})")
    return node


def _dump_process(process_obj, popen) -> bytes:
    """The process object by value; an unpicklable part raises, naming it."""
    mpctx.set_spawning_popen(popen)        # its authkey may travel, as with spawn
    try:
        try:
            return S.dumps_with_source(process_obj, getattr(process_obj, "_target", None))
        except Exception as e:
            raise TypeError(f"cannot start {process_obj!r} on the runtime: "
                            f"{_culprit(process_obj)} cannot be pickled ({e})") from e
    finally:
        mpctx.set_spawning_popen(None)


def _culprit(process_obj) -> str:
    for what, value in (("its target", getattr(process_obj, "_target", None)),
                        *((f"argument {i}", a) for i, a in
                          enumerate(getattr(process_obj, "_args", ()))),
                        *((f"keyword argument {k!r}", v) for k, v in
                          getattr(process_obj, "_kwargs", {}).items())):
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception:
            return f"{what} ({value!r})"
    return "the process object"
