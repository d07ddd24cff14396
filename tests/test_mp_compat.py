"""The "dragon" start method: multiprocessing's own names follow it."""
import multiprocessing
import multiprocessing.pool

import pytest

import dragon_nb
from multiprocessing import Pool as EarlyPool, cpu_count as early_cpu_count  # before the switch

pytestmark = pytest.mark.timeout(60)


def put_twice(q, x):
    q.put(x)
    q.put(x * 2)


@pytest.fixture
def dragon_method():
    old = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("dragon", force=True)
    yield
    multiprocessing.set_start_method(old, force=True)
    dragon_nb.stop()


def test_the_start_method_is_registered():
    assert "dragon" in multiprocessing.get_all_start_methods() or \
        multiprocessing.get_context("dragon").get_start_method() == "dragon"


def test_names_imported_before_the_switch_follow_it(dragon_method):
    with dragon_nb.start(nodes=2, cpus_per_node=2):
        assert early_cpu_count() == 4 == multiprocessing.cpu_count()
        with EarlyPool(2) as p:
            assert isinstance(p, dragon_nb.Pool)
            assert p.map(abs, [-1, -2]) == [1, 2]


def test_get_context_dragon_gives_a_dragon_pool(dragon_method):
    with multiprocessing.get_context("dragon").Pool(1) as p:
        assert isinstance(p, dragon_nb.Pool)


def test_other_start_methods_are_untouched():
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as p:
        assert type(p) is multiprocessing.pool.Pool
    old = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("fork", force=True)
    try:
        with EarlyPool(1) as p:
            assert type(p) is multiprocessing.pool.Pool
    finally:
        multiprocessing.set_start_method(old, force=True)


def test_other_multiprocessing_objects_keep_working(dragon_method):
    q = multiprocessing.Queue()
    proc = multiprocessing.Process(target=put_twice, args=(q, 21))
    proc.start()
    assert (q.get(timeout=10), q.get(timeout=10)) == (21, 42)
    proc.join(10)
    assert proc.exitcode == 0
    with multiprocessing.Manager() as m:
        d = m.dict(a=1)
        assert d["a"] == 1
