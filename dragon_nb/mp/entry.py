"""What runs in a ``Process`` started on the runtime: forked by a node agent,
it becomes the process object its parent sent and runs CPython's own
``BaseProcess._bootstrap`` (so ``current_process()``, ``parent_process()``,
exit codes, ``sys.exit`` and the joining of its own children are the stdlib's).

Around it: the parent's ``sys.path`` and working directory; the "dragon"
start method, and the runtime this process runs in, so it can start
Processes, Pools and objects of its own; its prints sent to the parent's hub,
then a bye once they are all out.

Entry point: ``main(spec, ctx)``, started by the agent.
"""
from __future__ import annotations

import os
import pickle
import select
import sys
import threading

import zmq

from dragon_nb import mp_compat
from dragon_nb.forwarding import ForwardedStream
from dragon_nb.mp import link as mp_link, local_link, object_hosts
from dragon_nb.mp import process as _process  # noqa: F401  (unpickling needs it: loaded once,
#                                                in the agent that forks this, not per child)
from dragon_nb.runtime import client, launch, network
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

# What a child needs to unpickle the handles it is given, imported by its agent at
# the first Process it starts (not at the agent's start: ~20 ms of compiling a
# node that runs no Process never pays), so a Process given a queue does not spend
# its first 17 ms importing shm_queues (measured without bytecode caches).
WARM_AT_FIRST_SPAWN = ("dragon_nb.mp.queues", "dragon_nb.mp.synchronize",
                       "dragon_nb.mp.sharedctypes", "dragon_nb.mp.connection",
                       "dragon_nb.mp.shm_queues", "dragon_nb.mp.shm_sync",
                       "dragon_nb.mp.shm_ctypes")
OUTPUT_FLUSH_BYTES = 8192
BYE_LINGER_MS = 2000          # the last prints and the bye get this long to leave


class ParentLink:
    """This process's link to its parent's hub, shared by its threads: a Unix
    socket when the hub can be reached by one (``local_link``), else a DEALER."""

    def __init__(self, address: str, local, ctx):
        self.node, self.pid = ctx.node, os.getpid()
        self.lock = threading.Lock()
        self.pending: dict[str, list] = {"stdout": [], "stderr": []}
        self.local = local_link.Sender.connect(local)
        self.zctx = self.chan = None
        if self.local is None:
            self.zctx = zmq.Context()
            self.chan = P.Channel(self.zctx.socket(zmq.DEALER), ctx.network.codec())
            ctx.network.connect(self.chan.sock, address)

    def write(self, stream: str, text: str) -> None:
        with self.lock:
            self.pending[stream].append(text)
            if text.endswith("\n") or sum(map(len, self.pending[stream])) >= OUTPUT_FLUSH_BYTES:
                self._flush(stream)

    def flush(self) -> None:
        with self.lock:
            for stream in self.pending:
                self._flush(stream)

    def _flush(self, stream: str) -> None:
        if self.pending[stream]:
            text, self.pending[stream] = "".join(self.pending[stream]), []
            body = {"node": self.node, "pid": self.pid, "stream": stream, "text": text}
            if self.local is not None:
                self.local.send_output(body)
            else:
                self.chan.send(P.MP_OUTPUT, body)

    def parent_sentinel(self, parent_pid: int, parent_space: str) -> int:
        """A descriptor that becomes readable when the parent ends: a pidfd when it
        runs in this pid space; else the end of a pipe closed once its hub's
        connection drops (its Unix socket hangs up, or a monitor of its DEALER says
        it disconnected)."""
        if parent_space == network.pid_space():
            try:
                return os.pidfd_open(parent_pid)
            except (OSError, AttributeError):     # gone already, or an old kernel
                pass
        r, w = os.pipe()
        if self.local is not None:
            hangup = self.local.sock.fileno()

            def wait_dropped():
                poller = select.poll()
                poller.register(hangup, select.POLLRDHUP)
                poller.poll()
        else:
            monitor = self.chan.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

            def wait_dropped():
                try:
                    monitor.recv_multipart()
                except zmq.ZMQError:
                    pass
                finally:
                    monitor.close(linger=0)

        def watch():
            try:
                wait_dropped()
            finally:
                os.close(w)
        threading.Thread(target=watch, name="dragon-nb parent watch", daemon=True).start()
        return r

    def bye(self, code: int) -> None:
        self.flush()
        body = {"node": self.node, "pid": self.pid, "code": code}
        with self.lock:
            if self.local is not None:
                self.local.last(P.MP_BYE, body, timeout=BYE_LINGER_MS / 1000)
                return
            self.chan.send(P.MP_BYE, body)
            self.chan.close(linger=BYE_LINGER_MS)
        self.zctx.term()


class _Flushing(ForwardedStream):
    def __init__(self, link: ParentLink, name: str):
        super().__init__(link.write, name)
        self.link = link

    def flush(self):
        self.link.flush()


def main(spec_bytes: bytes, ctx) -> int:
    spec = pickle.loads(spec_bytes)
    launch.adopt_caller_environment(spec["env"])
    os.environ["DRAGON_NB_NODE"] = str(ctx.node)       # where it runs, for the user's code
    client.attach_here(ctx.head, ctx.network)
    object_hosts.adopt(spec["hosts"], ctx.node)
    mp_compat.select_here()
    link = ParentLink(spec["hub"], spec.get("hub_local"), ctx)
    sys.stdout, sys.stderr = _Flushing(link, "stdout"), _Flushing(link, "stderr")
    code = 1
    try:
        process, _ = S.loads_with_source(spec["process"],
                                         lambda p: getattr(p, "_target", None))
        mp_link.settle()
        process.node = ctx.node              # current_process().node, as in a Pool worker
        sentinel = link.parent_sentinel(process._parent_pid, spec["parent_space"])
        code = process._bootstrap(parent_sentinel=sentinel)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        mp_link.release_all()
        client.stop()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        link.bye(code)
    return code
