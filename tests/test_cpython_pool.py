"""CPython's own Pool test classes, run against the "dragon" start method.

``install_tests_in_module_dict`` builds WithProcessesTestPool,
WithProcessesTestPoolWorkerErrors and WithProcessesTestPoolWorkerLifetime
(31 tests) from ``Lib/test/_test_multiprocessing.py``; its setUpModule sets
the start method. dragon_nb is imported first so that the suite's
``multiprocessing.Pool`` is the routed one.
"""
import dragon_nb  # noqa: F401  (registers the "dragon" start method)

from test import _test_multiprocessing as _tm

_tm.install_tests_in_module_dict(globals(), "dragon", only_type="processes")

_KEEP = {"WithProcessesTestPool", "WithProcessesTestPoolWorkerErrors",
         "WithProcessesTestPoolWorkerLifetime"}
for _name in [n for n in globals() if n.startswith("WithProcesses") and n not in _KEEP]:
    del globals()[_name]
