"""An object host's logic: its queues, locks, semaphores, conditions, events,
barriers and shared buffers, as a state machine with no sockets.

``ObjectTable.request`` takes one call (who, which object, which method, its
arguments, how long it may wait) and returns every ``Done`` it caused: the
caller's own, or none when the call must wait (it is *parked*), plus those of
other parked calls it completed (a put hands its item to a parked get). The
host sends each ``Done`` to the one who filed it (its ``token``), and calls
``expire`` when ``next_deadline`` comes. Nothing here blocks, sleeps or
unpickles: user data are opaque bytes. The semantics are those of CPython's
``multiprocessing`` and ``threading``, error messages included, so the client
handles can raise what the stdlib raises.

Waiters are served first come, first served. Before an item or a lock goes
to a parked waiter, ``alive`` is asked about its process: a dead one is
dropped and the next considered, so nothing is handed to a process that can
no longer use it (an item would be lost, a lock held for ever).
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

from dragon_nb.mp.signatures import checked_call, seconds as _seconds

log = logging.getLogger("dragon_nb.mp.objects")

OK, TIMEOUT, BROKEN, ERROR, CANCELLED, GONE, ACTION = \
    "ok", "timeout", "broken", "error", "cancelled", "gone", "action"


class Caller(NamedTuple):
    client: str          # a process's unique id (opaque string)
    thread: int          # its thread id
    proc: tuple | None   # (node, pid, pid_space, start_time) for liveness, or None


class Done(NamedTuple):
    token: object        # what the request was filed under (opaque, hashable)
    status: str          # OK, TIMEOUT, ...
    value: object        # the result, or for ERROR and GONE a message


class Call(NamedTuple):
    token: object
    caller: Caller
    timeout: float | None      # seconds, >= 0, or None: no limit


@dataclass(eq=False)
class Waiter:
    """A parked call: in ``obj.lines[line]`` and in the table's index."""
    token: object
    caller: Caller
    obj: "_Shared"
    line: str
    deadline: float | None = None
    timeout: float | None = None   # barrier: the wait's own, started when it enters
    item: bytes | None = None      # queue put: the item it brings
    count: int = 1                 # lock: the recursion count it gets
    result: object = True          # lock: what its acquire answers (a condition: notified?)
    index: int = 0                 # barrier: its arrival index


class Refused(Exception):
    """A call answered ERROR, with this message (nothing was changed)."""


def ok(call: Call, value=None) -> list:
    return [Done(call.token, OK, value)]


def _who(caller: Caller) -> tuple:
    return caller.client, caller.thread


# -- the base: parking ----------------------------------------------------------------
class _Shared:
    """One object. ``setup(**params)`` makes its state and returns its methods
    (name -> ``fn(call, *args)``, whose annotations say what the wire may pass);
    ``LINES`` name its queues of waiters; the ``on_*`` hooks say what becomes of
    a waiter that times out, is cancelled, or whose process went."""

    kind = ""
    LINES: tuple = ()
    timeout_status, timeout_value = TIMEOUT, None

    def __init__(self, table: "ObjectTable", oid: int, params: dict):
        self.table, self.oid = table, oid
        self.handles, self.pins = 1, 0
        self.lines = {name: collections.deque() for name in self.LINES}
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise ValueError(f"{self.kind}: the parameters must be a dict of names, "
                             f"not {params!r}")
        self.methods: dict = checked_call(self.setup, self.kind, ValueError, kwargs=params)

    def setup(self) -> dict:
        raise NotImplementedError

    def park(self, call: Call, line: str, **fields) -> list:
        """Park the call in ``line`` until something completes it; one that may
        not wait (timeout 0) times out now."""
        w = Waiter(call.token, call.caller, self, line, **fields)
        if call.timeout is not None and call.timeout <= 0:
            return self.on_timeout(w)
        if call.timeout is not None:
            w.deadline = self.table.clock() + call.timeout
        return self.line_up(w)

    def line_up(self, w: Waiter) -> list:
        self.lines[w.line].append(w)
        self.table.index(w)
        return []

    def next_live(self, line: str) -> Waiter | None:
        """Unpark and return the first waiter of ``line`` whose process may be
        alive; the dead ones before it are dropped."""
        queue = self.lines[line]
        while queue:
            w = queue.popleft()
            self.table.forget(w)
            if not self.table.dead(w.caller):
                return w
        return None

    def take_all(self, line: str) -> list:
        out = list(self.lines[line])
        self.lines[line].clear()
        for w in out:
            self.table.forget(w)
        return out

    def answer_all(self, line: str, status: str, value=None) -> list:
        return [Done(w.token, status, value) for w in self.take_all(line)]

    # what becomes of a waiter the table took out of its line:
    def on_timeout(self, w: Waiter) -> list:
        return [Done(w.token, self.timeout_status, self.timeout_value)]

    def on_cancel(self, w: Waiter) -> list:
        return [Done(w.token, CANCELLED, None)]

    def on_gone(self, w: Waiter) -> list:
        return []

    def client_gone(self, client: str) -> list:
        """A process went (beyond its parked calls, which the table drops)."""
        return []

    def on_remove(self) -> list:
        """The object goes (its waiters are answered GONE by the table)."""
        return []


