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
