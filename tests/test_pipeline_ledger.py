"""The caller's ledger of a pipeline's batches: what is fed in again, and how often."""
import pytest

from dragon_nb.pipeline.ledger import Ledger, TooManyRetries

pytestmark = pytest.mark.timeout(10)


def resends(ledger) -> list:
    out = []
    while (item := ledger.next_resend()) is not None:
        out.append(item)
    return out


def test_a_batch_that_came_out_is_taken_once_and_not_fed_again():
    ledger = Ledger(retries=1)
    ledger.sent(0, 0, 10, "frames 0")
    ledger.sent(1, 10, 10, "frames 1")
    assert ledger.arrived(1) is True
    assert ledger.arrived(1) is False           # a second copy is dropped
    assert ledger.send_again() == 1
    assert resends(ledger) == [(0, "frames 0")]


def test_a_worker_death_feeds_every_batch_in_flight_again_in_order_up_to_the_retries():
    ledger = Ledger(retries=1)
    for seq in (2, 0, 1):
        ledger.sent(seq, seq * 5, 5, f"frames {seq}")
    assert ledger.send_again() == 3
    assert [seq for seq, _ in resends(ledger)] == [0, 1, 2]
    ledger.arrived(0)
    with pytest.raises(TooManyRetries) as lost:
        ledger.send_again()
    assert (lost.value.seq, lost.value.start, lost.value.count) == (1, 5, 5)


def test_a_cut_link_feeds_again_without_using_retries_and_two_reports_send_once():
    ledger = Ledger(retries=0)
    ledger.sent(0, 0, 3, "frames 0")
    assert ledger.send_again(charge=False) == 1
    assert ledger.send_again(charge=False) == 1     # the same cut, seen by two senders
    assert resends(ledger) == [(0, "frames 0")]
    with pytest.raises(TooManyRetries):              # a death still counts
        ledger.send_again()


def test_a_batch_that_comes_out_before_its_resend_is_skipped():
    ledger = Ledger(retries=1)
    ledger.sent(0, 0, 3, "frames 0")
    ledger.sent(1, 3, 3, "frames 1")
    ledger.send_again()
    ledger.arrived(0)
    assert resends(ledger) == [(1, "frames 1")]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_re_feeds_after_cut_links_are_capped_per_batch():
    from dragon_nb.pipeline.ledger import TooManyRefeeds
    clock = Clock()
    ledger = Ledger(retries=0, link_refeeds=2, merge_s=1.0, clock=clock)
    ledger.sent(0, 0, 3, "frames 0")
    for _ in range(2):                               # two cuts: fed in again each time
        assert ledger.send_again(charge=False) == 1
        assert resends(ledger) == [(0, "frames 0")]
        clock.now += 2.0
    ledger.sent(1, 3, 4, "frames 1")                 # a batch sent since has its own count
    with pytest.raises(TooManyRefeeds) as capped:    # the third cut under batch 0: too many
        ledger.send_again(charge=False)
    assert (capped.value.seq, capped.value.start, capped.value.count,
            capped.value.refeeds) == (0, 0, 3, 2)
    assert ledger.arrived(0)                         # once it came out, the others go on
    assert ledger.send_again(charge=False) == 1
    assert resends(ledger) == [(1, "frames 1")]


def test_two_reports_of_one_cut_use_one_re_feed():
    ledger = Ledger(retries=0, link_refeeds=1)
    ledger.sent(0, 0, 3, "frames 0")
    ledger.send_again(charge=False)
    ledger.send_again(charge=False)                  # the same cut, seen by two senders
    assert resends(ledger) == [(0, "frames 0")]


def test_reports_of_one_cut_that_come_after_the_batch_was_sent_again_count_once():
    """One blip cuts several links; each sender reports when it notices. The batch is
    fed in again at each report (what was on a link cut later may be lost too), but
    the cap counts the blip once, so a few blips cannot end a healthy pipeline."""
    from dragon_nb.pipeline.ledger import TooManyRefeeds
    clock = Clock()
    ledger = Ledger(retries=0, link_refeeds=1, merge_s=1.0, clock=clock)
    ledger.sent(0, 0, 3, "frames 0")
    for _ in range(5):                               # five reports within 0.5 s
        assert ledger.send_again(charge=False) == 1
        assert resends(ledger) == [(0, "frames 0")]  # each feeds it in again
        clock.now += 0.1
    clock.now += 1.0                                 # a second blip: past the cap of one
    with pytest.raises(TooManyRefeeds):
        ledger.send_again(charge=False)


