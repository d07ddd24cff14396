"""The ``dragon-nb`` command: run a script on a fresh runtime, show the nodes, demo.

    dragon-nb run script.py [runtime options] [-- script args]
    dragon-nb info [runtime options]
    dragon-nb demo [--nodes N] [--files F]
    dragon-nb agent --connect tcp://HEAD:PORT --key-file FILE [--name NAME]

The runtime options (``--nodes``, ``--workers-per-node``, ``--hosts``,
``--listen``, ``--port``, ...) come from ``dragon_nb.options``, which the
``%dragon start`` magic reads too, so a script and a notebook start the same
runtime from the same words. ``run`` options may come before or after the
script; the script's own arguments follow ``--`` (without ``--``, arguments
dragon-nb does not know go to the script). ``--dry-run`` prints the commands
that would start agents on ``--hosts`` and starts nothing.

The help texts are plain (argparse prints them as they are written).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys

from dragon_nb import options


class DragonAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import dragon`` / ``dragon.x.y`` load ``dragon_nb`` / ``dragon_nb.x.y``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "dragon" or fullname.startswith("dragon."):
            target_name = "dragon_nb" + fullname[len("dragon"):]
            if importlib.util.find_spec(target_name) is None:
                return None
            return importlib.machinery.ModuleSpec(fullname, self, origin=target_name)
        return None

    def create_module(self, spec):
        return importlib.import_module(spec.origin)

    def exec_module(self, module):
        pass


def install_dragon_alias(force: bool = False) -> bool:
    """Alias ``dragon`` to dragon-nb unless the real Dragon is installed."""
    if not force and importlib.util.find_spec("dragon") is not None:
        return False
    if not any(isinstance(f, DragonAlias) for f in sys.meta_path):
        sys.meta_path.insert(0, DragonAlias())
    return True


def cmd_dry_run(args) -> int:
    try:
        print(options.dry_run_text(args.start))
    except ValueError as e:
        print(f"dragon-nb {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args) -> int:
    import dragon_nb
    script = args.script
    if not os.path.exists(script):
        print(f"dragon-nb run: no such script: {script}", file=sys.stderr)
        return 2
    if args.nodes is not None:
        os.environ["DRAGON_NB_NODES"] = str(args.nodes)
    if args.workers_per_node is not None:
        os.environ["DRAGON_NB_WORKERS_PER_NODE"] = str(args.workers_per_node)
    if args.cpus_per_node is not None:
        os.environ["DRAGON_NB_CPUS_PER_NODE"] = str(args.cpus_per_node)
    install_dragon_alias()
    dragon_nb.start(**args.start)
    sys.argv = [script, *args.script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)       # as the interpreter does for sys.exit("msg")
        return 1
    finally:
        dragon_nb.stop()
    return 0


def cmd_info(args) -> int:
    import dragon_nb
    from dragon_nb.machine import node_table
    with dragon_nb.start(**{"nodes": 1, **args.start}) as rt:
        print(node_table(rt))
        print(f"\n{len(rt.nodes())} node(s), {rt.cpu_count()} core(s) in all")
        if rt.join_command():
            print(f"other hosts join with: {rt.join_command()}")
    dragon_nb.stop()
    return 0


def cmd_agent(argv) -> int:
    from dragon_nb.runtime import agent
    return agent.main(argv, prog="dragon-nb agent")


def cmd_demo(args) -> int:
    from dragon_nb import demo
    return demo.main(nodes=args.start.get("nodes", 4), files=args.files)


DESCRIPTION = ("Dragon-style parallel Python on a node runtime: run a script on a fresh "
               "runtime, show the nodes, join a runtime from another host, or see the demo.")
DEMO_NODES = dataclasses.replace(options.NODES, help="virtual nodes to start (default 4)")
DEMO_FILES = options.Option(("--files",), "how many files to generate (default 400)",
                            type=int, default=400, metavar="F", check=options.at_least(1))
RUN_HELP = """Run a Python (or Dragon) script on a fresh runtime, stopped when the script ends.

Options may come before or after the script. The script's own arguments follow
--; without --, the arguments dragon-nb does not know go to the script too.
"""


def build_parser() -> argparse.ArgumentParser:
    """The dragon-nb parser; the runtime options come from dragon_nb.options,
    as those of the %dragon magics do."""
    ap = argparse.ArgumentParser(prog="dragon-nb", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a Python (or Dragon) script on a fresh runtime",
                         description=RUN_HELP, usage="%(prog)s script.py [options] [-- args]",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("script", help="the script to run (as python runs it, __main__)")
    options.add_start_options(run)
    run.set_defaults(func=cmd_run, parser=run)
    info = sub.add_parser("info", help="start a runtime, print its nodes, stop it",
                          description="Start a runtime, print a table of its nodes, stop it.")
    options.add_start_options(info)
    info.set_defaults(func=cmd_info, parser=info)
    demo = sub.add_parser("demo", help="count words in generated files across virtual nodes",
                          description="Count words in generated files across virtual nodes, "
                                      "with a progress bar per node (default 4 nodes).")
    options.add_options(demo, [DEMO_NODES, DEMO_FILES])
    demo.set_defaults(func=cmd_demo, parser=demo)
    sub.add_parser("agent", help="join a running runtime from this host as a node "
                                 "(dragon-nb agent --help)", add_help=False)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:
        return cmd_agent(argv[1:])
    if argv[:1] == ["run"]:
        ours, theirs = argv, []
        if "--" in argv:
            cut = argv.index("--")
            ours, theirs = argv[:cut], argv[cut + 1:]
        args, unknown = ap.parse_known_args(ours)
        args.script_args = unknown + theirs
    else:
        args = ap.parse_args(argv)
    try:
        options.check(args, [DEMO_FILES])
        args.start = options.start_kwargs(args)
    except ValueError as e:
        args.parser.error(str(e))           # its usage, the message, exit code 2
    if getattr(args, "dry_run", False):
        return cmd_dry_run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
