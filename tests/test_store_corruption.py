"""Damage a store on disk and check that verify reports it and reads refuse it, with
errors from the store's tree only (StoreError and below), never wrong data."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import StoreCorrupt, StoreError
from server.store import CompactionPolicy, RetentionPolicy, SQLiteStore
from server.store.__main__ import main as cli_main
from server.store.sqlite import DB_NAME
from tests.support.store_states import DEVICE, JOB, hash_for, snapshot_for

REPO = Path(__file__).resolve().parents[1]


def build(root: Path, upto: int = 8, **kw: object) -> None:
    with SQLiteStore(root, **kw) as s:  # type: ignore[arg-type]
        s.record_birth(DEVICE, JOB, spec={"k": 1}, model_hash="m", codec_version=0)
        for seq in range(1, upto + 1):
            base_seq, payload, h, full = snapshot_for(seq)
            s.commit_snapshot(DEVICE, JOB, seq, base_seq, 1, payload, h, full)
        s.put_outputs(JOB, 0, {"t": np.arange(5)})


def blob_of(root: Path, seq: int) -> Path:
    with SQLiteStore(root) as s:
        rec = next(r for r in s.snapshots(JOB) if r.seq == seq)
        return root / "blobs" / rec.blob[:2] / rec.blob


def test_flipped_byte_in_a_blob(tmp_path: Path) -> None:
    root = tmp_path / "s"
    build(root)
    path = blob_of(root, 5)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with SQLiteStore(root) as s:
        report = s.verify()
        assert not report.ok
        assert any("seq 5" in p and "damaged" in p for p in report.problems), str(report)
        assert any("seq 6" in p and "not checked" in p for p in report.problems)
        with pytest.raises(StoreCorrupt, match="damaged"):
            s.load_state(JOB)
        with pytest.raises(StoreCorrupt):
            s.read_payload(JOB, 5)
        assert s.load_state(JOB, 4).state_hash == hash_for(4)  # before the damage: fine
    assert cli_main(["verify", str(root)]) == 1


def test_deleted_blob(tmp_path: Path) -> None:
    root = tmp_path / "s"
    build(root)
    blob_of(root, 1).unlink()
    with SQLiteStore(root) as s:
        report = s.verify()
        assert any("seq 1: blob" in p and "missing" in p for p in report.problems), str(report)
        with pytest.raises(StoreCorrupt, match="missing"):
            s.load_state(JOB)


def test_damaged_output_row(tmp_path: Path) -> None:
    root = tmp_path / "s"
    build(root)
    conn = sqlite3.connect(root / DB_NAME)
    conn.execute("UPDATE outputs SET data = zeroblob(8) WHERE pos = 3")
    conn.commit()
    conn.close()
    with SQLiteStore(root) as s:
        assert any("position 3 is damaged" in p for p in s.verify().problems)
        with pytest.raises(StoreCorrupt, match="position 3"):
            s.get_outputs(JOB)


def test_row_that_replays_to_another_hash(tmp_path: Path) -> None:
    root = tmp_path / "s"
    build(root)
    conn = sqlite3.connect(root / DB_NAME)
    conn.execute("UPDATE snapshots SET state_hash = zeroblob(16) WHERE seq = 3")
    conn.commit()
    conn.close()
    with SQLiteStore(root) as s:
        problems = s.verify().problems
        assert any("seq 3" in p for p in problems), problems
        assert any("seq 4: its base" in p for p in problems), problems
        with pytest.raises(StoreCorrupt, match="seq 3"):
            s.load_state(JOB, 3)


def _commit_then_die(root: Path, first: int, last: int, compact_at: int | None = None) -> None:
    """In a child: commit ``first``..``last`` (compacting at ``compact_at``) and SIGKILL
    itself, so the WAL is left as a crash leaves it."""
    code = f"""