# -- the kinds ---------------------------------------------------------------------------
class Queue(_Shared):
    kind = "queue"
    LINES = ("get", "put", "poll", "join")

    def setup(self, maxsize: int = 0, joinable: bool = False):
        self.maxsize, self.joinable = maxsize, joinable
        self.items: collections.deque = collections.deque()
        self.unfinished = 0
        return {"put": self.put, "get": self.get, "unget": self.unget, "poll": self.poll,
                "qsize": lambda call: ok(call, len(self.items)),
                "empty": lambda call: ok(call, not self.items),
                "full": lambda call: ok(call, self.is_full()),
                "task_done": self.task_done, "join": self.join}

    def is_full(self) -> bool:
        return 0 < self.maxsize <= len(self.items)

    def put(self, call, item: bytes):
        if self.is_full():
            return self.park(call, "put", item=item)
        self.items.append(item)
        self.unfinished += 1
        return ok(call) + self.flow()

    def get(self, call):
        if not self.items:
            return self.park(call, "get")
        return ok(call, self.items.popleft()) + self.flow()

    def unget(self, call, item: bytes):
        self.items.appendleft(item)
        return ok(call) + self.flow()

    def poll(self, call):
        return ok(call, True) if self.items else self.park(call, "poll")

    def flow(self) -> list:
        """Items to the parked getters, parked putters' items into free room."""
        dones = []
        while True:
            if self.items and self.lines["get"]:
                w = self.next_live("get")
                if w is not None:
                    dones.append(Done(w.token, OK, self.items.popleft()))
            elif self.lines["put"] and not self.is_full():
                w = self.next_live("put")
                if w is not None:
                    self.items.append(w.item)
                    self.unfinished += 1
                    dones.append(Done(w.token, OK, None))
            else:
                break
        if self.items:
            dones += self.answer_all("poll", OK, True)
        return dones

    def _joinable(self, method):
        if not self.joinable:
            raise Refused(f"{method}() is a JoinableQueue's; this queue is not joinable")

    def task_done(self, call):
        self._joinable("task_done")
        if self.unfinished <= 0:
            raise Refused("task_done() called too many times")
        self.unfinished -= 1
        return ok(call) + (self.answer_all("join", OK) if self.unfinished == 0 else [])

    def join(self, call):
        self._joinable("join")
        return ok(call) if self.unfinished == 0 else self.park(call, "join")


class Lock(_Shared):
    kind = "lock"
    LINES = ("acquire",)

    def setup(self, recursive: bool = False):
        self.recursive = recursive
        self.owner: tuple | None = None     # (client, thread), for a plain lock too
        self.depth = 0
        return {"acquire": self.acquire, "release": self.release,
                "is_mine": lambda call: ok(call, self.owns(call.caller)),
                "count": lambda call: ok(call, self.depth),
                "owner": lambda call: ok(call, self.owner)}

    def owns(self, caller: Caller) -> bool:
        return self.owner is not None and self.owner == _who(caller)

    def acquire(self, call):
        if self.owner is None:
            self.owner, self.depth = _who(call.caller), 1
            return ok(call, True)
        if self.recursive and self.owns(call.caller):
            self.depth += 1
            return ok(call, True)
        return self.park(call, "acquire")

    def release(self, call):
        if self.recursive:
            if not self.owns(call.caller):
                raise Refused("cannot release un-acquired lock")
            self.depth -= 1
            if self.depth:
                return ok(call)
        elif self.owner is None:
            raise Refused("semaphore or lock released too many times")
        return ok(call) + self.free()

    def free(self) -> list:
        """Nobody holds it: the first live parked acquirer gets it."""
        self.owner, self.depth = None, 0
        w = self.next_live("acquire")
        return [] if w is None else [self.grant(w)]

    def grant(self, w: Waiter) -> Done:
        self.owner, self.depth = _who(w.caller), w.count
        return Done(w.token, OK, w.result)

    def enqueue(self, w: Waiter) -> list:
        """A condition's waiter wants the lock back: it waits for it with no deadline."""
        w.obj, w.line, w.deadline = self, "acquire", None
        return [self.grant(w)] if self.owner is None else self.line_up(w)


