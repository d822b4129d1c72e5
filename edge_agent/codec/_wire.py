"""The payload envelope: fixed prefix, msgpack header, bulk sections, trailing checksum.

This module owns the byte layout of docs/wire-format.md sections 1-3 and the size bounds
every decoder enforces. It checks the checksum before parsing anything, unpacks the
msgpack header with explicit limits derived from its length, and translates every
foreign exception into the CodecError tree. It never decompresses bulk data (that is
:mod:`._planes`) and never allocates more than the payload's own size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from edge_agent.errors import PayloadCorrupt, PayloadTruncated, UnsupportedVersion

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Envelope",
    "PayloadHeader",
    "alloc_bound",
    "pack",
    "read_header",
    "split",
    "stream_bound",
]

MAGIC = b"ERD"
FORMAT_VERSION = 1
FLAG_DELTA = 0x01

#: decoded streams and fresh result arrays may each exceed what the payload holds by
#: this factor per payload byte, plus :data:`SLACK` bytes (docs/wire-format.md, "Bounds")
EXPANSION = 1024
SLACK = 1 << 20

_PREFIX = 5  # magic, version, flags
_HASH = 16
_LEN = 4
_CHECK = 8


def stream_bound(payload_len: int) -> int:
    """The most bytes of decoded streams a payload of this length may announce."""
    return EXPANSION * payload_len + SLACK


def alloc_bound(payload_len: int, base_nbytes: int) -> int:
    """The most bytes of fresh result arrays a payload may make against a base."""
    return base_nbytes + EXPANSION * payload_len + SLACK


@dataclass(frozen=True, slots=True)
class PayloadHeader:
    """What a payload says about itself, read without decoding its body."""

    version: int
    base_hash: bytes | None  # None: a full snapshot
    state_hash: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """A checked payload, split into its parts (bulk is a view, not a copy)."""

    header: PayloadHeader
    meta: list[Any]  # the msgpack header, an array (shape checked by the plan decoder)
    bulk: memoryview  # sections, then padding
    size: int


def pack(
    state_hash: bytes,
    base_hash: bytes | None,
    meta: list[Any],
    bulk: Sequence[bytes | memoryview],
) -> bytes:
    """Assemble a payload from its parts (the encoder's half of :func:`split`)."""
    head = msgpack.packb(meta, use_bin_type=True)
    flags = FLAG_DELTA if base_hash is not None else 0
    parts: list[bytes | memoryview] = [MAGIC, bytes([FORMAT_VERSION, flags]), state_hash]
    if base_hash is not None:
        parts.append(base_hash)
    parts += [struct.pack("<I", len(head)), head, *bulk]
    body = b"".join(parts)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def _check(payload: bytes | bytearray | memoryview) -> tuple[memoryview, int, int]:
    """Magic, version, length and checksum. Returns (view, flags, offset past hashes)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadCorrupt(f"a payload is bytes, not a {type(payload).__name__}")
    mv = memoryview(payload)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n < len(MAGIC):
        raise PayloadTruncated(f"payload of {n} bytes is shorter than its magic")
    if bytes(mv[:3]) != MAGIC:
        raise PayloadCorrupt(f"payload starts with {bytes(mv[:3])!r}, not the magic {MAGIC!r}")
    if n < _PREFIX:
        raise PayloadTruncated(f"payload of {n} bytes ends inside its fixed header")
    if mv[3] != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"payload format version {mv[3]} is not {FORMAT_VERSION}, the one this build reads",
            hint="upgrade edge-resume on the receiving side",
        )
    flags = mv[4]
    if flags & ~FLAG_DELTA:
        raise PayloadCorrupt(f"payload flags {flags:#04x} set reserved bits")
    fixed = _PREFIX + _HASH + (_HASH if flags & FLAG_DELTA else 0) + _LEN
    if n < fixed + _CHECK:
        raise PayloadTruncated(f"payload of {n} bytes is shorter than its {fixed + 8}-byte frame")
    (check,) = struct.unpack_from("<Q", mv, n - _CHECK)
    if xxhash.xxh3_64_intdigest(mv[: n - _CHECK]) != check:
        (hlen,) = struct.unpack_from("<I", mv, fixed - _LEN)
        if fixed + hlen + _CHECK > n:
            raise PayloadTruncated(
                f"payload of {n} bytes is shorter than its {hlen}-byte header says "
                "(and its checksum does not match)"
            )
        raise PayloadCorrupt("payload checksum mismatch: the bytes were changed in transit")
    return mv, flags, fixed


def read_header(payload: bytes | bytearray | memoryview) -> PayloadHeader:
    """Version, base hash, state hash and size, after checking magic, version and checksum."""
    mv, flags, _ = _check(payload)
    state = bytes(mv[_PREFIX : _PREFIX + _HASH])
    base = bytes(mv[_PREFIX + _HASH : _PREFIX + 2 * _HASH]) if flags & FLAG_DELTA else None
    return PayloadHeader(FORMAT_VERSION, base, state, len(mv))


def split(payload: bytes | bytearray | memoryview) -> Envelope:
    """Check a payload and unpack its msgpack header (with limits from its length)."""
    mv, flags, fixed = _check(payload)
    n = len(mv)
    (hlen,) = struct.unpack_from("<I", mv, fixed - _LEN)
    if fixed + hlen + _CHECK > n:
        raise PayloadCorrupt(f"header length {hlen} runs past the end of a {n}-byte payload")
    raw = mv[fixed : fixed + hlen]
    try:
        meta = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_str_len=hlen,
            max_bin_len=hlen,
            max_array_len=hlen,
            max_map_len=hlen // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, TypeError, StackError...)
        raise PayloadCorrupt(f"payload header is not valid msgpack: {exc}") from exc
    if not isinstance(meta, list):
        raise PayloadCorrupt(f"payload header is a {type(meta).__name__}, not an array")
    state = bytes(mv[_PREFIX : _PREFIX + _HASH])
    base = bytes(mv[_PREFIX + _HASH : _PREFIX + 2 * _HASH]) if flags & FLAG_DELTA else None
    head = PayloadHeader(FORMAT_VERSION, base, state, n)
    return Envelope(head, meta, mv[fixed + hlen : n - _CHECK], n)
