"""Launching node agents on other hosts: ssh, Slurm's srun, or a command template.

The head runs these commands; each starts ``dragon-nb agent --connect ADDR``
on a host. With ssh and templates the key reaches the agent on its standard
input (``--key-file -``), never on a command line, and that same pipe stays
open as the agent's lifeline: when the head goes, the agent reads EOF and
stops its processes. srun gives standard input to one task only, so its agents
read the connection file from a path all hosts share (``shared_copy``).
The Python that runs the agent is this one's path, or DRAGON_NB_REMOTE_PYTHON.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys

LAUNCHERS = ("ssh", "srun")


def agent_command(head: str, key_file: str, name: str | None = None,
                  python: str | None = None) -> list[str]:
    """The agent's command line, as run on the other host."""
    python = python or os.environ.get("DRAGON_NB_REMOTE_PYTHON") or sys.executable
    cmd = [python, "-m", "dragon_nb.cli", "agent", "--connect", head,
           "--key-file", key_file]
    if name:
        cmd += ["--name", name]
    return cmd


def check_launcher(launcher: str) -> None:
    """A ValueError unless ``launcher`` is one ``launch_commands`` knows."""
    if launcher not in LAUNCHERS and not ("{host}" in launcher and "{command}" in launcher):
        raise ValueError(f"launcher must be 'ssh', 'srun' or a template with {{host}} and "
                         f"{{command}}, not {launcher!r}")


def launch_commands(hosts, launcher: str, head: str, connection_file: str,
                    python: str | None = None) -> list[tuple[str | None, list[str], bool]]:
    """-> [(host, argv, key on stdin?)]: what starts an agent on each host.

    ``launcher``: ``"ssh"``, ``"srun"`` (one command for all hosts of the Slurm
    allocation), or a template with ``{host}`` and ``{command}``, such as
    ``"ip netns exec {host} {command}"``.
    """
    hosts = list(hosts)
    if not hosts:
        return []
    check_launcher(launcher)
    if launcher == "ssh":
        return [(h, ["ssh", "-o", "BatchMode=yes", h,
                     shlex.join(agent_command(head, "-", h, python))], True) for h in hosts]
    if launcher == "srun":
        return [(None, ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1",
                        f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=0",
                        *agent_command(head, connection_file, None, python)], False)]
    out = []                             # a template
    for h in hosts:
        command = shlex.join(agent_command(head, "-", h, python))
        out.append((h, shlex.split(launcher.format(host=shlex.quote(h), command=command)),
                    True))
    return out


def shared_copy_path(rundir: str) -> str:
    """Where ``shared_copy`` puts the copy for a runtime (also for removing it)."""
    folder = os.environ.get("DRAGON_NB_SHARED_DIR") or os.path.expanduser("~/.dragon-nb")
    return os.path.join(folder, f"{os.path.basename(os.path.abspath(rundir))}.json")


def shared_copy(connection_file: str) -> str:
    """A 0600 copy of the connection file in the home directory (shared across a
    Slurm cluster), for agents that cannot get the key on standard input."""
    path = shared_copy_path(os.path.dirname(os.path.abspath(connection_file)))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, open(connection_file, "rb") as src:
        shutil.copyfileobj(src, out)
    return path


def dry_run(hosts, launcher: str, listen: str | None = None, port: int = 0) -> str:
    """What starting a runtime on ``hosts`` would run, without starting anything."""
    from dragon_nb.runtime import network
    address = network.resolve_interface(listen, hosts)
    head = f"tcp://{address}:{port or '<port>'}"
    return show(launch_commands(hosts, launcher, head, "<runtime dir>/connection.json"))


def show(commands) -> str:
    """The commands as a user would type them (for ``--dry-run``)."""
    lines = []
    for host, argv, key_on_stdin in commands:
        line = shlex.join(argv)
        if key_on_stdin:
            line += "    # key on standard input"
        lines.append(line)
    return "\n".join(lines)
