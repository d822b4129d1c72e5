"""The plane coder: a byte stream of fixed-width elements in, coded planes out, and back.

A stream of ``n`` bytes holding elements of width ``w`` is byte-shuffled (as Blosc does)
into ``w`` planes of ``n / w`` bytes (plane ``j`` holds byte ``j`` of every element), or
kept as one plane. Each plane is then coded on its own as one of:

* ``RAW``: the bytes as they are;
* ``CONST``: every byte has one value (no section);
* ``LZ4``: an LZ4 block (fast or high-compression; the decoder does not care which);
* ``HUF``: a static canonical Huffman code (:mod:`._huffman`).

The encoder picks, per plane, the smallest by computed size. This module owns that choice
and the plane codes' meaning; it never allocates more than the stream length it was told
(the caller bounds that) plus small temporaries, and reports malformed input as
:class:`PayloadCorrupt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import lz4.block
import numpy as np
import numpy.typing as npt

from edge_agent.codec import _huffman
from edge_agent.errors import PayloadCorrupt

__all__ = [
    "CONST",
    "HUF",
    "LZ4",
    "RAW",
    "BytesChunk",
    "Chunk",
    "PlaneChoice",
    "XorChunk",
    "decode_stream",
    "encode_stream",
    "estimate",
]

U8 = npt.NDArray[np.uint8]
Level = Literal["small", "fast"]

RAW = 0
LZ4 = 1
HUF = 2
CONST = 3

#: planes shorter than this are never Huffman-coded: the table and the lockstep decoding
#: steps would cost more decode time than the few hundred bytes they save
HUF_MIN = 4096
#: LZ4-HC compression level used by level "small" where LZ4 finds matches
HC_LEVEL = 4
#: an LZ4 block never decompresses to more than this many times its size (+64)
LZ4_MAX_RATIO = 256
#: streams up to this many bytes are also tried unshuffled
SMALL_STREAM = 8192
#: planes longer than twice this are histogrammed on a strided sample of this many bytes
SAMPLE = 16384


@dataclass(frozen=True, slots=True)
class BytesChunk:
    """Bytes that go into a stream as they are (a contiguous uint8 view)."""

    data: U8

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def plane(self, j: int, w: int, out: U8) -> None:
        np.copyto(out, self.data[j::w])

    def whole(self, out: U8) -> None:
        np.copyto(out, self.data)


@dataclass(frozen=True, slots=True)
class XorChunk:
    """The XOR of two equally long byte buffers, computed plane by plane when coded."""

    a: U8
    b: U8

    @property
    def nbytes(self) -> int:
        return len(self.a)

    def plane(self, j: int, w: int, out: U8) -> None:
        np.bitwise_xor(self.a[j::w], self.b[j::w], out=out)

    def whole(self, out: U8) -> None:
        np.bitwise_xor(self.a, self.b, out=out)


Chunk = BytesChunk | XorChunk


def _plane(chunks: Sequence[Chunk], j: int, w: int, n: int) -> U8:
    out = np.empty(n, np.uint8)
    at = 0
    for c in chunks:
        k = c.nbytes // w
        if w == 1:
            c.whole(out[at : at + k])
        else:
            c.plane(j, w, out[at : at + k])
        at += k
    return out


def _entropy_bytes(counts: npt.NDArray[np.int64], n: int) -> float:
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() * n / 8)


def _sample_counts(plane: U8) -> npt.NDArray[np.int64]:
    """Byte counts of a plane, or of an evenly strided sample of a long one."""
    n = len(plane)
    if n > 2 * SAMPLE:
        plane = plane[:: n // SAMPLE]
    return np.bincount(plane, minlength=256)


def estimate(plane: U8, level: Level) -> float:
    """A cheap estimate of a plane's coded size, for choosing between ops."""
    n = len(plane)
    if n == 0:
        return 0.0
    nnz = n - int(np.count_nonzero(plane == plane[0]))  # bytes unlike the first
    if nnz == 0:
        return 2.0
    est = min(float(n), 2.0 * nnz + 16)
    if level == "small" and n >= HUF_MIN:
        est = min(est, _entropy_bytes(_sample_counts(plane), n) + 80)
    return est


# decode cost model (seconds, one core), used to keep "small" within its decode budget
def _cost_raw(n: int) -> float:
    return 2e-6 + n * 0.1e-9


def _cost_lz4(n: int) -> float:
    return 3e-6 + n * 0.7e-9


def cost_huf(n: int) -> float:
    """Estimated seconds to decode a HUF plane of n symbols."""
    return 20e-6 + n * 5.5e-9 + _huffman.lanes_per(n) * 4.5e-6


@dataclass(slots=True)
class PlaneChoice:
    """How one plane will be coded: its code, section, size and estimated decode time.

    ``huf_size`` is the estimated size of a Huffman coding when one looks worth trying
    (the encoder decides, within its decode budget, whether to call :meth:`try_huffman`).
    """

    code: int
    section: bytes | memoryview | None  # RAW: a view of the plane, not a copy
    size: int
    cost: float
    plane: U8 | None = None
    counts: npt.NDArray[np.int64] | None = None
    huf_size: float = 0.0

    def try_huffman(self) -> None:
        """Huffman-code the plane; keep it if it is smaller than the current choice."""
        plane, counts = self.plane, self.counts
        assert plane is not None and counts is not None
        lengths = _huffman.code_lengths(counts)
        try:
            blob = _huffman.encode(plane, lengths)
        except ValueError:  # the sample missed a symbol: count them all
            lengths = _huffman.code_lengths(np.bincount(plane, minlength=256))
            blob = _huffman.encode(plane, lengths)
        if len(blob) < self.size:
            self.code, self.section, self.size = HUF, blob, len(blob)
            self.cost = cost_huf(len(plane))

    def release(self) -> None:
        self.plane = self.counts = None


