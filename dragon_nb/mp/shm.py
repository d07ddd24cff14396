"""Objects of one host in shared memory: named semaphores and segments.

When every process of the runtime is on this host (its network is ipc, so no
host can join), a lock, a semaphore, a shared value or a queue need not live
in an object host's table, a zmq round trip (~0.5 ms) per operation away.
They are kernel objects instead, named so that any process of the runtime
opens them by name (nothing is inherited, so a handle still pickles to a few
names, through queues, as Process or Pool arguments, in a DDict value):

- a lock or semaphore is a POSIX named semaphore, ``/dev/shm/sem.<name>``,
  driven by ``_multiprocessing.SemLock``, the C object the stdlib's locks use:
  an uncontended acquire and release costs what the stdlib's does (~0.1 µs,
  a futex, no system call), against ~1 ms through a host;
- a shared value's bytes are a segment, ``/dev/shm/<name>``, mapped into each
  process, so ``v.value`` is a memory read;
- a queue is a ring of records in a segment (``shm_ring.py``).

Their lifetime is still the object host's business: each is registered there
as a ``shm`` object (``objects.Memory``) before its kernel objects are made;
the host counts its handles as for any object and unlinks the names when the
last one goes, or when the host stops. Every name starts with the runtime
folder's name (``launch.shm_prefix``), so whatever a killed process left is
swept with that folder (``launch.remove_runtime_dir``).

Set ``DRAGON_NB_MP_SHM=0`` to keep every object in the hosts, as a runtime
whose network is TCP (hosts may join it) always does.
"""
from __future__ import annotations

import _multiprocessing
import functools
import itertools
import mmap
import os

from dragon_nb.errors import SharedObjectError
from dragon_nb.mp.link import Shared
from dragon_nb.runtime import client, launch, network

SemLock = _multiprocessing.SemLock
SEMAPHORE, RECURSIVE_MUTEX = 1, 0
SEM_VALUE_MAX = SemLock.SEM_VALUE_MAX

_counter = itertools.count()


def _network():
    return network.current() or client.get_runtime().network


@functools.cache
def _enabled_for(rundir: str, tcp: bool) -> bool:
    if os.environ.get("DRAGON_NB_MP_SHM", "1") == "0" or tcp:
        return False
    return os.path.isdir(launch.SHM_DIR) and os.access(launch.SHM_DIR, os.W_OK)


def enabled() -> bool:
    """Do this runtime's new objects live in shared memory?"""
    net = _network()
    return _enabled_for(net.rundir, net.tcp)


def new_name() -> str:
    """A name no other object of this runtime has: prefix, pid, a counter, and
    random bits (a pid is reused once its process is gone, its objects maybe not)."""
    prefix = launch.shm_prefix(_network().rundir)
    return f"{prefix}{os.getpid():x}-{next(_counter):x}-{os.urandom(3).hex()}"


def sem_path(name: str) -> str:
    return os.path.join(launch.SHM_DIR, f"sem.{name}")


def segment_path(name: str) -> str:
    return os.path.join(launch.SHM_DIR, name)


def sem_create(name: str, kind: int, value: int, maxvalue: int) -> SemLock:
    return SemLock(kind, value, maxvalue, "/" + name, False)


def sem_open(name: str, kind: int, maxvalue: int, what: str) -> SemLock:
    try:
        return SemLock._rebuild(0, kind, maxvalue, "/" + name)
    except FileNotFoundError:
        raise SharedObjectError(f"{what}: its semaphore {name!r} is gone (the object was "
                                f"removed with its last handle, or its runtime stopped)") from None


def segment_create(name: str, size: int) -> mmap.mmap:
    fd = os.open(segment_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(size, 1))
        return mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)


def segment_open(name: str, what: str) -> mmap.mmap:
    try:
        fd = os.open(segment_path(name), os.O_RDWR)
    except FileNotFoundError:
        raise SharedObjectError(f"{what}: its memory {name!r} is gone (the object was "
                                f"removed with its last handle, or its runtime stopped)") from None
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def unlink(prefix: str, paths, rings) -> None:
    """In the host: remove an object's kernel objects. Only names of this runtime
    under /dev/shm are touched, whatever a request says."""
    for path in paths:
        base = os.path.basename(path)
        if os.path.dirname(path) != launch.SHM_DIR or \
                not (base.startswith(prefix) or base.startswith("sem." + prefix)):
            continue
        try:
            os.unlink(path)
        except OSError:
            pass
    for ring in rings:
        if ring.startswith(prefix) and "/" not in ring:
            from dragon_nb.mp.shm_ring import Ring
            Ring.unlink(ring)


class Segment(Shared):
    """A handle on one segment, registered with this node's host; ``memory`` is
    its mapping in this process."""

    _kind = "shm"

    def __init__(self, size: int, what: str):
        self._name, self._what = new_name(), what
        self._create({"paths": [segment_path(self._name)]})    # registered first
        self.memory = segment_create(self._name, size)

    def _getstate(self):
        return (self._name, self._what)

    def _setstate(self, state) -> None:
        self._name, self._what = state
        self.memory = segment_open(self._name, self._what)

    def create_memoryview(self) -> memoryview:
        return memoryview(self.memory)
