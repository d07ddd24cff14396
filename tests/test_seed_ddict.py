"""The seed page's example 4 (process files in a Pool, keep the results in a
DDict), run as a user would run it.

``tests/seed/ex4_ddict.py`` (``import dragon_nb``, ``dragon_nb.data.ddict``,
``dragon_nb.native.machine``) runs with ``python``; the same file with the seed's
own ``dragon`` imports runs with ``dragon-nb run ... --nodes 2``. It differs from
the seed only by ``# seed fix:`` and ``# added for the test`` lines.
The DDict is sized, as the seed does, at 10% of all the nodes' memory: a budget,
not memory taken up front. The script never destroys it; the runtime's stop
at exit must take the managers away (``run`` checks nothing is left).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_seed_examples import (FILES, PYTHON, SEED, describe, dragon_nb_command,  # noqa: F401
                                dragon_script, run, workdir)


def check_ddict_example(proc, data, nodes: int):
    assert proc.returncode == 0, describe(proc)
    files = list(Path(data).glob("*"))        # the script's order: same directory listing
    lengths = [len(FILES[f.name]) for f in files]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == str(lengths[2]), describe(proc)          # the seed's own peek
    assert lines[-1] == (f"processed={len(files)} stored={len(files)} "
                         f"total={sum(lengths)} managers={2 * nodes}"), describe(proc)


@pytest.mark.timeout(60)
def test_ddict_example_with_python(workdir, env_with_pkg):
    data, rtdir = workdir
    proc = run([PYTHON, str(SEED / "ex4_ddict.py")], data, rtdir, env_with_pkg)
    check_ddict_example(proc, data, nodes=1)


@pytest.mark.timeout(60)
def test_ddict_example_with_dragon_nb_run(workdir, env_with_pkg):
    data, rtdir = workdir
    proc = run([*dragon_nb_command(), "run", dragon_script("ex4_ddict.py", data),
                "--nodes", "2"], data, rtdir, env_with_pkg)
    check_ddict_example(proc, data, nodes=2)