def code_plane(plane: U8, level: Level) -> PlaneChoice:
    """Choose a coding for one plane among CONST, RAW and LZ4 (fast, or HC where LZ4
    finds structure), and estimate what Huffman coding would give (level "small")."""
    n = len(plane)
    first = int(plane[0])
    if not np.any(plane != first):
        return PlaneChoice(CONST | (first << 2), None, 0, _cost_raw(n))
    best = PlaneChoice(RAW, plane.data, n, _cost_raw(n))
    lz = lz4.block.compress(plane, store_size=False)
    if len(lz) < best.size:
        best = PlaneChoice(LZ4, lz, len(lz), _cost_lz4(n))
    if level == "fast" or n < HUF_MIN:
        return best
    counts = _sample_counts(plane)
    est = _entropy_bytes(counts, n) + 48 + n // 400
    if len(lz) < 0.9 * min(n, est):  # LZ4 finds structure an order-0 coder cannot
        hc = lz4.block.compress(
            plane, mode="high_compression", compression=HC_LEVEL, store_size=False
        )
        if len(hc) < best.size:
            best = PlaneChoice(LZ4, hc, len(hc), _cost_lz4(n))
    if est < 0.97 * best.size and np.count_nonzero(counts) >= 2:
        best.plane, best.counts, best.huf_size = plane, counts, est
    return best


def _expected(choices: Sequence[PlaneChoice]) -> float:
    """Bytes a list of plane choices will likely take, section lengths included."""
    total = 0.0
    for c in choices:
        size = min(c.size, c.huf_size) if c.plane is not None else c.size
        total += size + (2 if c.section is not None else 0)
    return total


def encode_stream(
    chunks: Sequence[Chunk], width: int, nbytes: int, level: Level
) -> list[PlaneChoice]:
    """Analyse a stream given as chunks: one choice per plane, in plane order.

    Elements wider than a byte are byte-shuffled; a small stream is also tried whole
    (one plane), which wins where shuffling does not pay for its extra sections."""
    w = width if width > 1 else 1
    n = nbytes // w
    planes = [code_plane(_plane(chunks, j, w, n), level) for j in range(w)]
    if w > 1 and nbytes <= SMALL_STREAM:
        whole = [code_plane(_plane(chunks, 0, 1, nbytes), level)]
        if _expected(whole) <= _expected(planes):
            return whole
    return planes


def plane_needs_section(code: int) -> bool:
    return (code & 3) != CONST


def decode_plane(code: int, section: memoryview | None, n: int) -> U8 | int:
    """Decode one plane of n bytes: an array, or an int for a CONST plane."""
    method = code & 3
    if method == CONST:
        if code >> 2 > 255:
            raise PayloadCorrupt(f"plane code {code}: constant {code >> 2} is not a byte")
        return code >> 2
    if code >> 2:
        raise PayloadCorrupt(f"plane code {code} has stray high bits")
    assert section is not None
    if method == RAW:
        if len(section) != n:
            raise PayloadCorrupt(f"RAW plane: section of {len(section)} bytes for {n} bytes")
        return np.frombuffer(section, np.uint8)
    if method == LZ4:
        if n == 0:
            raise PayloadCorrupt("LZ4 plane: an empty plane cannot be LZ4-coded")
        if n > LZ4_MAX_RATIO * len(section) + 64:
            raise PayloadCorrupt(
                f"LZ4 plane: {len(section)} bytes cannot decompress to {n} (LZ4 expands "
                f"at most {LZ4_MAX_RATIO}x)"
            )
        try:
            raw = lz4.block.decompress(section, uncompressed_size=n, return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise PayloadCorrupt(f"LZ4 plane: {exc}") from exc
        if len(raw) != n:
            raise PayloadCorrupt(f"LZ4 plane: decompressed to {len(raw)} bytes, not {n}")
        return np.frombuffer(raw, np.uint8)
    return _huffman.decode(section, n)


def decode_stream(
    codes: Sequence[int], sections: Sequence[memoryview], nbytes: int, width: int
) -> U8:
    """Decode a stream of nbytes from its plane codes and their sections (in order)."""
    out = np.empty(nbytes, np.uint8)
    k = len(codes)
    if k == 1:
        p = decode_plane(codes[0], sections[0] if sections else None, nbytes)
        if isinstance(p, int):
            out.fill(p)
        else:
            np.copyto(out, p)
        return out
    n = nbytes // k
    si = 0
    view = out.reshape(n, k)
    for j, code in enumerate(codes):
        sec = None
        if plane_needs_section(code):
            sec = sections[si]
            si += 1
        p = decode_plane(code, sec, n)
        view[:, j] = p
    return out