def test_the_default_cap_is_the_tunable():
    from dragon_nb.tunables import LINK_REFEEDS
    assert Ledger(retries=1).link_refeeds == LINK_REFEEDS


# -- the feeder, on an inproc link with a key (as on TCP), without processes -----------------
def _feeder_on_a_keyed_link(source, link_refeeds=20):
    import zmq

    from dragon_nb.pipeline.feeder import Feeder
    from dragon_nb.wire import protocol as P
    ctx = zmq.Context.instance()
    key = b"k" * 32
    pull = P.Channel(ctx.socket(zmq.PULL), P.Codec(key))
    address = f"inproc://feeder-{id(pull)}"
    pull.sock.bind(address)
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    # every report a cut of its own (merge_s=0), as cuts seconds apart would be
    feeder = Feeder("test", P.Channel(push, P.Codec(key)), Ledger(0, link_refeeds, merge_s=0.0))
    feeder.start(iter(source))
    return feeder, pull


def _batches(pull, timeout_ms=5000) -> list:
    """The batch headers that arrive (a replay is dropped, as a stage worker drops it)."""
    from dragon_nb.wire import protocol as P
    got = []
    while pull.poll(timeout_ms):
        try:
            _, kind, body, _ = pull.recv()
        except P.ReplayError:
            continue
        got.append(body["seq"])
        timeout_ms = 300
    return got


def test_a_batch_fed_again_after_a_cut_link_is_encoded_again_not_dropped_as_a_replay():
    feeder, pull = _feeder_on_a_keyed_link(range(3))
    try:
        first = _batches(pull)
        assert first and feeder.total_batches == len(first)
        assert feeder.link_cut("a stage 0 worker", "tcp://10.0.0.2:5000") == len(first)
        assert _batches(pull) == first           # every one again, and taken
    finally:
        feeder.close()
        pull.close()


def test_a_link_cut_too_often_under_a_batch_ends_the_pipeline_naming_the_link():
    from dragon_nb.errors import PipelineError
    feeder, pull = _feeder_on_a_keyed_link(range(3), link_refeeds=2)
    try:
        first = _batches(pull)
        for _ in range(2):
            feeder.link_cut("a stage 0 worker", "stage 1 (f) worker 0 on node 2")
            assert _batches(pull) == first
        with pytest.raises(PipelineError, match=r"a stage 0 worker's link to stage 1 \(f\) "
                                                r"worker 0 on node 2 was cut .*LINK_REFEEDS=2"):
            feeder.link_cut("a stage 0 worker", "stage 1 (f) worker 0 on node 2")
    finally:
        feeder.close()
        pull.close()


class _FakeWatch:
    """A LinkWatch that was redialled at the endpoints given."""

    def __init__(self, *endpoints):
        self.pending, self.redials = list(endpoints), 0

    def poll(self):
        out, self.pending = self.pending, []
        self.redials += len(out)
        return out


def test_a_senders_report_link_redial_is_told_once_with_the_data_links_cut_by_then():
    import zmq

    from dragon_nb.pipeline.stage_worker import _Links
    from dragon_nb.wire import protocol as P
    ctx = zmq.Context.instance()
    router = P.Channel(ctx.socket(zmq.ROUTER), P.Codec(b"k" * 32), routed=True)
    router.sock.bind("inproc://links-test")
    dealer = P.Channel(ctx.socket(zmq.DEALER), P.Codec(b"k" * 32))
    dealer.sock.connect("inproc://links-test")
    try:
        links = _Links(dealer, -1, [_FakeWatch("tcp://h2:1"), None],
                       _FakeWatch("tcp://h1:2"))
        assert links.check() is True             # the caller of check() sends its end again
        assert links.check() is False            # and each redial is told once
        got = []
        while router.poll(500):
            _, kind, body, _ = router.recv()
            assert kind == P.PIPE_LINK
            got.append(body)
        assert got == [{"stage": -1, "to": "tcp://h2:1"},
                       {"stage": -1, "to": "tcp://h1:2", "report": True, "cut": 1}]
    finally:
        dealer.close()
        router.close()