class Semaphore(_Shared):
    kind = "semaphore"
    LINES = ("acquire",)

    def setup(self, value: int = 1, bounded: bool = False):
        if value < 0:
            raise ValueError("semaphore: value must be >= 0")
        self.value = self.initial = value
        self.bounded = bounded
        return {"acquire": self.acquire, "release": self.release,
                "get_value": lambda call: ok(call, self.value)}

    def acquire(self, call):
        if self.value > 0:
            self.value -= 1
            return ok(call, True)
        return self.park(call, "acquire")

    def release(self, call):
        if self.bounded and self.value >= self.initial:
            raise Refused("semaphore or lock released too many times")
        w = self.next_live("acquire")
        if w is None:
            self.value += 1
            return ok(call)
        return ok(call) + [Done(w.token, OK, True)]


class Condition(_Shared):
    kind = "condition"
    LINES = ("wait",)

    def setup(self, lock: int):
        self.lock = self.table.find(lock)
        if not isinstance(self.lock, Lock):
            raise ValueError(f"condition: lock {lock} is not a lock of this host")
        self.table.hold(lock)                 # the condition keeps its lock
        return {"wait": self.wait, "notify": self.notify,
                "notify_all": lambda call: self.notify(call, len(self.lines["wait"])),
                "n_waiting": lambda call: ok(call, len(self.lines["wait"]))}  # not notified

    def wait(self, call):
        if not self.lock.owns(call.caller):
            raise Refused("cannot wait on un-acquired lock")
        count = self.lock.depth
        return self.lock.free() + self.park(call, "wait", count=count)

    def notify(self, call, n: int = 1):
        if not self.lock.owns(call.caller):
            raise Refused("cannot notify on un-acquired lock")
        dones = []
        for _ in range(n):
            w = self.next_live("wait")
            if w is None:
                break
            dones += self.lock.enqueue(w)       # held by the notifier: parks there
        return ok(call) + dones

    def on_timeout(self, w):
        """As the stdlib's: the lock is taken back first, then wait answers False."""
        if self.table.dead(w.caller):
            return []
        w.result = False
        return self.lock.enqueue(w)

    def on_remove(self):
        return self.table.release(self.lock.oid)


class Event(_Shared):
    kind = "event"
    LINES = ("wait",)
    timeout_status, timeout_value = OK, False

    def setup(self):
        self.flag = False
        return {"set": self.set, "clear": self.clear, "wait": self.wait,
                "is_set": lambda call: ok(call, self.flag)}

    def set(self, call):
        self.flag = True
        return ok(call) + self.answer_all("wait", OK, True)

    def clear(self, call):
        self.flag = False
        return ok(call)

    def wait(self, call):
        return ok(call, True) if self.flag else self.park(call, "wait")


class Barrier(_Shared):
    """``threading.Barrier``. With an action, the last to arrive is answered
    ACTION and runs it; its ``action_done`` releases the others (or breaks the
    barrier). Calls arriving meanwhile wait in ``early`` (the stdlib's wait
    for its lock) and make the next generation, their timeouts starting then.
    A wait that times out, is cancelled or whose process goes breaks it."""

    kind = "barrier"
    LINES = ("wait", "early")
    timeout_status = BROKEN

    def setup(self, parties: int, action: bool = False, timeout: float | None = None):
        if parties < 1:
            raise ValueError("barrier: parties must be >= 1")
        self.parties, self.action, self.timeout = parties, action, timeout
        self.broken = False
        self.acting: str | None = None      # the client running the action
        return {"wait": self.wait, "action_done": self.action_done,
                "reset": self.reset, "abort": self.abort,
                "n_waiting": lambda call: ok(call, len(self.lines["wait"]) +
                                             (self.acting is not None)),
                "broken": lambda call: ok(call, self.broken),
                "parties": lambda call: ok(call, self.parties)}

    def wait(self, call):
        if call.timeout is None:
            call = call._replace(timeout=self.timeout)
        if self.broken:
            return [Done(call.token, BROKEN, None)]
        if self.acting is not None:
            return self.park(call._replace(timeout=None), "early", timeout=call.timeout)
        index = len(self.lines["wait"])
        if index + 1 < self.parties:
            return self.park(call, "wait", index=index)
        if self.action:
            self.acting = call.caller.client
            for w in self.lines["wait"]:
                w.deadline = None               # they wait for the action, not the clock
            return [Done(call.token, ACTION, index)]
        return [Done(call.token, OK, index)] + self.release_all()

    def release_all(self) -> list:
        """The generation passes; the early ones make the next."""
        self.acting = None
        dones = [Done(w.token, OK, w.index) for w in self.take_all("wait")]
        while self.lines["early"] and self.acting is None and not self.broken:
            w = self.next_live("early")
            if w is not None:
                dones += self.wait(Call(w.token, w.caller, w.timeout))
        return dones

    def action_done(self, call, succeeded: bool):
        if self.acting is None:                 # reset or aborted meanwhile
            return ok(call)
        return ok(call) + (self.release_all() if succeeded else self.break_all())

    def break_all(self) -> list:
        self.broken, self.acting = True, None
        return self.answer_all("wait", BROKEN) + self.answer_all("early", BROKEN)

    def reset(self, call):
        dones = self.answer_all("wait", BROKEN)
        self.broken = False
        return ok(call) + dones + self.release_all()

    def abort(self, call):
        return ok(call) + self.break_all()

    def on_timeout(self, w):
        return self.break_all() + [Done(w.token, BROKEN, None)]

    def on_cancel(self, w):
        others = self.break_all() if w.line == "wait" else []
        return [Done(w.token, CANCELLED, None)] + others

    def on_gone(self, w):
        return self.break_all() if w.line == "wait" else []

    def client_gone(self, client):
        return self.break_all() if self.acting == client else []


