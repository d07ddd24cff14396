"""CPython's own tests of Process, queues, locks, conditions, events, barriers,
shared values and connections, run under the "dragon" start method: every
process they start runs on a node of the runtime, every object they make lives
in its object hosts (84 tests of ``Lib/test/_test_multiprocessing.py``).

``install_tests_in_module_dict`` builds the ``WithProcesses*`` classes; its
setUpModule sets the start method. dragon_nb is imported first so that the
suite's ``multiprocessing.Queue`` and the like are the routed ones.

One helper of the suite is replaced, not a test: ``_DummyList``, which the
barrier tests use to count arrivals, keeps its count in fork-inherited heap
memory (``multiprocessing.heap.BufferWrapper``), which a process on another
node cannot share. The replacement keeps the same count in a
``multiprocessing.Value``, the suite's own locking around it.
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

_tm.install_tests_in_module_dict(globals(), "dragon", only_type="processes")

_KEEP = {f"WithProcessesTest{name}" for name in (
    "Process", "SubclassingProcess", "Queue", "Lock", "Semaphore", "Condition", "Event",
    "Value", "Array", "Barrier", "Connection", "Poll", "ListenerClient")}
for _name in [n for n in globals() if n.startswith("WithProcesses") and n not in _KEEP]:
    del globals()[_name]
