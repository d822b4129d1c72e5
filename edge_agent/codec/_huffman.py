"""Static canonical Huffman coding of byte planes, vectorized with numpy.

This module owns the HUF plane format (docs/wire-format.md, "HUF planes"): code lengths
limited to :data:`MAX_BITS` bits, a compact code-length table, and a bitstream cut into
*lanes* of ``per`` symbols each, so that the decoder runs all lanes in lockstep (one numpy
step decodes one symbol of every lane) instead of one Python step per symbol.

It never allocates more than a small multiple of the plane length it is given (which the
caller has bounded), and it reports malformed input as :class:`PayloadCorrupt`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import PayloadCorrupt

try:  # the lane walk, compiled (optional: setup.py builds it where a C compiler is)
    from edge_agent.codec import _hufc
except ImportError:  # pragma: no cover - depends on the install
    _hufc = None  # type: ignore[assignment]

#: decode with the compiled lane walk when it was built; tests turn it off to check that
#: the numpy walk gives the same results and errors
USE_COMPILED = _hufc is not None

__all__ = [
    "MAX_BITS",
    "MAX_PER",
    "code_lengths",
    "decode",
    "encode",
    "encoded_size",
    "lanes_per",
]

U8 = npt.NDArray[np.uint8]

MAX_BITS = 12  #: longest code, in bits
MAX_PER = 4096  #: most symbols per lane
_TABLE_FULL = 0
_TABLE_SPARSE = 1


def code_lengths(counts: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Huffman code lengths (0 for absent symbols), at most MAX_BITS, for 256 counts.

    Needs at least two symbols with a nonzero count. Moffat and Katajainen's in-place
    algorithm (linear after a sort); codes over MAX_BITS are then clamped and the Kraft
    sum repaired by lengthening the lightest shorter codes, then shortening the heaviest
    codes while there is room, so the code stays complete.
    """
    syms = np.flatnonzero(counts)
    if len(syms) < 2:
        raise ValueError("a Huffman code needs at least two symbols")
    w = np.asarray(counts)[syms]
    order = np.argsort(w, kind="stable")
    a = [int(x) for x in w[order]]
    n = len(a)
    s = r = 0
    for t in range(n - 1):  # phase 1: internal node weights, parents in place
        if s >= n or (r < t and a[r] < a[s]):
            a[t] = a[r]
            a[r] = t
            r += 1
        else:
            a[t] = a[s]
            s += 1
        if s >= n or (r < t and a[r] < a[s]):
            a[t] += a[r]
            a[r] = t
            r += 1
        else:
            a[t] += a[s]
            s += 1
    a[n - 2] = 0  # phase 2: internal node depths
    for t in range(n - 3, -1, -1):
        a[t] = a[a[t]] + 1
    avail, used, depth, t, x = 1, 0, 0, n - 2, n - 1  # phase 3: leaf depths
    while avail > 0:
        while t >= 0 and a[t] == depth:
            used += 1
            t -= 1
        while avail > used:
            a[x] = depth
            x -= 1
            avail -= 1
        avail = 2 * used
        depth += 1
        used = 0
    lens = np.array(a, np.int64)  # lens[i]: the i-th lightest symbol's length
    if lens[0] > MAX_BITS:
        cap = 1 << MAX_BITS
        lens = np.minimum(lens, MAX_BITS)
        kraft = int(np.sum(np.left_shift(1, MAX_BITS - lens)))
        while kraft > cap:
            j = int(np.argmax(lens < MAX_BITS))  # the lightest code that can grow
            kraft -= 1 << (MAX_BITS - int(lens[j]) - 1)
            lens[j] += 1
        for j in range(n - 1, -1, -1):  # heaviest first: use up any room left
            while lens[j] > 1 and kraft + (1 << (MAX_BITS - int(lens[j]))) <= cap:
                kraft += 1 << (MAX_BITS - int(lens[j]))
                lens[j] -= 1
    out = np.zeros(256, np.uint8)
    out[syms[order]] = lens
    return out


