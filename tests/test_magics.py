"""The ``%dragon`` actions as subcommands: each takes only its own options, has its
own help, and takes the runtime options of the ``dragon-nb`` command."""
import socket

import pytest

IPython = pytest.importorskip("IPython")
from IPython.core.error import UsageError  # noqa: E402
from IPython.testing import globalipapp  # noqa: E402

import dragon_nb  # noqa: E402
from dragon_nb import cli, options  # noqa: E402
from kernel_ext import magics  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ip():
    shell = globalipapp.start_ipython() or globalipapp.get_ipython()   # one per session
    shell.run_line_magic("load_ext", "dragon_nb")
    shell.run_cell("def sq(x):\n    return x * x")
    yield shell
    shell.run_line_magic("unload_ext", "dragon_nb")
    dragon_nb.stop()


@pytest.fixture
def running():
    """A runtime (the one left running by the test before, if any)."""
    return dragon_nb.get_runtime(auto_start=False) or dragon_nb.start(nodes=1)


@pytest.fixture
def no_runtime():
    dragon_nb.stop()
    yield
    assert dragon_nb.get_runtime(auto_start=False) is None, "the magic started a runtime"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- each action takes its own options only ----------------------------------------------
OTHER_ACTIONS_OPTIONS = {
    "stop --mem 1GiB": ("%dragon stop", "--mem", "%dragon ddict create"),
    "status --nodes 2": ("%dragon status", "--nodes", "%dragon start"),
    "nodes --chunksize 2": ("%dragon nodes", "--chunksize", "%dragon map"),
    "map sq range(3) --nodes 2": ("%dragon map", "--nodes", "%dragon start"),
    "ddict list --mem 1GiB": ("%dragon ddict list", "--mem", "%dragon ddict create"),
    "progress on --hosts a,b": ("%dragon progress", "--hosts", "%dragon start"),
    "restart --dry-run": ("%dragon restart", "--dry-run", "%dragon start"),
}


@pytest.mark.parametrize("line", OTHER_ACTIONS_OPTIONS)
def test_an_option_of_another_action_is_a_usage_error_naming_the_action_and_the_option(
        ip, running, line):
    action, option, owner = OTHER_ACTIONS_OPTIONS[line]
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("dragon", line)
    message = str(info.value)
    assert message.startswith(f"{action}: unrecognized arguments: {option}"), message
    assert f"{option} is an option of {owner}" in message, message
    assert f"usage: {action}" in message, message
    assert dragon_nb.get_runtime(auto_start=False) is running     # nothing was stopped


def test_an_unknown_option_is_a_usage_error_showing_the_actions_usage(ip, no_runtime):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("dragon", "start --nodez 2")
    message = str(info.value)
    assert "%dragon start: unrecognized arguments: --nodez 2" in message, message
    assert "usage: %dragon start [-h] [--nodes N]" in message, message


def test_restart_with_a_bad_option_keeps_the_running_runtime(ip, running):
    with pytest.raises(UsageError, match="--nodes must be at least 1, not 0"):
        ip.run_line_magic("dragon", "restart --nodes 0")
    assert dragon_nb.get_runtime(auto_start=False) is running


def test_pipeline_as_a_line_magic_points_to_the_cell_magic(ip, no_runtime):
    with pytest.raises(UsageError, match=r"pipeline is a cell magic: %%dragon pipeline"):
        ip.run_line_magic("dragon", "pipeline -o out")


# --- help ----------------------------------------------------------------------------------
HELP = {
    "start --help": ("usage: %dragon start [-h]", "--port P", "--listen ADDR", "--dry-run"),
    "start -h": ("usage: %dragon start [-h]", "--workers-per-node K"),
    "help start": ("usage: %dragon start [-h]", "--timeout S"),
    "restart --help": ("usage: %dragon restart [-h]", "--hosts H1,H2"),
    "map --help": ("usage: %dragon map FUNC ITERABLE [options]", "--chunksize N",
                   "--no-progress"),
    "ddict --help": ("usage: %dragon ddict create NAME [options] | list", "destroy"),
    "ddict create --help": ("usage: %dragon ddict create NAME [options]", "--mem SIZE"),
    "help ddict create": ("usage: %dragon ddict create NAME [options]", "--ddict-nodes N"),
    "progress --help": ("usage: %dragon progress on|off",),
    "help pipeline": ("usage: %%dragon pipeline [-h]", "--queue-depth N", "source: ITERABLE"),
    "help": ("usage: %dragon [-h]", "ddict", "%dragon ACTION --help"),
    "--help": ("usage: %dragon [-h]", "restart", "%%dragon pipeline"),
}


@pytest.mark.parametrize("line", HELP)
def test_an_actions_help_prints_its_usage_and_options_and_does_nothing_else(
        ip, no_runtime, capsys, line):
    ip.run_line_magic("dragon", line)
    out = capsys.readouterr().out
    for expected in HELP[line]:
        assert expected in out, out


