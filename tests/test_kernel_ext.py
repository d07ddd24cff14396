"""The IPython extension: %load_ext and the %dragon runtime magic."""
import pytest

IPython = pytest.importorskip("IPython")
from IPython.testing.globalipapp import start_ipython  # noqa: E402

import dragon_nb  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython()
    yield shell
    dragon_nb.stop()


@pytest.mark.parametrize("name", ["dragon_nb", "kernel_ext"])
def test_dragon_magic_starts_shows_and_stops_the_runtime(ip, name, capsys):
    ip.run_line_magic("load_ext", name)
    ip.run_line_magic("dragon", "start --nodes 2")
    assert "2 node(s)" in capsys.readouterr().out
    ip.run_line_magic("dragon", "start")
    assert "already running" in capsys.readouterr().out
    ip.run_line_magic("dragon", "nodes")
    out = capsys.readouterr().out
    assert "node0" in out and "node1" in out
    ip.run_cell("import dragon_nb\nres = dragon_nb.Pool(2).map(abs, [-1, -2])")
    assert ip.user_ns["res"] == [1, 2]
    ip.run_line_magic("unload_ext", name)
    assert dragon_nb.get_runtime(auto_start=False) is None


def test_bad_node_count_is_a_usage_message(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_line_magic("dragon", "start --nodes 0")
    assert "UsageError" in capsys.readouterr().out
    assert dragon_nb.get_runtime(auto_start=False) is None
    ip.run_line_magic("unload_ext", "dragon_nb")
