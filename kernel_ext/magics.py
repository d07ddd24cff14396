"""``%dragon``: the runtime behind the kernel, Pool maps, DDicts, live views.

Each action of ``%dragon`` is an argparse subcommand with only its own options,
so ``%dragon stop --mem 1GiB`` is an error that names the action and the option,
and ``%dragon ACTION --help`` (or ``%dragon help ACTION``) shows that action's
usage. The options that start a runtime (``start``, ``restart``) are those of
the ``dragon-nb`` command, from ``dragon_nb.options``, so the two cannot drift.

    %dragon start [--nodes N] [--workers-per-node K] [--cpus-per-node C] [--hosts H1,H2]
                  [--launcher HOW] [--listen ADDR] [--port P] [--timeout S] [--dry-run] ...
    %dragon stop | restart [runtime options] | status | nodes
    %dragon progress on|off
    %dragon map FUNC ITERABLE [--chunksize N] [--processes P] [-o NAME] [--no-progress]
    %dragon ddict create NAME [--managers-per-node M] [--ddict-nodes N] [--mem SIZE]
    %dragon ddict list | show NAME | destroy NAME
    %dragon help [ACTION]
    %%dragon pipeline [-o NAME] [--unordered] [--queue-depth N]     (stages in the cell body)

IPython reads ``%dragon start?`` as a question about an object called
``start``, before the magic sees it; so an action's help is ``--help``.
"""
from __future__ import annotations

import argparse
import re
import textwrap

import dragon_nb
from dragon_nb import options
from dragon_nb.machine import node_table
from dragon_nb.options import Option, at_least
from dragon_nb.pool import progress as PG
from dragon_nb.runtime import get_runtime

try:
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
    from IPython.utils.process import arg_split
except ImportError as e:  # pragma: no cover - only without IPython
    raise ImportError("kernel_ext needs IPython: pip install ipython") from e


def in_kernel(shell) -> bool:
    """True under a Jupyter kernel, where widgets can be shown."""
    return getattr(shell, "kernel", None) is not None


# --- parsing ------------------------------------------------------------------------------
class HelpShown(Exception):
    """``--help`` printed an action's help: there is nothing more to do."""


class MagicParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are IPython UsageErrors (one line under the
    cell, no traceback, "Run all" stops there), naming the action and showing its
    usage, and whose ``--help`` returns to the magic instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}\n"
                         f"({self.prog} --help shows its options)")

    def exit(self, status=0, message=None):
        if status == 0:
            raise HelpShown()
        raise UsageError(message or f"{self.prog} failed")

    @property
    def takes_nothing(self) -> bool:
        """No argument or option but --help."""
        return all(a.option_strings == ["-h", "--help"] for a in self._actions)


MAP_OPTIONS = (
    Option(("--chunksize",), "items per task (default: sized from the input)", type=int,
           metavar="N", check=at_least(1)),
    Option(("--processes",), "pool size (default: all cores)", type=int, metavar="P",
           check=at_least(1)),
    Option(("-o", "--output"), "name to bind the result list to (default _dragon_map)",
           metavar="NAME"),
    Option(("--no-progress",), "no live progress view for this map", flag_only=True),
)
DDICT_OPTIONS = (
    Option(("--managers-per-node",), "DDict managers on each node (default 1)", type=int,
           metavar="M", check=at_least(1)),
    Option(("--ddict-nodes",), "nodes to spread it over (default: all)", type=int,
           metavar="N", check=at_least(1)),
    Option(("--mem",), "total memory budget, e.g. 512MiB, 2GiB (default 256MiB)",
           default="256MiB", metavar="SIZE"),
)
PIPELINE_OPTIONS = (
    Option(("-o", "--output"), "name for the result list (default _dragon_pipeline)",
           default="_dragon_pipeline", metavar="NAME"),
    Option(("--unordered",), "results as they come, not in input order", flag_only=True),
    Option(("--queue-depth",), "batches each link between stages may hold (default 4)",
           type=int, default=4, metavar="N", check=at_least(1)),
)
PIPELINE_CELL = """The cell body, one line each:
  source: ITERABLE                     a name or expression in the notebook
  stage: FUNC [workers=N] [nodes=0,1]  one line per stage, in order
"""


LINE_EPILOG = """%dragon ACTION --help (or %dragon help ACTION) shows an action's usage and
options; %dragon start? does not: IPython reads it as a question about an object
called start. The cell magic %%dragon pipeline runs the pipeline its cell
describes (%dragon help pipeline).
"""


