"""The client side of the object hosts, and the base of every handle.

Each thread has its own DEALER per host (zmq sockets are not for sharing), so
a thread blocked in ``get`` holds nothing another thread needs. A call waits
for its answer in slices of ``CALL_SLICE_S``, looking at its host between two:
a host that is gone raises ``ObjectHostLostError`` naming its node, never a
hang. Interrupted (Ctrl-C, the notebook's interrupt button), a call tells its
host to drop it; if the host had already completed it (an item taken, a lock
granted) the call's ``undo`` gives it back, so nothing is lost; then the
``KeyboardInterrupt`` goes on.

A handle (``Shared``) names its host and object id and pickles to just that,
anywhere: through queues, as a Process or Pool argument, in a DDict value.
The host counts handles: ``hold`` at creation, ``pin`` when one is pickled,
``adopt`` when that is unpickled, ``release`` when one is collected; at zero
the object goes. A handle pickled but never unpickled keeps its object until
the runtime stops.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import weakref

import zmq

from dragon_nb.errors import ObjectHostLostError, SharedObjectError
from dragon_nb.mp import object_hosts
from dragon_nb.mp.object_hosts import HostRef
from dragon_nb.mp.objects import ERROR, GONE, OK
from dragon_nb.runtime import client, liveness, network
from dragon_nb.tunables import CALL_SLICE_S, CANCEL_WAIT_S
from dragon_nb.wire import protocol as P

NODE_CHECK_S = 1.0          # a host on another host: ask the head about its node this often


class Link:
    """This process's connections to the object hosts."""

    def __init__(self):
        self.pid = os.getpid()
        node = object_hosts._node
        self.client = f"{node}:{self.pid}:{os.urandom(4).hex()}"
        self.proc = (node if node is not None else -1, self.pid, network.pid_space(),
                     liveness.start_time(self.pid))
        self.local = threading.local()
        self.rids = itertools.count(1)
        self.net = network.current()
        if self.net is None:
            self.net = client.get_runtime().network

    def channel(self, address: str) -> P.Channel:
        chans = getattr(self.local, "chans", None)
        if chans is None:
            chans = self.local.chans = {}
        chan = chans.get(address)
        if chan is None:
            chan = P.Channel(client.zmq_context().socket(zmq.DEALER), self.net.codec())
            chan.sock.setsockopt(zmq.LINGER, 0)
            self.net.connect(chan.sock, address)
            chans[address] = chan
        return chan

    def create(self, host: HostRef, kind: str, params: dict) -> int:
        chan = self.channel(host.address)
        rid = next(self.rids)
        chan.send(P.REQ, {"op": P.Op.MP_CREATE, "rid": rid, "kind": kind, "params": params})
        status, value = self.wait(chan, host, rid, f"creating a {kind}")
        if status != OK:
            raise ValueError(value)
        return value

    def call(self, host: HostRef, oid: int, method: str, args=(), timeout=None,
             undo=None, what: str = "") -> tuple:
        """-> (status, value) of ``method`` on object ``oid``. ``undo(value)``: how to
        give back what an interrupted call had obtained; it must not wait (it sends,
        see ``send``), as it may run while another call waits."""
        chan = self.channel(host.address)
        rid = next(self.rids)
        orphans = self.orphans()
        result = None
        with _sigint_held():      # from here on, an answer nobody takes is given back
            orphans[(chan, rid)] = undo if undo is not None else _nothing
            chan.send(P.REQ, {"op": P.Op.MP_CALL, "rid": rid, "oid": oid, "method": method,
                              "args": tuple(args), "timeout": timeout,
                              "caller": self.caller()})
        try:
            result = self.wait(chan, host, rid, what or method)
            return result
        except KeyboardInterrupt:
            with _sigint_held():
                answer = result or self.answers().pop((chan, rid), None)
                if answer is not None:               # answered, then interrupted
                    if answer[0] == OK and undo is not None:
                        undo(answer[1])
            if answer is None:
                self.cancel(chan, rid)
            raise
        except BaseException:
            orphans.pop((chan, rid), None)
            raise

    def send(self, host: HostRef, oid: int, method: str, args=()) -> None:
        """Call ``method`` without waiting for its answer (a give-back)."""
        self.channel(host.address).send(P.REQ, {
            "op": P.Op.MP_CALL, "rid": next(self.rids), "oid": oid, "method": method,
            "args": tuple(args), "timeout": 0, "caller": self.caller()})

    def caller(self) -> tuple:
        return (self.client, threading.get_ident(), self.proc)

    def orphans(self) -> dict:
        """This thread's calls given up on before their host answered: rid -> undo.
        When their answer comes (read by a later call's wait), what they got goes back."""
        orphans = getattr(self.local, "orphans", None)
        if orphans is None:
            orphans = self.local.orphans = {}
        return orphans

    def answers(self) -> dict:
        """Answers read but not yet returned: (channel, rid) -> (status, value)."""
        answers = getattr(self.local, "answers", None)
        if answers is None:
            answers = self.local.answers = {}
        return answers

    def wait(self, chan: P.Channel, host: HostRef, rid: int, what: str) -> tuple:
        next_node_check = time.monotonic() + NODE_CHECK_S
        orphans, answers = self.orphans(), self.answers()
        while True:
            if chan.poll(CALL_SLICE_S * 1000):
                # a Ctrl-C between reading an answer and acting on it would lose what
                # it carries: SIGINT waits until the answers are filed
                with _sigint_held():
                    for _, kind, body, _ in chan.drain():
                        if kind == P.REP:
                            answers[(chan, body.get("rid"))] = (body["s"], body["v"])
                for key in [k for k in answers
                            if k[0] is chan and k in orphans and k[1] != rid]:
                    status, value = answers.pop(key)
                    undo = orphans.pop(key)
                    if status == OK:
                        undo(value)              # a late answer to a call given up on
                if (chan, rid) in answers:
                    with _sigint_held():
                        orphans.pop((chan, rid), None)
                        return answers.pop((chan, rid))
                for key in [k for k in answers if k[0] is chan]:
                    del answers[key]             # answers nobody waits for
                continue
            alive = host.process.alive()
            if alive is None and time.monotonic() >= next_node_check:
                next_node_check = time.monotonic() + NODE_CHECK_S
                alive = _node_alive(host.node)
            if alive is False:
                raise ObjectHostLostError(
                    f"{what}: the object host on node {host.node} is gone (its node was "
                    f"lost or it was killed), and with it everything it held")

    def cancel(self, chan, rid) -> None:
        """After an interrupt: ask the host to drop the call. Its answer, "cancelled"
        or what it got (given back, see ``orphans``), is read here for up to
        ``CANCEL_WAIT_S``, or else by a later call's wait on this channel."""
        crid = next(self.rids)
        orphans = self.orphans()
        try:
            chan.send(P.REQ, {"op": P.Op.MP_CANCEL, "rid": crid, "what": rid})
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                if not chan.poll(50):
                    continue
                done = False
                with _sigint_held():
                    for _, kind, body, _ in chan.drain():
                        if kind != P.REP:
                            continue
                        got = orphans.pop((chan, body.get("rid")), None)
                        if got is not None and body["s"] == OK:
                            got(body["v"])
                        done = done or (body.get("rid") == crid and (chan, rid) not in orphans)
                if done:
                    return
        except KeyboardInterrupt:    # a second Ctrl-C: the answer is dealt with later
            raise
        except Exception:            # the host is gone: nothing to give back to
            orphans.pop((chan, rid), None)

    def flush(self, host: HostRef) -> None:
        """Until the host answered a request sent after what this thread sent it
        before (for at most ``FLUSH_WAIT_S``)."""
        chan, rid = self.channel(host.address), next(self.rids)
        chan.send(P.REQ, {"op": P.Op.MP_STATS, "rid": rid})
        deadline = time.monotonic() + FLUSH_WAIT_S
        while time.monotonic() < deadline:
            if chan.poll(50) and any(kind == P.REP and body.get("rid") == rid
                                     for _, kind, body, _ in chan.drain()):
                return

    def refs(self, host: HostRef, changes) -> None:
        """Tell a host of handles made, pickled, unpickled or collected (no answer)."""
        self.channel(host.address).send(P.EVT, {"op": P.Op.MP_REFS, "changes": changes})


