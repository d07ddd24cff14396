"""What the head knows of each node and process, as named records.

The head's tables used to be dicts of dicts (``info["alive"]`` was True, False
or None for "stopping"); these records say the same with names, and the node
table the head sends to clients is ``NodeRecord.public()``: built-in values
only, as every message body must be.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NodeState(enum.Enum):
    STARTING = "starting"      # its agent is on its way; not yet registered
    UP = "up"                  # registered, heard from
    LOST = "lost"              # its agent died, left or fell silent: ``lost`` says why
    STOPPING = "stopping"      # the runtime stops: its agent's exit is expected


@dataclass
class NodeRecord:
    id: int
    name: str
    hostname: str
    cpus: list
    physical_mem: int
    virtual: bool = False
    remote: bool = False            # joined from another host (not the head's child)
    address: str | None = None      # the address its host binds TCP on
    agent_pid: int | None = None
    pid_space: str = ""             # which processes it can look at by pid (network.pid_space)
    ident: bytes | None = None      # its agent's zmq identity at the head's ROUTER
    state: NodeState = NodeState.STARTING
    lost: str | None = None         # why it was lost
    seen: float = 0.0               # monotonic: when its agent was last heard (or grace ends)
    pinged: float = 0.0             # monotonic: when the head last pinged it (remote only)

    @property
    def num_cpus(self) -> int:
        return len(self.cpus)

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP

    def public(self) -> dict:
        """The node as the head's ``nodes`` reply carries it."""
        return {"id": self.id, "name": self.name, "hostname": self.hostname,
                "pid_space": self.pid_space, "cpus": list(self.cpus),
                "num_cpus": self.num_cpus, "physical_mem": self.physical_mem,
                "virtual": self.virtual, "alive": self.up, "agent_pid": self.agent_pid,
                "address": self.address, "remote": self.remote, "lost": self.lost}


@dataclass
class Pending:
    """A client request the head is waiting on agents for: a spawn or a kill."""
    op: str
    ident: bytes                    # the client's identity, to answer
    rid: int                        # the client's request id
    waiting: set                    # node ids not answered yet
    deadline: float                 # monotonic
    owner: str = ""
    procs: list = field(default_factory=list)    # (node, pid) started so far (spawn)
