"""``%dragon``: the runtime behind the kernel, Pool maps, live views.

    %dragon start [--nodes N] [--workers-per-node K] [--cpus-per-node C]
                  [--hosts h1,h2 [--launcher ssh|srun|TEMPLATE] [--listen ADDR] [--dry-run]]
    %dragon stop | restart | status | nodes
    %dragon progress on|off
    %dragon map FUNC ITERABLE [--chunksize N] [--processes P] [-o NAME] [--no-progress]
    %%dragon pipeline [-o NAME] [--unordered]     (stages in the cell body)
    %dragon ddict create NAME [--managers-per-node M] [--ddict-nodes N] [--mem SIZE]
    %dragon ddict list | show NAME | destroy NAME
"""
from __future__ import annotations

import re


import dragon_nb
from dragon_nb.machine import node_table
from dragon_nb.pool import progress as PG
from dragon_nb.runtime import get_runtime

try:
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
except ImportError as e:  # pragma: no cover - only without IPython
    raise ImportError("kernel_ext needs IPython: pip install ipython") from e


def in_kernel(shell) -> bool:
    """True under a Jupyter kernel, where widgets can be shown."""
    return getattr(shell, "kernel", None) is not None


@magics_class
class DragonMagics(Magics):
    started_here = False

    @magic_arguments()
    @argument("action", choices=["start", "stop", "restart", "status", "nodes", "progress", "map",
                                 "ddict"],
              help="what to do")
    @argument("rest", nargs="*",
              help="for progress: on|off; for map: FUNC ITERABLE; for ddict: create|list|show|"
                   "destroy NAME")
    @argument("--nodes", type=int, default=None, help="virtual nodes to start (default 1)")
    @argument("--workers-per-node", type=int, default=None,
              help="default Pool workers per node (default: the node's cores)")
    @argument("--cpus-per-node", type=int, default=None,
              help="cores each virtual node claims (default: its share of the host's)")
    @argument("--hosts", default=None,
              help="start: also one node on each of these hosts (comma-separated)")
    @argument("--launcher", default="ssh",
              help="start: how agents start on --hosts: ssh, srun, or a template with "
                   "{host} and {command}")
    @argument("--listen", default=None,
              help="start: address or interface other hosts reach this one on")
    @argument("--dry-run", action="store_true",
              help="start: show the commands that would start agents on --hosts")
    @argument("--chunksize", type=int, default=None, help="map: items per task")
    @argument("--processes", type=int, default=None, help="map: pool size (default: all cores)")
    @argument("-o", "--output", default=None, help="map: name to bind the result list to")
    @argument("--no-progress", action="store_true", help="map: no progress widget")
    @argument("--managers-per-node", type=int, default=None, help="ddict create: (default 1)")
    @argument("--ddict-nodes", type=int, default=None,
              help="ddict create: nodes to spread it over (default: all)")
    @argument("--mem", default="256MiB", help="ddict create: total budget, e.g. 512MiB, 2GiB")
    @line_magic
    def dragon(self, line):
        """Control the dragon-nb runtime behind this kernel.

        %dragon start [--nodes N] [--workers-per-node K] [--cpus-per-node C]
            start a runtime of N virtual nodes (says so if one is running)
        %dragon start --hosts h1,h2 [--launcher ssh|srun|TEMPLATE] [--listen ADDR] [--dry-run]
            and one node on each host, its agent started by the launcher over signed TCP
        %dragon stop | restart
        %dragon status      the live per-node dashboard
        %dragon nodes       the System/Node table
        %dragon progress on|off
            show (or not) a live progress widget for every Pool map
        %dragon map FUNC ITERABLE [--chunksize N] [--processes P] [-o NAME] [--no-progress]
            map FUNC (a name in the notebook) over ITERABLE (a name or an expression)
            on a pool, with live progress; the list is bound to NAME (default: _dragon_map)
        """
        # a "# comment" after the magic is the user's, not an argument
        args = parse_argstring(self.dragon, re.sub(r"\s+#[^'\"]*$", "", line))
        for opt in ("nodes", "workers_per_node", "cpus_per_node", "processes", "chunksize",
                    "managers_per_node", "ddict_nodes"):
            value = getattr(args, opt)
            if value is not None and value < 1:
                raise UsageError(f"--{opt.replace('_', '-')} must be at least 1, not {value}")
        if args.action in ("start", "stop", "restart", "status", "nodes") and args.rest:
            raise UsageError(f"%dragon {args.action} takes no arguments, "
                             f"not {' '.join(args.rest)!r}")
        return getattr(self, f"_{args.action}")(args)

    # -- runtime -----------------------------------------------------------------
    def _start(self, args):
        if args.dry_run:
            if not args.hosts:
                raise UsageError("--dry-run shows how agents start on --hosts; none given")
            from dragon_nb.runtime import hosts
            try:
                print(hosts.dry_run(args.hosts.split(","), args.launcher, args.listen))
            except ValueError as e:
                raise UsageError(str(e)) from None
            return None
        rt = get_runtime(auto_start=False)
        if rt is not None:
            print(f"a runtime is already running: {rt!r}")
            print(node_table(rt))
            return None
        network = {}
        if args.hosts or args.listen:
            network = {"hosts": args.hosts, "listen": args.listen, "launcher": args.launcher}
        try:
            rt = dragon_nb.start(nodes=args.nodes, workers_per_node=args.workers_per_node,
                                 cpus_per_node=args.cpus_per_node, **network)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
        DragonMagics.started_here = True
        print(f"dragon-nb runtime started: {len(rt.nodes())} node(s), {rt.cpu_count()} core(s)")
        if rt.join_command():
            print(f"other hosts join with: {rt.join_command()}")
        return None

    views: dict = {}           # kind -> the live view shown last (one of each at a time)

    def _replace_view(self, kind, view):
        """A new live view stops the previous one of its kind (each has a thread)."""
        old = self.views.pop(kind, None)
        if old is not None:
            old.stop()
        self.views[kind] = view

    def _stop(self, args):
        for view in self.views.values():
            view.stop()
        self.views.clear()
        dragon_nb.stop()
        print("dragon-nb runtime stopped")

    def _restart(self, args):
        old = get_runtime(auto_start=False)
        nodes = args.nodes or (old.n_nodes if old else None)
        network = {}                       # the same hosts as before, unless told otherwise
        hosts = args.hosts or (",".join(old.hosts) if old is not None and old.hosts else None)
        listen = args.listen or (old.listen if old is not None else None)
        if hosts or listen:
            launcher = args.launcher if args.hosts or old is None else old.launcher
            network = {"hosts": hosts, "listen": listen, "launcher": launcher}
        dragon_nb.stop()
        rt = dragon_nb.start(nodes=nodes, workers_per_node=args.workers_per_node,
                             cpus_per_node=args.cpus_per_node, **network)
        DragonMagics.started_here = True
        print(f"dragon-nb runtime restarted: {len(rt.nodes())} node(s)")

    def _running(self):
        rt = get_runtime(auto_start=False)
        if rt is None:
            print("no dragon-nb runtime is running (start one with %dragon start)")
        return rt

    def _status(self, args):
        rt = self._running()
        if rt is None:
            return None
        if in_kernel(self.shell):
            from dragon_nb.widgets.live import Dashboard
            self._replace_view("status", Dashboard(rt).start())
        else:
            print(repr(rt))
            print(node_table(rt))
        return None

    def _nodes(self, args):
        rt = self._running()
        if rt is not None:
            print(node_table(rt))

    def _progress(self, args):
        if args.rest not in (["on"], ["off"]):
            raise UsageError("%dragon progress on|off")
        PG.enabled = args.rest == ["on"]
        print(f"progress widgets {'on' if PG.enabled else 'off'}")

    # -- pool ----------------------------------------------------------------------
    def _map(self, args):
        if len(args.rest) < 2:
            raise UsageError("%dragon map FUNC ITERABLE [--chunksize N] [-o NAME]")
        fname, expr = args.rest[0], " ".join(args.rest[1:])
        ns = self.shell.user_ns
        if fname not in ns:
            raise UsageError(f"name {fname!r} is not defined in the notebook")
        if not callable(ns[fname]):
            raise UsageError(f"{fname!r} is a {type(ns[fname]).__name__}, not a function")
        try:
            iterable = eval(expr, ns)
        except Exception as e:             # NameError, SyntaxError, whatever it raised
            raise UsageError(f"ITERABLE {expr!r}: {type(e).__name__}: {e}") from None
        if not (hasattr(iterable, "__iter__") or hasattr(iterable, "__getitem__")):
            raise UsageError(f"ITERABLE {expr!r} is a {type(iterable).__name__}, "
                             f"which cannot be iterated over")
        with dragon_nb.Pool(args.processes) as pool:
            result = pool.map(ns[fname], iterable, args.chunksize,
                              progress=False if args.no_progress else None)
        ns[args.output or "_dragon_map"] = result
        print(f"{len(result)} results in {args.output or '_dragon_map'}")
        return None

    # -- ddict ---------------------------------------------------------------------
    ddicts: dict = {}          # name -> DDict made by %dragon ddict create

    def _ddict(self, args):
        usage = ("%dragon ddict create NAME [--managers-per-node M] "
                 "[--ddict-nodes N] [--mem SIZE] | list | show NAME | destroy NAME")
        if not args.rest:
            raise UsageError(usage)
        sub, names = args.rest[0], args.rest[1:]
        from dragon_nb.ddict import DDict
        if sub == "list":
            found = dict(self.ddicts)           # made here, and any in the namespace
            found.update((k, v) for k, v in self.shell.user_ns.items()
                         if isinstance(v, DDict) and not k.startswith("_"))
            if not found:
                print("no DDict in this notebook (make one with %dragon ddict create NAME)")
            for name, d in sorted(found.items()):
                try:
                    stats = d.stats
                    print(f"{name}: {sum(s.num_keys for s in stats)} keys, "
                          f"{sum(s.total_used_bytes for s in stats)} bytes used of "
                          f"{sum(s.total_bytes for s in stats)}, {len(stats)} manager(s)")
                except Exception as e:          # destroyed, or its runtime stopped
                    print(f"{name}: unavailable ({e})")
            return None
        if sub not in ("create", "show", "destroy") or len(names) != 1:
            raise UsageError(usage)
        name = names[0]
        if sub == "create":
            try:
                size = parse_size(args.mem)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if not name.isidentifier():
                raise UsageError(f"{name!r} is not a valid Python name")
            rt = get_runtime()
            nodes = args.ddict_nodes or len(rt.nodes())
            try:
                d = DDict(args.managers_per_node or 1, nodes, size, name=name)
            except ValueError as e:
                raise UsageError(str(e)) from None
            old = self.ddicts.pop(name, None)
            if old is not None:                  # the name is taken: the old one goes
                old.destroy()
                print(f"the previous DDict {name!r} was destroyed")
            self.ddicts[name] = d
            self.shell.user_ns[name] = d
            print(f"DDict {name!r}: {(args.managers_per_node or 1) * nodes} manager(s) on "
                  f"{nodes} node(s), {size} bytes in all; bound to {name}")
            return None
        d = self.ddicts.get(name) or self.shell.user_ns.get(name)
        if d is None:
            raise UsageError(f"no DDict named {name!r}")
        if not isinstance(d, DDict):
            raise UsageError(f"{name!r} is a {type(d).__name__}, not a DDict")
        if sub == "destroy":
            d.destroy()
            self.ddicts.pop(name, None)
            print(f"DDict {name!r} destroyed")
            return None
        if in_kernel(self.shell):
            from dragon_nb.widgets.live import DDictWidget
            self._replace_view(f"ddict:{name}", DDictWidget(d, name).start())
        else:
            for st in d.stats:
                print(f"manager {st.manager_id} on node {st.node}: {st.num_keys} keys, "
                      f"{st.total_used_bytes} of {st.total_bytes} bytes")
        return None

    @magic_arguments()
    @argument("what", choices=["pipeline"], help="what the cell defines")
    @argument("-o", "--output", default="_dragon_pipeline", help="name for the result list")
    @argument("--unordered", action="store_true", help="results as they come")
    @argument("--queue-depth", type=int, default=4, help="batches each link may hold")
    @cell_magic("dragon")
    def dragon_cell(self, line, cell):
        """Run a pipeline defined in the cell, with live per-stage figures.

        %%dragon pipeline [-o NAME] [--unordered] [--queue-depth N]
        source: ITERABLE
        stage: FUNC [workers=N] [nodes=0,1]
        ...
        """
        from dragon_nb.pipeline import Pipeline, stage
        try:
            args = parse_argstring(self.dragon_cell, line)
            if args.queue_depth < 1:
                raise UsageError(f"--queue-depth must be at least 1, not {args.queue_depth}")
            source, stages = parse_pipeline_cell(cell, self.shell.user_ns)
            stages = [stage(f, workers=w, nodes=n) for f, w, n in stages]
        except (UsageError, ValueError, NameError, TypeError) as e:
            raise UsageError(f"{e}\n\n{PIPELINE_HELP}") from None
        try:
            pipe = Pipeline(source, *stages, ordered=not args.unordered,
                            queue_depth=args.queue_depth)
        except (RuntimeError, ValueError, TypeError) as e:   # a node that is not there, say
            raise UsageError(str(e)) from None
        view = None
        if in_kernel(self.shell):
            from dragon_nb.widgets.live import PipelineWidget
            view = PipelineWidget(pipe).start()
        try:
            with pipe:
                result = list(pipe)
        finally:
            if view is not None:
                view.close()
        self.shell.user_ns[args.output] = result
        print(f"{len(result)} results in {args.output}")
        return None


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1000000' -> bytes."""
    units = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
             "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(num) * units[t[len(num):]]
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (say 512MiB or 2GiB)") from None
    if value <= 0:
        raise ValueError(f"a size must be positive, not {text!r}")
    return int(value)


