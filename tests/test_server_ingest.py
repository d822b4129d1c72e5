"""server.ingest with a real SQLite store and a recording publisher (no broker): every
effect of the server session carried out in order, refusals, restarts, take-overs,
hand-overs, completion with outputs, and fuzzed input. The same over Mosquitto is in
tests/test_server_integration.py."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import Fenced, LocalProtocolError, StoreError
from edge_agent.protocol import Ack, Ctl, Nack, Sync, TopicNamespace, encode
from edge_agent.protocol.messages import Heartbeat, Status
from server import metrics
from server.control import MqttJobControl, pending_handovers
from server.ingest import Ingest, StateCache
from server.liveness import Liveness
from server.store import SQLiteStore
from tests.support.server_fakes import (
    DEVICE,
    JOB,
    NS,
    FakeResumer,
    RecordingPublisher,
    birth,
    chain,
    done,
    forged,
    query,
    release,
    snap,
    state_topic,
    wire,
)
from tests.support.sim_device import generate_state


def counter(c: object, **labels: str) -> float:
    m = c.labels(**labels) if labels else c  # type: ignore[attr-defined]
    return float(m._value.get())


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def pub() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def ingest(store: SQLiteStore, pub: RecordingPublisher) -> Iterator[Ingest]:
    i = Ingest(store, pub, liveness=Liveness(store, heartbeat_timeout=30))
    yield i
    i.close()


def send(ingest: Ingest, msg: object, device: str | None = None) -> None:
    ingest.handle(state_topic(msg, device), wire(msg))  # type: ignore[arg-type]


def born(ingest: Ingest, pub: RecordingPublisher, **kw: object) -> None:
    send(ingest, birth(**kw))  # type: ignore[arg-type]
    (sync,) = pub.take()
    assert isinstance(sync, Sync) and sync.seq is None


def commit_chain(ingest: Ingest, pub: RecordingPublisher, steps: list[int]) -> list[bytes]:
    """Send a chain of snapshots (full, then deltas) and check each is acknowledged."""
    hashes = []
    base = None
    for i, (payload, h, _) in enumerate(chain(steps), start=1):
        send(ingest, snap(i, payload, base_seq=base, step=steps[i - 1]))
        (ack,) = pub.take()
        assert isinstance(ack, Ack) and (ack.seq, ack.hash) == (i, h)
        hashes.append(h)
        base = i
    return hashes


# ---------------------------------------------------------------------------------------------


def test_commits_and_acks_a_sequence_of_deltas(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    commits = counter(metrics.COMMITS, kind="delta")
    born(ingest, pub)
    rec = store.get_job(JOB)
    assert rec is not None and (rec.device, rec.epoch, rec.owner) == (DEVICE, 1, "edge")
    assert rec.total_steps == 50
    hashes = commit_chain(ingest, pub, [1, 2, 5, 9])
    rec = store.get_job(JOB)
    assert rec is not None and (rec.seq, rec.state_hash, rec.step) == (4, hashes[-1], 9)
    loaded = store.load_state(JOB)
    assert np.array_equal(loaded.state["tokens"], generate_state(9)["tokens"])
    assert counter(metrics.COMMITS, kind="delta") == commits + 3
    # a duplicate of the newest snapshot is acknowledged again and changes nothing
    payload, _, _ = chain([5, 9])[1]
    send(ingest, snap(4, payload, base_seq=3, step=9))
    assert [type(m) for m in pub.take()] == [Ack]
    assert [s.seq for s in store.snapshots(JOB)][-1] == 4


def test_corrupt_delta_is_nacked_and_the_last_good_state_kept(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1, 2])
    before = store.get_job(JOB)
    nacks = counter(metrics.NACKS, reason="corrupt")
    payload, _, _ = chain([2, 3])[1]
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x40
    send(ingest, snap(3, bytes(bad), base_seq=2, step=3))
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and (nack.seq, nack.reason) == (3, "corrupt")
    assert (nack.have_seq, nack.have_hash) == (2, before.state_hash)  # type: ignore[union-attr]
    assert counter(metrics.NACKS, reason="corrupt") == nacks + 1
    assert store.get_job(JOB) == before
    # the good delta still applies on the kept state
    send(ingest, snap(4, payload, base_seq=2, step=3))
    (ack,) = pub.take()
    assert isinstance(ack, Ack) and ack.seq == 4


def test_a_delta_on_another_base_is_nacked_base(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1, 2])
    payload, _, _ = chain([1, 3])[1]  # encoded on step 1's state (seq 1), not seq 2
    send(ingest, snap(3, payload, base_seq=1, step=3))
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and nack.reason == "base" and nack.have_seq == 2
    assert store.get_job(JOB).seq == 2  # type: ignore[union-attr]


def test_a_full_snapshot_over_a_state_counts_as_a_resync(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    resyncs = counter(metrics.RESYNCS)
    payload, h, _ = chain([4])[0]
    send(ingest, snap(2, payload, step=4))
    (ack,) = pub.take()
    assert isinstance(ack, Ack) and ack.hash == h
    assert counter(metrics.RESYNCS) == resyncs + 1


def test_a_wrong_device_message_is_refused_without_a_reply(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    before = store.get_job(JOB)
    refused = counter(metrics.REFUSED, reason="TopicMismatch")
    malformed = counter(metrics.REFUSED, reason="MalformedMessage")
    payload, _, _ = chain([1, 2])[1]
    # gw-2 sends for job-1 (gw-1's) on its own topic: the job id belongs to gw-1
    send(ingest, snap(2, payload, base_seq=1, step=2, device="gw-2"))
    send(ingest, birth(device="gw-2"))
    assert pub.take() == []
    assert counter(metrics.REFUSED, reason="TopicMismatch") == refused + 2
    # and a message made by gw-2 arrives on gw-1's topic: the payload does not name its
    # device, but its check covers gw-2's ids, so it fails on gw-1's topic like a damaged
    # message (answered, like one, with a nack invalid for no seq to the topic's device)
    msg = forged(snap(2, payload, base_seq=1, step=2), device="gw-2")
    ingest.handle(NS.state(DEVICE, JOB), encode(msg))
    assert [(type(m), m.seq, m.reason) for m in pub.take()] == [(Nack, 0, "invalid")]  # type: ignore[union-attr]
    assert counter(metrics.REFUSED, reason="MalformedMessage") > malformed
    assert store.get_job(JOB) == before
    assert store.get_device("gw-2") is None or store.list_jobs("gw-2") == []


def test_an_older_epoch_is_refused_and_changes_nothing(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    assert ingest.take_over(JOB, reason="test") == 2
    pub.take()
    before = store.get_job(JOB)
    fenced = counter(metrics.REFUSED, reason="Fenced")
    payload, _, _ = chain([1, 2])[1]
    send(ingest, snap(2, payload, base_seq=1, step=2, epoch=1))
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and (nack.reason, nack.epoch) == ("fenced", 2)
    send(ingest, birth())  # a re-birth at the old epoch: SYNC showing the server owns it
    (sync,) = pub.take()
    assert isinstance(sync, Sync) and (sync.owner, sync.epoch) == ("server", 2)
    assert counter(metrics.REFUSED, reason="Fenced") == fenced + 2
    assert store.get_job(JOB) == before
    assert [s.seq for s in store.snapshots(JOB)] == [1]


def test_restart_rebuilds_sessions_and_acks_continue(
    store: SQLiteStore, pub: RecordingPublisher, ingest: Ingest
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1, 2, 3])
    misses = counter(metrics.STATE_CACHE, result="miss")
    fresh = Ingest(store, pub)  # a restarted server: nothing in memory
    try:
        payload, h, _ = chain([3, 4])[1]
        send(fresh, snap(4, payload, base_seq=3, step=4))
        (ack,) = pub.take()
        assert isinstance(ack, Ack) and (ack.seq, ack.hash) == (4, h)
        assert counter(metrics.STATE_CACHE, result="miss") == misses + 1  # replayed from store
        s = fresh.session(JOB)
        assert s is not None and s.born and s.current_seq == 4
        send(fresh, query(4))  # a query for what it holds: ack
        assert [type(m) for m in pub.take()] == [Ack]
    finally:
        fresh.close()


def test_unknown_job_is_nacked_unknown(ingest: Ingest, pub: RecordingPublisher) -> None:
    payload, _, _ = chain([1])[0]
    send(ingest, snap(1, payload, step=1))
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and nack.reason == "unknown"


def test_birth_of_a_job_first_seen_at_a_later_epoch(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    send(ingest, birth(epoch=3))
    (sync,) = pub.take()
    assert isinstance(sync, Sync) and sync.epoch == 3
    assert store.get_job(JOB).epoch == 3  # type: ignore[union-attr]
    payload, _, _ = chain([1])[0]
    send(ingest, snap(1, payload, step=1, epoch=3))
    assert [type(m) for m in pub.take()] == [Ack]


def test_take_over_raises_the_epoch_durably_then_publishes_a_retained_ctl(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    assert ingest.take_over(JOB, reason="api") == 2
    (sent,) = pub.take_sent()
    ctl = sent.message
    assert sent.retain and sent.topic == NS.ctl(DEVICE, JOB)
    assert isinstance(ctl, Ctl) and (ctl.epoch, ctl.owner, ctl.request) == (2, "server", "run")
    rec = store.get_job(JOB)
    assert rec is not None and (rec.epoch, rec.owner, rec.status) == (2, "server", "resuming")
    assert store.status_history(JOB)[-1].detail == "claimed: api"
    # a new attempt fences the old one with another epoch
    assert ingest.take_over(JOB, reason="retry") == 3
    (ctl,) = pub.take()
    assert isinstance(ctl, Ctl) and (ctl.epoch, ctl.owner) == (3, "server")
    with pytest.raises(StoreError, match="unknown job"):
        ingest.take_over("nope", reason="x")


def test_take_over_is_fenced_when_another_claimer_wins(
    tmp_path: Path, pub: RecordingPublisher
) -> None:
    class RacingStore(SQLiteStore):
        race = True

        def raise_epoch(self, job, expected_epoch, new_owner, **kw):  # type: ignore[no-untyped-def]
            if self.race:  # another process claims between our read and our CAS
                self.race = False
                super().raise_epoch(job, expected_epoch, "server", status="resuming")
            return super().raise_epoch(job, expected_epoch, new_owner, **kw)

    with RacingStore(tmp_path / "s") as store:
        ingest = Ingest(store, pub)
        born(ingest, pub)
        with pytest.raises(Fenced):
            ingest.take_over(JOB, reason="api")
        assert pub.take() == []  # no CTL for a claim that lost
        assert store.get_job(JOB).epoch == 2  # type: ignore[union-attr]
        ingest.close()


def test_epoch_raised_in_another_process_is_noticed(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    other_pub = RecordingPublisher()
    other = MqttJobControl(store, other_pub)  # the worker's own process
    assert other.take_over(JOB, reason="auto") == 2
    # the ingest's cached session is still at epoch 1: the store fences the commit
    payload, _, _ = chain([1, 2])[1]
    fenced = counter(metrics.COMMIT_FAILURES, reason="fenced")
    send(ingest, snap(2, payload, base_seq=1, step=2))
    assert pub.take() == []  # a refused store write gets no reply ...
    assert counter(metrics.COMMIT_FAILURES, reason="fenced") == fenced + 1
    send(ingest, query(2))  # ... and the rebuilt session fences the agent's next message
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and (nack.reason, nack.epoch) == ("fenced", 2)
    assert [s.seq for s in store.snapshots(JOB)] == [1]


def test_a_ctl_from_elsewhere_drops_the_outdated_session(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    other_pub = RecordingPublisher()
    MqttJobControl(store, other_pub).take_over(JOB, reason="auto")
    (sent,) = other_pub.take_sent()
    assert ingest.session(JOB) is not None
    ingest.handle(sent.topic, sent.payload)
    assert ingest.session(JOB) is None  # rebuilt from the store on next use
    send(ingest, query(1))
    (nack,) = pub.take()
    assert isinstance(nack, Nack) and nack.reason == "fenced"


def test_live_handover_release_then_worker_callback(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    worker = FakeResumer(store)
    ingest.set_hooks(worker)
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    ingest.request_handover(JOB)
    (sent,) = pub.take_sent()
    ctl = sent.message
    assert sent.retain and isinstance(ctl, Ctl)
    assert (ctl.epoch, ctl.owner, ctl.request) == (1, "edge", "handover")
    payload, _, _ = chain([1, 2])[1]
    send(ingest, snap(2, payload, base_seq=1, step=2))
    assert [type(m) for m in pub.take()] == [Ack]
    send(ingest, release(2, 2))
    (ctl,) = pub.take()
    assert isinstance(ctl, Ctl) and (ctl.epoch, ctl.owner, ctl.request) == (2, "server", "run")
    rec = store.get_job(JOB)
    assert rec is not None and (rec.epoch, rec.owner, rec.status) == (2, "server", "resuming")
    deadline = time.monotonic() + 5
    while not worker.handed_over and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.handed_over == [(JOB, 2)]
    assert [r.job for r in pending_handovers(store)] == [JOB]
    with pytest.raises(LocalProtocolError):
        ingest.request_handover(JOB)  # the server owns it now


def test_done_records_completed_and_outputs_by_position(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub, total_steps=4)
    commit_chain(ingest, pub, [2, 4])
    send(ingest, done(2, 4))
    (sent,) = pub.take_sent()
    ctl = sent.message
    assert sent.retain and isinstance(ctl, Ctl)
    assert (ctl.epoch, ctl.owner, ctl.request) == (1, "edge", "stop")
    rec = store.get_job(JOB)
    assert rec is not None and rec.status == "completed" and rec.step == 4
    outs = store.get_outputs(JOB)
    assert np.array_equal(outs["tokens"], generate_state(4)["tokens"][3:])
    assert [h.status for h in store.status_history(JOB)][-1] == "completed"
    # a repeated DONE (the agent missed the CTL) gets it again; outputs are not doubled
    send(ingest, done(2, 4))
    assert [type(m) for m in pub.take()] == [Ctl]
    assert store.get_outputs(JOB)["tokens"].shape == (4,)
    with pytest.raises(LocalProtocolError):
        ingest.take_over(JOB, reason="too late")


def test_finish_and_republish_retained(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    born(ingest, pub)
    born(ingest, pub, job="job-2")
    ingest.take_over(JOB, reason="api")
    pub.take()
    with pytest.raises(Fenced):
        ingest.finish(JOB, 1)
    ingest.finish(JOB, 2)
    (ctl,) = pub.take()
    assert isinstance(ctl, Ctl) and (ctl.epoch, ctl.owner, ctl.request) == (2, "server", "stop")
    assert store.get_job(JOB).status == "completed"  # type: ignore[union-attr]
    assert ingest.republish_retained() == 1  # job-2 runs on its device: no retained CTL
    (ctl,) = pub.take()
    assert isinstance(ctl, Ctl) and ctl.request == "stop"


def test_status_and_heartbeats_go_to_liveness(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    ingest.handle(NS.status(DEVICE), encode(Status(DEVICE, True, "s1", 0)))
    assert store.get_device(DEVICE).online  # type: ignore[union-attr]
    born(ingest, pub)
    ingest.handle(NS.hb(DEVICE), encode(Heartbeat(DEVICE, "s1", 0, {JOB: (7, None)})))
    assert ingest.liveness is not None and ingest.liveness.device_step(JOB)[:2] == (7, None)  # type: ignore[index]
    ingest.handle(NS.status(DEVICE), encode(Status(DEVICE, False, "s1", 0)))
    assert not store.get_device(DEVICE).online  # type: ignore[union-attr]
    assert store.get_job(JOB).status == "offline"  # type: ignore[union-attr]


def test_compaction_runs_in_maintenance(tmp_path: Path, pub: RecordingPublisher) -> None:
    from server.store import CompactionPolicy

    with SQLiteStore(tmp_path / "s", compaction=CompactionPolicy(max_deltas=2)) as store:
        ingest = Ingest(store, pub)
        born(ingest, pub)
        commit_chain(ingest, pub, [1, 2, 3, 4, 5])
        assert len(store.chain(JOB)) == 5
        ingest.maintain(retain=True)
        assert len(store.chain(JOB)) == 1 and store.chain(JOB)[0].kind == "full"
        assert ingest.take_dirty() == []
        assert store.verify().ok
        ingest.close()


def test_state_cache_is_bounded() -> None:
    c = StateCache(max_bytes=2500, max_jobs=10)
    a = {"x": np.zeros(1000, np.uint8)}
    for i in range(5):
        c.put(f"j{i}", bytes([i]) * 16, a)
    assert len(c) == 2 and c.nbytes <= 2500
    assert c.get("j4", bytes([4]) * 16) is a
    assert c.get("j4", bytes([3]) * 16) is None  # another hash: not this state
    assert c.get("j0", bytes([0]) * 16) is None
    c.put("big", b"h" * 16, {"x": np.zeros(5000, np.uint8)})  # larger than the cache
    assert c.get("big", b"h" * 16) is None
    c2 = StateCache(max_bytes=10**9, max_jobs=2)
    for i in range(3):
        c2.put(f"j{i}", b"h" * 16, a)
    assert len(c2) == 2


# -- fuzz: nothing undecodable changes anything ------------------------------------------------


def _valid_messages() -> list[tuple[str, bytes]]:
    payload, _, _ = chain([1])[0]
    msgs = [birth(), snap(1, payload, step=1), query(1), done(1, 1), release(1, 1)]
    out = [(state_topic(m), wire(m)) for m in msgs]
    out.append((NS.status(DEVICE), encode(Status(DEVICE, True, "s1", 0))))
    out.append((NS.hb(DEVICE), encode(Heartbeat(DEVICE, "s1", 0, {JOB: (1, None)}))))
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_messages_change_nothing(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    with SQLiteStore(root / "s") as store:
        pub = RecordingPublisher()
        ingest = Ingest(store, pub)
        born(ingest, pub)
        commit_chain(ingest, pub, [1])
        before = store.get_job(JOB)
        topics = [
            NS.state(DEVICE, JOB),
            NS.status(DEVICE),
            NS.hb(DEVICE),
            NS.ctl(DEVICE, JOB),
            NS.state("gw-2", JOB),
            "edge-resume/v1/x",
            "other/topic",
            NS.ack(DEVICE, JOB),
        ]
        for _ in range(data.draw(st.integers(1, 8))):
            kind = data.draw(st.sampled_from(["random", "mutated"]))
            if kind == "random":
                topic = data.draw(st.sampled_from(topics))
                payload = data.draw(st.binary(max_size=300))
            else:
                topic, good = data.draw(st.sampled_from(_valid_messages()))
                buf = bytearray(good)
                for _ in range(data.draw(st.integers(1, 4))):
                    i = data.draw(st.integers(0, len(buf) - 1))
                    buf[i] ^= data.draw(st.integers(1, 255))
                if bytes(buf) == good:  # two flips of one byte cancelled out
                    buf[0] ^= 0xFF
                payload = bytes(buf)
            ingest.handle(topic, payload)  # never raises
        after = store.get_job(JOB)
        assert after is not None and before is not None
        assert (after.seq, after.state_hash, after.epoch, after.owner, after.status) == (
            before.seq, before.state_hash, before.epoch, before.owner, before.status,
        )  # fmt: skip
        assert [j.job for j in store.list_jobs()] == [JOB]
        for m in pub.take():  # every reply is a refusal or a repeat, never a new ack
            assert not isinstance(m, Ack) or m.seq == 1
        ingest.close()


def test_fuzz_seeded_mutations_of_snapshot_chunks(
    ingest: Ingest, pub: RecordingPublisher, store: SQLiteStore
) -> None:
    """Flip bytes inside a valid envelope's data (the envelope check is recomputed, as a
    buggy agent would): the codec refuses, the state stays."""
    rng = random.Random(7)
    born(ingest, pub)
    commit_chain(ingest, pub, [1])
    payload, _, _ = chain([1, 2])[1]
    for n in range(40):
        buf = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        send(ingest, snap(2 + n, bytes(buf), base_seq=1, step=2))
        (reply,) = pub.take()
        assert isinstance(reply, Nack) and reply.reason in ("corrupt", "hash", "base")
        assert store.get_job(JOB).seq == 1  # type: ignore[union-attr]


def test_namespace_prefix_is_respected(store: SQLiteStore, pub: RecordingPublisher) -> None:
    ns = TopicNamespace("plant-7/er")
    ingest = Ingest(store, pub, namespace=ns)
    b = birth()
    ingest.handle(ns.state(DEVICE, JOB), wire(b))
    assert [type(m) for m in pub.take()] == [Sync]
    ingest.handle(NS.state(DEVICE, JOB), wire(b))  # the default prefix: not ours
    assert pub.take() == []
    ingest.close()
