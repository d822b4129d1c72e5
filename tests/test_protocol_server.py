"""The server session, one transition at a time (the fake-link tests run them together)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.codec import encode_delta
from edge_agent.errors import (
    BaseMismatch,
    Fenced,
    LocalProtocolError,
    MalformedMessage,
    PayloadCorrupt,
    StateHashMismatch,
    StoreError,
    TopicMismatch,
)
from edge_agent.protocol import (
    Commit,
    Incoming,
    Outgoing,
    RecordBirth,
    RecordCompleted,
    RecordOwnership,
    ServerJobSession,
    TopicNamespace,
    decode,
    decode_incoming,
    encode,
    split_payload,
)
from edge_agent.protocol.messages import (
    Ack,
    Birth,
    Ctl,
    Done,
    Message,
    Nack,
    Need,
    Query,
    Release,
    Snap,
    Sync,
)
from edge_agent.protocol.server import Refused
from edge_agent.state import state_hash

NS = TopicNamespace()
D, J = "gw-1", "j1"
S1 = {"x": np.arange(100, dtype=np.float32), "n": 1}
S2 = {"x": np.arange(101, dtype=np.float32), "n": 2}
S3 = {"x": np.arange(102, dtype=np.float32), "n": 3, "y": np.ones((2, 2))}


def birth(
    epoch: int = 1, *, session: str = "run-1", model: str = "sha256:m", device: str = D
) -> Birth:
    return Birth(device, J, epoch, session, {"kind": "toy"}, model, 0, None, None, 0, 10)


def incoming(msg: Message, topic_device: str | None = None) -> Incoming:
    d = topic_device or msg.device
    return decode_incoming(NS, NS.state(d, J), encode(msg))


def sent(effects: list[Any]) -> list[Message]:
    return [decode(e.payload, D, J) for e in effects if isinstance(e, Outgoing)]


def chunks(
    payload: bytes,
    seq: int,
    base_seq: int | None,
    *,
    epoch: int = 1,
    step: int = 5,
    max_message: int = 200,
) -> list[Snap]:
    return split_payload(
        payload,
        device=D,
        job=J,
        epoch=epoch,
        seq=seq,
        base_seq=base_seq,
        step=step,
        max_message=max_message,
    )


def feed(s: ServerJobSession, snaps: list[Snap]) -> list[Any]:
    out: list[Any] = []
    for snap in snaps:
        out = s.receive(incoming(snap), 0.0)
    return out


def born() -> ServerJobSession:
    s = ServerJobSession(D, J)
    s.receive(incoming(birth()), 0.0)
    return s


def committed(s: ServerJobSession, payload: bytes, seq: int, base_seq: int | None) -> list[Any]:
    effects = feed(s, chunks(payload, seq, base_seq))
    assert isinstance(effects[-1], Commit)
    return s.commit_succeeded(seq)


def test_nothing_before_a_birth() -> None:
    s = ServerJobSession(D, J)
    effects = s.receive(incoming(Query(D, J, 1, 1, 1)), 0.0)
    assert isinstance(effects[0], Refused)
    assert sent(effects) == [Nack(D, J, 1, 1, "unknown", None, None)]
    assert not s.born


def test_birth_records_the_job_and_syncs() -> None:
    s = ServerJobSession(D, J)
    effects = s.receive(incoming(birth()), 0.0)
    assert isinstance(effects[0], RecordBirth) and effects[0].epoch == 1
    assert sent(effects) == [Sync(D, J, 1, "edge", None, None)]
    assert [type(e) for e in s.receive(incoming(birth()), 0.0)] == [Outgoing]  # same: no record
    again = s.receive(incoming(birth(session="run-2")), 0.0)
    assert isinstance(again[0], RecordBirth) and again[0].birth.session == "run-2"
    other = s.receive(incoming(birth(model="sha256:other")), 0.0)
    assert isinstance(other[0], Refused)
    assert sent(other) == [Nack(D, J, 1, 0, "invalid", None, None)]
    assert s.birth is not None and s.birth.model_hash == "sha256:m"


def test_full_then_delta_store_then_ack() -> None:
    s = born()
    p1 = encode_delta(None, S1)
    effects = feed(s, chunks(p1, 1, None))
    commit = effects[-1]
    assert isinstance(commit, Commit) and commit.full and commit.payload == p1
    assert s.current_seq is None  # nothing changes before the caller reports
    with pytest.raises(LocalProtocolError, match="unreported"):
        s.receive(incoming(Query(D, J, 1, 1, 1)), 0.0)
    with pytest.raises(LocalProtocolError):
        s.take_over(0.0)
    with pytest.raises(LocalProtocolError):
        s.commit_succeeded(2)
    new = commit.apply(None)
    assert state_hash(new) == commit.state_hash == state_hash(S1)
    h1 = state_hash(S1)
    assert sent(s.commit_succeeded(1)) == [Ack(D, J, 1, 1, h1)]
    assert (s.current_seq, s.current_hash, s.step) == (1, h1, 5)
    p2 = encode_delta(S1, S2)
    c2 = feed(s, chunks(p2, 2, 1))[-1]
    assert isinstance(c2, Commit) and c2.base_hash == h1 and not c2.full
    assert state_hash(c2.apply(new)) == state_hash(S2)
    assert sent(s.commit_succeeded(2)) == [Ack(D, J, 1, 2, state_hash(S2))]


def test_duplicates_and_late_chunks() -> None:
    s = born()
    p1 = encode_delta(None, S1)
    snaps = chunks(p1, 1, None)
    committed(s, p1, 1, None)
    assert sent(s.receive(incoming(snaps[0]), 0.0)) == [Ack(D, J, 1, 1, state_hash(S1))]
    p2 = encode_delta(S1, S2)
    committed(s, p2, 2, 1)
    assert s.receive(incoming(snaps[1]), 0.0) == []  # seq 1 < current 2: late, ignored
    assert s.current_seq == 2


def test_delta_on_another_base_is_nacked_with_what_we_have() -> None:
    s = born()
    committed(s, encode_delta(None, S1), 1, None)
    h1 = state_hash(S1)
    effects = feed(s, chunks(encode_delta(S2, S3), 3, 2))  # made on S2, which we never had
    assert isinstance(effects[0], Refused) and isinstance(effects[0].error, BaseMismatch)
    assert sent(effects) == [Nack(D, J, 1, 3, "base", 1, h1)]
    # the right base hash with a wrong base_seq is refused too
    effects = feed(s, chunks(encode_delta(S1, S3), 4, 3))
    assert sent(effects)[0].reason == "base"  # type: ignore[union-attr]
    # a full payload sent as a delta (base_seq set) does not match its own header
    effects = feed(s, chunks(encode_delta(None, S3), 5, 1))
    assert sent(effects)[0].reason == "corrupt"  # type: ignore[union-attr]
    assert s.current_seq == 1


def test_corrupt_payload_and_failed_commits() -> None:
    s = born()
    payload = bytearray(encode_delta(None, S1))
    payload[20] ^= 0xFF
    effects = feed(s, chunks(bytes(payload), 1, None))
    assert isinstance(effects[0].error, PayloadCorrupt)
    assert sent(effects) == [Nack(D, J, 1, 1, "corrupt", None, None)]
    p = encode_delta(None, S1)
    for error, reason in [
        (StateHashMismatch("x"), "hash"),
        (BaseMismatch("x"), "base"),
        (PayloadCorrupt("x"), "corrupt"),
    ]:
        feed(s, chunks(p, 2, None))
        assert sent(s.commit_failed(2, error)) == [Nack(D, J, 1, 2, reason, None, None)]
        assert s.current_seq is None
    feed(s, chunks(p, 3, None))
    assert s.commit_failed(3, StoreError("disk full")) == []  # no answer: the agent will ask
    assert sent(s.receive(incoming(Query(D, J, 1, 3, 2)), 0.0)) == [Need(D, J, 1, 3, ((0, 2),))]


def test_commit_apply_verifies_the_hash() -> None:
    p = encode_delta(None, S1)
    c = Commit(1, None, 0, 1, None, state_hash(S2), p)
    with pytest.raises(StateHashMismatch):
        c.apply(None)


def test_too_large_and_bad_chunks() -> None:
    s = ServerJobSession(D, J, max_transfer=100)
    s.receive(incoming(birth()), 0.0)
    effects = s.receive(incoming(Snap(D, J, 1, 1, None, 0, 0, 2, 1000, bytes(500))), 0.0)
    assert sent(effects) == [Nack(D, J, 1, 1, "too-large", None, None)]
    s.receive(incoming(Snap(D, J, 1, 2, None, 0, 0, 2, 10, bytes(5))), 0.0)
    effects = s.receive(incoming(Snap(D, J, 1, 2, None, 0, 1, 3, 11, bytes(4))), 0.0)
    assert sent(effects) == [Nack(D, J, 1, 2, "invalid", None, None)]  # seq 2 is another size?
    assert s.transfer_seq == 2 and s.transfer_bytes == 5
    # the same payload cut into other chunks (an agent restarted with another max_message)
    assert s.receive(incoming(Snap(D, J, 1, 2, None, 0, 1, 3, 10, bytes(3))), 0.0) == []
    assert s.transfer_seq == 2 and s.transfer_bytes == 3


def test_newer_transfer_replaces_older() -> None:
    s = born()
    p1, p3 = encode_delta(None, S1), encode_delta(None, S3)
    a, b = chunks(p1, 1, None), chunks(p3, 3, None)
    s.receive(incoming(a[0]), 0.0)
    s.receive(incoming(b[0]), 0.0)
    assert s.transfer_seq == 3
    assert s.receive(incoming(a[1]), 0.0) == []  # the abandoned one is ignored
    assert s.transfer_seq == 3
    assert isinstance(feed(s, b[1:])[-1], Commit)


def test_query() -> None:
    s = born()
    p1 = encode_delta(None, S1)
    committed(s, p1, 1, None)
    h1 = state_hash(S1)
    assert sent(s.receive(incoming(Query(D, J, 1, 1, 3)), 0.0)) == [Ack(D, J, 1, 1, h1)]
    p2 = encode_delta(S1, S2)
    c = chunks(p2, 3, 1, max_message=45)
    assert len(c) >= 3
    s.receive(incoming(c[1]), 0.0)
    n = len(c)
    assert sent(s.receive(incoming(Query(D, J, 1, 3, n)), 0.0)) == [
        Need(D, J, 1, 3, ((0, 1), (2, n)))
    ]
    assert sent(s.receive(incoming(Query(D, J, 1, 4, 7)), 0.0)) == [Need(D, J, 1, 4, ((0, 7),))]
    # a query with another count: the agent cut the payload anew; start over
    assert sent(s.receive(incoming(Query(D, J, 1, 3, n + 1)), 0.0)) == [
        Need(D, J, 1, 3, ((0, n + 1),))
    ]
    assert s.transfer_seq is None
    committed(s, encode_delta(S1, S3), 5, 1)
    # a query for something older than what we hold: we are past it
    assert sent(s.receive(incoming(Query(D, J, 1, 4, 2)), 0.0)) == [
        Nack(D, J, 1, 4, "base", 5, state_hash(S3))
    ]


def test_epochs() -> None:
    s = ServerJobSession(D, J, epoch=3, birth=birth(3))
    old = s.receive(incoming(Query(D, J, 2, 1, 1)), 0.0)
    assert isinstance(old[0].error, Fenced)
    assert sent(old) == [Nack(D, J, 3, 1, "fenced", None, None)]
    new = s.receive(incoming(Query(D, J, 4, 1, 1)), 0.0)
    assert sent(new) == [Nack(D, J, 3, 1, "invalid", None, None)]
    odd = s.receive(incoming(birth(2)), 0.0)
    assert isinstance(odd[0], Refused) and sent(odd) == [Sync(D, J, 3, "edge", None, None)]


def test_take_over_fences_everything_after() -> None:
    s = born()
    committed(s, encode_delta(None, S1), 1, None)
    h1 = state_hash(S1)
    effects = s.take_over(42.0)
    assert effects[0] == RecordOwnership(2, "server", "takeover")  # stored before published
    assert isinstance(effects[1], Outgoing) and effects[1].retain
    assert decode(effects[1].payload, D, J) == Ctl(D, J, 2, "server", "run", 42000)
    assert (s.epoch, s.owner) == (2, "server")
    for msg in [
        chunks(encode_delta(S1, S2), 2, 1)[0],
        Query(D, J, 1, 2, 1),
        Done(D, J, 1, 1, 5),
        Release(D, J, 1, 1, 5),
    ]:
        out = s.receive(incoming(msg), 0.0)
        assert isinstance(out[0].error, Fenced)
        assert sent(out) == [Nack(D, J, 2, msg.seq, "fenced", 1, h1)]  # type: ignore[union-attr]
    assert sent(s.receive(incoming(birth()), 0.0)) == [Sync(D, J, 2, "server", 1, h1)]
    assert (s.current_seq, s.current_hash) == (1, h1)
    assert [type(e) for e in s.take_over(43.0)] == [Outgoing]  # idempotent: the CTL again
    retained = s.retained_ctl(44.0)
    assert retained is not None and decode(retained.payload, D, J).owner == "server"  # type: ignore[union-attr]


def test_live_handover_and_release() -> None:
    s = born()
    assert s.retained_ctl(0.0) is None
    committed(s, encode_delta(None, S1), 1, None)
    assert sent(s.request_handover(1.0)) == [Ctl(D, J, 1, "edge", "handover", 1000)]
    assert sent(s.receive(incoming(Release(D, J, 1, 2, 9)), 0.0))[0].reason == "base"  # type: ignore[union-attr]
    committed(s, encode_delta(S1, S3), 2, 1)
    effects = s.receive(incoming(Release(D, J, 1, 2, 9)), 2.0)
    assert effects[0] == RecordOwnership(2, "server", "release")
    assert sent(effects) == [Ctl(D, J, 2, "server", "run", 2000)]
    again = s.receive(incoming(Release(D, J, 1, 2, 9)), 3.0)  # a resend: fenced tells the agent
    assert sent(again)[0].reason == "fenced"  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        s.request_handover(4.0)


def test_done() -> None:
    s = born()
    committed(s, encode_delta(None, S1), 1, None)
    assert sent(s.receive(incoming(Done(D, J, 1, 2, 10)), 0.0))[0].reason == "base"  # type: ignore[union-attr]
    effects = s.receive(incoming(Done(D, J, 1, 1, 10)), 5.0)
    assert effects[0] == RecordCompleted(1, 10)
    assert sent(effects) == [Ctl(D, J, 1, "edge", "stop", 5000)]
    assert s.completed
    assert sent(s.receive(incoming(Done(D, J, 1, 1, 10)), 6.0)) == [
        Ctl(D, J, 1, "edge", "stop", 6000)
    ]
    late = s.receive(incoming(chunks(encode_delta(S1, S2), 2, 1)[0]), 0.0)
    assert isinstance(late[0], Refused) and s.current_seq == 1
    with pytest.raises(LocalProtocolError, match="completed"):
        s.take_over(0.0)
    assert decode(s.retained_ctl(0.0).payload, D, J).request == "stop"  # type: ignore[union-attr]


def test_wrong_device_or_job_is_refused_without_reply() -> None:
    s = born()
    mallory = s.receive(incoming(birth(device="mallory")), 0.0)
    assert len(mallory) == 1 and isinstance(mallory[0].error, TopicMismatch)
    other_job = Query(D, "j2", 1, 1, 1)
    wrong = Incoming(NS.parse(NS.state(D, "j2")), other_job)
    assert [type(e) for e in s.receive(wrong, 0.0)] == [Refused]
    on_ack_topic = Incoming(NS.parse(NS.ack(D, J)), Query(D, J, 1, 1, 1))
    assert [type(e) for e in s.receive(on_ack_topic, 0.0)] == [Refused]
    assert s.birth is not None and s.birth.device == D


def test_undecodable_message_gets_an_invalid_nack() -> None:
    s = born()
    effects = s.receive_invalid(MalformedMessage("bad"))
    assert sent(effects) == [Nack(D, J, 1, 0, "invalid", None, None)]


def test_constructor_checks() -> None:
    for kw in [
        dict(epoch=0),
        dict(owner="cloud"),
        dict(current=(0, bytes(16))),
        dict(current=(1, b"short")),
        dict(max_transfer=0),
    ]:
        with pytest.raises(LocalProtocolError):
            ServerJobSession(D, J, **kw)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ServerJobSession("gw/1", J)
    with pytest.raises(LocalProtocolError, match="no birth"):
        ServerJobSession(D, J).take_over(0.0)
