"""DDict on the runtime core (issue 12): managers as named records, their liveness
through ``runtime/liveness.py``, their links through ``network.LinkWatch``, the
BOUND report through ``protocol.Channel``, the constructor's checks through
``checks.py``."""
import base64
import json
import os
import pickle
import signal
import time
import uuid

import numpy as np
import pytest
import zmq

from dragon_nb import DDict, DDictError
from dragon_nb.ddict import connection as C
from dragon_nb.ddict import lifecycle as L
from dragon_nb.ddict.records import ManagerRecord
from dragon_nb.runtime import liveness, network
from dragon_nb.wire import protocol as P

from conftest import wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


@pytest.fixture
def d(runtime):
    dd = DDict(1, 2, 4 * MiB, timeout=10)
    yield dd
    dd.destroy()


def test_a_handles_managers_are_named_records(d):
    for mid, m in enumerate(d._managers):
        assert isinstance(m, ManagerRecord)
        assert m.mid == mid and m.node == mid and m.pid > 0
        assert m.address.startswith("ipc://") and m.lane_path.endswith(".lane")
        assert m.pid_space == network.pid_space()
        assert m.start_time == liveness.start_time(m.pid) > 0     # clock ticks since boot
        assert m.proc.alive() is True and m.proc.key == (m.node, m.pid)
        assert m[5] == m.pid                 # still read by position where it was


def test_the_pickled_state_of_a_handle_is_built_in_values_only(d):
    """So it may travel in a protocol message body, whose unpickler refuses globals."""
    state = P.loads_body(pickle.dumps(d.__getstate__(), 5))
    assert state["state"]["managers"] == [list(m) for m in d._managers]
    again = pickle.loads(pickle.dumps(d))
    assert again._managers == d._managers and isinstance(again._managers[0], ManagerRecord)
    d["k"] = 1
    assert again["k"] == 1


def test_attach_refuses_a_manager_record_of_the_wrong_shape(d):
    state = json.loads(base64.b64decode(d.serialize()))
    state["managers"][0] = state["managers"][0][:5]
    with pytest.raises(DDictError, match="not a serialized DDict"):
        DDict.attach(base64.b64encode(json.dumps(state).encode()).decode())
    attached = DDict.attach(d.serialize())
    assert attached._managers == d._managers


def test_the_constructors_sizes_are_checked_before_a_runtime_is_asked(runtime):
    with pytest.raises(ValueError, match="managers_per_node must be a positive integer"):
        DDict("1", 1, MiB, runtime=runtime)
    with pytest.raises(ValueError, match="total_mem must be a positive integer"):
        DDict(1, 1, 0, runtime=runtime)
    with DDict(np.int64(1), 1, np.int32(MiB), runtime=runtime) as dd:   # numpy ints do
        dd["k"] = 1
        assert dd["k"] == 1


def test_a_link_whose_watcher_says_gone_is_dead_even_when_its_pid_cannot_be_looked_at():
    rec = ManagerRecord(0, 3, "elsewhere", "tcp://127.0.0.1:9", "", 12345, 0.0, "other/0")
    conn = C.Connection([rec], "x", "/nonexistent/tombstone")
    link = conn.links[0]
    assert conn.alive(link) is True          # no pid to look at, no watcher: cannot tell

    class Gone:
        redials = 2

        def gone(self, refusals):
            return True

        def close(self):
            pass
    link.watch = Gone()
    assert link.redials == 2
    assert conn.alive(link) is False
    assert "cannot be reached" in str(conn._mark_dead(link))


def test_a_manager_that_does_not_exit_after_destroy_is_killed_through_the_liveness_layer(
        runtime):
    dd = DDict(1, 1, MiB, timeout=1, runtime=runtime)
    pid = dd._managers[0].pid
    os.kill(pid, signal.SIGSTOP)              # it will answer nothing, and not exit
    try:
        t0 = time.monotonic()
        dd.destroy()
        assert time.monotonic() - t0 < 10     # its request's timeout, then the exit wait
        wait_until(lambda: dd._managers[0].proc.alive() is False, 5,
                   "the late manager to be killed")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_bound_reports_are_read_through_a_channel_and_others_are_dropped(tmp_path):
    key = os.urandom(32)
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    address = f"ipc://{tmp_path}/report-{uuid.uuid4().hex[:6]}"
    router.bind(address)
    channel = P.Channel(router, P.Codec(key), routed=True)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(address)
    try:
        P.Channel(dealer, P.Codec(os.urandom(32))).send(P.BOUND, {"manager": 0,
                                                               "address": "tcp://x:1"})
        P.Channel(dealer, P.Codec(key)).send(P.BOUND, {"manager": "no"})
        P.Channel(dealer, P.Codec(key)).send(P.BOUND, {"manager": 1, "address": "tcp://a:2"})
        P.Channel(dealer, P.Codec(key)).send(P.BOUND, {"manager": 0, "address": "tcp://b:3"})
        assert L._await_bound(channel, 2, 5.0) == {1: "tcp://a:2", 0: "tcp://b:3"}
        with pytest.raises(DDictError, match="1 of 1 DDict managers did not start"):
            L._await_bound(channel, 1, 0.2)
    finally:
        dealer.close(linger=0)
        channel.close()
