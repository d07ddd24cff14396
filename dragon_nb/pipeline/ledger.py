"""The caller's ledger of a pipeline's batches: what went in and has not come out.

Stage workers keep no record of what they hold, so when one dies nobody knows
which of the batches in flight it had. The caller does know what it fed in and
what came out of the last stage: every batch in between is sent again, each at
most ``retries`` times, and a batch that then comes out twice is taken once.
Stages are functions of one item, so running an item again gives the same
result (a stage with side effects sees the item twice). The same is done,
without counting against the retries, when a TCP link between stages was cut
and dialled again: whatever was on it is gone.
"""
from __future__ import annotations

import collections
import threading


class TooManyRetries(Exception):
    def __init__(self, seq: int, start: int, count: int, retries: int):
        super().__init__(seq, start, count, retries)
        self.seq, self.start, self.count, self.retries = seq, start, count, retries


class Ledger:
    def __init__(self, retries: int):
        self.retries = retries
        self.lock = threading.Lock()
        self.inflight: dict[int, list] = {}     # seq -> [start, count, frames, times sent again]
        self.done_below = 0                      # every seq below this came out
        self.done_above: set[int] = set()        # and these, above it
        self.resend: collections.deque = collections.deque()   # (seq, frames) to send again

    def sent(self, seq: int, start: int, count: int, frames) -> None:
        with self.lock:
            self.inflight[seq] = [start, count, frames, 0]

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
        link is not the items' fault: ``charge=False`` does not count it."""
        with self.lock:
            for seq in sorted(self.inflight):
                start, count, frames, times = self.inflight[seq]
                if charge and times >= self.retries:
                    raise TooManyRetries(seq, start, count, self.retries)
            queued = {seq for seq, _ in self.resend}
            for seq in sorted(self.inflight):
                entry = self.inflight[seq]
                entry[3] += charge
                if seq not in queued:          # two reports of one cut: sent once
                    self.resend.append((seq, entry[2]))
            return len(self.inflight)

    def next_resend(self):
        """-> (seq, frames) to send again now, or None; a batch that came out
        meanwhile is skipped."""
        with self.lock:
            while self.resend:
                seq, frames = self.resend.popleft()
                if seq in self.inflight:
                    return seq, frames
            return None
