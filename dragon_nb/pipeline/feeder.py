"""The feeder: a pipeline's source run in the caller, on a thread of its own.

It owns the PUSH channel into stage 0 and sends the source's batches, recording
each in the caller's ledger; and it sends again, *encoded again* (a keyed
message carries a sequence number, and a receiver drops one it has seen), the
batches the ledger asks for: after a stage worker died, or after a TCP link
between stages was cut and dialled again. A cut link is not the items' fault
and does not use up ``task_retries``, but every batch may be fed in again after
cut links at most ``LINK_REFEEDS`` times: a link that keeps flapping ends the
pipeline with a ``PipelineError`` naming it, instead of feeding it forever.
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from dragon_nb.errors import PipelineError
from dragon_nb.pipeline.ledger import Ledger, TooManyRefeeds
from dragon_nb.pipeline.stage_worker import StageFailure
from dragon_nb.tunables import BATCH_TARGET_S, PUSH_POLL_MS
from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S

log = logging.getLogger("dragon_nb.pipeline")

MAX_BATCH = 256


class Feeder:
    """Feeds ``it`` into ``chan`` (a PUSH channel into stage 0).

    ``watch``: the channel's LinkWatch (None on ipc). ``rate``: the caller's
    measured items/s (batches are sized from it). ``alive``: is the runtime still
    there. ``connect(sock, address)``: how to dial a replacement worker.
    ``describe(endpoint)``: the worker (stage, node) an endpoint reaches.
    The caller reads ``total_batches`` (set once the source is done), ``failure``
    (the source's own error, a StageFailure) and ``error`` (a PipelineError the
    feeder thread hit: the caller raises it).
    """

    def __init__(self, name: str, chan: P.Channel, ledger: Ledger, watch=None,
                 rate=lambda: 0.0, alive=lambda: True, connect=None, describe=str):
        self.name, self.chan, self.ledger, self.watch = name, chan, ledger, watch
        self.rate, self.alive, self.connect = rate, alive, connect
        self.describe = describe             # endpoint -> what it is, for messages
        self.total_batches = None
        self.failure = None
        self.error: PipelineError | None = None
        self.items_sent = 0
        self.closed = False
        self.wake = threading.Event()        # something to send again
        self.rewires: list = []              # (old, new) inputs of stage 0
        self.thread: threading.Thread | None = None
        self._closing = threading.Lock()

    def start(self, it) -> None:
        self.thread = threading.Thread(target=self.run, args=(it,), daemon=True,
                                       name=f"dragon-nb {self.name} source")
        self.thread.start()

    def rewire(self, old: str, new: str) -> None:
        """A stage 0 worker was replaced: send to ``new`` instead of ``old``."""
        self.rewires.append((old, new))
        self.wake.set()

    def run(self, it) -> None:
        """The thread: the source's batches, and those to send again."""
        seq = start = 0
        exhausted = False
        try:
            while not self.closed and self.error is None:
                self._apply_rewires()
                self._check_links()
                again = self.ledger.next_resend()
                if again is not None:
                    if not self.push(*again):
                        return
                    continue
                if exhausted or self.failure is not None:
                    self.wake.wait(0.1)          # done feeding; resends may still come
                    self.wake.clear()
                    continue
                size = max(1, min(MAX_BATCH, int(self.rate() * BATCH_TARGET_S)))
                batch = []
                began = time.monotonic()
                try:                 # up to `size` items, but never sit on a slow source's
                    while len(batch) < size:          # items longer than a batch's worth
                        batch.append(next(it))
                        if time.monotonic() - began > BATCH_TARGET_S:
                            break
                except StopIteration:
                    exhausted = True
                except Exception as e:          # the source failed: after the items before it
                    self.failure = StageFailure(-1, "source", start + len(batch), 0, e)
                if batch:
                    data, bufs = S.dumps_work((batch, {}))
                    payload = ({"seq": seq, "start": start}, [data, *bufs])
                    self.ledger.sent(seq, start, len(batch), payload)
                    if not self.push(seq, payload):
                        return
                    seq += 1
                    start += len(batch)
                    self.items_sent = start
                if exhausted or self.failure is not None:
                    self.total_batches = seq
        except PipelineError as e:              # a link kept being cut
            self.error = e
        except Exception as e:                  # pickling an item failed, say
            if not self.closed:
                self.failure = StageFailure(-1, "source", start, 0, e)
            self.total_batches = seq
        finally:
            if self.closed:          # close() left the channel to us: we were still using it
                self.close_channel()

    def push(self, seq: int, payload) -> bool:
        """Send one batch to stage 0 (encoded now), waiting while it is full; False
        if closed meanwhile."""
        while not self.chan.poll(PUSH_POLL_MS, zmq.POLLOUT):
            if self.closed or not self.alive():
                return False
            self._apply_rewires()              # the worker we waited for may have died
            self._check_links()
        body, buffers = payload
        self.chan.send(P.PIPE_ITEMS, body, buffers)
        return True

    def _check_links(self) -> None:
        for endpoint in self.watch.poll() if self.watch is not None else ():
            self.link_cut("the feeder", endpoint)

    def link_cut(self, sender: str, endpoint: str) -> int:
        """A TCP link into a stage was cut and dialled again: the batches on it are
        lost. Queue again all that have not come out (not counted as retries); ->
        how many. PipelineError once a batch has been fed again too often so."""
        try:
            again = self.ledger.send_again(charge=False)
        except TooManyRefeeds as e:
            raise PipelineError(
                f"{sender}'s link to {self.describe(endpoint)} was cut and dialled again, and items "
                f"{e.start} to {e.start + e.count - 1} had already been fed in again "
                f"{e.refeeds} time(s) after cut links (LINK_REFEEDS={e.refeeds}): the "
                f"link keeps failing, so the pipeline stops") from None
        log.info("%s: %s's link to %s was cut and dialled again; %d batch(es) fed in again",
                 self.name, sender, endpoint, again)
        self.wake.set()
        return again

    def _apply_rewires(self) -> None:
        while self.rewires:
            old, new = self.rewires.pop(0)
            try:
                self.chan.sock.disconnect(old)
            except zmq.ZMQError:
                pass
            self.connect(self.chan.sock, new)

    def close(self) -> None:
        """Stop feeding; the channel is closed here unless the thread still uses it
        (stuck in the source's ``next()``), then by the thread."""
        self.closed = True
        self.wake.set()
        feeding = self.thread is not None and self.thread.is_alive() and \
            self.thread is not threading.current_thread()
        if feeding:
            self.thread.join(1.0)
            feeding = self.thread.is_alive()
        if not feeding:
            self.close_channel()

    def close_channel(self) -> None:
        with self._closing:              # the thread and close() may both get here
            if self.watch is not None:
                self.watch.close()
                self.watch = None
            self.chan.close(linger=0)
