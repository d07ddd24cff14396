"""CPython's own tests of Process, queues, locks, conditions, events, barriers,
shared values and connections, run under the "dragon" start method: every
process they start runs on a node of the runtime, every object they make lives
in its object hosts (84 tests of ``Lib/test/_test_multiprocessing.py``).

``install_tests_in_module_dict`` builds the ``WithProcesses*`` classes; its
setUpModule sets the start method. dragon_nb is imported first so that the
suite's ``multiprocessing.Queue`` and the like are the routed ones.

Two helpers of the suite are replaced, no test: ``_DummyList``, which the
barrier tests use to count arrivals, keeps its count in fork-inherited heap
memory (``multiprocessing.heap.BufferWrapper``), which a process on another
node cannot share: the replacement keeps it in a ``multiprocessing.Value``.
And the condition tests' ``check_invariant`` reads the stdlib Condition's
private semaphores: the replacement asks the host how many still wait.
"""
import multiprocessing

import dragon_nb  # noqa: F401  (registers the "dragon" start method)

from test import _test_multiprocessing as _tm


class _SharedCount:
    """_DummyList's interface (append, len) over a multiprocessing.Value."""

    def __init__(self):
        self._count = multiprocessing.Value("i", 0)

    def append(self, _):
        with self._count.get_lock():
            self._count.value += 1

    def __len__(self):
        return self._count.value


_tm._DummyList = _SharedCount


def _no_sleeper_left(self, cond):
    """The condition tests' invariant, "no process still waits on it": the stdlib's
    check reads its Condition's private semaphores; this one asks the host."""
    self.assertEqual(cond._n_waiting(), 0)


_tm._TestCondition.check_invariant = _no_sleeper_left

_tm.install_tests_in_module_dict(globals(), "dragon", only_type="processes")

_KEEP = {f"WithProcessesTest{name}" for name in (
    "Process", "SubclassingProcess", "Queue", "Lock", "Semaphore", "Condition", "Event",
    "Value", "Array", "Barrier", "Connection", "Poll", "ListenerClient")}
for _name in [n for n in globals() if n.startswith("WithProcesses") and n not in _KEEP]:
    del globals()[_name]

# Tests of what the "dragon" context deliberately does otherwise, each with why.
_SKIPS = {
    ("WithProcessesTestQueue", "test_queue_feeder_donot_stop_onexc"):
        "an object that cannot be pickled makes put() raise in the caller (the stdlib's "
        "feeder thread prints the error and drops the item; this test checks that drop); "
        "tests/test_mp.py checks the raise",
    ("WithProcessesTestConnection", "test_connection"):
        "it checks that conn.fileno() is a descriptor and that recv() raises EOFError once "
        "every copy of the other end is closed: a dragon-nb pipe end has no descriptor, "
        "and does not count the other end's copies yet (docs/compatibility.md); "
        "tests/test_mp.py checks the rest of what this test does",
    ("WithProcessesTestConnection", "test_fd_transfer"):
        "passing a file descriptor needs a Unix socket between the two processes; a "
        "dragon-nb pipe end has no descriptor (its processes may be on different hosts)",
    ("WithProcessesTestConnection", "test_large_fd_transfer"):
        "as test_fd_transfer: no descriptor to pass file descriptors over",
    ("WithProcessesTestConnection", "test_missing_fd_transfer"):
        "as test_fd_transfer: no descriptor to pass file descriptors over",
}


def _skip(cls_name, test_name, reason):
    import unittest
    cls = globals()[cls_name]
    setattr(cls, test_name, unittest.skip(reason)(getattr(cls, test_name)))


for (_cls, _test), _reason in _SKIPS.items():
    _skip(_cls, _test, _reason)
