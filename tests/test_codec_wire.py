"""The envelope: layout, read_header, and the refusals that happen before any parsing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

from edge_agent.codec import (
    FORMAT_VERSION,
    PayloadHeader,
    _wire,
    apply_delta,
    encode_delta,
    read_header,
)
from edge_agent.errors import PayloadCorrupt, PayloadTruncated, UnsupportedVersion
from edge_agent.state import state_hash

STATE = {"x": np.arange(100, dtype=np.float32), "n": 3}
NEW = {"x": np.arange(101, dtype=np.float32), "n": 4}


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_layout_of_a_full_snapshot() -> None:
    p = encode_delta(None, STATE)
    assert p[:3] == b"ERD" and p[3] == FORMAT_VERSION and p[4] == 0
    assert p[5:21] == state_hash(STATE)
    (hlen,) = struct.unpack_from("<I", p, 21)
    assert 25 + hlen + 8 <= len(p)
    assert struct.unpack("<Q", p[-8:])[0] == xxhash.xxh3_64_intdigest(p[:-8])


def test_layout_of_a_delta() -> None:
    p = encode_delta(STATE, NEW)
    assert p[4] == 1
    assert p[5:21] == state_hash(NEW) and p[21:37] == state_hash(STATE)


def test_read_header() -> None:
    p = encode_delta(STATE, NEW)
    h = read_header(p)
    assert h == PayloadHeader(FORMAT_VERSION, state_hash(STATE), state_hash(NEW), len(p))
    assert read_header(memoryview(p)) == h
    assert read_header(bytearray(p)) == h
    assert read_header(encode_delta(None, NEW)).base_hash is None


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 5, 20, 24, 30, -9, -1])
def test_truncated(cut: int) -> None:
    p = encode_delta(STATE, NEW)
    with pytest.raises((PayloadTruncated, PayloadCorrupt)) as info:
        read_header(p[:cut])
    if 0 < cut < 40 or cut == 0:
        assert isinstance(info.value, PayloadTruncated)


def test_truncated_with_a_header_longer_than_the_rest_says_truncated() -> None:
    p = encode_delta(STATE, NEW)
    with pytest.raises(PayloadTruncated, match="shorter than its"):
        read_header(p[:60])


def test_wrong_magic_version_flags_checksum() -> None:
    p = encode_delta(STATE, NEW)
    with pytest.raises(PayloadCorrupt, match="magic"):
        read_header(b"XYZ" + p[3:])
    with pytest.raises(UnsupportedVersion, match="version 9"):
        read_header(p[:3] + bytes([9]) + p[4:])
    with pytest.raises(PayloadCorrupt, match="reserved"):
        read_header(_seal(p[:4] + bytes([0x81]) + p[5:-8]))
    bad = bytearray(p)
    bad[-20] ^= 0x10
    with pytest.raises(PayloadCorrupt, match="checksum"):
        read_header(bytes(bad))
    with pytest.raises(PayloadCorrupt):
        read_header("not bytes")  # type: ignore[arg-type]


def test_header_must_be_a_msgpack_array_within_limits() -> None:
    p = encode_delta(None, STATE)
    fixed = 21
    for head in (b"\xc1", b"\x81\xa1a\x01", b"\x92\x01"):  # invalid, a map, a short array
        body = p[:fixed] + struct.pack("<I", len(head)) + head
        with pytest.raises(PayloadCorrupt):
            apply_delta(None, _seal(body))
    body = p[:fixed] + struct.pack("<I", 10**6) + b"\x90"
    with pytest.raises(PayloadCorrupt, match="runs past"):
        apply_delta(None, _seal(body))


def test_bounds() -> None:
    assert _wire.stream_bound(1000) == 1024 * 1000 + (1 << 20)
    assert _wire.alloc_bound(1000, 5000) == 5000 + 1024 * 1000 + (1 << 20)
