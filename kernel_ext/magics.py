"""``%dragon``: start, stop and inspect the runtime behind the kernel."""
from __future__ import annotations

import dragon_nb
from dragon_nb.machine import node_table
from dragon_nb.runtime import get_runtime

try:
    from IPython.core.magic import Magics, line_magic, magics_class
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
except ImportError as e:  # pragma: no cover - only without IPython
    raise ImportError("kernel_ext needs IPython: pip install ipython") from e


@magics_class
class DragonMagics(Magics):
    started_here = False

    @magic_arguments()
    @argument("action", choices=["start", "stop", "restart", "status", "nodes"],
              help="what to do with the runtime")
    @argument("--nodes", type=int, default=None, help="virtual nodes to start (default 1)")
    @argument("--workers-per-node", type=int, default=None,
              help="default Pool workers per node (default: the node's cores)")
    @line_magic
    def dragon(self, line):
        """Control the dragon-nb runtime behind this kernel.

        %dragon start [--nodes N] [--workers-per-node K]
        %dragon stop | restart | status | nodes
        """
        args = parse_argstring(self.dragon, line)
        if args.nodes is not None and args.nodes < 1:
            print(f"UsageError: --nodes must be at least 1, not {args.nodes}")
            return None
        if args.action == "start":
            rt = get_runtime(auto_start=False)
            if rt is not None:
                print(f"a runtime is already running: {rt!r}")
                print(node_table(rt))
                return rt
            rt = dragon_nb.start(nodes=args.nodes, workers_per_node=args.workers_per_node)
            DragonMagics.started_here = True
            print(f"dragon-nb runtime started: {len(rt.nodes())} node(s), "
                  f"{rt.cpu_count()} core(s)")
            return None
        if args.action == "stop":
            dragon_nb.stop()
            print("dragon-nb runtime stopped")
            return None
        if args.action == "restart":
            old = get_runtime(auto_start=False)
            nodes = args.nodes or (old.n_nodes if old else None)
            dragon_nb.stop()
            rt = dragon_nb.start(nodes=nodes, workers_per_node=args.workers_per_node)
            print(f"dragon-nb runtime restarted: {len(rt.nodes())} node(s)")
            return None
        rt = get_runtime(auto_start=False)
        if rt is None:
            print("no dragon-nb runtime is running (start one with %dragon start)")
            return None
        print(repr(rt) if args.action == "status" else "")
        print(node_table(rt))
        return None


def load_ipython_extension(ipython):
    ipython.register_magics(DragonMagics)


def unload_ipython_extension(ipython):
    if DragonMagics.started_here:
        dragon_nb.stop()
        DragonMagics.started_here = False
