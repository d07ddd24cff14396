"""CPython's tests of test_cpython_mp.py again, with every object in the object
hosts (``DRAGON_NB_MP_SHM=0``): what a runtime over TCP, which hosts may join,
always uses. On one host the objects are in shared memory (``mp/shm.py``);
both kinds must pass the same suite.
"""
import os

import dragon_nb

import test_cpython_mp as _suite
from test_cpython_mp import *  # noqa: F401,F403  (the same WithProcesses* classes)

_saved = {}


def setUpModule():
    dragon_nb.stop()                  # the next runtime reads the setting when it starts
    _saved["env"] = os.environ.get("DRAGON_NB_MP_SHM")
    os.environ["DRAGON_NB_MP_SHM"] = "0"
    _suite.setUpModule()


def tearDownModule():
    try:
        _suite.tearDownModule()
    finally:
        dragon_nb.stop()
        if _saved["env"] is None:
            os.environ.pop("DRAGON_NB_MP_SHM", None)
        else:
            os.environ["DRAGON_NB_MP_SHM"] = _saved["env"]


def test_the_objects_of_this_module_are_in_the_hosts():
    import multiprocessing
    from dragon_nb.mp import sharedctypes, synchronize
    assert type(multiprocessing.Lock()) is synchronize.Lock
    assert isinstance(multiprocessing.Value("i", 1), sharedctypes.SynchronizedValue)