import os, signal
from server.store import SQLiteStore, CompactionPolicy
from tests.support.store_states import DEVICE, JOB, snapshot_for
s = SQLiteStore({str(root)!r}, compaction=CompactionPolicy(max_deltas=2))
s.record_birth(DEVICE, JOB, spec={{'k': 1}}, model_hash='m', codec_version=0)
for seq in range({first}, {last} + 1):
    base_seq, payload, h, full = snapshot_for(seq)
    s.commit_snapshot(DEVICE, JOB, seq, base_seq, 1, payload, h, full)
    if seq == {compact_at!r}:
        assert s.compact(JOB).compacted
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_truncated_wal_loses_commits_and_verify_says_so(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _commit_then_die(root, 1, 20)
    wal = root / f"{DB_NAME}-wal"
    os.truncate(wal, wal.stat().st_size // 2)
    with SQLiteStore(root) as s:
        job = s.get_job(JOB)
        assert job is not None and job.seq is not None and 1 <= job.seq < 19
        report = s.verify()
        assert not report.ok
        assert any("acknowledged snapshot(s) were lost" in p for p in report.problems), str(report)
        assert any("WAL ends inside a frame" in n for n in report.notes)
        with pytest.raises(StoreError, match="not stored"):
            s.load_state(JOB, 20)  # acknowledged once, gone now: refused, not invented
        loaded = s.load_state(JOB)  # what is left is consistent
        assert loaded.state_hash == hash_for(job.seq)
    assert cli_main(["verify", str(root)]) == 1


def test_truncated_wal_after_compaction_leaves_no_dangling_row(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _commit_then_die(root, 1, 12, compact_at=9)  # deletes blobs of seqs 1..8, then 10..12
    os.truncate(root / f"{DB_NAME}-wal", 0)
    with SQLiteStore(root) as s:
        job = s.get_job(JOB)
        assert job is not None and job.seq == 9  # the compaction was checkpointed
        report = s.verify()
        assert not any("missing" in p for p in report.problems), str(report)
        assert any("were lost" in p for p in report.problems), str(report)  # 10..12 lost
        assert s.load_state(JOB).state_hash == hash_for(9)
        assert [r.kind for r in s.snapshots(JOB)] == ["full"]


def test_truncated_database_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    build(root, upto=30)
    db = root / DB_NAME
    os.truncate(db, db.stat().st_size // 3)
    with pytest.raises(StoreCorrupt, match="malformed"):
        SQLiteStore(root)
    assert cli_main(["verify", str(root)]) == 2


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", str(tmp_path / "nothing")]) == 2
    root = tmp_path / "s"
    build(root)
    assert cli_main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 jobs, 8 snapshots")
    proc = subprocess.run(
        [sys.executable, "-m", "server.store", "verify", str(root)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith(b"OK")


@pytest.mark.parametrize("seed", range(int(os.environ.get("STORE_FUZZ_SEEDS", "12"))))
def test_random_damage_is_refused_or_reported(tmp_path: Path, seed: int) -> None:
    """Seeded random mutation of blob files and of the database file: every read either
    gives the right state or raises from the StoreError tree, and verify never crashes."""
    rng = random.Random(seed)
    root = tmp_path / "s"
    build(root, upto=12, retention=RetentionPolicy(keep_baselines=2))
    files = [p for p in (root / "blobs").rglob("*") if p.is_file()]
    targets = [*rng.sample(files, 2), root / DB_NAME]
    for path in targets:
        raw = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(raw))
            raw[i] = rng.randrange(256) if rng.random() < 0.8 else raw[i] ^ 0xFF
        if rng.random() < 0.2:
            del raw[rng.randrange(len(raw)) :]
        path.write_bytes(bytes(raw))
    try:
        s = SQLiteStore(root, compaction=CompactionPolicy(max_deltas=1))
    except StoreError:
        return  # refused at open: fine
    with s:
        for call in (s.verify, s.list_jobs, s.list_devices):
            with contextlib.suppress(StoreError):
                call()
        for seq in range(1, 13):
            try:
                loaded = s.load_state(JOB, seq)
            except StoreError:
                continue
            assert loaded.state_hash == hash_for(seq)
        for call2 in (lambda: s.get_outputs(JOB), lambda: s.compact(JOB), s.retain):
            with contextlib.suppress(StoreError):
                call2()
