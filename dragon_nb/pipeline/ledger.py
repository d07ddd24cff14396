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
cross it stops the pipeline after ``link_refeeds`` cuts.

What is recorded for a batch (``payload``) is opaque here: the feeder keeps
what it needs to encode the batch again (a signed message may not be sent twice).
"""
from __future__ import annotations

import collections
import threading

from dragon_nb.tunables import LINK_REFEEDS


class TooManyRetries(Exception):
    def __init__(self, seq: int, start: int, count: int, retries: int):
        super().__init__(seq, start, count, retries)
        self.seq, self.start, self.count, self.retries = seq, start, count, retries


class TooManyRefeeds(Exception):
    def __init__(self, seq: int, start: int, count: int, refeeds: int):
        super().__init__(seq, start, count, refeeds)
        self.seq, self.start, self.count, self.refeeds = seq, start, count, refeeds


class Ledger:
    def __init__(self, retries: int, link_refeeds: int = LINK_REFEEDS):
        self.retries = retries
        self.link_refeeds = link_refeeds
        self.lock = threading.Lock()
        # seq -> [start, count, payload, times sent again (deaths), after cut links]
        self.inflight: dict[int, list] = {}
        self.done_below = 0                      # every seq below this came out
        self.done_above: set[int] = set()        # and these, above it
        self.resend: collections.deque = collections.deque()   # (seq, payload) to send again

    def sent(self, seq: int, start: int, count: int, payload) -> None:
        with self.lock:
            self.inflight[seq] = [start, count, payload, 0, 0]

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
        the retries, but against ``link_refeeds`` (TooManyRefeeds past it). A
        batch already queued again is not queued (nor counted) twice: two
        reports of one cut send it once."""
        with self.lock:
            queued = {seq for seq, _ in self.resend}
            for seq in sorted(self.inflight):
                start, count, _, times, refeeds = self.inflight[seq]
                if charge and times >= self.retries:
                    raise TooManyRetries(seq, start, count, self.retries)
                if not charge and seq not in queued and refeeds >= self.link_refeeds:
                    raise TooManyRefeeds(seq, start, count, self.link_refeeds)
            for seq in sorted(self.inflight):
                entry = self.inflight[seq]
                if charge:
                    entry[3] += 1
                if seq not in queued:          # two reports of one cut: sent once
                    entry[4] += not charge
                    self.resend.append((seq, entry[2]))
            return len(self.inflight)

    def next_resend(self):
        """-> (seq, payload) to send again now, or None; a batch that came out
        meanwhile is skipped."""
        with self.lock:
            while self.resend:
                seq, payload = self.resend.popleft()
                if seq in self.inflight:
                    return seq, payload
            return None