def _action(actions, name: str, help: str, **kw) -> MagicParser:
    """A subcommand whose one-line help (in the list of actions) is also its description."""
    description = textwrap.fill(help[:1].upper() + help[1:] + ".", 79)   # wrapped if raw
    return actions.add_parser(name, help=help, description=description, **kw)


def build_line_parser() -> MagicParser:
    """The parser of ``%dragon``: one subcommand per action."""
    top = MagicParser(prog="%dragon", epilog=LINE_EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = top.add_subparsers(dest="action", required=True, parser_class=MagicParser)
    start = _action(actions, "start", "start a runtime of N virtual nodes (and one on each "
                    "of --hosts); says so if one is running")
    options.add_start_options(start)
    restart = _action(actions, "restart", "stop the runtime and start a fresh one, with the "
                      "same nodes and hosts unless told otherwise")
    options.add_start_options(restart, dry_run=False)
    _action(actions, "stop", "stop the runtime: every process and file it made goes")
    _action(actions, "status", "the live per-node dashboard (a table outside a notebook)")
    _action(actions, "nodes", "the System/Node table")
    progress = _action(actions, "progress", "show (or not) a live progress view for every "
                       "Pool map", usage="%(prog)s on|off")
    progress.add_argument("state", choices=["on", "off"], metavar="on|off")
    mapper = _action(actions, "map", "map FUNC over ITERABLE on a pool, with live progress; "
                     "the list is bound to NAME", usage="%(prog)s FUNC ITERABLE [options]")
    mapper.add_argument("func", metavar="FUNC", help="a function's name in the notebook")
    mapper.add_argument("iterable", metavar="ITERABLE", nargs="+",
                        help="a name or an expression in the notebook")
    options.add_options(mapper, MAP_OPTIONS)
    ddict = _action(actions, "ddict", "make, list, show and destroy DDicts", usage="%(prog)s "
                    "create NAME [options] | list | show NAME | destroy NAME")
    subs = ddict.add_subparsers(dest="ddict_action", metavar="ACTION", required=True,
                                parser_class=MagicParser, prog=ddict.prog)
    create = _action(subs, "create", "a DDict bound to NAME in the notebook (one made "
                     "before under that name is destroyed)", usage="%(prog)s NAME [options]")
    create.add_argument("name", metavar="NAME", help="a Python name")
    options.add_options(create, DDICT_OPTIONS)
    _action(subs, "list", "the DDicts of this notebook, with their keys and bytes")
    for name, help in (("show", "the live figures of each of its managers"),
                       ("destroy", "destroy it: its managers exit, its memory is freed")):
        _action(subs, name, help).add_argument("name", metavar="NAME", help="its name")
    helper = _action(actions, "help", "this overview, or an action's usage and options",
                     usage="%(prog)s [ACTION [ACTION]]")
    helper.add_argument("topic", nargs="*", metavar="ACTION",
                        help="e.g. start, ddict create, or pipeline (the cell magic)")
    return top


def build_cell_parser() -> MagicParser:
    """The parser of ``%%dragon``'s first line (the cell body is read apart)."""
    top = MagicParser(prog="%%dragon", epilog=PIPELINE_CELL,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    whats = top.add_subparsers(dest="what", required=True, parser_class=MagicParser)
    pipeline = _action(whats, "pipeline", "run the pipeline the cell describes, with live "
                       "per-stage figures; the list is bound to NAME", epilog=PIPELINE_CELL,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_options(pipeline, PIPELINE_OPTIONS)
    return top


def action_parsers(parser: MagicParser, path: tuple = ()) -> dict:
    """{("ddict", "create"): its parser, ...}: every action of ``parser``, nested ones too."""
    found = {}
    for act in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in act.choices.items():
            found[(*path, name)] = sub
            found.update(action_parsers(sub, (*path, name)))
    return found


LINE_PARSER, CELL_PARSER = build_line_parser(), build_cell_parser()
LINE_ACTIONS, CELL_ACTIONS = action_parsers(LINE_PARSER), action_parsers(CELL_PARSER)
PIPELINE_HELP = CELL_ACTIONS[("pipeline",)].format_usage() + PIPELINE_CELL   # under errors


def parse(parser: MagicParser, actions: dict, line: str):
    """``line`` -> its Namespace (None when it asked for help); a UsageError that
    names the action and what it does not take, for anything else."""
    line = re.sub(r"\s+#[^'\"]*$", "", line)    # a "# comment" is the user's, not an argument
    try:
        words = arg_split(line)
    except ValueError as e:                          # an unclosed quote
        raise UsageError(f"{parser.prog}: {e}") from None
    try:
        args, extras = parser.parse_known_args(words)
    except HelpShown:
        return None
    if extras:
        path = tuple(getattr(args, dest) for dest in ("action", "ddict_action", "what")
                     if getattr(args, dest, None))
        raise UsageError(_unrecognized(actions[path], extras, actions))
    return args


def _unrecognized(action: MagicParser, extras: list, actions: dict) -> str:
    if action.takes_nothing and not any(w.startswith("-") for w in extras):
        return f"{action.prog} takes no arguments, not {' '.join(extras)!r}"
    lines = [f"{action.prog}: unrecognized arguments: {' '.join(extras)}"]
    for flag in (w.split("=", 1)[0] for w in extras if w.startswith("--")):
        owners = [p.prog for p in actions.values() if flag in p._option_string_actions]
        if owners:
            lines.append(f"{flag} is an option of {', '.join(owners)}, not of {action.prog}")
    lines.append(f"{action.format_usage().rstrip()}\n({action.prog} --help shows its options)")
    return "\n".join(lines)


def _checked(args, opts) -> None:
    """The options' own checks (``--chunksize must be at least 1``) as UsageErrors."""
    try:
        options.check(args, opts)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _magic_doc(parser: MagicParser, first_line: str) -> str:
    """A magic's docstring (what ``%dragon?`` shows): the overview of its actions."""
    return f"{first_line}\n\n{parser.format_help()}"


@magics_class
class DragonMagics(Magics):
    started_here = False

    @line_magic
    def dragon(self, line):
        if line.split()[:1] == ["pipeline"]:
            raise UsageError("pipeline is a cell magic: %%dragon pipeline [options] on the "
                             "first line of a cell, the stages below it (%dragon help "
                             "pipeline shows its options)")
        args = parse(LINE_PARSER, LINE_ACTIONS, line)
        if args is None:
            return None
        return getattr(self, f"_{args.action}")(args)

    def _help(self, args):
        if args.topic[:1] == ["pipeline"]:             # the cell magic's
            parse(CELL_PARSER, CELL_ACTIONS, " ".join([*args.topic, "--help"]))
        else:
            parse(LINE_PARSER, LINE_ACTIONS, " ".join([*args.topic, "--help"]))

    # -- runtime -----------------------------------------------------------------
    def _start_kwargs(self, args, base=None) -> dict:
        try:
            return options.start_kwargs(args, base)
        except ValueError as e:
            raise UsageError(f"%dragon {args.action}: {e}") from None

    def _start(self, args):
        kwargs = self._start_kwargs(args)
        if args.dry_run:
            try:
                print(options.dry_run_text(kwargs))
            except ValueError as e:
                raise UsageError(str(e)) from None
            return None
        rt = get_runtime(auto_start=False)
        if rt is not None:
            print(f"a runtime is already running: {rt!r}")
            print(node_table(rt))
            return None
        try:
            rt = dragon_nb.start(**kwargs)
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
        before = {}                     # the same nodes and hosts as before, unless told otherwise
        if old is not None:
            before["nodes"] = old.n_nodes
            if old.hosts:
                before.update(hosts=",".join(old.hosts), launcher=old.launcher)
            if old.listen is not None:
                before["listen"] = old.listen
        kwargs = self._start_kwargs(args, before)       # checked before anything stops
        dragon_nb.stop()
        try:
            rt = dragon_nb.start(**kwargs)
        except (ValueError, TypeError) as e:
            raise UsageError(f"the runtime was stopped, and a new one could not start: "
                             f"{e}") from None
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
        PG.enabled = args.state == "on"
        print(f"progress widgets {'on' if PG.enabled else 'off'}")

    # -- pool ----------------------------------------------------------------------
    def _map(self, args):
        _checked(args, MAP_OPTIONS)
        fname, expr = args.func, " ".join(args.iterable)
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
        from dragon_nb.ddict import DDict
        sub = args.ddict_action
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
        name = args.name
        if sub == "create":
            _checked(args, DDICT_OPTIONS)
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

    # -- pipelines -----------------------------------------------------------------
    @cell_magic("dragon")
    def dragon_cell(self, line, cell):
        from dragon_nb.pipeline import Pipeline, stage
        try:
            args = parse(CELL_PARSER, CELL_ACTIONS, line)
            if args is None:
                return None
            _checked(args, PIPELINE_OPTIONS)
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


DragonMagics.dragon.__doc__ = _magic_doc(
    LINE_PARSER, "Control the dragon-nb runtime behind this kernel: %dragon ACTION [options].")
DragonMagics.dragon_cell.__doc__ = _magic_doc(
    CELL_PARSER, "Run what the cell defines: %%dragon pipeline [options], its stages in the "
                 "cell.")


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


