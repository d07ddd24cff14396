"""The options that start a runtime, defined once for the command line and the magics.

``dragon-nb run|info|demo`` and ``%dragon start|restart`` take the same
options with the same flags, types, checks and help, because both build them
from the table here; each option also names the ``dragon_nb.start()``
keyword it becomes, so a new keyword of ``start()`` is one more row, not two
copies that drift apart.

Every option's argparse default is None ("not given"): ``start()`` supplies
the real default (and the environment variables ``dragon-nb run`` sets), and
``%dragon restart`` can tell what the user asked for from what the previous
runtime had. Checks name the flag, not the keyword (``--nodes must be at
least 1, not 0``), since that is what the user typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any, Callable

from dragon_nb.runtime.client import Runtime

# the defaults Runtime() applies, for the help texts (so they cannot go stale)
DEFAULTS = {name: p.default for name, p in inspect.signature(Runtime).parameters.items()}


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option: how argparse reads it, and what it becomes."""

    flags: tuple[str, ...]
    help: str
    type: Callable | None = None
    metavar: str | None = None
    keyword: str | None = None     # the dragon_nb.start() keyword (None: not passed to start)
    default: Any = None            # what argparse stores when the option is not given
    check: Callable | None = None  # check(flag, value) -> an error message, or None
    flag_only: bool = False        # a switch (store_true)

    @property
    def flag(self) -> str:
        """The long flag, as errors name it."""
        return self.flags[-1]

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.flag_only:
            parser.add_argument(*self.flags, dest=self.dest, action="store_true", help=self.help)
        else:
            parser.add_argument(*self.flags, dest=self.dest, type=self.type, default=self.default,
                                metavar=self.metavar, help=self.help)


def at_least(low: int) -> Callable:
    """A check: the value is a number no smaller than ``low``."""
    def check(flag, value):
        if value < low:
            return f"{flag} must be at least {low}, not {value}"
        return None
    return check


def positive_seconds(flag, value):
    if not value > 0:
        return f"{flag} must be a positive number of seconds, not {value}"
    return None


def tcp_port(flag, value):
    if not 0 <= value < 65536:
        return f"{flag} must be a TCP port (1-65535), or 0 for any free port, not {value}"
    return None


NODES = Option(("--nodes",), "virtual nodes to start on this host (default 1)",
               type=int, metavar="N", keyword="nodes")
START_OPTIONS: tuple[Option, ...] = (
    NODES,
    Option(("--workers-per-node",), "pool workers per node for a Pool() without a size "
           "(default: the node's cores)", type=int, metavar="K", keyword="workers_per_node",
           check=at_least(1)),
    Option(("--cpus-per-node",), "cores each virtual node claims (default: its share of "
           "the host's)", type=int, metavar="C", keyword="cpus_per_node", check=at_least(1)),
    Option(("--hosts",), "comma-separated hosts to start one more node on each, over "
           "signed TCP", metavar="H1,H2", keyword="hosts"),
    Option(("--launcher",), "how agents start on --hosts: ssh, srun, or a template with "
           f"{{host}} and {{command}} (default {DEFAULTS['launcher']})", metavar="HOW",
           keyword="launcher"),
    Option(("--listen",), "address or interface other hosts reach this one on (default: "
           "the interface that routes to the first host)", metavar="ADDR", keyword="listen"),
    Option(("--port",), "the head's TCP port, with --hosts or --listen (default: any free "
           "port)", type=int, metavar="P", keyword="port", check=tcp_port),
    Option(("--timeout",), "seconds a request to the head may take "
           f"(default {DEFAULTS['timeout']:g})", type=float, metavar="S", keyword="timeout",
           check=positive_seconds),
    Option(("--telemetry-interval",), "seconds between the figures each node publishes "
           f"(default {DEFAULTS['telemetry_interval']:g})", type=float, metavar="S",
           keyword="telemetry_interval", check=positive_seconds),
)
DRY_RUN = Option(("--dry-run",), "print the commands that would start agents on --hosts, "
                 "and start nothing", flag_only=True)


def add_options(parser: argparse.ArgumentParser, opts) -> None:
    """Add each of ``opts`` (Options) to ``parser``."""
    for opt in opts:
        opt.add_to(parser)


def add_start_options(parser: argparse.ArgumentParser, *, only=None,
                      dry_run: bool = True) -> None:
    """Add the runtime-start options (those whose dest is in ``only``, if given)
    to ``parser`` in a group of their own, and ``--dry-run`` unless told not to."""
    group = parser.add_argument_group("runtime options")
    add_options(group, [o for o in START_OPTIONS if only is None or o.dest in only])
    if dry_run:
        DRY_RUN.add_to(group)


def check(args: argparse.Namespace, opts) -> None:
    """A ValueError naming the first of ``opts`` given a value its check refuses."""
    for opt in opts:
        value = getattr(args, opt.dest, None)
        if value is not None and opt.check is not None:
            problem = opt.check(opt.flag, value)
            if problem:
                raise ValueError(problem)


def start_kwargs(args: argparse.Namespace, base: dict | None = None) -> dict:
    """The ``dragon_nb.start()`` keywords the user gave in ``args``, over ``base``
    (the keywords of a runtime being restarted, say); a ValueError naming the
    flag for a value or a combination that cannot start a runtime."""
    check(args, START_OPTIONS)
    kwargs = dict(base or {})
    for opt in START_OPTIONS:
        value = getattr(args, opt.dest, None)
        if value is not None:
            kwargs[opt.keyword] = value
    networked = bool(kwargs.get("hosts")) or kwargs.get("listen") is not None
    nodes = kwargs.get("nodes")
    if nodes is not None and nodes < (0 if networked else 1):
        also = " (0 only with --hosts or --listen: every node on another host)"
        raise ValueError(f"--nodes must be at least 1, not {nodes}{also if nodes == 0 else ''}")
    if "port" in kwargs and not networked:
        raise ValueError("--port is the head's TCP port for other hosts: give --hosts or "
                         "--listen too")
    if "launcher" in kwargs and not kwargs.get("hosts"):
        raise ValueError("--launcher says how agents start on --hosts; no hosts given")
    return kwargs


def dry_run_text(kwargs: dict) -> str:
    """The commands that starting a runtime with ``kwargs`` would run on its hosts;
    a ValueError if there are no hosts, or the launcher or address is wrong."""
    if not kwargs.get("hosts"):
        raise ValueError("--dry-run shows how agents start on --hosts; none given")
    from dragon_nb.runtime import hosts
    return hosts.dry_run(kwargs["hosts"].split(","), kwargs.get("launcher", DEFAULTS["launcher"]),
                         kwargs.get("listen"), kwargs.get("port", 0))
