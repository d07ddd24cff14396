"""An object host: the process where queues, locks and shared values live.

Started by a node agent (``object_hosts.for_new``), it binds a ROUTER, tells
its starter's hub where (``BOUND``), and serves the ``MP_*`` requests of any
process of the runtime on an ``objects.ObjectTable``. The table decides; the
host only carries messages: a call that cannot complete yet (a get on an
empty queue, an acquire of a held lock) is parked in the table and answered
when another request, or its deadline, completes it. User data (queue items,
shared bytes) are opaque bytes here: the host never unpickles them.

It lives as long as the runtime (its agent stops it); objects go when their
last handle does (``MP_REFS``), or with it. Objects in shared memory
(``shm.py``) are registered here too, and their kernel objects unlinked then.

Entry point: ``main(spec, ctx)``, started by the agent.
"""
from __future__ import annotations

import functools
import logging
import os
import pickle
import time

import zmq

from dragon_nb.mp import shm
from dragon_nb.mp.objects import Caller, ObjectTable
from dragon_nb.runtime import launch, liveness, network
from dragon_nb.wire import protocol as P

log = logging.getLogger("dragon_nb.mp.host")
_dropped = P.DropLog(log)

HANDLERS = P.Handlers("object host")     # any runtime process -> host: handler(body, ident)
IDLE_MS = 1000


def _alive(proc) -> bool | None:
    return liveness.ProcessRef(*proc).alive() if proc else None


class Host:
    def __init__(self, ctx, hub_address: str):
        self.zctx = zmq.Context()
        self.router = P.Channel(self.zctx.socket(zmq.ROUTER), ctx.network.codec(), routed=True)
        self.address = ctx.network.bind(self.router.sock, f"mp-objects-{os.getpid()}")
        prefix = launch.shm_prefix(ctx.network.rundir)
        self.table = ObjectTable(alive=_alive, unlink=functools.partial(shm.unlink, prefix))
        self.dispatch = HANDLERS.bind(self)
        hub = P.Channel(self.zctx.socket(zmq.DEALER), ctx.network.codec())
        ctx.network.connect(hub.sock, hub_address)
        pid = os.getpid()
        hub.send(P.BOUND, {"address": self.address, "node": ctx.node, "pid": pid,
                           "pid_space": network.pid_space(),
                           "start_time": liveness.start_time(pid)})
        hub.close(linger=2000)

    def run(self) -> int:
        while True:
            deadline = self.table.next_deadline()
            wait = IDLE_MS if deadline is None else \
                max(0, min(IDLE_MS, (deadline - time.monotonic()) * 1000))
            if self.router.poll(wait + (1 if deadline is not None else 0)):
                for ident, kind, body, _bufs in self.router.drain(_dropped):
                    try:
                        self.dispatch(kind, body, ident)
                    except Exception as e:            # a nonsensical message
                        _dropped("dropped a %r message: %r", kind, e)
                        if kind == P.REQ and isinstance(body, dict) and "rid" in body:
                            self.router.send(P.REP, {"rid": body["rid"], "s": "error",
                                                     "v": f"bad request: {e!r}"}, to=ident)
            self.answer(self.table.expire())

    def answer(self, dones) -> None:
        for done in dones:
            ident, rid = done.token
            self.router.send(P.REP, {"rid": rid, "s": done.status, "v": done.value},
                             to=ident)

    @HANDLERS.on(P.REQ, P.Op.MP_CREATE)
    def on_create(self, body, ident):
        try:
            oid = self.table.create(body["kind"], body["params"])
            reply = {"rid": body["rid"], "s": "ok", "v": oid}
        except (ValueError, TypeError, KeyError) as e:
            reply = {"rid": body["rid"], "s": "error", "v": str(e)}
        self.router.send(P.REP, reply, to=ident)

    @HANDLERS.on(P.REQ, P.Op.MP_CALL)
    def on_call(self, body, ident):
        caller = Caller(*body["caller"])
        self.answer(self.table.request((ident, body["rid"]), caller, body["oid"],
                                       body["method"], tuple(body["args"]), body["timeout"]))

    @HANDLERS.on(P.REQ, P.Op.MP_CANCEL)
    def on_cancel(self, body, ident):
        """The caller gave up on a call (interrupted): if it was parked, it is
        answered "cancelled"; if it had completed, its answer is already sent."""
        self.answer(self.table.cancel((ident, body["what"])))
        self.router.send(P.REP, {"rid": body["rid"], "s": "ok", "v": None}, to=ident)

    @HANDLERS.on(P.EVT, P.Op.MP_REFS)
    def on_refs(self, body, ident):
        for oid, what in body["changes"]:
            if what == "release":
                self.answer(self.table.release(oid))
            elif what in ("hold", "pin", "adopt"):
                getattr(self.table, what)(oid)

    @HANDLERS.on(P.REQ, P.Op.MP_STATS)
    def on_stats(self, body, ident):
        self.router.send(P.REP, {"rid": body["rid"], "s": "ok", "v": self.table.stats()},
                         to=ident)

    def close(self):
        for memory in self.table.memory():
            self.table.unlink(memory.paths, memory.rings)
        self.router.close(linger=500)
        self.zctx.term()


def main(spec_bytes: bytes, ctx) -> int:
    spec = pickle.loads(spec_bytes)
    host = Host(ctx, spec["hub"])
    try:
        return host.run()
    finally:
        host.close()