class Buffer(_Shared):
    kind = "buffer"

    def setup(self, size: int, initial: bytes | None = None):
        if size < 0:
            raise ValueError("buffer: size must be >= 0")
        if initial is not None and len(initial) != size:
            raise ValueError(f"buffer: initial holds {len(initial)} bytes, not size={size}")
        self.data = bytearray(size) if initial is None else bytearray(initial)
        return {"read": self.read, "write": self.write,
                "size": lambda call: ok(call, len(self.data))}

    def _check(self, what, start, stop):
        if not 0 <= start <= stop <= len(self.data):
            raise Refused(f"{what} of bytes {start}:{stop} is out of range: "
                          f"the buffer holds {len(self.data)}")

    def read(self, call, start: int, stop: int):
        self._check("read", start, stop)
        return ok(call, bytes(self.data[start:stop]))

    def write(self, call, start: int, data: bytes):
        self._check("write", start, start + len(data))
        self.data[start:start + len(data)] = data
        return ok(call)


class Memory(_Shared):
    """The kernel objects of an object that lives in shared memory (``shm.py``):
    named semaphores and segments under /dev/shm. The table counts its handles
    like any other's; when it goes, ``table.unlink(paths, rings)`` removes them."""
    kind = "shm"

    def setup(self, paths: list = (), rings: list = ()):
        if not all(isinstance(p, str) for p in (*paths, *rings)):
            raise ValueError(f"shm: paths and rings are names, not {paths!r}, {rings!r}")
        self.paths, self.rings = list(paths), list(rings)
        return {}

    def on_remove(self):
        self.table.unlink(self.paths, self.rings)
        return []


KINDS = {cls.kind: cls for cls in (Queue, Lock, Semaphore, Condition, Event, Barrier, Buffer,
                                   Memory)}


# -- the table ------------------------------------------------------------------------------
class _Deadline(NamedTuple):
    at: float
    seq: int
    waiter: Waiter