def wait_timeout(block: bool, timeout: float | None) -> float | None:
    """A blocking call's ``block``/``timeout`` as the host takes it: 0 for no wait,
    None for no limit; a negative timeout counts as 0, as with the stdlib."""
    if not block:
        return 0
    return None if timeout is None else max(0.0, timeout)


def _nothing(value) -> None:
    pass


class _sigint_held:
    """Hold SIGINT back (in the main thread) for a few lines that must not be cut."""

    def __enter__(self):
        self.main = threading.current_thread() is threading.main_thread()
        if self.main:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc):
        if self.main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _node_alive(node: int) -> bool | None:
    runtime = client.get_runtime(auto_start=False)
    if runtime is None:
        return None
    try:
        nodes = runtime.nodes(refresh=True)
    except Exception:
        return None
    for n in nodes:
        if n["id"] == node:
            return bool(n.get("alive", True))
    return False


_link: Link | None = None
_link_lock = threading.Lock()


def link() -> Link:
    """This process's Link: a new one after a fork, or once another runtime started."""
    global _link
    with _link_lock:
        net = network.current()
        if _link is None or _link.pid != os.getpid() or (net is not None and net is not _link.net):
            _link = Link()
        return _link


_live: dict = {}                  # this process's handles: key -> their weakref.finalize
_keys = itertools.count()
FLUSH_WAIT_S = 2.0


