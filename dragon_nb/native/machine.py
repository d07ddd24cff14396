"""``from dragon.native.machine import System, Node`` becomes
``from dragon_nb.native.machine import System, Node``."""
from dragon_nb.machine import Node, System, node_table


def cpu_count() -> int:
    """Cores on all nodes of the runtime."""
    return System().cpu_count()


__all__ = ["System", "Node", "cpu_count", "node_table"]
