"""The agent session, one transition at a time (the fake-link tests run them together)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest

from edge_agent.codec import apply_delta, read_header
from edge_agent.errors import Fenced, LocalProtocolError
from edge_agent.protocol import (
    Acked,
    AckedState,
    AgentConfig,
    AgentDevice,
    AgentJobSession,
    Completed,
    HandoverRequested,
    Ignored,
    Incoming,
    JobIdentity,
    NeedsFull,
    Offered,
    Outgoing,
    PendingSnapshot,
    Phase,
    Priority,
    Reassembly,
    Rejected,
    Stopped,
    Synced,
    TakenOver,
    TopicNamespace,
    TransferAbandoned,
    decode,
    decode_incoming,
    encode,
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
from edge_agent.state import state_hash

NS = TopicNamespace()
D, J = "gw-1", "j1"
CONFIG = AgentConfig(
    max_message=300,
    timeout_floor=5.0,
    timeout_max=40.0,
    ack_timeout_factor=2.0,
    default_link_rate=1000.0,
)
IDENTITY = JobIdentity({"kind": "toy"}, "sha256:m", 7, 100)


# Incompressible tokens, so that payloads really are split into several chunks; a state
# with more tokens extends the same sequence (the codec sends only the new slice).
_TOKENS = np.random.default_rng(7).integers(0, 2**31, 100_000, dtype=np.int32)


def state(n: int, kv: int = 4) -> dict[str, Any]:
    return {
        "tokens": _TOKENS[:n].copy(),
        "kv": np.full((2, n, kv), n, dtype=np.float16),
        "h": np.float32(n),
        "meta": {"n": n},
    }


def stripped(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k != "kv"}


def session(**kw: Any) -> AgentJobSession:
    return AgentJobSession(
        AgentDevice(D, "run-1"), J, IDENTITY, derivable={"kv"}, config=CONFIG, **kw
    )


def to_agent(msg: Message) -> Incoming:
    topic = NS.ctl(D, J) if isinstance(msg, Ctl) else NS.ack(D, J)
    return decode_incoming(NS, topic, encode(msg))


def msgs(items: list[Any]) -> list[Message]:
    return [decode(i.payload, D, i.job) for i in items if isinstance(i, Outgoing)]


def events(items: list[Any]) -> list[Any]:
    return [i for i in items if not isinstance(i, Outgoing)]


def synced(seq: int | None = None, h: bytes | None = None, **kw: Any) -> AgentJobSession:
    s = session(**kw)
    s.connected(0.0)
    s.receive(to_agent(Sync(D, J, s.epoch, "edge", seq, h)), 0.0)
    assert s.phase is Phase.READY
    return s


def offered(items: list[Any]) -> Offered:
    (o,) = [i for i in items if isinstance(i, Offered)]
    return o


def reassemble(items: list[Any]) -> bytes:
    snaps = [m for m in msgs(items) if isinstance(m, Snap)]
    r = Reassembly(snaps[0])
    for s in snaps[1:]:
        r.add(s)
    return r.payload()


def acked(s: AgentJobSession, items: list[Any]) -> list[Any]:
    o = offered(items)
    return s.receive(to_agent(Ack(D, J, s.epoch, o.seq, o.state_hash)), 1.0)


def test_birth_first_and_no_snapshot_before_the_sync() -> None:
    s = session(step=12)
    assert s.phase is Phase.DISCONNECTED and not s.can_offer
    (birth,) = msgs(s.connected(0.0))
    assert birth == Birth(D, J, 1, "run-1", {"kind": "toy"}, "sha256:m", 7, None, None, 12, 100)
    assert s.phase is Phase.SYNCING and not s.can_offer
    with pytest.raises(LocalProtocolError, match="not synced"):
        s.offer(state(3), 3, 0.0)
    items = s.receive(to_agent(Sync(D, J, 1, "edge", None, None)), 0.5)
    assert events(items) == [Synced(1, None, None, False)] and s.can_offer


def test_first_offer_is_full_without_derivables_then_deltas_on_the_acked_state() -> None:
    s = synced()
    s1 = state(100)
    items = s.offer(s1, 100, 1.0)
    o = offered(items)
    assert items[0] is o  # journal before publishing the chunks
    assert (o.seq, o.base_seq, o.step, o.final) == (1, None, 100, False)
    assert o.state_hash == state_hash(stripped(s1))
    outs = [i for i in items if isinstance(i, Outgoing)]
    assert len(outs) > 1 and all(i.priority is Priority.FULL for i in outs)
    assert all(len(i.payload) <= CONFIG.max_message for i in outs)
    payload = reassemble(items)
    assert payload == o.payload
    assert state_hash(apply_delta(None, payload)) == state_hash(stripped(s1))
    with pytest.raises(LocalProtocolError, match="in flight"):
        s.offer(state(11), 11, 1.0)
    # acks for the wrong hash, the wrong seq or the wrong epoch are ignored
    for bad in [
        Ack(D, J, 1, 1, bytes(16)),
        Ack(D, J, 1, 2, o.state_hash),
        Ack(D, J, 2, 1, o.state_hash),
    ]:
        assert s.receive(to_agent(bad), 1.0) == []
    (ack,) = acked(s, items)
    assert isinstance(ack, Acked) and (ack.seq, ack.state_hash) == (1, o.state_hash)
    assert state_hash(ack.state) == o.state_hash and "kv" not in ack.state
    assert (s.acked_seq, s.acked_hash) == (1, o.state_hash) and s.can_offer
    items = s.offer(state(11), 11, 2.0, include_derivable=True)
    o2 = offered(items)
    assert (o2.seq, o2.base_seq) == (2, 1)
    assert read_header(o2.payload).base_hash == o.state_hash  # invariant 1
    assert all(i.priority is Priority.DELTA for i in items if isinstance(i, Outgoing))
    assert o2.state_hash == state_hash(state(11))  # this one carries the kv cache


def test_the_session_keeps_no_offered_state() -> None:
    """Besides the payload in flight it holds the acked base, rebuilt from the payload."""
    s = synced()
    s1 = state(50)
    probe = weakref.ref(s1["tokens"])
    items = s.offer(s1, 50, 0.0)
    del s1
    gc.collect()
    assert probe() is None  # not kept while in flight
    acked(s, items)
    gc.collect()
    assert probe() is None  # nor after the ack: the base is rebuilt from the payload
    assert s.acked is not None and s.acked.state["tokens"].shape == (50,)


def test_ack_timeout_scales_with_size_and_link_rate_then_backs_off() -> None:
    s = synced()
    items = s.offer(state(200), 200, 100.0)
    size = offered(items).size
    expected = 100.0 + 5.0 + 2.0 * size / 1000.0
    assert s.next_deadline == pytest.approx(expected)
    assert s.tick(expected - 0.01) == []
    (q,) = msgs(s.tick(expected))
    assert q == Query(D, J, 1, 1, len([i for i in items if isinstance(i, Outgoing)]))
    waits = []
    for _ in range(5):
        deadline = s.next_deadline
        assert deadline is not None
        waits.append(deadline)
        assert isinstance(msgs(s.tick(deadline))[0], Query)
    gaps = [b - a for a, b in zip([expected, *waits], waits, strict=False)]
    assert gaps == pytest.approx([10.0, 20.0, 40.0, 40.0, 40.0])  # doubling from the floor, capped
    s2 = synced()
    s2.set_link_rate(100_000.0)
    s2.offer(state(200), 200, 100.0)
    assert s2.next_deadline == pytest.approx(100.0 + 5.0 + 2.0 * size / 100_000.0)
    with pytest.raises(LocalProtocolError):
        s2.set_link_rate(0.0)


def test_need_resends_only_the_missing_chunks() -> None:
    s = synced()
    items = s.offer(state(400), 400, 0.0)
    count = len([i for i in items if isinstance(i, Outgoing)])
    assert count >= 5
    resent = msgs(s.receive(to_agent(Need(D, J, 1, 1, ((1, 2), (3, count + 10)))), 1.0))
    assert [m.index for m in resent] == [1, *range(3, count)]  # type: ignore[union-attr]
    assert s.receive(to_agent(Need(D, J, 1, 2, ((0, 1),))), 1.0) == []  # another seq


@pytest.mark.parametrize("reason", ["base", "corrupt", "hash"])
def test_nack_means_a_full_snapshot(reason: str) -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    items = s.offer(state(6), 6, 1.0)
    nack = s.receive(to_agent(Nack(D, J, 1, 2, reason, 9, bytes(16))), 2.0)  # type: ignore[arg-type]
    assert events(nack) == [
        TransferAbandoned(2, f"nack {reason}"),
        NeedsFull(f"nack {reason} for 2"),
    ]
    assert s.acked is None and s.can_offer and s.next_seq == 10  # past the server's seq
    o = offered(s.offer(state(7), 7, 3.0))
    assert (o.seq, o.base_seq) == (10, None)
    assert offered(items).seq == 2


def test_nack_for_something_else_is_ignored() -> None:
    s = synced()
    s.offer(state(5), 5, 0.0)
    assert s.receive(to_agent(Nack(D, J, 1, 7, "corrupt", None, None)), 1.0) == []
    assert s.in_flight_seq == 1
    assert events(s.receive(to_agent(Nack(D, J, 1, 0, "invalid", None, None)), 1.0)) == [
        Rejected(0, "invalid")
    ]
    assert s.in_flight_seq == 1


def test_nack_unknown_means_a_new_birth() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    s.offer(state(6), 6, 1.0)
    items = s.receive(to_agent(Nack(D, J, 1, 2, "unknown", None, None)), 2.0)
    assert isinstance(msgs(items)[-1], Birth) and s.phase is Phase.SYNCING
    assert s.acked is None


def test_nack_too_large_keeps_the_base() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    s.offer(state(6), 6, 1.0, include_derivable=True)
    items = s.receive(to_agent(Nack(D, J, 1, 2, "too-large", 1, bytes(16))), 2.0)
    assert Rejected(2, "too-large") in items and s.acked_seq == 1 and s.can_offer


@pytest.mark.parametrize(
    "msg",
    [
        Ctl(D, J, 2, "server", "run", 0),
        Ctl(D, J, 1, "server", "run", 0),  # an equal epoch counts
        Sync(D, J, 2, "server", None, None),
        Nack(D, J, 2, 1, "fenced", None, None),
    ],
)
def test_fenced_means_silence_forever(msg: Message) -> None:
    s = synced()
    s.offer(state(5), 5, 0.0)
    items = s.receive(to_agent(msg), 1.0)
    taken = TakenOver(msg.epoch, False, msg.TYPE)  # type: ignore[union-attr,arg-type]
    assert events(items) == [TransferAbandoned(1, "the job is closed"), taken]  # via what told it
    assert s.closed
    assert s.tick(1e9) == [] and s.connected(2.0) == [] and s.disconnected(3.0) == []
    assert s.receive(to_agent(Ack(D, J, 1, 1, bytes(16))), 4.0) == []
    with pytest.raises(Fenced):
        s.offer(state(6), 6, 5.0)
    with pytest.raises(Fenced):
        s.finish(state(6), 6, 5.0)


def test_stale_control_is_refused() -> None:
    s = synced(epoch=3)
    for msg in [
        Ctl(D, J, 2, "server", "run", 0),
        Ctl(D, J, 4, "edge", "run", 0),
        Nack(D, J, 3, 0, "fenced", None, None),
    ]:
        (r,) = s.receive(to_agent(msg), 0.0)
        assert isinstance(r, Ignored)
    assert not s.closed
    assert s.receive(to_agent(Ctl(D, J, 3, "edge", "run", 0)), 0.0) == []


def test_message_for_another_job_is_refused() -> None:
    s = synced()
    other = Incoming(NS.parse(NS.ack(D, "j2")), Ack(D, "j2", 1, 1, bytes(16)))
    assert [type(e) for e in s.receive(other, 0.0)] == [Ignored]


def test_reconnect_queries_the_transfer_in_flight() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    a = s.acked
    assert a is not None
    items = s.offer(state(6), 6, 1.0)
    assert s.disconnected(2.0) == [] and s.next_deadline is None and s.tick(1e9) == []
    assert isinstance(msgs(s.connected(3.0))[0], Birth)
    n = len(msgs(items))
    out = s.receive(to_agent(Sync(D, J, 1, "edge", a.seq, a.hash)), 4.0)
    assert msgs(out) == [Query(D, J, 1, 2, n)]
    assert s.receive(to_agent(Sync(D, J, 1, "edge", None, None)), 5.0) == []  # a late SYNC


def test_sync_naming_the_transfer_in_flight_adopts_it() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    o = offered(s.offer(state(6), 6, 1.0))
    s.disconnected(2.0)
    s.connected(3.0)
    items = s.receive(to_agent(Sync(D, J, 1, "edge", o.seq, o.state_hash)), 4.0)
    assert events(items)[0] == Synced(1, o.seq, o.state_hash, True)
    assert isinstance(events(items)[1], Acked) and s.acked_seq == 2 and s.can_offer


def test_sync_naming_another_state_drops_the_base_and_a_delta_in_flight() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    s.offer(state(6), 6, 1.0)
    s.disconnected(2.0)
    s.connected(3.0)
    items = s.receive(to_agent(Sync(D, J, 1, "edge", 40, bytes(16))), 4.0)
    kinds = [type(e) for e in events(items)]
    assert kinds == [Synced, NeedsFull, TransferAbandoned]
    assert s.acked is None and s.next_seq == 41 and s.can_offer


def test_a_full_transfer_survives_a_sync_unless_the_server_is_past_it() -> None:
    s = synced()
    s.offer(state(5), 5, 0.0)
    s.disconnected(1.0)
    s.connected(2.0)
    assert isinstance(msgs(s.receive(to_agent(Sync(D, J, 1, "edge", None, None)), 3.0))[0], Query)
    s.disconnected(4.0)
    s.connected(5.0)
    items = s.receive(to_agent(Sync(D, J, 1, "edge", 1, bytes(16))), 6.0)
    assert [type(e) for e in events(items)] == [Synced, TransferAbandoned]


def test_birth_is_retried_with_back_off() -> None:
    s = session()
    s.connected(0.0)
    times = []
    for _ in range(4):
        t = s.next_deadline
        assert t is not None
        times.append(t)
        assert isinstance(msgs(s.tick(t))[0], Birth)
    assert times == [5.0, 15.0, 35.0, 75.0]


@pytest.mark.parametrize("reply", ["ack", "nack"])
def test_a_reply_to_the_transfer_while_syncing_keeps_the_birth_retried(reply: str) -> None:
    """Found by the fault drill (a broker SIGKILLed before it saved its sessions): after a
    reconnect, the BIRTH is lost (the server's subscriptions are not back yet), and then
    the server answers the snapshot that was in flight when the link went (paho resent it
    on reconnect). The ack (or nack) is settled, but the session still waits for a SYNC:
    the BIRTH must still be retried, else the job never offers a snapshot again."""
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    o = offered(s.offer(state(6), 6, 1.0))
    s.disconnected(2.0)
    assert isinstance(msgs(s.connected(3.0))[0], Birth)  # lost on its way
    if reply == "ack":
        items = s.receive(to_agent(Ack(D, J, 1, o.seq, o.state_hash)), 4.0)
        assert [type(e) for e in events(items)] == [Acked] and s.acked_seq == o.seq
    else:
        items = s.receive(to_agent(Nack(D, J, 1, o.seq, "corrupt", None, None)), 4.0)
        assert TransferAbandoned in [type(e) for e in events(items)]
    assert s.phase is Phase.SYNCING and not s.can_offer
    t = s.next_deadline
    assert t is not None and t <= 3.0 + CONFIG.timeout_floor  # the birth's own deadline
    (birth,) = msgs(s.tick(t))
    assert isinstance(birth, Birth)
    assert birth.acked_seq == s.acked_seq
    s.receive(to_agent(Sync(D, J, 1, "edge", s.acked_seq, s.acked_hash)), t + 0.5)
    assert s.phase is Phase.READY and s.can_offer


def test_restore_from_the_journal() -> None:
    s = synced()
    ack = acked(s, s.offer(state(5), 5, 0.0))[0]
    o = offered(s.offer(state(6), 6, 1.0))
    # a new process: the journal gave it the acked state and the pending snapshot
    r = session(epoch=1, next_seq=o.seq + 1, acked=ack.acked_state(), pending=o.pending())
    assert r.in_flight_seq == 2 and r.acked_seq == 1
    birth = msgs(r.connected(10.0))[0]
    assert isinstance(birth, Birth) and (birth.acked_seq, birth.acked_hash) == (1, ack.state_hash)
    out = msgs(r.receive(to_agent(Sync(D, J, 1, "edge", 1, ack.state_hash)), 11.0))
    assert isinstance(out[0], Query) and out[0].seq == 2
    with pytest.raises(LocalProtocolError, match="journal Acked before Offered"):
        session(next_seq=5, pending=PendingSnapshot(3, 2, bytes(16), 0, o.payload))
    with pytest.raises(LocalProtocolError):
        session(next_seq=2, pending=o.pending())
    with pytest.raises(LocalProtocolError):
        session(next_seq=1, acked=AckedState(1, bytes(16), {}))


def test_finish_sends_the_final_snapshot_then_done() -> None:
    s = synced()
    first = s.offer(state(5), 5, 0.0)
    assert events(s.finish(state(9), 9, 1.0)) == []  # waits for the one in flight
    assert not s.can_offer
    items = acked(s, first)
    final = offered(items)
    assert final.final and final.state_hash == state_hash(stripped(state(9)))
    items = acked(s, items)
    assert msgs(items) == [Done(D, J, 1, final.seq, 9)]
    t = s.next_deadline
    assert t is not None and msgs(s.tick(t)) == [Done(D, J, 1, final.seq, 9)]  # retried
    items = s.receive(to_agent(Ctl(D, J, 1, "edge", "stop", 0)), 2.0)
    assert events(items) == [Completed(final.seq, 9)] and s.closed


def test_finish_on_an_acked_state_sends_done_directly() -> None:
    s = synced()
    acked(s, s.offer(state(9), 9, 0.0))
    assert msgs(s.finish(state(9), 9, 1.0)) == [Done(D, J, 1, 1, 9)]
    with pytest.raises(LocalProtocolError, match="already finishing"):
        s.hand_over(state(9), 9, 1.0)
    # the server lost it: it answers base; the final goes again, in full
    items = s.receive(to_agent(Nack(D, J, 1, 1, "base", None, None)), 2.0)
    o = offered(items)
    assert o.final and o.base_seq is None and s.acked is None


def test_done_is_resent_after_a_reconnect() -> None:
    s = synced()
    acked(s, s.offer(state(9), 9, 0.0))
    s.finish(state(9), 9, 1.0)
    s.disconnected(2.0)
    s.connected(3.0)
    items = s.receive(to_agent(Sync(D, J, 1, "edge", 1, state_hash(stripped(state(9))))), 4.0)
    assert msgs(items) == [Done(D, J, 1, 1, 9)]


def test_live_handover() -> None:
    s = synced()
    acked(s, s.offer(state(5), 5, 0.0))
    items = s.receive(to_agent(Ctl(D, J, 1, "edge", "handover", 0)), 1.0)
    assert events(items) == [HandoverRequested(1)]
    assert s.receive(to_agent(Ctl(D, J, 1, "edge", "handover", 0)), 1.5) == []  # once
    items = s.hand_over(state(7), 7, 2.0)
    o = offered(items)
    assert o.final and o.state_hash == state_hash(state(7))  # derivable entries included
    items = acked(s, items)
    assert msgs(items) == [Release(D, J, 1, o.seq, 7)]
    items = s.receive(to_agent(Ctl(D, J, 2, "server", "run", 0)), 3.0)
    assert events(items) == [TakenOver(2, True)]


def test_ctl_stop_stops_a_running_job() -> None:
    s = synced()
    s.offer(state(5), 5, 0.0)
    items = s.receive(to_agent(Ctl(D, J, 1, "edge", "stop", 0)), 1.0)
    assert events(items) == [TransferAbandoned(1, "the job is closed"), Stopped(1)]
    with pytest.raises(LocalProtocolError, match="closed"):
        s.offer(state(6), 6, 2.0)


def test_config_and_ids_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        AgentConfig(timeout_floor=0.0)
    with pytest.raises(LocalProtocolError):
        AgentConfig(timeout_floor=10.0, timeout_max=5.0)
    with pytest.raises(LocalProtocolError):
        AgentConfig(default_link_rate=0.0)
    with pytest.raises(LocalProtocolError):
        session(epoch=0)
    with pytest.raises(LocalProtocolError):
        AgentJobSession(AgentDevice(D, "run-1"), "j 1", IDENTITY)
    with pytest.raises(LocalProtocolError):
        AgentDevice("gw/1", "run-1")


def test_device_messages() -> None:
    dev = AgentDevice(D, "run-1")
    on = dev.online(2.0)
    assert (on.topic, on.retain, on.qos) == (NS.status(D), True, 1)
    hb = dev.heartbeat(3.0, {J: (10, 2), "j2": (0, None)})
    assert (hb.topic, hb.qos, hb.retain) == (NS.hb(D), 0, False)
    assert decode(hb.payload, D).jobs == {J: (10, 2), "j2": (0, None)}  # type: ignore[union-attr]
    assert [x.filter for x in dev.subscriptions()] == [
        f"{NS.prefix}/{D}/+/ack",
        f"{NS.prefix}/{D}/+/ctl",
    ]


def test_nack_base_naming_what_we_hold() -> None:
    s = synced()
    first = acked(s, s.offer(state(5), 5, 0.0))[0]
    o = offered(s.offer(state(6), 6, 1.0))
    # the server says it holds our snapshot in flight: adopt it
    items = s.receive(to_agent(Nack(D, J, 1, o.seq, "base", o.seq, o.state_hash)), 2.0)
    assert [type(e) for e in events(items)] == [Acked] and s.acked_seq == o.seq
    # the server says it holds our acknowledged base: keep it, the next one is a delta again
    o3 = offered(s.offer(state(7), 7, 3.0))
    a = s.acked
    assert a is not None and first.seq == 1
    items = s.receive(to_agent(Nack(D, J, 1, o3.seq, "base", a.seq, a.hash)), 4.0)
    assert [type(e) for e in events(items)] == [TransferAbandoned]
    assert s.acked is a and offered(s.offer(state(8), 8, 5.0)).base_seq == a.seq


def test_too_large_on_a_regular_snapshot_keeps_a_pending_final() -> None:
    s = synced()
    s.offer(state(5), 5, 0.0)
    s.finish(state(9), 9, 1.0)
    items = s.receive(to_agent(Nack(D, J, 1, 1, "too-large", None, None)), 2.0)
    assert Rejected(1, "too-large") in items
    assert offered(items).final  # the final goes out next
    items = s.receive(to_agent(Nack(D, J, 1, offered(items).seq, "too-large", None, None)), 3.0)
    assert [type(e) for e in events(items)] == [TransferAbandoned, Rejected]
    assert s.can_offer  # the final was given up; the runner decides what to do


def test_an_identity_that_cannot_make_a_birth_fails_early() -> None:
    import datetime

    bad = JobIdentity({"when": datetime.date(2024, 1, 1)}, "sha256:m", 0)
    with pytest.raises(LocalProtocolError, match="plain values"):
        AgentJobSession(AgentDevice(D, "run-1"), J, bad)
    with pytest.raises(LocalProtocolError):
        AgentJobSession(AgentDevice(D, "run-1"), J, JobIdentity({}, "has space", 0))


def sent_by(server: Any, msg: Message) -> list[Message]:
    effects = server.receive(decode_incoming(NS, NS.state(D, J), encode(msg)), 0.0)
    return [decode(e.payload, D, J) for e in effects if isinstance(e, Outgoing)]


def test_a_pending_snapshot_cut_anew_after_a_restart_still_completes() -> None:
    from edge_agent.protocol import ServerJobSession

    server = ServerJobSession(D, J)
    s = synced()
    o = offered(s.offer(state(300), 300, 0.0))
    server.receive(
        decode_incoming(
            NS,
            NS.state(D, J),
            encode(Birth(D, J, 1, "run-1", {"kind": "toy"}, "sha256:m", 7, None, None, 0, 100)),
        ),
        0.0,
    )
    (first,) = s.receive(to_agent(Need(D, J, 1, o.seq, ((0, 1),))), 0.5)  # chunk 0 only
    assert isinstance(first, Outgoing)
    server.receive(decode_incoming(NS, first.topic, first.payload), 0.0)
    assert server.transfer_seq == o.seq
    # restart with a larger max_message: fewer, larger chunks
    big = AgentConfig(max_message=2000, timeout_floor=5.0)
    r = AgentJobSession(
        AgentDevice(D, "run-2"),
        J,
        IDENTITY,
        derivable={"kv"},
        config=big,
        next_seq=o.seq + 1,
        pending=o.pending(),
    )
    r.connected(1.0)
    (query,) = msgs(r.receive(to_agent(Sync(D, J, 1, "edge", None, None)), 2.0))
    (need,) = sent_by(server, query)
    assert isinstance(need, Need) and need.missing == ((0, query.count),)  # type: ignore[union-attr]
    effects: list[Any] = []
    for out in r.receive(to_agent(need), 3.0):
        assert isinstance(out, Outgoing)
        effects = server.receive(decode_incoming(NS, out.topic, out.payload), 3.0)
    commit = effects[-1]
    assert commit.payload == o.payload


def test_reserved_seqs_are_never_reused() -> None:
    s = synced()
    first = offered(s.offer(state(3), 3, 0.0))
    acked(s, [first])
    local = s.reserve_seq()
    assert local == first.seq + 1 and s.next_seq == local + 1
    second = offered(s.offer(state(5), 5, 2.0))
    assert second.seq == local + 1 and second.base_seq == first.seq
    s.receive(to_agent(Ctl(D, J, 2, "server", "run", 0)), 3.0)
    with pytest.raises(Fenced):
        s.reserve_seq()