def release_all() -> None:
    """At the end of a process of the runtime (which exits without atexit, as the
    stdlib's children do): the hosts hear that its handles are gone, at once
    and for sure (a request answered after them), so objects it was given go
    when their last handle elsewhere does, not when the runtime stops."""
    changes: dict = {}
    for key in list(_live):
        finalizer = _live.pop(key, None)
        got = finalizer.detach() if finalizer is not None else None
        if got is not None and got[2][2] == os.getpid():
            host, oid = got[2][0], got[2][1]
            changes.setdefault(host, []).append((oid, "release"))
    for host, released in changes.items():
        try:
            link().refs(host, released)
            link().flush(host)
        except Exception:        # the host is gone: so are its objects
            pass


def settle() -> None:
    """Until the hosts of this process's handles have heard of them all (an
    adoption is sent without waiting for an answer): a Process runs its target
    with its handles counted and its connections to their hosts made, the same
    in every child (CPython's suite counts a child's descriptors)."""
    hosts = {}
    for finalizer in list(_live.values()):
        alive = finalizer.peek()             # (handle, _release, its arguments, {})
        if alive is None:
            continue
        host, _oid, pid, _key = alive[2]
        if pid == os.getpid():
            hosts[host.address] = host
    for host in hosts.values():
        try:
            link().flush(host)
        except Exception:        # a host that is gone says so at the handle's first use
            pass


def _release(host: HostRef, oid: int, pid: int, key: int) -> None:
    _live.pop(key, None)
    if os.getpid() != pid:
        return
    try:
        link().refs(host, [(oid, "release")])
    except Exception:           # at interpreter exit, or the runtime gone: it goes anyway
        pass


def _rebuild(cls, host, oid, state):
    obj = cls.__new__(cls)
    obj._host, obj._oid = HostRef(*host), oid
    obj._setstate(state)
    link().refs(obj._host, [(oid, "adopt")])
    obj._track()
    return obj


class Shared:
    """A handle on one object of an object host."""

    _kind = ""
    _error = ValueError           # what a call the host refuses raises (the stdlib's type)

    def _create(self, params: dict, host: HostRef | None = None) -> None:
        self._host = host or object_hosts.for_new()
        self._oid = link().create(self._host, self._kind, params)
        self._track()

    def _track(self) -> None:
        key = next(_keys)
        _live[key] = weakref.finalize(self, _release, self._host, self._oid, os.getpid(), key)

    def _call(self, method: str, *args, timeout=None, undo=None) -> tuple:
        """-> (status, value); an error or a removed object raises."""
        status, value = link().call(self._host, self._oid, method, args, timeout, undo,
                                    what=f"{type(self).__name__}.{method}()")
        if status == ERROR:
            raise self._error(value)
        if status == GONE:
            raise SharedObjectError(f"{type(self).__name__}.{method}(): {value}")
        return status, value

    def _send(self, method: str, *args) -> None:
        """``method`` without waiting: how an interrupted call gives back what it got."""
        link().send(self._host, self._oid, method, args)

    def _value(self, method: str, *args):
        return self._call(method, *args)[1]

    def _getstate(self):
        return None

    def _setstate(self, state) -> None:
        pass

    def __reduce__(self):
        link().refs(self._host, [(self._oid, "pin")])
        return (_rebuild, (type(self), tuple(self._host), self._oid, self._getstate()))

    def __eq__(self, other):
        return (type(other) is type(self) and other._oid == self._oid
                and other._host.address == self._host.address)

    def __hash__(self):
        return hash((self._host.address, self._oid))
