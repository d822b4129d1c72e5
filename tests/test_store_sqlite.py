"""SQLiteStore, method by method, on real SQLite files in temporary folders."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import server.store
from edge_agent.codec import encode_delta
from edge_agent.errors import Fenced, OutputConflict, StoreCorrupt, StoreError
from edge_agent.state import state_hash, state_nbytes
from server.store import (
    BlobInfo,
    BlobStore,
    CompactionPolicy,
    RetentionPolicy,
    SQLiteStore,
    Store,
    blob_key,
)
from server.store.sqlite import DB_NAME, FORMAT_NAME
from tests.support.store_states import DEVICE, JOB, hash_for, snapshot_for, state_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "store", clock=clock) as s:
        yield s


def born(store: Store, job: str = JOB, device: str = DEVICE) -> None:
    store.record_birth(device, job, spec={"kind": "t", "n": 3}, model_hash="m0", codec_version=0)


def commit(store: Store, seq: int, *, job: str = JOB, epoch: int = 1) -> None:
    base_seq, payload, h, full = snapshot_for(seq)
    store.commit_snapshot(DEVICE, job, seq, base_seq, epoch, payload, h, full, step=seq)


def blob_count(store: SQLiteStore) -> int:
    return sum(1 for _ in store.blobs.list())


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


# -- the package -----------------------------------------------------------------------------


def test_all_names_exist_and_are_sorted() -> None:
    for name in server.store.__all__:
        assert hasattr(server.store, name), name
    assert server.store.__all__ == sorted(server.store.__all__, key=lambda n: (not n.isupper(), n))


# -- opening ---------------------------------------------------------------------------------


def test_create_reopen_and_pragmas(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with SQLiteStore(root) as s:
        born(s)
        commit(s, 1)
        conn = s._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert (root / FORMAT_NAME).read_text().startswith("edge-resume store")
    with SQLiteStore(root, create=False) as s:
        job = s.get_job(JOB)
        assert job is not None and job.seq == 1


def test_open_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="holds no store"):
        SQLiteStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / DB_NAME)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not an edge-resume store"):
        SQLiteStore(other)


def test_open_refuses_an_unknown_format_version(tmp_path: Path) -> None:
    root = tmp_path / "s"
    SQLiteStore(root).close()
    conn = sqlite3.connect(root / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="format version 99"):
        SQLiteStore(root)


def test_open_refuses_a_lost_database(tmp_path: Path) -> None:
    root = tmp_path / "s"
    SQLiteStore(root).close()
    (root / DB_NAME).unlink()
    with pytest.raises(StoreCorrupt, match="missing"):
        SQLiteStore(root)


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s")
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_job(JOB)


# -- devices ---------------------------------------------------------------------------------


def test_devices(store: SQLiteStore) -> None:
    assert store.get_device("d1") is None
    a = store.touch_device("d1")
    assert a.first_seen == a.last_seen and not a.online
    b = store.touch_device("d1")
    assert b.last_seen > a.last_seen and b.first_seen == a.first_seen
    on = store.set_device_online("d1", True)
    assert on.online and on.online_at > b.last_seen
    again = store.set_device_online("d1", True)
    assert again.online_at == on.online_at  # the flag did not change
    off = store.set_device_online("d1", False)
    assert not off.online and off.online_at > on.online_at
    store.set_device_online("d2", True)
    assert [d.device for d in store.list_devices()] == ["d1", "d2"]
    with pytest.raises(StoreError, match="does not match"):
        store.touch_device("bad/id")


# -- jobs ------------------------------------------------------------------------------------


def test_birth_creates_the_job(store: SQLiteStore) -> None:
    rec = store.record_birth(
        DEVICE, JOB, spec={"kind": "g", "b": b"\x00", "n": [1, 2]}, model_hash="mh",
        codec_version=0, session="s1",
    )  # fmt: skip
    assert (rec.owner, rec.epoch, rec.status, rec.births) == ("edge", 1, "running", 1)
    assert rec.spec == {"kind": "g", "b": b"\x00", "n": [1, 2]}
    assert (rec.seq, rec.state_hash, rec.bytes_received, rec.attempts) == (None, None, 0, 0)
    assert store.get_device(DEVICE) is not None
    again = store.record_birth(
        DEVICE, JOB, spec={"n": [1, 2], "b": b"\x00", "kind": "g"}, model_hash="mh",
        codec_version=0, session="s2",
    )  # fmt: skip
    assert (again.births, again.session, again.born_at) == (2, "s2", rec.born_at)
    assert again.last_birth_at > rec.last_birth_at
    hist = store.status_history(JOB)
    assert [(h.status, h.detail) for h in hist] == [("running", "born")]


def test_birth_refuses_a_changed_job(store: SQLiteStore) -> None:
    born(store)
    with pytest.raises(StoreError, match="belongs to device"):
        born(store, device="gw-2")
    with pytest.raises(StoreError, match="another spec"):
        store.record_birth(DEVICE, JOB, spec={"kind": "x"}, model_hash="m0", codec_version=0)
    with pytest.raises(StoreError, match="another spec"):
        store.record_birth(
            DEVICE, JOB, spec={"kind": "t", "n": 3}, model_hash="m1", codec_version=0
        )
    with pytest.raises(StoreError, match="plain msgpack"):
        store.record_birth(DEVICE, "j2", spec={"x": object()}, model_hash="m", codec_version=0)


def test_get_and_list_jobs(store: SQLiteStore) -> None:
    assert store.get_job(JOB) is None
    born(store, "a")
    born(store, "b")
    born(store, "c", device="gw-2")
    assert [j.job for j in store.list_jobs()] == ["a", "b", "c"]
    assert [j.job for j in store.list_jobs(DEVICE)] == ["a", "b"]
    assert store.list_jobs("nobody") == []


def test_status_history(store: SQLiteStore) -> None:
    born(store)
    store.set_status(JOB, "offline", detail="will")
    store.set_status(JOB, "offline")  # no change, no entry
    rec = store.set_status(JOB, "resuming")
    assert rec.status == "resuming"
    hist = store.status_history(JOB)
    assert [h.status for h in hist] == ["running", "offline", "resuming"]
    assert hist[1].detail == "will"
    assert hist[0].at < hist[1].at < hist[2].at == rec.status_at
    with pytest.raises(StoreError, match="not a job status"):
        store.set_status(JOB, "paused")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="unknown job"):
        store.set_status("nope", "offline")


def test_status_compare_and_set(store: SQLiteStore) -> None:
    born(store)
    rec = store.set_status(JOB, "offline", expect=("resuming",))  # not resuming: no change
    assert rec.status == "running"
    rec = store.set_status(JOB, "offline", detail="will", expect=("running",))
    assert rec.status == "offline"
    assert [h.status for h in store.status_history(JOB)] == ["running", "offline"]
    with pytest.raises(StoreError, match="not a job status"):
        store.set_status(JOB, "running", expect=("gone",))  # type: ignore[list-item]


def test_progress_and_attempts(store: SQLiteStore) -> None:
    born(store)
    store.set_progress(JOB, 5, 100)
    assert store.add_attempt(JOB) == 1
    assert store.add_attempt(JOB) == 2
    rec = store.get_job(JOB)
    assert rec is not None and (rec.step, rec.total_steps, rec.attempts) == (5, 100, 2)
    with pytest.raises(StoreError):
        store.set_progress(JOB, -1, None)


def test_raise_epoch_is_a_compare_and_set(tmp_path: Path, store: SQLiteStore) -> None:
    born(store)
    rec = store.raise_epoch(JOB, 1, "server", status="resuming", detail="operator")
    assert (rec.epoch, rec.owner, rec.status) == (2, "server", "resuming")
    with pytest.raises(Fenced, match="epoch 2"):
        store.raise_epoch(JOB, 1, "server")
    assert store.status_history(JOB)[-1].detail == "operator"
    store.close()
    with SQLiteStore(tmp_path / "store") as again:  # durable
        job = again.get_job(JOB)
        assert job is not None and (job.epoch, job.owner) == (2, "server")


def test_raise_epoch_has_one_winner_across_connections(tmp_path: Path) -> None:
    root = tmp_path / "s"
    stores = [SQLiteStore(root), SQLiteStore(root)]  # two "processes": two lock holders
    born(stores[0])
    wins: list[int] = []
    losses: list[int] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            stores[i % 2].raise_epoch(JOB, 1, "server", status="resuming")
            wins.append(i)
        except Fenced:
            losses.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    job = stores[1].get_job(JOB)
    assert job is not None and job.epoch == 2
    for s in stores:
        s.close()


# -- snapshots -------------------------------------------------------------------------------


def test_commit_and_counters(store: SQLiteStore) -> None:
    born(store)
    sizes = []
    for seq in range(1, 5):
        _, payload, _, full = snapshot_for(seq)
        sizes.append(len(payload))
        commit(store, seq)
    rec = store.get_job(JOB)
    assert rec is not None
    assert (rec.seq, rec.state_hash, rec.step) == (4, hash_for(4), 4)
    assert (rec.bytes_received, rec.full_size, rec.snapshots) == (sum(sizes), full, 4)
    snaps = store.snapshots(JOB)
    assert [(s.seq, s.base_seq, s.kind) for s in snaps] == [
        (1, None, "full"), (2, 1, "delta"), (3, 2, "delta"), (4, 3, "delta"),
    ]  # fmt: skip
    assert store.read_payload(JOB, 3) == snapshot_for(3)[1]


def test_commit_is_idempotent_for_a_repeat(store: SQLiteStore) -> None:
    born(store)
    commit(store, 1)
    commit(store, 1)
    rec = store.get_job(JOB)
    assert rec is not None and rec.snapshots == 1


def test_commit_refusals_change_nothing(store: SQLiteStore) -> None:
    born(store)
    commit(store, 1)
    commit(store, 2)
    before = (store.get_job(JOB), blob_count(store))
    _, p3, h3, f3 = snapshot_for(3)
    _, p1, h1, f1 = snapshot_for(1)
    with pytest.raises(StoreError, match="unknown job"):
        store.commit_snapshot(DEVICE, "other", 3, 2, 1, p3, h3, f3)
    with pytest.raises(StoreError, match="belongs to device"):
        store.commit_snapshot("gw-9", JOB, 3, 2, 1, p3, h3, f3)
    with pytest.raises(StoreError, match="never raised"):
        store.commit_snapshot(DEVICE, JOB, 3, 2, 2, p3, h3, f3)
    with pytest.raises(StoreError, match="names another state hash"):
        store.commit_snapshot(DEVICE, JOB, 3, 2, 1, p3, h1, f3)
    with pytest.raises(StoreError, match="payload is a delta"):
        store.commit_snapshot(DEVICE, JOB, 3, None, 1, p3, h3, f3)
    with pytest.raises(StoreError, match="not a codec payload"):
        store.commit_snapshot(DEVICE, JOB, 3, 2, 1, b"garbage" * 5, h3, f3)
    with pytest.raises(StoreError, match="not above"):
        store.commit_snapshot(DEVICE, JOB, 0, None, 1, encode_delta(None, state_for(5)),
                              hash_for(5), f1)  # fmt: skip
    with pytest.raises(StoreError, match="another state hash"):
        store.commit_snapshot(DEVICE, JOB, 2, None, 1, p1, h1, f1)
    # a delta against a state that is not the acknowledged one (seq 1 instead of 2)
    d = encode_delta(state_for(1), state_for(3))
    with pytest.raises(StoreError, match="not the acknowledged state"):
        store.commit_snapshot(DEVICE, JOB, 3, 1, 1, d, h3, f3)
    with pytest.raises(StoreError, match="not below"):
        store.commit_snapshot(DEVICE, JOB, 3, 3, 1, p3, h3, f3)
    assert (store.get_job(JOB), blob_count(store)) == before


def test_commit_is_fenced_after_a_takeover(store: SQLiteStore) -> None:
    born(store)
    commit(store, 1)
    store.raise_epoch(JOB, 1, "server")
    with pytest.raises(Fenced):
        commit(store, 2, epoch=1)
    commit(store, 2, epoch=2)  # the new owner's snapshots are accepted
    rec = store.get_job(JOB)
    assert rec is not None and rec.seq == 2
    assert [s.epoch for s in store.snapshots(JOB)] == [1, 2]


def test_delta_needs_an_acknowledged_state(store: SQLiteStore) -> None:
    born(store)
    base_seq, payload, h, full = snapshot_for(2)
    with pytest.raises(StoreError, match="not the acknowledged state"):
        store.commit_snapshot(DEVICE, JOB, 2, base_seq, 1, payload, h, full)


def test_chain_and_load_state(store: SQLiteStore) -> None:
    born(store)
    with pytest.raises(StoreError, match="no acknowledged snapshot"):
        store.chain(JOB)
    for seq in range(1, 15):  # seq 11 is a full snapshot (a resync)
        commit(store, seq)
    assert [r.seq for r in store.chain(JOB)] == [11, 12, 13, 14]
    assert [r.seq for r in store.chain(JOB, 7)] == list(range(1, 8))
    loaded = store.load_state(JOB)
    assert (loaded.seq, loaded.state_hash) == (14, hash_for(14))
    assert_same_state(loaded.state, state_for(14))
    old = store.load_state(JOB, 9)
    assert old.state_hash == hash_for(9) == state_hash(old.state)
    with pytest.raises(StoreError, match="not stored"):
        store.load_state(JOB, 15)
    with pytest.raises(StoreError, match="not stored"):
        store.read_payload(JOB, 99)


# -- outputs ---------------------------------------------------------------------------------


def test_outputs_round_trip_and_exactly_once(store: SQLiteStore) -> None:
    born(store)
    tokens = np.arange(10, dtype=np.int64)
    logits = np.arange(30, dtype=np.float32).reshape(10, 3)
    assert store.put_outputs(JOB, 0, {"tokens": tokens[:6], "logits": logits[:6]}) == 12
    assert store.put_outputs(JOB, 4, {"tokens": tokens[4:], "logits": logits[4:]}) == 8
    assert store.put_outputs(JOB, 0, {"tokens": tokens, "logits": logits}) == 0  # replay
    out = store.get_outputs(JOB)
    assert np.array_equal(out["tokens"], tokens) and out["tokens"].dtype == np.int64
    assert np.array_equal(out["logits"], logits) and out["logits"].shape == (10, 3)
    part = store.get_outputs(JOB, 3, 5)
    assert np.array_equal(part["tokens"], tokens[3:5])


def test_outputs_conflict_writes_nothing(store: SQLiteStore) -> None:
    born(store)
    store.put_outputs(JOB, 0, {"tokens": np.array([1, 2, 3])})
    with pytest.raises(OutputConflict, match="position 2"):
        store.put_outputs(JOB, 2, {"tokens": np.array([4, 5])})  # pos 2 differs, pos 3 new
    assert np.array_equal(store.get_outputs(JOB)["tokens"], [1, 2, 3])
    with pytest.raises(OutputConflict):  # another dtype is other bytes too
        store.put_outputs(JOB, 0, {"tokens": np.array([1], dtype=np.int32)})


def test_outputs_gaps_fencing_and_bad_input(store: SQLiteStore) -> None:
    born(store)
    store.put_outputs(JOB, 0, {"t": np.array([1, 2])})
    store.put_outputs(JOB, 5, {"t": np.array([6])})
    assert np.array_equal(store.get_outputs(JOB)["t"], [1, 2])  # up to the first gap
    assert np.array_equal(store.get_outputs(JOB, 5)["t"], [6])
    with pytest.raises(StoreError, match="no position 2"):
        store.get_outputs(JOB, 0, 4)
    store.raise_epoch(JOB, 1, "server")
    with pytest.raises(Fenced):
        store.put_outputs(JOB, 2, {"t": np.array([3])}, epoch=1)
    assert store.put_outputs(JOB, 2, {"t": np.array([3])}, epoch=2) == 1
    with pytest.raises(StoreError, match="different numbers"):
        store.put_outputs(JOB, 0, {"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(StoreError, match="not supported"):
        store.put_outputs(JOB, 0, {"a": np.array(["x"])})
    with pytest.raises(StoreError, match="position axis"):
        store.put_outputs(JOB, 0, {"a": np.float32(1)})  # type: ignore[dict-item]
    with pytest.raises(StoreError, match="unknown job"):
        store.put_outputs("nope", 0, {"a": np.zeros(1)})


# -- compaction and retention ----------------------------------------------------------------


def test_compaction_rule_and_switch(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s", compaction=CompactionPolicy(delta_ratio=1e9, max_deltas=4),
                     retention=RetentionPolicy(keep_baselines=1)) as s:  # fmt: skip
        born(s)
        for seq in range(1, 5):
            commit(s, seq)
        res = s.compact(JOB)
        assert not res.compacted and res.deltas_before == 3 and "cheaper" in res.reason
        commit(s, 5)
        commit(s, 6)
        old_blobs = {r.blob for r in s.chain(JOB)}
        res = s.compact(JOB)
        assert res.compacted and res.seq == 6 and "5 deltas > 4" in res.reason
        assert res.rows_dropped == 5 and res.blobs_deleted == 6
        chain = s.chain(JOB)
        assert [(r.seq, r.kind) for r in chain] == [(6, "full")]
        assert chain[0].base_seq == 5  # as received
        assert not old_blobs & {b.key for b in s.blobs.list()}
        loaded = s.load_state(JOB)
        assert loaded.state_hash == hash_for(6)
        assert_same_state(loaded.state, state_for(6))
        commit(s, 7)  # a delta against seq 6 still applies to the new baseline
        assert s.load_state(JOB).state_hash == hash_for(7)
        again = s.compact(JOB, force=True)
        assert again.compacted and again.reason == "forced"
        assert s.verify().ok


@pytest.mark.parametrize("level", ["fast", "small", None])
def test_compaction_writes_baselines_at_the_policys_level(
    tmp_path: Path, level: str | None
) -> None:
    policy = CompactionPolicy() if level is None else CompactionPolicy(baseline_level=level)  # type: ignore[arg-type]
    want = level or "fast"  # the default: the server reads baselines more than links carry them
    with SQLiteStore(tmp_path / "s", compaction=policy) as s:
        born(s)
        for seq in (1, 2, 3):
            commit(s, seq)
        assert s.compact(JOB, force=True).compacted
        (rec,) = s.chain(JOB)
        stored = s.blobs.get(rec.blob)
        assert stored == encode_delta(None, state_for(3), level=want)  # type: ignore[arg-type]
        assert rec.received_size == len(snapshot_for(3)[1]) and rec.size == len(stored)
        assert s.load_state(JOB).state_hash == hash_for(3)


def test_compaction_policy_refuses_an_unknown_level() -> None:
    with pytest.raises(StoreError, match="baseline_level must be 'small' or 'fast', not 'tiny'"):
        CompactionPolicy(baseline_level="tiny")  # type: ignore[arg-type]


def test_compaction_by_bytes(tmp_path: Path) -> None:
    # A ratio between what the deltas 2..3 and 2..4 weigh against the baseline at 1: the
    # first is under it, the second over it, whatever the codec's exact sizes.
    size = {seq: len(snapshot_for(seq)[1]) for seq in (1, 2, 3, 4)}
    ratio = (size[2] + size[3] + size[4] / 2) / size[1]
    with SQLiteStore(tmp_path / "s", compaction=CompactionPolicy(delta_ratio=ratio)) as s:
        born(s)
        commit(s, 1)
        commit(s, 2)
        commit(s, 3)
        assert not s.compact(JOB).compacted
        commit(s, 4)
        res = s.compact(JOB)
        assert res.compacted and "x the baseline" in res.reason


def test_compaction_of_a_baseline_only_applies_retention(store: SQLiteStore) -> None:
    born(store)
    for seq in range(1, 12):  # 11 is a full snapshot: 1..10 are no longer needed
        commit(store, seq)
    res = store.compact(JOB)
    assert not res.compacted and res.rows_dropped == 10 and res.blobs_deleted == 10
    assert [r.seq for r in store.snapshots(JOB)] == [11]


def test_retention_keeps_older_restore_points(tmp_path: Path) -> None:
    policy = RetentionPolicy(keep_baselines=2, orphan_grace_s=0)
    with SQLiteStore(tmp_path / "s", retention=policy) as s:
        born(s)
        for seq in range(1, 26):  # baselines at 1, 11, 21
            commit(s, seq)
        report = s.retain()
        assert report.rows_dropped == 10 and report.blobs_deleted == 10
        assert [r.seq for r in s.snapshots(JOB)] == list(range(11, 26))
        assert s.load_state(JOB, 12).state_hash == hash_for(12)
        with pytest.raises(StoreError, match="not stored"):
            s.load_state(JOB, 5)
        assert s.verify().ok


def test_retain_collects_orphans_after_their_grace(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with SQLiteStore(root, retention=RetentionPolicy(orphan_grace_s=3600)) as s:
        born(s)
        commit(s, 1)
        orphan = s.blobs.put(snapshot_for(2)[1])  # a crash between blob and row
        tmp = s.blobs.path(orphan).parent / ".tmp-x"
        tmp.write_bytes(b"partial")
        assert s.retain().blobs_deleted == 0  # too young
        report = s.verify()
        assert report.ok and len(report.notes) == 2, str(report)
    with SQLiteStore(root, retention=RetentionPolicy(orphan_grace_s=0)) as s:
        report = s.retain()
        assert (report.blobs_deleted, report.temporaries_removed) == (1, 1)
        assert not tmp.exists()
        assert blob_count(s) == 1 and s.load_state(JOB).state_hash == hash_for(1)
        assert s.verify().notes == []


# -- verify, threads -------------------------------------------------------------------------


def test_verify_counts_a_sound_store(store: SQLiteStore) -> None:
    born(store)
    for seq in range(1, 6):
        commit(store, seq)
    store.put_outputs(JOB, 0, {"t": np.arange(4)})
    report = store.verify()
    assert report.ok, str(report)
    assert (report.jobs, report.snapshots, report.states_replayed, report.outputs) == (1, 5, 5, 4)
    assert report.blobs == 5 and str(report).startswith("OK")


def test_threads_share_one_store(store: SQLiteStore) -> None:
    jobs = [f"job-{i}" for i in range(4)]
    for j in jobs:
        born(store, j)
    errors: list[BaseException] = []

    def ingest(job: str) -> None:
        try:
            for seq in range(1, 9):
                commit(store, seq, job=job)
                store.put_outputs(job, seq, {"t": np.array([seq])})
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(20):
                for j in jobs:
                    rec = store.get_job(j)
                    if rec is not None and rec.seq is not None:
                        loaded = store.load_state(j)  # may be newer than rec by now
                        assert loaded.seq >= rec.seq
                        assert loaded.state_hash == hash_for(loaded.seq)
                store.compact(jobs[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(j,)) for j in jobs]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j in jobs:
        loaded = store.load_state(j)
        assert (loaded.seq, loaded.state_hash) == (8, hash_for(8))
    assert store.verify().ok


def test_full_size_is_the_states_canonical_size(store: SQLiteStore) -> None:
    born(store)
    commit(store, 1)
    rec = store.get_job(JOB)
    assert rec is not None and rec.full_size == state_nbytes(state_for(1))


class MemoryBlobStore(BlobStore):
    """A second BlobStore, to show the store runs on any (as an object store would plug in)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float]] = {}

    def put(self, data: bytes | memoryview) -> str:
        key = blob_key(data)
        self.data[key] = (bytes(data), time.time())
        return key

    def get(self, key: str) -> bytes:
        if key not in self.data or blob_key(self.data[key][0]) != key:
            raise StoreCorrupt(f"blob {key} is missing or damaged")
        return self.data[key][0]

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def list(self) -> Iterator[BlobInfo]:
        return iter([BlobInfo(k, len(d), t) for k, (d, t) in self.data.items()])


def test_another_blob_store_plugs_in(tmp_path: Path) -> None:
    blobs = MemoryBlobStore()
    policy = RetentionPolicy(orphan_grace_s=0)
    with SQLiteStore(tmp_path / "s", blobs=blobs, retention=policy) as s:
        born(s)
        for seq in range(1, 6):
            commit(s, seq)
        assert len(blobs.data) == 5 and not (tmp_path / "s" / "blobs").exists()
        assert s.compact(JOB, force=True).compacted
        assert len(blobs.data) == 1
        blobs.put(b"orphan")
        assert s.retain().blobs_deleted == 1
        assert s.load_state(JOB).state_hash == hash_for(5)
        assert s.verify().ok
