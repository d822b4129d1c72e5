"""FolderBlobStore: content addressing, atomic writes, verification on read."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_agent.errors import StoreCorrupt, StoreError
from server.store.blobs import FolderBlobStore, blob_key, is_blob_key


def test_put_get_list_delete(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    k1 = bs.put(b"hello")
    k2 = bs.put(memoryview(b"world" * 1000))
    assert k1 == blob_key(b"hello") and is_blob_key(k1)
    assert bs.path(k1) == tmp_path / "b" / k1[:2] / k1
    assert bs.get(k1) == b"hello" and bs.get(k2) == b"world" * 1000
    assert {(i.key, i.size) for i in bs.list()} == {(k1, 5), (k2, 5000)}
    bs.delete(k1)
    bs.delete(k1)  # deleting a missing blob is fine
    assert [i.key for i in bs.list()] == [k2]
    with pytest.raises(StoreCorrupt, match="missing"):
        bs.get(k1)


def test_put_is_idempotent_and_refreshes_mtime(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    key = bs.put(b"x" * 100)
    os.utime(bs.path(key), (1, 1))
    assert bs.put(b"x" * 100) == key
    assert bs.path(key).stat().st_mtime > time.time() - 60
    assert len(list(bs.list())) == 1


def test_put_repairs_a_damaged_copy(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    key = bs.put(b"payload bytes")
    bs.path(key).write_bytes(b"payload bytez")
    with pytest.raises(StoreCorrupt, match="damaged"):
        bs.get(key)
    assert bs.put(b"payload bytes") == key
    assert bs.get(key) == b"payload bytes"


def test_get_refuses_a_flipped_byte_or_truncation(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    key = bs.put(bytes(range(256)) * 10)
    raw = bytearray(bs.path(key).read_bytes())
    raw[1000] ^= 0x01
    bs.path(key).write_bytes(bytes(raw))
    with pytest.raises(StoreCorrupt):
        bs.get(key)
    bs.path(key).write_bytes(bytes(range(256)) * 9)
    with pytest.raises(StoreCorrupt):
        bs.get(key)


def test_bad_keys_and_missing_folder(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    for bad in ["", "../../etc/passwd", "A" * 32, "0" * 31]:
        with pytest.raises(StoreError, match="not a blob key"):
            bs.get(bad)
    with pytest.raises(StoreError, match="does not exist"):
        FolderBlobStore(tmp_path / "nope", create=False)


def test_sweep_removes_old_temporaries_only(tmp_path: Path) -> None:
    bs = FolderBlobStore(tmp_path / "b")
    key = bs.put(b"data")
    old = bs.path(key).parent / ".tmp-old"
    young = bs.path(key).parent / ".tmp-young"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    os.utime(old, (1, 1))
    assert bs.temporaries() == 2
    assert [i.key for i in bs.list()] == [key]  # temporaries are never listed
    assert bs.sweep(time.time() - 60) == 1
    assert not old.exists() and young.exists()