PIPELINE_HELP = """%%dragon pipeline [-o NAME] [--unordered] [--queue-depth N]
source: ITERABLE                     a name or expression in the notebook
stage: FUNC [workers=N] [nodes=0,1]  one line per stage, in order
"""


def parse_pipeline_cell(cell: str, ns: dict):
    """The cell body -> (source, [(func, workers, nodes)]); errors name the line."""
    source, stages = None, []
    for lineno, raw in enumerate(cell.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        what, _, rest = line.partition(":")
        what, rest = what.strip(), rest.strip()
        if what == "source":
            try:
                source = eval(rest, ns)
            except NameError as e:
                raise NameError(f"line {lineno}: {e}") from None
            except Exception as e:             # SyntaxError, or whatever it raised
                raise ValueError(f"line {lineno}: the source {rest!r} failed: "
                                 f"{type(e).__name__}: {e}") from None
            if not (hasattr(source, "__iter__") or hasattr(source, "__getitem__")):
                raise TypeError(f"line {lineno}: the source {rest!r} is a "
                                f"{type(source).__name__}, which cannot be iterated over")
        elif what == "stage":
            words = rest.split()
            if not words:
                raise ValueError(f"line {lineno}: a stage needs a function name")
            if words[0] not in ns:
                raise NameError(f"line {lineno}: name {words[0]!r} is not defined in the notebook")
            opts = {}
            for w in words[1:]:
                key, eq, value = w.partition("=")
                if not eq or key not in ("workers", "nodes"):
                    raise ValueError(f"line {lineno}: expected workers=N or nodes=A,B, not {w!r}")
                opts[key] = value
            try:
                workers = int(opts.get("workers", 1))
                nodes = [int(n) for n in opts["nodes"].split(",")] if "nodes" in opts else None
            except ValueError:
                raise ValueError(f"line {lineno}: workers=N takes a positive integer and "
                                 f"nodes=A,B node ids, not {' '.join(words[1:])!r}") from None
            if workers < 1:
                raise ValueError(f"line {lineno}: workers must be at least 1, not {workers}")
            if not callable(ns[words[0]]):
                raise TypeError(f"line {lineno}: {words[0]!r} is a "
                                f"{type(ns[words[0]]).__name__}, not a function")
            stages.append((ns[words[0]], workers, nodes))
        else:
            raise ValueError(f"line {lineno}: expected 'source:' or 'stage:', not {line!r}")
    if source is None or not stages:
        raise ValueError("a pipeline needs a 'source:' line and at least one 'stage:' line")
    return source, stages


def _widget_observer(pool, progress):
    from dragon_nb.widgets.live import show_call
    show_call(pool, progress)


def load_ipython_extension(ipython):
    ipython.register_magics(DragonMagics)
    if in_kernel(ipython):
        from dragon_nb.widgets import text
        PG.remove_observer(text.show_call)      # widgets replace the terminal bars
        PG.add_observer(_widget_observer)


def unload_ipython_extension(ipython):
    PG.remove_observer(_widget_observer)
    for view in DragonMagics.views.values():
        view.stop()
    DragonMagics.views.clear()
    if DragonMagics.started_here:
        dragon_nb.stop()
        DragonMagics.started_here = False


