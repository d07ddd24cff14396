"""The IPython extension: %load_ext and the %dragon runtime magic."""
import pytest

IPython = pytest.importorskip("IPython")
from IPython.core.error import UsageError  # noqa: E402
from IPython.testing import globalipapp  # noqa: E402

import dragon_nb  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ip():
    shell = globalipapp.start_ipython() or globalipapp.get_ipython()   # one per session
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


def test_bad_node_count_is_a_usage_error(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    with pytest.raises(UsageError):
        ip.run_line_magic("dragon", "start --nodes 0")
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


def test_pipeline_cell_magic_runs_the_stages_and_binds_the_results(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_cell("def inc(x):\n    return x + 1\ndef dbl(x):\n    return 2 * x\nitems = range(50)")
    ip.run_cell_magic("dragon", "pipeline -o out",
                      "source: items\nstage: inc workers=2\nstage: dbl nodes=0\n")
    assert ip.user_ns["out"] == [2 * (x + 1) for x in range(50)]
    assert "50 results in out" in capsys.readouterr().out
    with pytest.raises(UsageError, match="name 'nope' is not defined"):
        ip.run_cell_magic("dragon", "pipeline", "source: items\nstage: nope\n")
    with pytest.raises(UsageError, match="needs a 'source:' line"):
        ip.run_cell_magic("dragon", "pipeline", "stage: inc\n")
    dragon_nb.stop()


def test_map_magic_binds_the_result_and_names_what_is_missing(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_cell("def sq(x):\n    return x * x")
    ip.run_line_magic("dragon", "map sq range(10) --chunksize 2 -o squares")
    assert ip.user_ns["squares"] == [x * x for x in range(10)]
    with pytest.raises(UsageError, match="name 'missing_fn' is not defined"):
        ip.run_line_magic("dragon", "map missing_fn range(3)")
    with pytest.raises(UsageError):
        ip.run_line_magic("dragon", "start --bogus")
    dragon_nb.stop()


def test_ddict_magics_create_list_show_and_destroy(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_line_magic("dragon", "start --nodes 2")
    capsys.readouterr()
    ip.run_line_magic("dragon", "ddict create results --managers-per-node 1 --mem 64MiB")
    assert "2 manager(s) on 2 node(s)" in capsys.readouterr().out
    ip.run_cell("results['a'] = 1\nresults['b'] = b'x' * 100")
    ip.run_line_magic("dragon", "ddict list")
    assert "results: 2 keys" in capsys.readouterr().out
    ip.run_line_magic("dragon", "ddict show results")
    out = capsys.readouterr().out
    assert "manager 0 on node 0" in out and "manager 1 on node 1" in out
    with pytest.raises(UsageError, match="no DDict named 'nothing_here'"):
        ip.run_line_magic("dragon", "ddict show nothing_here")
    with pytest.raises(UsageError, match='not a size'):
        ip.run_line_magic("dragon", "ddict create big --mem lots")
    with pytest.raises(UsageError):
        ip.run_line_magic("dragon", "ddict create big --ddict-nodes 3")
    ip.run_cell("not_a_ddict = [1, 2]")
    with pytest.raises(UsageError, match='is a list, not a DDict'):
        ip.run_line_magic("dragon", "ddict show not_a_ddict")
    ip.run_line_magic("dragon", "ddict create results --mem 8MiB")
    assert "previous DDict 'results' was destroyed" in capsys.readouterr().out
    ip.run_line_magic("dragon", "ddict destroy results")
    assert "destroyed" in capsys.readouterr().out
    dragon_nb.stop()


def test_a_comment_after_a_magic_is_ignored_and_restart_keeps_the_network(ip, capsys):
    ip.run_line_magic("load_ext", "dragon_nb")
    ip.run_line_magic("dragon", "start --nodes 1 --listen 127.0.0.1   # for the other hosts")
    first = dragon_nb.get_runtime(auto_start=False)
    assert first.tcp_address.startswith("tcp://127.0.0.1:")
    assert "other hosts join with: dragon-nb agent --connect" in capsys.readouterr().out
    ip.run_line_magic("dragon", "restart")
    second = dragon_nb.get_runtime(auto_start=False)
    assert second is not first and second.tcp_address.startswith("tcp://127.0.0.1:")
    dragon_nb.stop()
