"""Unit tests of the journal: layout, write order, bounds, errors, corruption, fuzz."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.codec import apply_delta, encode_delta
from edge_agent.errors import JournalError
from edge_agent.journal import (
    FORMAT_VERSION,
    Journal,
    list_jobs,
    verify_journal,
)
from edge_agent.state import state_hash


def state(i: int, n: int = 64) -> dict[str, Any]:
    return {"step": i, "x": np.arange(n, dtype=np.float32) * i, "tokens": np.arange(i % 7)}


def full(i: int) -> bytes:
    return encode_delta(None, state(i), level="fast")


def snap_files(j: Journal) -> list[str]:
    return sorted(n for n in os.listdir(j.path) if n.startswith(("snap-", ".snap-")))


def own_files(j: Journal) -> list[str]:
    return sorted(n for n in os.listdir(j.path) if n not in ("LOCK",))


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        yield j


# ------------------------------------------------------------------ basics


def test_create_write_reopen_round_trip(tmp_path: Path) -> None:
    with Journal.create(tmp_path, "job-1", device="dev-1", info={"model": "m.onnx"}) as j:
        assert j.local is None and j.acked is None and j.transfer is None
        assert j.next_seq == 1
        ref = j.write_snapshot(1, 10, full(1))
        assert (ref.seq, ref.step, ref.state_hash) == (1, 10, state_hash(state(1)))
        j.write_snapshot(2, 20, full(2))
        assert j.next_seq == 3
    with Journal.open(tmp_path, "job-1") as j:
        assert j.meta.device == "dev-1" and j.meta.info == {"model": "m.onnx"}
        assert j.local is not None and j.local.seq == 2 and j.local.step == 20
        got = apply_delta(None, j.read_local() or b"")
        assert state_hash(got) == state_hash(state(2))
        assert snap_files(j) == ["snap-0000000000000002.ers"]
        assert j.verify(deep=True).ok
    assert list_jobs(tmp_path) == ["job-1"]


def test_create_refuses_an_existing_journal_and_open_a_missing_one(tmp_path: Path) -> None:
    Journal.create(tmp_path, "job-1", device="dev-1").close()
    with pytest.raises(JournalError, match="exists already"):
        Journal.create(tmp_path, "job-1", device="dev-1")
    with pytest.raises(JournalError, match="no journal"):
        Journal.open(tmp_path, "job-2")
    with pytest.raises(JournalError, match="belongs to device"):
        Journal.open_or_create(tmp_path, "job-1", device="dev-2")
    with Journal.open_or_create(tmp_path, "job-1", device="dev-1") as j:
        assert j.job == "job-1"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 65, "a b"])
def test_job_ids_that_are_not_safe_file_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(JournalError, match="job id"):
        Journal.create(tmp_path, bad, device="dev-1")


def test_one_writer_at_a_time_readers_need_no_lock(tmp_path: Path) -> None:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        j.write_snapshot(1, 1, full(1))
        with pytest.raises(JournalError, match="in use by another process"):
            Journal.open(tmp_path, "job-1")
        with Journal.open(tmp_path, "job-1", readonly=True) as r:
            assert r.local is not None and r.local.seq == 1
            with pytest.raises(JournalError, match="read-only"):
                r.write_snapshot(2, 2, full(2))
    with Journal.open(tmp_path, "job-1") as j:  # the lock went with the first writer
        assert j.local is not None
    with pytest.raises(JournalError, match="closed"):
        j.write_snapshot(5, 5, full(5))


def test_snapshot_arguments_are_checked(journal: Journal) -> None:
    journal.write_snapshot(3, 30, full(3))
    with pytest.raises(JournalError, match="below next_seq"):
        journal.write_snapshot(3, 31, full(4))
    with pytest.raises(JournalError, match="delta payload"):
        journal.write_snapshot(4, 40, encode_delta(state(3), state(4)))
    with pytest.raises(JournalError, match="another state hash"):
        journal.write_snapshot(4, 40, full(4), state_hash=state_hash(state(5)))
    with pytest.raises(JournalError, match="not a valid codec payload"):
        journal.write_snapshot(4, 40, b"not a payload at all")
    with pytest.raises(JournalError, match="non-negative"):
        journal.write_snapshot(-1, 0, full(4))
    assert journal.local is not None and journal.local.seq == 3


# ------------------------------------------------------------------ acks, transfers, bounds


def test_acking_a_snapshot_on_disk_only_rewrites_the_record(journal: Journal) -> None:
    journal.write_snapshot(1, 10, full(1))
    path = journal.path / "snap-0000000000000001.ers"
    before = os.stat(path)
    written = journal.counters["journal_bytes_written"]
    journal.mark_acked(1, state_hash(state(1)))
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert journal.counters["journal_bytes_written"] == written  # no snapshot bytes
    assert journal.acked is not None and journal.acked.seq == 1
    assert journal.local is not None and journal.local.file == journal.acked.file
    journal.write_snapshot(2, 20, full(2))  # the acked file stays, it is the delta base
    assert snap_files(journal) == ["snap-0000000000000001.ers", "snap-0000000000000002.ers"]
    with pytest.raises(JournalError, match="has state hash"):
        journal.mark_acked(2, state_hash(state(3)))


def test_at_most_three_snapshot_files_with_acked_inflight_and_local(journal: Journal) -> None:
    h = {i: state_hash(state(i)) for i in range(10)}
    journal.write_snapshot(1, 1, full(1))
    journal.mark_acked(1, h[1])
    journal.write_snapshot(2, 2, full(2))
    delta = encode_delta(state(1), state(2))
    t = journal.begin_transfer(2, base_seq=1, count=2, payload=delta)
    assert t.state_hash == h[2] and t.size == len(delta)
    journal.write_snapshot(3, 3, full(3))  # acked 1, in flight 2, local 3
    assert [s.seq for s in journal.meta.snapshots] == [1, 2, 3]
    assert journal.holds(2, h[2])
    journal.write_snapshot(4, 4, full(4))  # a fourth would be too many: 2's file goes
    assert [s.seq for s in journal.meta.snapshots] == [1, 4]
    assert len(snap_files(journal)) == 3 - 1
    assert not journal.holds(2, h[2])
    assert journal.transfer is not None and journal.transfer.seq == 2  # still queryable
    with pytest.raises(JournalError, match="no snapshot with seq 2 on disk"):
        journal.mark_acked(2, h[2])
    journal.mark_acked(2, h[2], payload=full(2), step=2)
    assert journal.transfer is None  # settled by the same commit
    assert journal.acked is not None and journal.acked.seq == 2
    assert [s.seq for s in journal.meta.snapshots] == [2, 4]
    assert not any(n.startswith("xfer-") for n in os.listdir(journal.path))
    assert journal.verify(deep=True).ok


def test_transfer_payload_survives_a_reopen(tmp_path: Path) -> None:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        j.write_snapshot(1, 1, full(1))
        j.mark_acked(1, state_hash(state(1)))
        j.write_snapshot(2, 2, full(2))
        delta = encode_delta(state(1), state(2), level="small")
        j.begin_transfer(2, base_seq=1, count=3, payload=delta)
    with Journal.open(tmp_path, "job-1") as j:
        t = j.transfer
        assert t is not None and (t.seq, t.base_seq, t.count, t.size) == (2, 1, 3, len(delta))
        assert j.read_transfer_payload() == delta
        j.end_transfer()
        assert j.transfer is None and j.read_transfer_payload() is None
        assert not any(n.startswith("xfer-") for n in os.listdir(j.path))


def test_transfer_without_payload_is_only_a_record(journal: Journal) -> None:
    journal.write_snapshot(1, 1, full(1))
    t = journal.begin_transfer(1, base_seq=None, count=2, size=1000)
    assert t.file is None and journal.read_transfer_payload() is None
    journal.write_snapshot(2, 2, full(2))
    t2 = journal.begin_transfer(2, base_seq=None, count=1, payload=full(2))
    assert journal.transfer == t2 and journal.next_seq == 3
    # the first transfer's snapshot file is no longer needed
    assert [s.seq for s in journal.meta.snapshots] == [2]


def test_transfers_must_be_against_the_acknowledged_state(journal: Journal) -> None:
    journal.write_snapshot(1, 1, full(1))
    journal.mark_acked(1, state_hash(state(1)))
    journal.write_snapshot(2, 2, full(2))
    with pytest.raises(JournalError, match="invariant 1"):
        journal.begin_transfer(2, base_seq=0, count=1, payload=encode_delta(state(0), state(2)))
    with pytest.raises(JournalError, match="base hash"):
        journal.begin_transfer(2, base_seq=1, count=1, payload=encode_delta(state(0), state(2)))
    with pytest.raises(JournalError, match="base hash"):
        journal.begin_transfer(2, base_seq=None, count=1, payload=encode_delta(state(1), state(2)))
    with pytest.raises(JournalError, match="not above the acknowledged"):
        journal.begin_transfer(1, base_seq=None, count=1, payload=full(1))
    with pytest.raises(JournalError, match="chunks"):
        journal.begin_transfer(2, base_seq=None, count=10**6, payload=full(2))
    with pytest.raises(JournalError, match="positive"):
        journal.begin_transfer(2, base_seq=None, count=0, payload=full(2))
    assert journal.transfer is None


def test_clear_acked_forgets_the_base_and_a_delta_transfer(journal: Journal) -> None:
    journal.write_snapshot(1, 1, full(1))
    journal.mark_acked(1, state_hash(state(1)))
    journal.write_snapshot(2, 2, full(2))
    journal.begin_transfer(2, base_seq=1, count=1, payload=encode_delta(state(1), state(2)))
    journal.clear_acked()
    assert journal.acked is None and journal.transfer is None
    assert [s.seq for s in journal.meta.snapshots] == [2]
    assert journal.verify().ok


def test_epoch_owner_status_and_counters_persist(tmp_path: Path) -> None:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        j.add_counters(bytes_sent=100, bytes_full=1000)
        j.add_counters(bytes_sent=20)
        assert j.counters["bytes_sent"] == 120
        j.update(epoch=2, owner="server", status="fenced")
        j.add_counters(acks=1)  # flushed by close()
        with pytest.raises(JournalError, match="status"):
            j.update(status="paused")
        with pytest.raises(JournalError, match="below the journal's epoch"):
            j.update(epoch=1)
        with pytest.raises(JournalError, match="owner"):
            j.update(owner="nobody")
    with Journal.open(tmp_path, "job-1", readonly=True) as j:
        m = j.meta
        assert (m.epoch, m.owner, m.status) == (2, "server", "fenced")
        assert m.counters["bytes_sent"] == 120 and m.counters["bytes_full"] == 1000
        assert m.counters["acks"] == 1


def test_a_fenced_or_released_job_takes_no_new_snapshots(journal: Journal) -> None:
    journal.write_snapshot(1, 1, full(1))
    journal.update(epoch=2, owner="server", status="fenced")
    with pytest.raises(JournalError, match="fenced"):
        journal.write_snapshot(2, 2, full(2))
    with pytest.raises(JournalError, match="fenced"):
        journal.begin_transfer(1, base_seq=None, count=1, payload=full(1))
    journal.update(epoch=3, owner="edge", status="running")  # handed back
    journal.write_snapshot(2, 2, full(2))
    journal.update(status="released")
    with pytest.raises(JournalError, match="released"):
        journal.write_snapshot(3, 3, full(3))


def test_writer_open_removes_leftovers_reader_reports_them(tmp_path: Path) -> None:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        j.write_snapshot(1, 1, full(1))
        path = j.path
    (path / ".snap-0000000000000002.7.tmp").write_bytes(b"half a snapshot")
    (path / "snap-0000000000000009.ers").write_bytes(b"orphan")
    (path / ".meta.3.tmp").write_bytes(b"half a record")
    (path / "notes.txt").write_text("not ours")
    reports = verify_journal(tmp_path)
    assert len(reports) == 1 and reports[0].ok
    assert set(reports[0].unreferenced) >= {
        ".snap-0000000000000002.7.tmp",
        "snap-0000000000000009.ers",
        ".meta.3.tmp",
    }
    with Journal.open(tmp_path, "job-1") as j:
        assert sorted(os.listdir(path)) == [
            "LOCK",
            "meta",
            "notes.txt",
            "snap-0000000000000001.ers",
        ]
        assert j.verify().unreferenced == ("notes.txt",)


# ------------------------------------------------------------------ damage


def _rewrite(path: Path, mutate: Any) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))


def _with_checksum(body: bytes) -> bytes:
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@pytest.fixture
def written(tmp_path: Path) -> Path:
    with Journal.create(tmp_path, "job-1", device="dev-1") as j:
        j.write_snapshot(1, 1, full(1))
        j.mark_acked(1, state_hash(state(1)))
        j.write_snapshot(2, 2, full(2))
        j.begin_transfer(2, base_seq=1, count=2, payload=encode_delta(state(1), state(2)))
        return j.path


def test_flipped_byte_in_the_record_is_a_clear_error(written: Path) -> None:
    def flip(d: bytearray) -> bytearray:
        d[len(d) // 2] ^= 0x40
        return d

    _rewrite(written / "meta", flip)
    with pytest.raises(JournalError, match="checksum mismatch"):
        Journal.open(written.parent, "job-1")
    [report] = verify_journal(written.parent)
    assert not report.ok and "checksum mismatch" in report.problems[0]


def test_truncated_record_is_a_clear_error(written: Path) -> None:
    _rewrite(written / "meta", lambda d: d[:-3])
    with pytest.raises(JournalError, match=r"checksum mismatch|truncated"):
        Journal.open(written.parent, "job-1")
    _rewrite(written / "meta", lambda d: d[:5])
    with pytest.raises(JournalError, match="truncated"):
        Journal.open(written.parent, "job-1")


def test_unknown_format_version_is_named(written: Path) -> None:
    def bump(d: bytearray) -> bytes:
        d[4:6] = struct.pack("<H", FORMAT_VERSION + 1)
        return _with_checksum(bytes(d[:-8]))

    _rewrite(written / "meta", bump)
    with pytest.raises(JournalError, match=f"format version {FORMAT_VERSION + 1}") as info:
        Journal.open(written.parent, "job-1")
    assert info.value.hint and "edge-resume version" in info.value.hint


def test_damaged_snapshot_is_caught_on_read_and_by_verify(written: Path) -> None:
    def flip(d: bytearray) -> bytearray:
        d[-20] ^= 0x01
        return d

    _rewrite(written / "snap-0000000000000002.ers", flip)
    with Journal.open(written.parent, "job-1") as j:
        with pytest.raises(JournalError, match=r"snapshot file .* checksum mismatch"):
            j.read_local()
        assert j.read_acked() is not None  # the other one is fine
        report = j.verify()
        assert not report.ok and any("snap-0000000000000002" in p for p in report.problems)


def test_truncated_transfer_file_is_caught(written: Path) -> None:
    _rewrite(written / "xfer-0000000000000002.ers", lambda d: d[: len(d) // 2])
    with Journal.open(written.parent, "job-1") as j:
        with pytest.raises(JournalError, match="transfer file"):
            j.read_transfer_payload()
        assert not j.verify().ok


def test_missing_snapshot_file_is_caught_on_open(written: Path) -> None:
    os.unlink(written / "snap-0000000000000001.ers")
    with pytest.raises(JournalError, match="is missing"):
        Journal.open(written.parent, "job-1")


def test_a_file_swapped_for_another_of_the_same_kind_is_caught(written: Path) -> None:
    # a valid snapshot file, but not the one the record names
    (written / "snap-0000000000000002.ers").write_bytes(
        (written / "snap-0000000000000001.ers").read_bytes()
    )
    with pytest.raises(JournalError, match="does not match the metadata record"):
        Journal.open(written.parent, "job-1", readonly=True).read_local()


def test_a_snapshot_file_in_place_of_the_record_is_caught(written: Path) -> None:
    (written / "meta").write_bytes((written / "snap-0000000000000001.ers").read_bytes())
    with pytest.raises(JournalError, match="not an edge-resume metadata record"):
        Journal.open(written.parent, "job-1")


def test_seeded_random_damage_always_gives_journal_error(written: Path) -> None:
    rng = random.Random(7)
    originals = {p: p.read_bytes() for p in written.iterdir() if p.name != "LOCK"}
    for round_ in range(300):
        target = rng.choice(sorted(originals))
        data = bytearray(originals[target])
        how = rng.randrange(4)
        if how == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == 1:
            data = data[: rng.randrange(len(data))]
        elif how == 2:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
        if bytes(data) == originals[target]:
            continue
        target.write_bytes(bytes(data))
        try:
            with Journal.open(written.parent, "job-1", readonly=True) as j:
                j.read_local()
                j.read_acked()
                j.read_transfer_payload()
            pytest.fail(f"round {round_}: damage to {target.name} ({how}) went unnoticed")
        except JournalError:
            pass
        finally:
            target.write_bytes(originals[target])
    with Journal.open(written.parent, "job-1") as j:
        assert j.verify(deep=True).ok


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=20,
)
_fields = [
    "job",
    "device",
    "epoch",
    "owner",
    "status",
    "next_seq",
    "snapshots",
    "local_seq",
    "acked_seq",
    "transfer",
    "counters",
    "info",
    "generation",
    "created_ms",
    "updated_ms",
]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(_fields), st.booleans(), _plain), min_size=1, max_size=3
    )
)
def test_fuzz_record_fields_with_valid_checksums(
    written: Path, changes: list[tuple[str, bool, Any]]
) -> None:
    """A record that passes its checksum but holds a wrong or missing field is a JournalError,
    never another exception, and never a journal that reads garbage."""
    original = (written / "meta").read_bytes()
    hlen = struct.unpack("<I", original[6:10])[0]
    body = msgpack.unpackb(original[10 : 10 + hlen], raw=False)
    for name, drop, value in changes:
        if drop:
            body.pop(name, None)
        else:
            body[name] = value
    head = msgpack.packb(body, use_bin_type=True)
    raw = b"ERJM" + struct.pack("<HI", FORMAT_VERSION, len(head)) + head
    (written / "meta").write_bytes(_with_checksum(raw))
    try:
        with Journal.open(written.parent, "job-1", readonly=True) as j:
            # whatever it accepted must still be consistent with the files on disk
            assert j.verify().ok
            j.read_local()
            j.read_acked()
            j.read_transfer_payload()
    except JournalError:
        pass
    finally:
        (written / "meta").write_bytes(original)


def test_a_failed_write_leaves_the_journal_as_it_was(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write_snapshot(1, 1, full(1))
    before = journal.meta

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(JournalError, match="No space left"):
        journal.write_snapshot(2, 2, full(2))
    monkeypatch.undo()
    assert journal.meta == before
    assert own_files(journal) == ["meta", "snap-0000000000000001.ers"]  # no temp file left
    assert journal.verify().ok
    journal.write_snapshot(2, 2, full(2))  # and it goes on once there is room
    assert journal.local is not None and journal.local.seq == 2


def test_a_commit_whose_folder_fsync_fails_is_still_the_record_in_memory(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write_snapshot(1, 1, full(1))
    real_fsync = os.fsync
    calls = {"n": 0}

    def fail_on_folders(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_on_folders)
    with pytest.raises(JournalError, match="fsync the folder"):
        journal.mark_acked(1, state_hash(state(1)))
    monkeypatch.undo()
    assert calls["n"] == 1
    # the record was renamed into place: memory follows the disk, nothing is deleted wrongly
    on_disk = Journal._load_meta(journal.path)
    assert journal.meta == on_disk and journal.meta.acked_seq == 1
    journal.write_snapshot(2, 2, full(2))
    assert journal.verify(deep=True).ok