class ObjectTable:
    """All the objects of one host, and every call parked on them."""

    def __init__(self, alive: Callable = lambda proc: None, clock: Callable = time.monotonic,
                 unlink: Callable = lambda paths, rings: None):
        self.alive, self.clock, self.unlink = alive, clock, unlink
        self.objects: dict[int, _Shared] = {}
        self.parked: dict[object, Waiter] = {}
        self.deadlines: list[_Deadline] = []      # a heap; entries of unparked waiters stay
        self.oids = itertools.count(1)
        self.seq = itertools.count()

    # -- objects and calls -------------------------------------------------------------
    def create(self, kind: str, params: dict) -> int:
        cls = KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ValueError(f"unknown kind of object {kind!r}: one of {sorted(KINDS)}")
        oid = next(self.oids)
        self.objects[oid] = cls(self, oid, params)
        return oid

    def find(self, oid) -> _Shared | None:
        return self.objects.get(oid) if isinstance(oid, int) else None

    def request(self, token, caller: Caller, oid: int, method: str, args: tuple,
                timeout: float | None) -> list:
        obj = self.find(oid)
        if obj is None:
            return [Done(token, GONE, f"no object {oid!r} here: removed when its last "
                                      f"handle went, or never made")]
        what = f"{obj.kind}.{method}()"
        try:
            fn = obj.methods.get(method) if isinstance(method, str) else None
            if fn is None:
                raise Refused(f"a {obj.kind} has no method {method!r}")
            hash(token)
            if token in self.parked:
                raise Refused(f"a call filed under {token!r} is already waiting")
            if not isinstance(args, (tuple, list)):
                raise Refused(f"{what}: the arguments must be a tuple, not {args!r}")
            try:
                seconds = _seconds(timeout)
            except (TypeError, ValueError) as e:
                raise Refused(f"{what}: timeout {e}") from None
            return checked_call(fn, what, Refused, (Call(token, caller, seconds),), tuple(args))
        except Refused as e:
            return [Done(token, ERROR, str(e))]
        except Exception as e:        # a bug, or a caller that is not a Caller
            log.exception("%s (object %s) failed", what, oid)
            return [Done(token, ERROR, f"{what} failed: {e!r}")]

    # -- parked calls ------------------------------------------------------------------
    def index(self, w: Waiter) -> None:
        """``w`` was put in its object's line."""
        self.parked[w.token] = w
        if w.deadline is not None:
            heapq.heappush(self.deadlines, _Deadline(w.deadline, next(self.seq), w))

    def forget(self, w: Waiter) -> None:
        """``w`` was taken out of its object's line."""
        self.parked.pop(w.token, None)

    def unpark(self, w: Waiter) -> None:
        w.obj.lines[w.line].remove(w)
        self.forget(w)

    def dead(self, caller: Caller) -> bool:
        try:
            return self.alive(caller.proc) is False
        except Exception:             # can't tell: as if alive
            log.exception("alive(%r) failed", caller.proc)
            return False

    def _current(self, entry: _Deadline) -> bool:
        w = entry.waiter
        return self.parked.get(w.token) is w and w.deadline == entry.at

    def cancel(self, token) -> list:
        try:
            w = self.parked.get(token)
        except TypeError:             # unhashable: never parked
            return []
        if w is None:
            return []
        self.unpark(w)
        return w.obj.on_cancel(w)

    def expire(self) -> list:
        now, dones = self.clock(), []
        while self.deadlines and self.deadlines[0].at <= now:
            entry = heapq.heappop(self.deadlines)
            if self._current(entry):
                self.unpark(entry.waiter)
                dones += entry.waiter.obj.on_timeout(entry.waiter)
        return dones

    def next_deadline(self) -> float | None:
        while self.deadlines and not self._current(self.deadlines[0]):
            heapq.heappop(self.deadlines)
        return self.deadlines[0].at if self.deadlines else None

    def caller_gone(self, client: str) -> list:
        """Its parked calls go unanswered; what they held up goes on."""
        mine = [w for w in self.parked.values() if w.caller.client == client]
        tokens, dones = {w.token for w in mine}, []
        for w in mine:
            if self.parked.get(w.token) is w:     # not completed by an earlier one meanwhile
                self.unpark(w)
                dones += w.obj.on_gone(w)
        for obj in list(self.objects.values()):
            dones += obj.client_gone(client)
        return [d for d in dones if d.token not in tokens]

    # -- lifetime ----------------------------------------------------------------------
    def hold(self, oid) -> None:
        self._count(oid, 1, 0)

    def pin(self, oid) -> None:
        self._count(oid, 0, 1)

    def adopt(self, oid) -> None:
        self._count(oid, 1, -1)

    def _count(self, oid, handles: int, pins: int) -> None:
        obj = self.find(oid)
        if obj is not None:
            obj.handles += handles
            obj.pins = max(0, obj.pins + pins)

    def release(self, oid) -> list:
        obj = self.find(oid)
        if obj is None:
            return []
        obj.handles -= 1
        if obj.handles > 0 or obj.pins > 0:
            return []
        del self.objects[obj.oid]
        why = f"the {obj.kind} (object {obj.oid}) was removed: its last handle went"
        dones = []
        for line in obj.lines:
            dones += obj.answer_all(line, GONE, why)
        return dones + obj.on_remove()

    def memory(self) -> list:
        """The shared-memory objects still here (their kernel objects go with the host)."""
        return [obj for obj in self.objects.values() if isinstance(obj, Memory)]

    def stats(self) -> dict:
        return {"objects": len(self.objects),
                "by_kind": dict(collections.Counter(obj.kind for obj in self.objects.values())),
                "parked": len(self.parked)}
