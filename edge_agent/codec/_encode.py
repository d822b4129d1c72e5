"""The encoder: a base (state, signature or None) and a new state in, a payload out.

Per entry of the new state it picks the cheapest op it can prove correct (by hashes, or
by comparing with the base's data when it has it): unchanged entries are left out; REF
and VIEW find content anywhere in the base; CAST, GROW, GATHER, XOR/SPARSE (data base)
and PATCH (signature base) describe a change against the same key; FULL is the fallback
whenever nothing else is smaller. Literal bytes of all entries are collected into one
stream per (role, dtype) and coded by :mod:`._planes`, so tables and headers are paid
once per payload, not once per entry.

Pure: no I/O. Memory: besides the payload it builds, the encoder holds per-entry
temporaries (a contiguous copy of a non-contiguous array, a grown slice, the changed
elements of a sparse update); XOR data is computed plane by plane as it is coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import xxhash

from edge_agent.codec import _planes, _wire
from edge_agent.codec._plan import (
    CAST,
    FULL,
    GATHER,
    GROW,
    PATCH,
    PLAIN,
    REF,
    SCALAR,
    SPARSE,
    VIEW,
    XOR,
    cast_allowed,
    stream_width,
)
from edge_agent.codec._signature import BaseIndex, Signature, gather_candidate
from edge_agent.errors import OptionError
from edge_agent.state import (
    KIND_ARRAY,
    KIND_PLAIN,
    EntryDigest,
    State,
    state_digests,
    state_hash_from_digests,
)

__all__ = ["encode_delta"]

Array = npt.NDArray[Any]
Level = Literal["small", "fast"]

# stream roles: literal values, dense XOR, sparse XOR values, sparse gaps
_LIT, _XOR, _XSV, _IDX = range(4)
_SCAN = 1 << 20  # elements per block when scanning for changed elements
#: GATHER looks for repeated tail cells only when there are at most this many
MAX_DEDUP_CELLS = 4096


@dataclass
class _Stream:
    index: int
    dtype: np.dtype[Any]
    chunks: list[_planes.Chunk] = field(default_factory=list)
    nbytes: int = 0


def _bytes(a: Array) -> npt.NDArray[np.uint8]:
    """C-order bytes of an array (a view when it is contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _region_hash(c: Array, axis: int, stop: int) -> bytes:
    """xxh3-128 of c[..., :stop, ...] (axis ``axis``) in C order; c is C-contiguous."""
    shape = c.shape
    outer = _prod(shape[:axis])
    inner = _prod(shape[axis + 1 :]) * c.dtype.itemsize
    take = stop * inner
    flat = c.reshape(-1).view(np.uint8)
    if outer == 1:
        return xxhash.xxh3_128_digest(flat[:take].data)
    rows = flat.reshape(outer, shape[axis] * inner)
    if outer <= 1024:
        h = xxhash.xxh3_128()
        for o in range(outer):
            h.update(rows[o, :take].data)
        return h.digest()
    return xxhash.xxh3_128_digest(np.ascontiguousarray(rows[:, :take]).data)


def _tail_cells(c: Array, axis: int, keep: int) -> tuple[Array, npt.NDArray[np.int64] | None]:
    """The tail of c along axis (from keep on) as cells [rows, k, *rest], and the GATHER
    dup table: -1, or an earlier row whose cell at the same position is equal (beams that
    share their history), or None when no cell repeats or there are too many to look."""
    tail = c[(slice(None),) * axis + (slice(keep, None),)]
    cells = np.ascontiguousarray(np.moveaxis(tail, axis, 1))
    nrows, k = cells.shape[0], cells.shape[1]
    if nrows < 2 or nrows * k > MAX_DEDUP_CELLS:
        return cells, None
    flat = cells.reshape(nrows * k, -1).view(np.uint8)
    h = xxhash.xxh3_128_digest
    hashes = [h(flat[i].data) for i in range(nrows * k)]
    table = np.full((nrows, k), -1, np.int64)
    for p in range(k):
        seen: dict[bytes, int] = {}
        for i in range(nrows):
            j = seen.setdefault(hashes[i * k + p], i)
            if j != i:
                table[i, p] = j
    return cells, (table if np.any(table >= 0) else None)


def _words(b: npt.NDArray[np.uint8], itemsize: int) -> Array:
    if itemsize == 16:
        return b.view(np.uint64).reshape(-1, 2)
    return b.view(np.dtype(f"u{itemsize}"))


def _planes_estimate(buf: npt.NDArray[np.uint8] | _planes.XorChunk, w: int, level: Level) -> float:
    total = 0.0
    for j in range(w):
        if isinstance(buf, _planes.XorChunk):
            plane = np.bitwise_xor(buf.a[j::w], buf.b[j::w])
        else:
            plane = np.ascontiguousarray(buf[j::w])
        total += _planes.estimate(plane, level)
    return total


class _Encoder:
    def __init__(self, base: BaseIndex | None, level: Level) -> None:
        self.base = base
        self.level: Level = level
        self.ops: list[list[Any]] = []
        self.streams: dict[tuple[int, str], _Stream] = {}
        self.alloc = 0

    # -- streams

    def _stream(self, role: int, dtype: np.dtype[Any]) -> _Stream:
        k = (role, dtype.str)
        s = self.streams.get(k)
        if s is None:
            s = self.streams[k] = _Stream(len(self.streams), dtype)
        return s

    def _put(self, role: int, dtype: np.dtype[Any], chunk: _planes.Chunk) -> int:
        s = self._stream(role, dtype)
        s.chunks.append(chunk)
        s.nbytes += chunk.nbytes
        return s.index

    # -- entries

    def entry(self, name: str, value: Any, d: EntryDigest) -> None:
        b = self.base
        key: int | str = name
        bd = None
        if b is not None:
            bd = b.digests.get(name)
            if bd == d:
                return  # unchanged: left out
            key = b.index.get(name, name)
            src = b.by_digest.get(d)
            if src is not None:
                self.ops.append([REF, key, b.index[src]])
                return
            if d.kind == KIND_ARRAY and d.nbytes > 0:
                src = b.by_data.get(d.data_hash)
                if src is not None:
                    self.ops.append(
                        [VIEW, key, None if src == name else b.index[src], d.dtype, list(d.shape)]
                    )
                    self.alloc += d.nbytes
                    return
        if d.kind == KIND_PLAIN:
            self.ops.append([PLAIN, key, value])
            return
        if d.kind != KIND_ARRAY:
            self.ops.append([SCALAR, key, d.dtype, np.asarray(value).tobytes()])
            return
        if bd is not None and bd.kind == KIND_ARRAY and self._delta(key, name, value, d, bd):
            return
        self._full(key, value, d)

    def _full(self, key: int | str, arr: Array, d: EntryDigest) -> None:
        if d.nbytes == 0:
            self.ops.append([FULL, key, d.dtype, list(d.shape), None])
            return
        s = self._put(_LIT, arr.dtype, _planes.BytesChunk(_bytes(arr)))
        self.ops.append([FULL, key, d.dtype, list(d.shape), s])

    def _delta(
        self, key: int | str, name: str, arr: Array, d: EntryDigest, bd: EntryDigest
    ) -> bool:
        b = self.base
        assert b is not None
        base_arr = b.array(name)
        if d.dtype != bd.dtype:
            if d.shape != bd.shape or base_arr is None:
                return False
            if not cast_allowed(np.dtype(bd.dtype), np.dtype(d.dtype)):
                return False
            with np.errstate(all="ignore"):
                c = base_arr.astype(np.dtype(d.dtype), order="C")
            if xxhash.xxh3_128_digest(_bytes(c).data) != d.data_hash:
                return False
            self.ops.append([CAST, key, None, d.dtype])
            self.alloc += d.nbytes
            return True
        c = np.ascontiguousarray(arr)
        if d.shape != bd.shape:
            if len(d.shape) != len(bd.shape):
                return False
            diff = [i for i, (x, y) in enumerate(zip(d.shape, bd.shape, strict=True)) if x != y]
            if len(diff) == 1 and self._grow(key, c, d, bd, diff[0]):
                return True
            return self._gather(key, name, c, d, bd)
        if self._gather(key, name, c, d, bd):
            return True
        if base_arr is not None:
            return self._xor(key, base_arr, c, d)
        return self._patch(key, name, c, d)

    def _grow(self, key: int | str, c: Array, d: EntryDigest, bd: EntryDigest, a: int) -> bool:
        keep = bd.shape[a]
        if d.shape[a] <= keep or _prod(d.shape[:a] + d.shape[a + 1 :]) == 0:
            return False
        if _region_hash(c, a, keep) != bd.data_hash:
            return False
        if a >= 1 and d.shape[0] >= 2:
            cells, dup = _tail_cells(c, a, keep)
            if dup is not None:  # rows repeat each other's new cells: a GATHER says so
                self._emit_gather(key, c.dtype, list(range(d.shape[0])), a, cells, dup)
                self.alloc += d.nbytes
                return True
        lit = np.ascontiguousarray(c[(slice(None),) * a + (slice(keep, None),)])
        s = self._put(_LIT, c.dtype, _planes.BytesChunk(lit.reshape(-1).view(np.uint8)))
        self.ops.append([GROW, key, None, a, lit.size, s])
        self.alloc += d.nbytes
        return True

    def _emit_gather(
        self,
        key: int | str,
        dtype: np.dtype[Any],
        rows: list[int],
        axis: int,
        cells: Array,
        dup: npt.NDArray[np.int64] | None,
    ) -> None:
        lit = cells if dup is None else cells[dup == -1]
        s = None
        if lit.size:
            data = np.ascontiguousarray(lit).reshape(-1).view(np.uint8)
            s = self._put(_LIT, dtype, _planes.BytesChunk(data))
        wire_dup = None if dup is None else dup.reshape(-1).tolist()
        self.ops.append([GATHER, key, None, rows, axis, int(lit.size), s, wire_dup])

    def _gather(self, key: int | str, name: str, c: Array, d: EntryDigest, bd: EntryDigest) -> bool:
        b = self.base
        assert b is not None
        if not gather_candidate(bd) or not gather_candidate(d) or len(d.shape) != len(bd.shape):
            return False
        diff = [i for i in range(1, len(d.shape)) if d.shape[i] != bd.shape[i]]
        if len(diff) > 1:
            return False
        axis = diff[0] if diff else None
        if axis is not None and d.shape[axis] < bd.shape[axis]:
            return False
        table = b.rows(name)
        if not table:
            return False
        rows: list[int] = []
        for i in range(d.shape[0]):
            row = c[i]
            if axis is None:
                h = xxhash.xxh3_128_digest(row.reshape(-1).view(np.uint8).data)
            else:
                h = _region_hash(row, axis - 1, bd.shape[axis])
            r = table.get(h)
            if r is None:
                return False
            rows.append(r)
        if axis is None:
            self.ops.append([GATHER, key, None, rows, None, 0, None, None])
        else:
            cells, dup = _tail_cells(c, axis, bd.shape[axis])
            self._emit_gather(key, c.dtype, rows, axis, cells, dup)
        self.alloc += d.nbytes
        return True

    def _xor(self, key: int | str, base_arr: Array, c: Array, d: EntryDigest) -> bool:
        dt = c.dtype
        isz = dt.itemsize
        w = stream_width(dt)
        bb = _bytes(base_arr)
        nb = c.reshape(-1).view(np.uint8)
        bw = _words(bb, isz)
        nw = _words(nb, isz)
        n = c.size
        limit = n // 4 if isz > 2 else n // 8
        parts: list[npt.NDArray[np.intp]] = []
        count = 0
        for start in range(0, n, _SCAN):
            ne = bw[start : start + _SCAN] != nw[start : start + _SCAN]
            if isz == 16:
                ne = ne.any(axis=1)
            nz = np.flatnonzero(ne)
            count += len(nz)
            if count > limit:
                break
            parts.append(nz + start)
        cost_full = cost_dense = cost_sparse = float("inf")
        sparse = None
        if count <= limit:
            idx = np.concatenate(parts) if parts else np.zeros(0, np.intp)
            gaps = np.diff(idx, prepend=-1) - 1
            if len(gaps) and int(gaps.max()) < 1 << 32:
                vals = np.bitwise_xor(bw[idx], nw[idx])
                gap_bytes = gaps.astype("<u4").view(np.uint8)
                val_bytes = vals.reshape(-1).view(np.uint8)
                sparse = (gap_bytes, val_bytes)
                if count <= n // 16 and c.nbytes > 4096:
                    cost_sparse = 0.0  # clearly sparse: no need to compare
                else:
                    cost_sparse = _planes_estimate(gap_bytes, 4, self.level) + _planes_estimate(
                        val_bytes, w, self.level
                    )
        if cost_sparse > 0:
            cost_dense = _planes_estimate(_planes.XorChunk(bb, nb), w, self.level)
            cost_full = _planes_estimate(nb, w, self.level)
        best = min(cost_full, cost_dense, cost_sparse)
        if best == cost_full:
            return False
        if best == cost_sparse and sparse is not None:
            si = self._put(_IDX, np.dtype("<u4"), _planes.BytesChunk(sparse[0]))
            sv = self._put(_XSV, dt, _planes.BytesChunk(sparse[1]))
            self.ops.append([SPARSE, key, None, count, si, sv])
        else:
            s = self._put(_XOR, dt, _planes.XorChunk(bb, nb))
            self.ops.append([XOR, key, None, n, s])
        self.alloc += d.nbytes
        return True

    def _patch(self, key: int | str, name: str, c: Array, d: EntryDigest) -> bool:
        b = self.base
        assert b is not None and b.signature is not None
        base_blocks = b.blocks(name)
        if base_blocks is None:
            return False
        bs = b.signature.block_size
        nb = c.reshape(-1).view(np.uint8)
        mv = nb.data
        h = xxhash.xxh3_64_intdigest
        new_blocks = np.array([h(mv[i : i + bs]) for i in range(0, len(mv), bs)], np.uint64)
        if len(new_blocks) != len(base_blocks):
            return False
        changed = np.flatnonzero(new_blocks != base_blocks)
        if len(changed) == 0 or len(changed) == len(new_blocks):
            return False
        breaks = np.flatnonzero(np.diff(changed) != 1) + 1
        runs: list[int] = []
        pieces = []
        for run in np.split(changed, breaks):
            lo = int(run[0])
            runs += [lo, len(run)]
            pieces.append(nb[lo * bs : min((int(run[-1]) + 1) * bs, len(nb))])
        lit = np.concatenate(pieces)
        s = self._put(_LIT, c.dtype, _planes.BytesChunk(lit))
        self.ops.append([PATCH, key, None, bs, runs, len(lit) // c.dtype.itemsize, s])
        self.alloc += d.nbytes
        return True

    # -- the payload

    def finish(self, state_hash: bytes, removed: list[int], result_nbytes: int) -> bytes:
        b = self.base
        streams = sorted(self.streams.values(), key=lambda s: s.index)
        choices = [
            _planes.encode_stream(s.chunks, stream_width(s.dtype), s.nbytes, self.level)
            for s in streams
        ]
        # a full snapshot is rare (the first, a resync) and its bytes cost the most link
        # time: it is Huffman-coded wherever that pays, whatever the decode time
        budget = float("inf") if b is None else huffman_budget(result_nbytes)
        _fit_decode_budget(choices, budget)
        descs: list[list[Any]] = []
        sections: list[bytes | memoryview] = []
        total = 0
        for s, planes in zip(streams, choices, strict=True):
            descs.append([s.dtype.str, s.nbytes, [p.code for p in planes]])
            sections += [p.section for p in planes if p.section is not None]
            total += s.nbytes
        base_hash = b.state_hash if b is not None else None
        base_nbytes = b.nbytes if b is not None else 0
        lengths = [len(x) for x in sections]
        pad = 0
        while True:
            meta = [lengths, descs, self.ops, removed, pad]
            payload = _wire.pack(state_hash, base_hash, meta, [*sections, bytes(pad)])
            p = len(payload)
            need = max(
                total - _wire.stream_bound(p),
                self.alloc - _wire.alloc_bound(p, base_nbytes),
            )
            if need <= 0:
                return payload
            pad += -(-need // _wire.EXPANSION) + 16


#: level "small" spends at most max(HUF_BUDGET_PER_BYTE * (bytes of the resulting state)
#: - HUF_BUDGET_FIXED, HUF_BUDGET_FLOOR) seconds of (estimated, one core) Huffman decoding
#: per payload, so that applying payloads keeps pace with about 1 GB/s of resulting state
HUF_BUDGET_PER_BYTE = 0.75e-9
HUF_BUDGET_FIXED = 0.3e-3
HUF_BUDGET_FLOOR = 0.35e-3


def huffman_budget(result_nbytes: int) -> float:
    """Seconds of Huffman decoding a payload may cost (docs/codec.md, "Levels")."""
    return max(HUF_BUDGET_PER_BYTE * result_nbytes - HUF_BUDGET_FIXED, HUF_BUDGET_FLOOR)


def _fit_decode_budget(choices: list[list[_planes.PlaneChoice]], budget: float) -> None:
    """Huffman-code the planes that save the most bytes per second of decoding, as long
    as the estimated decode time fits the budget."""
    cands = [p for planes in choices for p in planes if p.plane is not None]

    def extra(p: _planes.PlaneChoice) -> float:
        assert p.plane is not None
        return max(_planes.cost_huf(len(p.plane)) - p.cost, 1e-9)

    for p in sorted(cands, key=lambda p: (p.size - p.huf_size) / extra(p), reverse=True):
        if extra(p) <= budget:
            budget -= extra(p)
            p.try_huffman()
    for p in cands:
        p.release()


def encode_delta(
    base: State | Signature | None,
    new: State,
    *,
    level: Literal["small", "fast"] = "small",
    **more: Any,
) -> bytes:
    """Encode ``new`` as a payload: a full snapshot (base None) or a delta against base.

    ``level``: "small" (the default: LZ4-HC where it pays, Huffman-coded byte planes,
    alternatives tried) or "fast" (LZ4 fast only). ``base`` may be a state, a
    :class:`~edge_agent.state.HashedState` (its cached digests save a hash pass), or a
    :class:`Signature` (hashes only). Raises StateError for an invalid state.
    """
    if more:
        raise OptionError(f"encode_delta got unknown options: {', '.join(sorted(more))}")
    if level not in ("small", "fast"):
        raise OptionError(f"level must be 'small' or 'fast', not {level!r}")
    nd = state_digests(new)
    index = BaseIndex(base) if base is not None else None
    enc = _Encoder(index, level)
    for name in sorted(nd):
        enc.entry(name, new[name], nd[name])
    removed = [] if index is None else [index.index[k] for k in index.keys if k not in nd]
    result_nbytes = sum(d.nbytes for d in nd.values())
    return enc.finish(state_hash_from_digests(nd), removed, result_nbytes)
