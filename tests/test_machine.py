"""System and Node, as Dragon's dragon.native.machine offers them."""
import psutil
import pytest

from dragon_nb.native.machine import Node, System, cpu_count

pytestmark = pytest.mark.timeout(60)


def test_system_lists_the_nodes(runtime):
    s = System()
    assert s.nnodes == 2
    assert s.nodes == [0, 1]
    assert s.primary_node.h_uid == 0
    assert cpu_count() == sum(Node(h).num_cpus for h in s.nodes)


def test_a_virtual_node_reports_its_share_of_the_host(runtime):
    node = Node(1)
    assert node.h_uid == 1 and node.name == "node1"
    assert node.hostname and node.num_cpus == len(node.cpus) >= 1
    assert node.physical_mem == psutil.virtual_memory().total // 2
    assert Node("node1").h_uid == 1


def test_live_load_and_memory(runtime):
    node = Node(0)
    rec = node.telemetry()
    assert rec["node"] == 0
    assert node.load >= 0.0 and node.mem_used >= 0


def test_unknown_node_is_a_clear_error(runtime):
    with pytest.raises(ValueError, match="no node 9"):
        Node(9)
