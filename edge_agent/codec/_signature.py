"""What the encoder knows of a base: its digests, and (lazily) row and block hashes.

A :class:`Signature` is the rsync-style low-memory form of a base: per-entry digests,
xxh3-64 hashes of fixed-size blocks of every array's bytes, and xxh3-128 hashes of the
rows (along axis 0) of arrays with a moderate number of rows. It holds no array data, so
an agent short of memory can drop its acknowledged state and keep only this.

:class:`BaseIndex` is the encoder's view of either kind of base (a full state or a
signature). This module only hashes; it never copies a state's data except, per entry,
to make a non-contiguous array contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from edge_agent.errors import OptionError
from edge_agent.state import (
    KIND_ARRAY,
    EntryDigest,
    HashedState,
    State,
    state_digests,
    state_hash_from_digests,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_GATHER_ROWS",
    "BaseIndex",
    "Signature",
    "block_hashes",
    "row_hashes",
    "signature",
]

#: the default block size (bytes) of a signature's block hashes
DEFAULT_BLOCK_SIZE = 1024
#: arrays with more rows than this are not matched row by row (GATHER)
MAX_GATHER_ROWS = 4096


def _contig(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return np.ascontiguousarray(a)


def block_hashes(a: npt.NDArray[Any], block_size: int) -> npt.NDArray[np.uint64]:
    """xxh3-64 of each block_size-byte block of an array's C-order bytes (the last short)."""
    mv = _contig(a).reshape(-1).view(np.uint8).data
    n = len(mv)
    h = xxhash.xxh3_64_intdigest
    return np.array([h(mv[i : i + block_size]) for i in range(0, n, block_size)], np.uint64)


def row_hashes(a: npt.NDArray[Any]) -> list[bytes]:
    """xxh3-128 of each row (along axis 0) of an array's C-order bytes."""
    c = _contig(a)
    rows = c.reshape(c.shape[0], -1).view(np.uint8) if c.size else c.reshape(c.shape[0], 0)
    h = xxhash.xxh3_128_digest
    return [h(rows[i].data) for i in range(rows.shape[0])]


def gather_candidate(d: EntryDigest) -> bool:
    """Whether an array's rows are worth indexing for GATHER."""
    return (
        d.kind == KIND_ARRAY
        and len(d.shape) >= 2
        and 1 <= d.shape[0] <= MAX_GATHER_ROWS
        and d.nbytes > 0
    )


@dataclass(frozen=True)
class Signature:
    """Hashes of a base state, enough to encode deltas against it without its data.

    Make one with :func:`signature`; pass it to ``encode_delta`` as the base. The
    receiver applies such a delta to the full base state as usual."""

    digests: Mapping[str, EntryDigest]
    block_size: int
    blocks: Mapping[str, npt.NDArray[np.uint64]]
    rows: Mapping[str, list[bytes]]
    state_hash: bytes = field(default=b"")

    @property
    def nbytes(self) -> int:
        """Roughly what the signature holds in memory (hashes only)."""
        return (
            sum(b.nbytes for b in self.blocks.values())
            + 16 * sum(len(r) for r in self.rows.values())
            + 100 * len(self.digests)
        )


def signature(state: State, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Signature:
    """The hashes of a state (block hashes every ``block_size`` bytes, a multiple of 16)."""
    if type(block_size) is not int or block_size < 16 or block_size % 16:
        raise OptionError(f"block_size {block_size!r} is not a positive multiple of 16")
    digests = state_digests(state)
    blocks: dict[str, npt.NDArray[np.uint64]] = {}
    rows: dict[str, list[bytes]] = {}
    for k, d in digests.items():
        if d.kind != KIND_ARRAY or d.nbytes == 0:
            continue
        blocks[k] = block_hashes(state[k], block_size)
        if gather_candidate(d):
            rows[k] = row_hashes(state[k])
    return Signature(digests, block_size, blocks, rows, state_hash_from_digests(digests))


class BaseIndex:
    """The encoder's view of a base: digests, lookups by content, lazy row hashes."""

    def __init__(self, base: State | Signature) -> None:
        self.signature: Signature | None
        if isinstance(base, Signature):
            self.signature = base
            self.state: State | None = None
            self.digests = base.digests
            self.state_hash = base.state_hash or state_hash_from_digests(base.digests)
        else:
            self.signature = None
            self.state = base
            self.digests = state_digests(base)
            self.state_hash = (
                base.state_hash
                if isinstance(base, HashedState)
                else state_hash_from_digests(self.digests)
            )
        self.keys = sorted(self.digests)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.by_digest: dict[EntryDigest, str] = {}
        self.by_data: dict[bytes, str] = {}
        for k in self.keys:
            d = self.digests[k]
            self.by_digest.setdefault(d, k)
            if d.kind == KIND_ARRAY and d.nbytes > 0:
                self.by_data.setdefault(d.data_hash, k)
        self.nbytes = sum(d.nbytes for d in self.digests.values())
        self._rows: dict[str, dict[bytes, int]] = {}

    def array(self, key: str) -> npt.NDArray[Any] | None:
        """The base array under key, or None when the base is a signature."""
        if self.state is None:
            return None
        a = self.state[key]
        assert isinstance(a, np.ndarray)
        return a

    def rows(self, key: str) -> dict[bytes, int]:
        """Row hash -> first row index, for a gather candidate."""
        got = self._rows.get(key)
        if got is None:
            if self.signature is not None:
                hashes = self.signature.rows.get(key, [])
            else:
                a = self.array(key)
                assert a is not None
                hashes = row_hashes(a)
            got = {}
            for i, h in enumerate(hashes):
                got.setdefault(h, i)
            self._rows[key] = got
        return got

    def blocks(self, key: str) -> npt.NDArray[np.uint64] | None:
        if self.signature is None:
            return None
        return self.signature.blocks.get(key)
