"""The caller's ledger of a pipeline's batches: what went in and has not come out.

Stage workers keep no record of what they hold, so when one dies nobody knows
which of the batches in flight it had. The caller does know what it fed in and
what came out of the last stage: every batch in between is sent again, each at
most ``retries`` times, and a batch that then comes out twice is taken once.
Stages are functions of one item, so running an item again gives the same
result (a stage with side effects sees the item twice). The same is done,
without counting against the retries, when a TCP link between stages was cut
and dialled again: whatever was on it is gone. Those re-feeds are counted per
batch apart, and capped (``link_refeeds``): a batch fed in again that often
after cut links has a link that keeps failing under it, and feeding it once
more would go on forever. Per batch, not per pipeline, so that a long stream
that sees a cut now and then (each costing the batches then in flight one
re-feed) never fails for it, while a link that flaps faster than a batch can
cross it stops the pipeline after ``link_refeeds`` cuts. One blip is reported by
every sender whose link it cut, each when it notices: reports that close
together count once.

What is recorded for a batch (``payload``) is opaque here: the feeder keeps
what it needs to encode the batch again (a signed message may not be sent twice).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from dragon_nb.tunables import LINK_REFEEDS, REFEED_MERGE_S


class TooManyRetries(Exception):
    def __init__(self, seq: int, start: int, count: int, retries: int):
        super().__init__(seq, start, count, retries)
        self.seq, self.start, self.count, self.retries = seq, start, count, retries


class TooManyRefeeds(Exception):
    def __init__(self, seq: int, start: int, count: int, refeeds: int):
        super().__init__(seq, start, count, refeeds)
        self.seq, self.start, self.count, self.refeeds = seq, start, count, refeeds


@dataclass
class InFlight:
    """A batch fed in that has not come out."""
    start: int                 # its first item's position in the stream
    count: int                 # its items
    payload: object            # what the feeder needs to encode it again
    retries: int = 0           # times fed in again because a worker died
    refeeds: int = 0           # times fed in again because a link was cut
    charged_at: float = -1e18  # when a cut was last counted against it


class Ledger:
    """``retries``: re-feeds a batch may have after worker deaths; ``link_refeeds``:
    after cut links, where reports within ``merge_s`` of the last one counted for
    a batch are the same cut (one blip is seen by every sender whose link it cut,
    each reporting when it notices); ``clock`` for tests."""

    def __init__(self, retries: int, link_refeeds: int = LINK_REFEEDS,
                 merge_s: float = REFEED_MERGE_S, clock=time.monotonic):
        self.retries = retries
        self.link_refeeds = link_refeeds
        self.merge_s, self.clock = merge_s, clock
        self.lock = threading.Lock()
        self.inflight: dict[int, InFlight] = {}
        self.done_below = 0                      # every seq below this came out
        self.done_above: set[int] = set()        # and these, above it
        self.resend: collections.deque = collections.deque()   # (seq, payload) to send again

    def sent(self, seq: int, start: int, count: int, payload) -> None:
        with self.lock:
            self.inflight[seq] = InFlight(start, count, payload)

    def arrived(self, seq: int) -> bool:
        """A batch came out of the last stage; False if it had already."""
        with self.lock:
            if seq < self.done_below or seq in self.done_above:
                return False
            self.inflight.pop(seq, None)
            self.done_above.add(seq)
            while self.done_below in self.done_above:
                self.done_above.discard(self.done_below)
                self.done_below += 1
            return True

    def send_again(self, charge: bool = True) -> int:
        """Queue every batch in flight to be sent again; -> how many. Raises
        TooManyRetries for the first batch that has used its retries up. A cut
        link is not the items' fault: ``charge=False`` does not count it against
        the retries, but against ``link_refeeds`` (TooManyRefeeds past it), once
        per cut (reports within ``merge_s`` are one). A batch already queued
        again is not queued twice."""
        with self.lock:
            now = self.clock()
            queued = {seq for seq, _ in self.resend}
            for seq in sorted(self.inflight):
                batch = self.inflight[seq]
                if charge and batch.retries >= self.retries:
                    raise TooManyRetries(seq, batch.start, batch.count, self.retries)
                if not charge and self._new_cut(batch, now) and \
                        batch.refeeds >= self.link_refeeds:
                    raise TooManyRefeeds(seq, batch.start, batch.count, self.link_refeeds)
            for seq in sorted(self.inflight):
                batch = self.inflight[seq]
                if charge:
                    batch.retries += 1
                elif self._new_cut(batch, now):
                    batch.refeeds += 1
                    batch.charged_at = now
                if seq not in queued:
                    self.resend.append((seq, batch.payload))
            return len(self.inflight)

    def _new_cut(self, batch: InFlight, now: float) -> bool:
        return now - batch.charged_at >= self.merge_s

    def next_resend(self):
        """-> (seq, payload) to send again now, or None; a batch that came out
        meanwhile is skipped."""
        with self.lock:
            while self.resend:
                seq, payload = self.resend.popleft()
                if seq in self.inflight:
                    return seq, payload
            return None
