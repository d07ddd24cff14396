"""The wire protocol: framing, signing, and refusing what does not check out."""
import pytest

from dragon_nb.wire import protocol as P
from dragon_nb.wire import serialization as S


def test_round_trip_with_buffers():
    codec = P.Codec()
    frames = codec.encode(P.REQ, {"op": "x", "rid": 1}, [b"payload"])
    kind, body, bufs = codec.decode(frames)
    assert kind == P.REQ and body == {"op": "x", "rid": 1} and bytes(bufs[0]) == b"payload"


def test_signed_frames_verify_and_tampering_is_refused():
    codec = P.Codec(key=b"k" * 32)
    frames = codec.encode(P.EVT, {"op": "telemetry"}, [b"abc"])
    assert codec.decode(frames)[1] == {"op": "telemetry"}
    tampered = list(frames)
    tampered[-1] = b"abd"
    with pytest.raises(P.ProtocolError, match="signature"):
        codec.decode(tampered)
    with pytest.raises(P.ProtocolError):
        P.Codec(key=b"other" * 8).decode(frames)


def test_an_undecodable_body_is_a_protocol_error_not_a_crash():
    with pytest.raises(P.ProtocolError):
        P.Codec().decode([P.REQ, b"\x80\x05garbage"])
    with pytest.raises(P.ProtocolError):
        P.Codec().decode([P.REQ])


def test_large_arrays_travel_out_of_band():
    np = pytest.importorskip("numpy")
    arr = np.arange(1 << 18, dtype=np.int64)
    data, bufs = S.dumps_work(arr)
    assert len(bufs) == 1 and len(data) < 1000
    assert (S.loads(data, bufs) == arr).all()
    small, none = S.dumps_result(np.arange(10))
    assert none == [] and (S.loads(small) == np.arange(10)).all()


def test_describe_unpicklable_names_the_global():
    import threading
    g = {"LOCK": threading.Lock()}
    exec("def f(x):\n    with LOCK:\n        return x", g)
    assert "global 'LOCK'" in S.describe_unpicklable(g["f"])


def test_frames_split_or_merged_after_signing_no_longer_verify():
    codec = P.Codec(key=b"k" * 32)
    frames = codec.encode(P.TASKS, {"tasks": []}, [b"ab", b"cd"])
    merged = frames[:-2] + [frames[-2] + frames[-1]]
    moved = frames[:2] + [frames[2] + b"a", b"b", frames[-1]]
    for bad in (merged, moved):
        with pytest.raises(P.ProtocolError, match="signature"):
            codec.decode(bad)
    signer = P.FrameSigner(b"k" * 32)
    raw = signer.sign([b"head", b"buf"])
    assert P.FrameSigner(b"k" * 32).verify(raw) == [b"head", b"buf"]
    with pytest.raises(P.ProtocolError):
        P.FrameSigner(b"k" * 32).verify([b"headbuf", *raw[2:]])
    with pytest.raises(P.ProtocolError):        # a DDict frame cannot pass for a message
        codec.decode([P.REQ, raw[-1], raw[-2], b"head", b"buf"])
