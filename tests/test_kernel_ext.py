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


def test_functions_and_classes_defined_in_cells_run_on_workers(ip):
    ip.run_cell("import dragon_nb\n"
                "class Box:\n"
                "    def __init__(self, v):\n"
                "        self.v = v\n"
                "def boxed(x):\n"
                "    return Box(x * 2)\n"
                "def fails(x):\n"
                "    raise ValueError('cell line shown')  # marker\n")
    ip.run_cell("with dragon_nb.Pool(2) as p:\n"
                "    out = [b.v for b in p.map(boxed, range(4))]\n"
                "    isbox = isinstance(p.apply(boxed, (1,)), Box)\n"
                "    try:\n"
                "        p.apply(fails, (1,))\n"
                "    except ValueError as e:\n"
                "        tb = e.__cause__.tb\n")
    assert ip.user_ns["out"] == [0, 2, 4, 6]
    assert ip.user_ns["isbox"] is True
    # the remote traceback shows the cell's own source line
    assert "raise ValueError('cell line shown')  # marker" in ip.user_ns["tb"]
    dragon_nb.stop()