def _canonical_order(lengths: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """The present symbols in canonical order: by code length, then by value."""
    key = lengths.astype(np.int64) << 8
    key |= np.arange(256, dtype=np.int64)
    order: npt.NDArray[np.int64] = np.sort(key)[256 - np.count_nonzero(lengths) :] & 255
    return order  # absent symbols (length 0) sorted first and were cut off


def _canonical(
    lengths: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Symbols in canonical order (by length, then value) and each symbol's code."""
    order = _canonical_order(lengths)
    span = np.left_shift(1, MAX_BITS - lengths[order].astype(np.int64))
    start = np.concatenate(([0], np.cumsum(span)[:-1]))
    codes = np.zeros(256, np.int64)
    codes[order] = start >> (MAX_BITS - lengths[order].astype(np.int64))
    return order, codes


def _table_bytes(lengths: npt.NDArray[np.uint8]) -> bytes:
    full = lengths[0::2] | (lengths[1::2] << 4)
    present = np.flatnonzero(lengths)
    if 32 + (len(present) + 1) // 2 < 128:
        bitmap = np.packbits(lengths > 0, bitorder="little")
        nib = lengths[present]
        if len(nib) % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        packed = nib[0::2] | (nib[1::2] << 4)
        return bytes([_TABLE_SPARSE]) + bitmap.tobytes() + packed.tobytes()
    return bytes([_TABLE_FULL]) + full.astype(np.uint8).tobytes()


def _read_table(blob: memoryview) -> tuple[npt.NDArray[np.uint8], int]:
    """Parse a code-length table; return the lengths and the bytes it used."""
    if len(blob) < 1:
        raise PayloadCorrupt("HUF plane: empty section")
    fmt = blob[0]
    if fmt == _TABLE_FULL:
        if len(blob) < 129:
            raise PayloadCorrupt("HUF plane: truncated code-length table")
        nib = np.frombuffer(blob[1:129], np.uint8)
        lengths = np.empty(256, np.uint8)
        lengths[0::2] = nib & 15
        lengths[1::2] = nib >> 4
        used = 129
    elif fmt == _TABLE_SPARSE:
        if len(blob) < 33:
            raise PayloadCorrupt("HUF plane: truncated code-length table")
        present = np.unpackbits(np.frombuffer(blob[1:33], np.uint8), bitorder="little")
        k = int(present.sum())
        nbytes = (k + 1) // 2
        if len(blob) < 33 + nbytes:
            raise PayloadCorrupt("HUF plane: truncated code-length table")
        nib = np.frombuffer(blob[33 : 33 + nbytes], np.uint8)
        vals = np.empty(nbytes * 2, np.uint8)
        vals[0::2] = nib & 15
        vals[1::2] = nib >> 4
        if k % 2 and vals[-1] != 0:
            raise PayloadCorrupt("HUF plane: nonzero padding nibble in code-length table")
        lengths = np.zeros(256, np.uint8)
        lengths[present.astype(bool)] = vals[:k]
        if k and int(vals[:k].min()) == 0:
            raise PayloadCorrupt("HUF plane: a listed symbol has code length 0")
        used = 33 + nbytes
    else:
        raise PayloadCorrupt(f"HUF plane: unknown code-length table format {fmt}")
    if int(lengths.max()) > MAX_BITS:
        raise PayloadCorrupt(f"HUF plane: a code is longer than {MAX_BITS} bits")
    nz = lengths[lengths > 0].astype(np.int64)
    if len(nz) < 1 or int(np.sum(np.left_shift(1, MAX_BITS - nz))) > 1 << MAX_BITS:
        raise PayloadCorrupt("HUF plane: code lengths do not form a prefix code")
    return lengths, used


def lanes_per(n: int) -> int:
    """Symbols per lane the encoder uses for a plane of n symbols (a multiple of 4).

    The decoder runs ``per`` lockstep steps over ``n / per`` lanes: few steps keep the
    Python overhead low, few lanes keep the lane length table small."""
    if n <= 16384:
        return 16
    per = -(-n // 2048)
    per = (per + 3) // 4 * 4
    return max(32, min(MAX_PER, per))


def _pack_bits(values: npt.NDArray[np.int64], k: int) -> bytes:
    """values (each < 2**k) as k-bit fields, most significant bit first."""
    if k == 0 or len(values) == 0:
        return b""
    be = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    bits = np.unpackbits(be, axis=1)[:, 32 - k :]
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_bits(blob: memoryview, count: int, k: int) -> npt.NDArray[np.int64]:
    if k == 0:
        return np.zeros(count, np.int64)
    bits = np.unpackbits(np.frombuffer(blob, np.uint8))[: count * k].reshape(count, k)
    weights = np.left_shift(np.int64(1), np.arange(k - 1, -1, -1, dtype=np.int64))
    out: npt.NDArray[np.int64] = bits.astype(np.int64) @ weights
    return out


def encoded_size(counts: npt.NDArray[Any], lengths: npt.NDArray[np.uint8], n: int) -> int:
    """A close upper estimate of ``len(encode(...))`` for n symbols with these counts."""
    bits = int(np.dot(np.asarray(counts, np.int64), lengths.astype(np.int64)))
    per = lanes_per(n)
    lanes = -(-n // per)
    pad_bits = (lanes * per - n) * int(lengths[lengths > 0].min())
    present = int(np.count_nonzero(lengths))
    table = 1 + min(128, 32 + (present + 1) // 2)
    return table + 7 + (lanes * 10 + 7) // 8 + (bits + pad_bits + 7) // 8


def encode(sym: U8, lengths: npt.NDArray[np.uint8]) -> bytes:
    """Encode symbols (every one must have a nonzero length) into a HUF blob."""
    n = len(sym)
    order, codes = _canonical(lengths)
    per = lanes_per(n)
    lanes = -(-n // per)
    total_syms = lanes * per
    if total_syms != n:  # pad the last lane with the symbol of the shortest code
        sym = np.concatenate([sym, np.full(total_syms - n, order[0], np.uint8)])
    # codes are <= 12 bits: pair them in 32 bits, then pairs of pairs (<= 48 bits) in 64
    l1 = lengths[sym]
    if int(l1.min()) == 0:
        raise ValueError("a symbol of the plane has no code")
    c1 = codes.astype(np.uint32)[sym]
    c2 = c1[0::2] << l1[1::2].astype(np.uint32)
    c2 |= c1[1::2]
    l2 = l1[0::2] + l1[1::2]
    c = c2[0::2].astype(np.uint64) << l2[1::2].astype(np.uint64)
    c |= c2[1::2]
    ln = (l2[0::2] + l2[1::2]).astype(np.uint64)
    ends = np.cumsum(ln)
    starts = ends - ln
    total_bits = int(ends[-1])
    lane_start = starts[:: per // 4].astype(np.int64)
    lane_len = np.diff(np.concatenate([lane_start, [total_bits]]))
    nw = total_bits // 64 + 2
    u6 = np.uint64(6)
    u63 = np.uint64(63)
    u64 = np.uint64(64)
    w = starts >> u6
    end_in = (starts & u63) + ln  # bit just past the unit, within word w (may exceed 64)
    fits = end_in <= u64
    spill = end_in - np.minimum(end_in, u64)  # bits that run into word w + 1
    head = np.where(fits, c << (u64 - np.where(fits, end_in, u64)), c >> spill)
    words = np.zeros(nw, np.uint64)
    first = np.flatnonzero(np.diff(w)) + 1
    first = np.concatenate([np.zeros(1, np.int64), first])
    words[w[first]] = np.bitwise_or.reduceat(head, first)
    over = np.flatnonzero(~fits)
    if len(over):
        words[w[over] + np.uint64(1)] |= c[over] << (u64 - spill[over])
    stream = words.astype(">u8").view(np.uint8)[: (total_bits + 7) // 8]
    base = int(lane_len.min())
    dev = lane_len - base
    k = int(dev.max()).bit_length()
    head_bytes = (
        _table_bytes(lengths)
        + per.to_bytes(2, "little")
        + base.to_bytes(4, "little")
        + bytes([k])
        + _pack_bits(dev, k)
    )
    return head_bytes + stream.tobytes()


def decode(blob: memoryview, n: int) -> U8:
    """Decode a HUF blob holding n symbols. Raises PayloadCorrupt for malformed input."""
    lengths, pos = _read_table(blob)
    if len(blob) < pos + 7:
        raise PayloadCorrupt("HUF plane: truncated lane header")
    per = int.from_bytes(blob[pos : pos + 2], "little")
    base = int.from_bytes(blob[pos + 2 : pos + 6], "little")
    k = blob[pos + 6]
    pos += 7
    if not 1 <= per <= MAX_PER:
        raise PayloadCorrupt(f"HUF plane: {per} symbols per lane is outside 1..{MAX_PER}")
    if k > 32:
        raise PayloadCorrupt(f"HUF plane: lane length width {k} is over 32 bits")
    if n == 0:
        raise PayloadCorrupt("HUF plane: an empty plane cannot be Huffman-coded")
    lanes = -(-n // per)
    dev_bytes = (lanes * k + 7) // 8
    if len(blob) < pos + dev_bytes:
        raise PayloadCorrupt("HUF plane: truncated lane length table")
    lane_len = _unpack_bits(blob[pos : pos + dev_bytes], lanes, k) + base
    pos += dev_bytes
    stream_len = len(blob) - pos
    total_bits = int(lane_len.sum())
    if (total_bits + 7) // 8 != stream_len:
        raise PayloadCorrupt(
            f"HUF plane: lanes hold {total_bits} bits but the bitstream has {stream_len} bytes"
        )
    if stream_len >= 1 << 28:
        raise PayloadCorrupt("HUF plane: bitstream over 256 MiB")
    min_len = int(lengths[lengths > 0].min())
    if total_bits < lanes * per * min_len:
        raise PayloadCorrupt(
            f"HUF plane: {total_bits} bits cannot hold {lanes * per} symbols of >= {min_len} bits"
        )
    ends = np.cumsum(lane_len)
    starts = ends - lane_len
    order = _canonical_order(lengths)
    olen = lengths[order].astype(np.int64)
    table = np.zeros(1 << MAX_BITS, np.uint16)  # codes left unassigned decode as length 0
    filled = np.repeat((order | (olen << 8)).astype(np.uint16), np.left_shift(1, MAX_BITS - olen))
    table[: len(filled)] = filled
    if USE_COMPILED:
        flat = np.empty(lanes * per, np.uint8)
        if _hufc.decode(blob[pos:], starts, ends, per, table, flat) >= 0:
            raise PayloadCorrupt("HUF plane: a lane did not end where its length says")
        return flat[:n]
    return _walk_lanes(blob[pos:], starts, ends, per, table, n)


def _walk_lanes(
    stream: memoryview,
    starts: npt.NDArray[np.int64],
    ends: npt.NDArray[np.int64],
    per: int,
    table: npt.NDArray[np.uint16],
    n: int,
) -> U8:
    """The lanes decoded in lockstep with numpy (what ``_hufc.decode`` does in C)."""
    stream_len = len(stream)
    lanes = len(starts)
    # 32-bit big-endian windows at every byte offset; zero padding covers over-reads
    pad = per * MAX_BITS // 8 + 8
    m = (stream_len + pad) // 4 + 1
    buf = np.zeros(4 * m + 4, np.uint8)
    buf[:stream_len] = np.frombuffer(stream, np.uint8)
    win = np.empty(4 * m, np.uint32)
    for k in range(4):
        win[k::4] = buf[k : k + 4 * m].view(">u4")
    out = np.empty((per, lanes), np.uint16)  # symbol | length << 8, low byte kept at the end
    p = starts.astype(np.uint32)
    s3 = np.uint32(3)
    m7 = np.uint32(7)
    s20 = np.uint32(32 - MAX_BITS)
    s8 = np.uint16(8)
    v = np.empty(lanes, np.uint32)
    o = np.empty(lanes, np.uint32)
    r = np.empty(lanes, np.uint32)
    ln = np.empty(lanes, np.uint16)
    take_win = win.take  # mode "clip": indices are in range by construction (padding)
    take_table = table.take
    shr = np.right_shift
    band = np.bitwise_and
    # two symbols a step: after a 7-bit offset and a 12-bit code, 13 bits of the window remain
    for t in range(0, per - 1, 2):
        first = out[t]
        second = out[t + 1]
        shr(p, s3, o)
        take_win(o, None, v, "clip")
        band(p, m7, r)
        v <<= r
        shr(v, s20, o)
        take_table(o, None, first, "clip")
        shr(first, s8, ln)
        v <<= ln
        v >>= s20
        take_table(v, None, second, "clip")
        p += ln
        p += second >> s8
    if per % 2:
        last = out[per - 1]
        shr(p, s3, o)
        take_win(o, None, v, "clip")
        band(p, m7, r)
        v <<= r
        v >>= s20
        take_table(v, None, last, "clip")
        p += last >> s8
    if not np.array_equal(p, ends.astype(np.uint32)):
        raise PayloadCorrupt("HUF plane: a lane did not end where its length says")
    sym: U8 = out.T.astype(np.uint8).reshape(-1)[:n]
    return sym
