"""A DDict manager's shard, driven by raw requests: what a batch's end reports."""
import pickle

import pytest

from dragon_nb.ddict.store import Shard
from dragon_nb.wire import protocol as P

pytestmark = pytest.mark.timeout(10)
REQ, REP, ENTRY = P.DD_REQUEST, P.DD_REPLY, P.DD_ENTRY


def batch_frame(batch_id: int, keys) -> bytes:
    parts = []
    for k in keys:
        kb, vb = pickle.dumps(k), pickle.dumps(f"value {k}")
        parts += [ENTRY.pack(len(kb), len(vb), 0, 0, 0), kb, vb]
    return REQ.pack(P.DD_BATCH, 0, 0, 0, 0, 0, batch_id) + b"".join(parts)


def batch_end(shard, rid: int, batch_id: int, sent: int):
    count = sent.to_bytes(8, "little")
    frame, _ = shard.handle(REQ.pack(P.DD_BATCH_END, 0, 0, 0, rid, 8, batch_id) + count, [])
    status, _vflags, _nbufs, _rid, arg = REP.unpack_from(frame)
    return status, arg, frame[REP.size:].decode()


def test_a_batch_whose_puts_all_arrived_ends_ok():
    shard = Shard(0, 0, "here", 1 << 20)
    assert shard.handle(batch_frame(7, range(5)), []) is None     # batches get no reply
    assert batch_end(shard, 1, 7, 5) == (P.DDS_OK, 0, "")


def test_puts_that_never_arrived_are_reported_with_how_many():
    shard = Shard(0, 0, "here", 1 << 20)
    shard.handle(batch_frame(7, range(3)), [])     # 5 were sent; one message was lost
    status, count, why = batch_end(shard, 1, 7, 5)
    assert status == P.DDS_ERROR and count == 2
    assert "2 of the 5 puts of the batch never reached this manager" in why


def test_a_batch_end_asked_again_gets_the_same_answer():
    """Its reply may be lost on a cut connection, and the client asks again."""
    shard = Shard(0, 0, "here", 1 << 20)
    shard.handle(batch_frame(9, range(4)), [])
    first = batch_end(shard, 1, 9, 4)
    assert batch_end(shard, 2, 9, 4) == first == (P.DDS_OK, 0, "")