def test_the_help_of_an_action_shows_only_its_own_options(ip, no_runtime, capsys):
    ip.run_line_magic("dragon", "stop --help")
    out = capsys.readouterr().out
    assert out.startswith("usage: %dragon stop [-h]\n"), out
    assert "--nodes" not in out and "--mem" not in out, out


def test_the_pipeline_cell_magics_help_shows_the_cell_format_and_runs_nothing(
        ip, no_runtime, capsys):
    ip.run_cell_magic("dragon", "pipeline --help", "source: range(3)\nstage: sq\n")
    out = capsys.readouterr().out
    assert "usage: %%dragon pipeline [-h] [-o NAME]" in out, out
    assert "stage: FUNC [workers=N] [nodes=0,1]" in out, out
    assert "_dragon_pipeline" not in ip.user_ns


def test_the_magics_docstring_lists_every_action_and_how_to_get_its_help(ip, capsys):
    ip.run_cell("%dragon?")                  # IPython's magic help shows the docstring
    out = capsys.readouterr().out
    top_level = [path[0] for path in magics.LINE_ACTIONS if len(path) == 1]
    assert set(top_level) >= {"start", "stop", "restart", "status", "nodes", "progress",
                              "map", "ddict", "help"}
    for action in top_level:
        assert f"    {action} " in out, (action, out)
    assert "%dragon ACTION --help" in out, out
    assert "%dragon start? does not" in out, out


def test_ipython_reads_a_question_mark_after_an_action_as_object_help_not_the_magics(ip):
    """Why the docs say ``%dragon start --help``: IPython turns ``%dragon start?``
    into a look-up of an object called ``start`` before the magic sees the line."""
    assert ip.transform_cell("%dragon start?").strip() == \
        "get_ipython().run_line_magic('pinfo', 'start')"


# --- the runtime options are the dragon-nb command's ----------------------------------------
def option_table(parser) -> dict:
    """{flag: (help, metavar, type)} of a parser's options, --help aside."""
    return {flag: (a.help, a.metavar, a.type) for a in parser._actions
            for flag in a.option_strings if flag not in ("-h", "--help")}


def cli_parser(command: str):
    return cli.build_parser()._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize("action", ["start", "restart"])
@pytest.mark.parametrize("command", ["run", "info"])
def test_start_and_restart_take_the_same_runtime_options_as_the_command_line(action, command):
    magic = option_table(magics.LINE_ACTIONS[(action,)])
    shell = option_table(cli_parser(command))
    runtime_flags = {opt.flag for opt in options.START_OPTIONS}
    assert runtime_flags <= set(magic) and runtime_flags <= set(shell)
    for flag in runtime_flags:
        assert magic[flag] == shell[flag], flag
    assert ("--dry-run" in magic) == (action == "start")


def test_every_start_keyword_has_an_option():
    """A new keyword of Runtime() is one more row in dragon_nb.options, or it is
    not reachable from the command line or the magics."""
    keywords = {opt.keyword for opt in options.START_OPTIONS}
    assert keywords == set(options.DEFAULTS)


def test_start_with_port_and_listen_binds_the_head_on_that_address(ip, no_runtime, capsys):
    port = free_port()
    ip.run_line_magic("dragon", f"start --nodes 1 --port {port} --listen 127.0.0.1")
    try:
        rt = dragon_nb.get_runtime(auto_start=False)
        assert rt.tcp_address == f"tcp://127.0.0.1:{port}"
        assert f"--connect tcp://127.0.0.1:{port}" in capsys.readouterr().out
    finally:
        ip.run_line_magic("dragon", "stop")


BAD_START = {
    "start --port 5555": "--port is the head's TCP port for other hosts: give --hosts or "
                         "--listen too",
    "start --launcher srun": "--launcher says how agents start on --hosts; no hosts given",
    "start --listen 127.0.0.1 --port 70000": "--port must be a TCP port (1-65535)",
    "start --timeout 0": "--timeout must be a positive number of seconds, not 0.0",
    "start --telemetry-interval -1": "--telemetry-interval must be a positive number",
    "start --workers-per-node 0": "--workers-per-node must be at least 1, not 0",
    "start --nodes -1 --listen 127.0.0.1": "--nodes must be at least 1, not -1",
    "start --nodes 0": "(0 only with --hosts or --listen",
    "start --dry-run": "--dry-run shows how agents start on --hosts; none given",
}


@pytest.mark.parametrize("line", BAD_START)
def test_runtime_options_that_cannot_start_a_runtime_are_usage_errors_naming_the_flag(
        ip, no_runtime, line):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("dragon", line)
    assert BAD_START[line] in str(info.value), info.value
