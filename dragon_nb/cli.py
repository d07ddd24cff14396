"""The ``dragon-nb`` command: run a script on a fresh runtime, show the nodes, demo.

    dragon-nb run script.py [--nodes N] [--workers-per-node K] [-- script args]

``run`` options may come before or after the script; the script's own
arguments follow ``--`` (without ``--``, arguments dragon-nb does not know
go to the script).
    dragon-nb info [--nodes N]
    dragon-nb demo [--nodes N] [--files F]
    dragon-nb agent --connect tcp://HEAD:PORT --key-file FILE [--name NAME]

``run`` and ``info`` also take ``--hosts h1,h2 [--launcher ssh|srun|TEMPLATE]
[--listen ADDR] [--port P] [--dry-run]``: one more node on each host, its
agent started by the launcher; ``--dry-run`` prints the launch commands and
starts nothing.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys


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


def _add_runtime_args(ap):
    ap.add_argument("--nodes", type=int, default=None,
                    help="virtual nodes to start on this host (default 1)")
    ap.add_argument("--workers-per-node", type=int, default=None,
                    help="default pool workers per node (default: the node's cores)")
    ap.add_argument("--cpus-per-node", type=int, default=None,
                    help="cores each virtual node claims (default: its share of the host's)")
    ap.add_argument("--hosts", default=None,
                    help="comma-separated hosts to start one more node on each")
    ap.add_argument("--launcher", default="ssh",
                    help="how agents start on --hosts: ssh, srun, or a template with "
                         "{host} and {command}")
    ap.add_argument("--listen", default=None,
                    help="address or interface other hosts reach this one on (default: "
                         "the interface that routes to the first host)")
    ap.add_argument("--port", type=int, default=0, help="the head's TCP port (default: any)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the commands that would start agents on --hosts, and stop")


def _network_kwargs(args) -> dict:
    if not args.hosts and not args.listen:
        return {}
    return {"hosts": args.hosts, "listen": args.listen, "launcher": args.launcher,
            "port": args.port}


def cmd_dry_run(args) -> int:
    from dragon_nb.runtime import hosts
    if not args.hosts:
        print("dragon-nb: --dry-run shows how agents start on --hosts; none given",
              file=sys.stderr)
        return 2
    try:
        print(hosts.dry_run(args.hosts.split(","), args.launcher, args.listen, args.port))
    except ValueError as e:
        print(f"dragon-nb: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args) -> int:
    import dragon_nb
    if args.dry_run:
        return cmd_dry_run(args)
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
    dragon_nb.start(nodes=args.nodes, workers_per_node=args.workers_per_node,
                    cpus_per_node=args.cpus_per_node, **_network_kwargs(args))
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
    if args.dry_run:
        return cmd_dry_run(args)
    nodes = args.nodes if args.nodes is not None else 1
    with dragon_nb.start(nodes=nodes, workers_per_node=args.workers_per_node,
                         cpus_per_node=args.cpus_per_node, **_network_kwargs(args)) as rt:
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
    return demo.main(nodes=args.nodes or 4, files=args.files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dragon-nb", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a Python (or Dragon) script on a fresh runtime")
    _add_runtime_args(run)
    run.add_argument("script")
    run.set_defaults(func=cmd_run)
    info = sub.add_parser("info", help="start a runtime and print its nodes")
    _add_runtime_args(info)
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="process generated files across virtual nodes")
    _add_runtime_args(demo)
    demo.add_argument("--files", type=int, default=400)
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("agent", help="join a running runtime from this host as a node "
                                 "(dragon-nb agent --help)", add_help=False)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
