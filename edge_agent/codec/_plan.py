"""The decoded form of a payload: a :class:`Plan` of ops over numpy buffers, and its apply.

:func:`decode` does all of a payload's validation that does not need the base (envelope,
checksum, header structure, bounds on announced sizes, stream decompression, slicing of
literals) and returns a :class:`Plan`. :meth:`Plan.bind` checks the plan against a base
(its hash, its keys, dtypes and shapes, the allocation bound) without allocating result
data; :meth:`Plan.apply` then runs the ops with numpy and verifies the result's hash.

A backend for another array library (the server's torch replay) walks the same ops:
``for step in plan.bind(base).steps: ...`` (see :class:`Step` and docs/wire-format.md).

Every op is a frozen dataclass whose array fields are numpy arrays (views into decoded
stream buffers, never into the payload). This module never mutates a base, never returns a
partially built state, and raises only the CodecError tree (StateError for a bad base).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from edge_agent.codec import _planes, _wire
from edge_agent.errors import (
    BaseMismatch,
    LimitExceeded,
    PayloadCorrupt,
    StateError,
    StateHashMismatch,
)
from edge_agent.state import (
    KIND_ARRAY,
    MAX_KEY_BYTES,
    SUPPORTED_DTYPES,
    EntryDigest,
    HashedState,
    State,
    check_key,
    check_plain,
    entry_digest,
    state_digests,
    state_hash_from_digests,
)

__all__ = [
    "MAX_NDIM",
    "OPCODES",
    "Binding",
    "Cast",
    "Full",
    "Gather",
    "Grow",
    "Key",
    "Op",
    "Patch",
    "Plain",
    "Plan",
    "Ref",
    "Scalar",
    "Sparse",
    "Step",
    "View",
    "Xor",
    "cast_allowed",
    "decode",
    "stream_width",
]

Array = npt.NDArray[Any]
#: an entry's name in a payload: an int is an index into the base's keys in canonical
#: (sorted by UTF-8 bytes) order; a str is a key the base does not have
Key = int | str

MAX_NDIM = 32

# op codes (docs/wire-format.md, "Ops")
FULL, SCALAR, PLAIN, REF, VIEW, CAST, GROW, GATHER, XOR, SPARSE, PATCH = range(11)
OPCODES = {
    "FULL": FULL,
    "SCALAR": SCALAR,
    "PLAIN": PLAIN,
    "REF": REF,
    "VIEW": VIEW,
    "CAST": CAST,
    "GROW": GROW,
    "GATHER": GATHER,
    "XOR": XOR,
    "SPARSE": SPARSE,
    "PATCH": PATCH,
}


# ----------------------------------------------------------------------------- the ops


@dataclass(frozen=True, slots=True)
class Full:
    """FULL: a literal array (``data`` has the entry's dtype and shape)."""

    key: Key
    data: Array = field(repr=False)


@dataclass(frozen=True, slots=True)
class Scalar:
    """SCALAR: a literal numpy scalar."""

    key: Key
    value: np.generic


@dataclass(frozen=True, slots=True)
class Plain:
    """PLAIN: a literal plain value (None, bool, int, float, str, bytes, list, dict)."""

    key: Key
    value: Any


@dataclass(frozen=True, slots=True)
class Ref:
    """REF: the base entry ``src`` as it is (any kind), under ``key``."""

    key: Key
    src: int


@dataclass(frozen=True, slots=True)
class View:
    """VIEW: the bytes of base array ``src`` (C order) as ``dtype`` and ``shape``."""

    key: Key
    src: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Cast:
    """CAST: ``base[src].astype(dtype)`` (numpy semantics; see :func:`cast_allowed`)."""

    key: Key
    src: int
    dtype: np.dtype[Any]


@dataclass(frozen=True, slots=True)
class Grow:
    """GROW: base array ``src`` with ``data`` appended along ``axis``.

    ``data`` is 1-D (the base's dtype); its shape is the base's with ``axis`` replaced by
    ``data.size // (product of the other dims)``."""

    key: Key
    src: int
    axis: int
    data: Array = field(repr=False)


@dataclass(frozen=True, slots=True)
class Gather:
    """GATHER: ``base[src][rows]`` (rows along axis 0, may repeat), then, when ``axis`` is
    not None (>= 1), a tail of ``k`` positions appended along ``axis``.

    The tail is made of *cells*: cell ``(i, p)`` is the result's row ``i`` at tail
    position ``p``, an array of the dims other than 0 and ``axis``. ``dup`` (None, or
    int64 of shape [rows, k]) says where each cell comes from: -1 takes the next cell of
    ``data`` (cells in (i, p) order, each in C order), ``j`` (< i) copies cell ``(j, p)``.
    Without ``dup`` every cell comes from ``data``."""

    key: Key
    src: int
    rows: npt.NDArray[np.int64]
    axis: int | None
    data: Array | None = field(repr=False)
    dup: npt.NDArray[np.int64] | None = None


@dataclass(frozen=True, slots=True)
class Xor:
    """XOR: base array ``src`` with its bytes XORed with ``data``'s (same dtype, same size)."""

    key: Key
    src: int
    data: Array = field(repr=False)


@dataclass(frozen=True, slots=True)
class Sparse:
    """SPARSE: base array ``src`` with element ``index[i]`` (C order) XORed with ``data[i]``."""

    key: Key
    src: int
    index: npt.NDArray[np.int64] = field(repr=False)
    data: Array = field(repr=False)


@dataclass(frozen=True, slots=True)
class Patch:
    """PATCH: base array ``src``'s bytes with the ``block_size``-byte blocks listed in
    ``blocks`` (increasing) replaced by ``data``'s bytes, in order; the last block of the
    array may be short."""

    key: Key
    src: int
    block_size: int
    blocks: npt.NDArray[np.int64] = field(repr=False)
    data: Array = field(repr=False)


Op = Full | Scalar | Plain | Ref | View | Cast | Grow | Gather | Xor | Sparse | Patch


def stream_width(dtype: np.dtype[Any]) -> int:
    """The shuffle width of a stream of this dtype (a complex's component size)."""
    return dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize


def cast_allowed(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    """Whether CAST may convert src to dst: only conversions with one well-defined result.

    A byte-order change; any cast numpy calls "safe" (bool/int to a wider int or to a
    float that holds it, float to a wider float, to complex); and float64 -> float32,
    float32 -> float16 (IEEE round to nearest even)."""
    if src == dst:
        return False
    if src.kind == dst.kind and src.itemsize == dst.itemsize:
        return True
    if np.can_cast(src, dst, casting="safe"):
        return True
    return src.kind == "f" and dst.kind == "f" and (src.itemsize, dst.itemsize) in ((8, 4), (4, 2))


# ----------------------------------------------------------------------------- parsing


def _fail(where: str, what: str) -> PayloadCorrupt:
    return PayloadCorrupt(f"{where}: {what}")


def _int(v: object, lo: int, hi: int, where: str) -> int:
    if type(v) is not int:
        raise _fail(where, f"expected an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _fail(where, f"{v} is outside {lo}..{hi}")
    return v


def _list(v: object, where: str, n: int | None = None) -> list[Any]:
    if type(v) is not list:
        raise _fail(where, f"expected an array, got {type(v).__name__}")
    if n is not None and len(v) != n:
        raise _fail(where, f"expected {n} fields, got {len(v)}")
    return v


def _dtype(v: object, where: str) -> np.dtype[Any]:
    if type(v) is not str or v not in SUPPORTED_DTYPES:
        raise _fail(where, f"dtype {v!r} is not a supported dtype")
    return np.dtype(v)


def _shape(v: object, where: str, itemsize: int) -> tuple[int, ...]:
    dims = _list(v, where)
    if len(dims) > MAX_NDIM:
        raise _fail(where, f"{len(dims)} dimensions, over {MAX_NDIM}")
    shape = tuple(_int(d, 0, 1 << 62, f"{where}[{i}]") for i, d in enumerate(dims))
    nonzero = itemsize
    for d in shape:
        if d:
            nonzero *= d
    if nonzero >= 1 << 62:
        raise LimitExceeded(f"{where}: shape {list(shape)} is too large to allocate")
    return shape


def _key(v: object, where: str) -> Key:
    if type(v) is int:
        return _int(v, 0, 1 << 32, where)
    if type(v) is str:
        if len(v.encode("utf-8")) > MAX_KEY_BYTES:
            raise _fail(where, f"key is over {MAX_KEY_BYTES} bytes")
        try:
            check_key(v)
        except StateError as exc:
            raise _fail(where, str(exc)) from exc
        return v
    raise _fail(where, f"a key is an int or a str, not {type(v).__name__}")


def _src(v: object, key: Key, where: str) -> int:
    if v is None:
        if type(key) is not int:
            raise _fail(where, "src is nil but the key is not a base key")
        return key
    return _int(v, 0, 1 << 32, where)


@dataclass(frozen=True, slots=True)
class _Stream:
    dtype: np.dtype[Any]
    nbytes: int
    codes: tuple[int, ...]
    sections: tuple[memoryview, ...]


@dataclass(slots=True)
class _Take:
    """A literal demanded by an op: count elements of stream s at byte offset off."""

    stream: int
    off: int
    count: int


class _Parser:
    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams
        self.cursor = [0] * len(streams)

    def take(self, s: object, count: int, where: str) -> _Take | None:
        if count == 0 and s is None:
            return None
        si = _int(s, 0, len(self.streams) - 1, f"{where} stream")
        st = self.streams[si]
        nb = count * st.dtype.itemsize
        off = self.cursor[si]
        if off + nb > st.nbytes:
            raise _fail(
                where, f"takes {nb} bytes from stream {si}, which has {st.nbytes - off} left"
            )
        self.cursor[si] = off + nb
        return _Take(si, off, count)


Builder = Callable[[list[npt.NDArray[np.uint8]]], Op]


def _lit(bufs: list[npt.NDArray[np.uint8]], streams: list[_Stream], t: _Take) -> Array:
    st = streams[t.stream]
    return bufs[t.stream][t.off : t.off + t.count * st.dtype.itemsize].view(st.dtype)


def _parse_op(raw: object, i: int, p: _Parser) -> Builder:
    where = f"op {i}"
    fields = _list(raw, where)
    if not fields:
        raise _fail(where, "empty op")
    code = _int(fields[0], 0, PATCH, f"{where} code")
    arity = {FULL: 5, SCALAR: 4, PLAIN: 3, REF: 3, VIEW: 5, CAST: 4, GROW: 6, GATHER: 8,
             XOR: 5, SPARSE: 6, PATCH: 7}[code]  # fmt: skip
    if len(fields) != arity:
        raise _fail(where, f"op code {code} has {arity} fields, not {len(fields)}")
    key = _key(fields[1], f"{where} key")
    streams = p.streams
    if code == FULL:
        dt = _dtype(fields[2], f"{where} dtype")
        shape = _shape(fields[3], f"{where} shape", dt.itemsize)
        count = int(np.prod(shape, dtype=object))
        t = p.take(fields[4], count, where)
        if t is not None and streams[t.stream].dtype != dt:
            raise _fail(
                where, f"stream {t.stream} holds {streams[t.stream].dtype.str}, not {dt.str}"
            )

        def full(b: list[npt.NDArray[np.uint8]]) -> Op:
            data = np.empty(shape, dt) if t is None else _lit(b, streams, t).reshape(shape)
            return Full(key, data)

        return full
    if code == SCALAR:
        dt = _dtype(fields[2], f"{where} dtype")
        if not dt.isnative:
            raise _fail(where, f"a numpy scalar has native byte order, not {dt.str}")
        raw_b = fields[3]
        if type(raw_b) is not bytes or len(raw_b) != dt.itemsize:
            raise _fail(where, f"scalar bytes must be {dt.itemsize} bytes of bin")
        value = np.frombuffer(raw_b, dt)[0]
        return lambda b: Scalar(key, value)
    if code == PLAIN:
        value = fields[2]
        try:
            check_plain(value, where)
        except StateError as exc:
            raise PayloadCorrupt(str(exc)) from exc
        return lambda b: Plain(key, value)
    src = _src(fields[2], key, f"{where} src")
    if code == REF:
        if fields[2] is None:
            raise _fail(where, "REF needs an explicit src")
        return lambda b: Ref(key, src)
    if code == VIEW:
        dt = _dtype(fields[3], f"{where} dtype")
        vshape = _shape(fields[4], f"{where} shape", dt.itemsize)
        return lambda b: View(key, src, dt, vshape)
    if code == CAST:
        dt = _dtype(fields[3], f"{where} dtype")
        return lambda b: Cast(key, src, dt)
    if code == GROW:
        axis = _int(fields[3], 0, MAX_NDIM - 1, f"{where} axis")
        count = _int(fields[4], 1, 1 << 62, f"{where} count")
        tg = p.take(fields[5], count, where)
        assert tg is not None
        return lambda b: Grow(key, src, axis, _lit(b, streams, tg))
    if code == GATHER:
        rows_raw = _list(fields[3], f"{where} rows")
        rows = np.array(
            [_int(r, 0, 1 << 62, f"{where} rows[{j}]") for j, r in enumerate(rows_raw)],
            dtype=np.int64,
        )
        if fields[4] is None:
            if fields[5] != 0 or fields[6] is not None or fields[7] is not None:
                raise _fail(where, "a GATHER without an axis appends nothing")
            return lambda b: Gather(key, src, rows, None, None)
        gaxis = _int(fields[4], 1, MAX_NDIM - 1, f"{where} axis")
        count = _int(fields[5], 0, 1 << 62, f"{where} count")
        tt = p.take(fields[6], count, where)
        dup = None
        if fields[7] is not None:
            raw_dup = _list(fields[7], f"{where} dup")
            nrows = len(rows)
            if nrows == 0 or not raw_dup or len(raw_dup) % nrows:
                raise _fail(where, f"{len(raw_dup)} dup entries for {nrows} rows")
            dup = np.array(
                [_int(x, -1, nrows - 1, f"{where} dup[{j}]") for j, x in enumerate(raw_dup)],
                dtype=np.int64,
            ).reshape(nrows, -1)
            if np.any(dup >= np.arange(nrows)[:, None]):
                raise _fail(where, "a cell copies a row that is not above it")
        elif tt is None:
            raise _fail(where, "a GATHER with an axis appends something")
        return lambda b: Gather(
            key, src, rows, gaxis, None if tt is None else _lit(b, streams, tt), dup
        )
    if code == XOR:
        count = _int(fields[3], 1, 1 << 62, f"{where} count")
        tx = p.take(fields[4], count, where)
        assert tx is not None
        return lambda b: Xor(key, src, _lit(b, streams, tx))
    if code == SPARSE:
        count = _int(fields[3], 1, 1 << 62, f"{where} count")
        ti = p.take(fields[4], count, f"{where} index")
        tv = p.take(fields[5], count, f"{where} values")
        assert ti is not None and tv is not None
        if streams[ti.stream].dtype.str != "<u4":
            raise _fail(where, "a SPARSE index stream must hold <u4")

        def sparse(b: list[npt.NDArray[np.uint8]]) -> Op:
            gaps = _lit(b, streams, ti).astype(np.int64)
            gaps += 1
            index = np.cumsum(gaps)
            index -= 1
            return Sparse(key, src, index, _lit(b, streams, tv))

        return sparse
    # PATCH
    bs = _int(fields[3], 16, 1 << 40, f"{where} block size")
    if bs % 16:
        raise _fail(where, f"block size {bs} is not a multiple of 16")
    count = _int(fields[5], 1, 1 << 62, f"{where} count")
    tp = p.take(fields[6], count, where)
    assert tp is not None
    # the data covers every listed block but the last one in full: that bounds the list
    most = count * streams[tp.stream].dtype.itemsize // bs + 1
    runs = _list(fields[4], f"{where} runs")
    if len(runs) % 2 or not runs:
        raise _fail(where, "runs must be nonempty (start, length) pairs")
    starts: list[int] = []
    lens: list[int] = []
    nxt = 0
    for j in range(0, len(runs), 2):
        start = _int(runs[j], nxt, 1 << 50, f"{where} runs[{j}]")
        length = _int(runs[j + 1], 1, most, f"{where} runs[{j + 1}]")
        nxt = start + length + 1
        starts.append(start)
        lens.append(length)
        most -= length
        if most < 0:
            raise _fail(where, "lists more blocks than its data can fill")
    total_blocks = sum(lens)
    blk = np.repeat(np.array(starts, np.int64) - np.cumsum([0, *lens[:-1]]), lens)
    blk += np.arange(total_blocks, dtype=np.int64)
    return lambda b: Patch(key, src, bs, blk, _lit(b, streams, tp))


def decode(payload: bytes | bytearray | memoryview) -> Plan:
    """Check and decode a payload into a :class:`Plan` (all validation that needs no base)."""
    env = _wire.split(payload)
    meta = env.meta
    if len(meta) != 5:
        raise PayloadCorrupt(f"payload header has {len(meta)} fields, not 5")
    sec_raw = _list(meta[0], "sections")
    lengths = [_int(x, 0, env.size, f"sections[{i}]") for i, x in enumerate(sec_raw)]
    pad = _int(meta[4], 0, env.size, "pad")
    if sum(lengths) + pad != len(env.bulk):
        raise PayloadCorrupt(
            f"sections ({sum(lengths)} bytes) and padding ({pad}) do not fill the "
            f"{len(env.bulk)}-byte bulk area"
        )
    cuts: list[memoryview] = []
    at = 0
    for n in lengths:
        cuts.append(env.bulk[at : at + n])
        at += n
    # streams
    streams: list[_Stream] = []
    used = 0
    total = 0
    for i, sraw in enumerate(_list(meta[1], "streams")):
        where = f"stream {i}"
        f = _list(sraw, where, 3)
        dt = _dtype(f[0], f"{where} dtype")
        nbytes = _int(f[1], 1, 1 << 62, f"{where} length")
        codes = [_int(c, 0, 1023, f"{where} plane") for c in _list(f[2], f"{where} planes")]
        w = stream_width(dt)
        if len(codes) not in (1, w):
            raise _fail(where, f"{len(codes)} planes for elements of width {w}")
        if nbytes % dt.itemsize:
            raise _fail(where, f"{nbytes} bytes is not a whole number of {dt.str} elements")
        need = sum(1 for c in codes if _planes.plane_needs_section(c))
        if used + need > len(cuts):
            raise _fail(where, "its planes need more sections than the payload has")
        streams.append(_Stream(dt, nbytes, tuple(codes), tuple(cuts[used : used + need])))
        used += need
        total += nbytes
    if used != len(cuts):
        raise PayloadCorrupt(f"{len(cuts) - used} sections are not used by any stream")
    if total > _wire.stream_bound(env.size):
        raise LimitExceeded(
            f"streams announce {total} bytes, over the bound of "
            f"{_wire.stream_bound(env.size)} for a {env.size}-byte payload"
        )
    for i, st in enumerate(streams):
        for c, sec in zip(
            [c for c in st.codes if _planes.plane_needs_section(c)], st.sections, strict=True
        ):
            if c & 3 == _planes.RAW and len(sec) * len(st.codes) != st.nbytes:
                raise _fail(f"stream {i}", "a RAW plane's section has the wrong length")
    # ops (structure only), then removed
    parser = _Parser(streams)
    builders = [_parse_op(raw, i, parser) for i, raw in enumerate(_list(meta[2], "ops"))]
    for i, st in enumerate(streams):
        if parser.cursor[i] != st.nbytes:
            raise PayloadCorrupt(
                f"stream {i} holds {st.nbytes} bytes but the ops take {parser.cursor[i]}"
            )
    removed = tuple(
        _int(x, 0, 1 << 32, f"removed[{i}]") for i, x in enumerate(_list(meta[3], "removed"))
    )
    if env.header.base_hash is None and removed:
        raise PayloadCorrupt("a full snapshot removes no keys")
    # decompress, then build the ops over the decoded buffers
    bufs = [
        _planes.decode_stream(st.codes, st.sections, st.nbytes, stream_width(st.dtype))
        for st in streams
    ]
    ops = tuple(b(bufs) for b in builders)
    return Plan(env.header, ops, removed)


# ----------------------------------------------------------------------------- binding


@dataclass(frozen=True, slots=True)
class Step:
    """One op bound to a base: the result key, the base key it reads (None for literal
    ops), and the result's dtype and shape (None for scalars and plain values)."""

    name: str
    src: str | None
    op: Op
    dtype: np.dtype[Any] | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Binding:
    """A plan checked against a base: the base keys kept as they are, and the steps."""

    keep: tuple[str, ...]
    steps: tuple[Step, ...]
    base_digests: Mapping[str, EntryDigest]
    alloc: int  # bytes of fresh result arrays the steps make


def _need_array(d: EntryDigest, where: str) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if d.kind != KIND_ARRAY:
        raise _fail(where, "its source is not an array")
    return np.dtype(d.dtype), d.shape


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bind_step(
    op: Op, name: str, src: str | None, bd: Mapping[str, EntryDigest], where: str
) -> tuple[Step, int]:
    if isinstance(op, Full):
        return Step(name, None, op, op.data.dtype, op.data.shape), 0
    if isinstance(op, (Scalar, Plain)):
        return Step(name, None, op, None, None), 0
    assert src is not None
    d = bd[src]
    if isinstance(op, Ref):
        if d.kind == KIND_ARRAY:
            return Step(name, src, op, np.dtype(d.dtype), d.shape), 0
        return Step(name, src, op, None, None), 0
    dt, shape = _need_array(d, where)
    nbytes = _prod(shape) * dt.itemsize
    if isinstance(op, View):
        if _prod(op.shape) * op.dtype.itemsize != nbytes:
            raise _fail(where, f"a view as {op.dtype.str} {list(op.shape)} does not have the "
                        f"{nbytes} bytes of its source")  # fmt: skip
        return Step(name, src, op, op.dtype, op.shape), nbytes
    if isinstance(op, Cast):
        if not cast_allowed(dt, op.dtype):
            raise _fail(where, f"a cast from {dt.str} to {op.dtype.str} is not allowed")
        return Step(name, src, op, op.dtype, shape), _prod(shape) * op.dtype.itemsize
    if isinstance(op, Grow):
        axis = op.axis
        if axis >= len(shape):
            raise _fail(where, f"axis {axis} is out of range for {len(shape)} dimensions")
        if op.data.dtype != dt:
            raise _fail(where, f"appends {op.data.dtype.str} to a {dt.str} array")
        inner = _prod(shape[:axis] + shape[axis + 1 :])
        if inner == 0 or op.data.size % inner:
            raise _fail(where, f"{op.data.size} elements do not fit the other dims {list(shape)}")
        out_shape = (*shape[:axis], shape[axis] + op.data.size // inner, *shape[axis + 1 :])
        return Step(name, src, op, dt, out_shape), _prod(out_shape) * dt.itemsize
    if isinstance(op, Gather):
        if not shape:
            raise _fail(where, "cannot gather rows of a 0-d array")
        if len(op.rows) and int(op.rows.max()) >= shape[0]:
            raise _fail(where, f"row {int(op.rows.max())} is out of range for {shape[0]} rows")
        shape = (len(op.rows), *shape[1:])
        if op.axis is None:
            return Step(name, src, op, dt, shape), _prod(shape) * dt.itemsize
        axis = op.axis
        if axis >= len(shape):
            raise _fail(where, f"axis {axis} is out of range for {len(shape)} dimensions")
        if op.data is not None and op.data.dtype != dt:
            raise _fail(where, f"appends {op.data.dtype.str} to a {dt.str} array")
        cell = _prod(shape[1:axis] + shape[axis + 1 :])
        nlit = 0 if op.data is None else op.data.size
        if op.dup is not None:
            k = op.dup.shape[1]
            if cell == 0 or int(np.count_nonzero(op.dup == -1)) * cell != nlit:
                raise _fail(where, f"{nlit} elements are not the dup map's literal cells")
        else:
            if cell == 0 or len(op.rows) == 0 or nlit % (cell * len(op.rows)):
                raise _fail(where, f"{nlit} elements do not fill whole cells of {list(shape)}")
            k = nlit // (cell * len(op.rows))
        out_shape = (*shape[:axis], shape[axis] + k, *shape[axis + 1 :])
        return Step(name, src, op, dt, out_shape), _prod(out_shape) * dt.itemsize
    if isinstance(op, Xor):
        if op.data.dtype != dt or op.data.size != _prod(shape):
            raise _fail(where, f"XOR data ({op.data.size} {op.data.dtype.str}) does not match "
                        f"its source ({_prod(shape)} {dt.str})")  # fmt: skip
        return Step(name, src, op, dt, shape), nbytes
    if isinstance(op, Sparse):
        if op.data.dtype != dt:
            raise _fail(where, f"values are {op.data.dtype.str}, the source is {dt.str}")
        if int(op.index[-1]) >= _prod(shape):
            raise _fail(
                where, f"index {int(op.index[-1])} is past the source's {_prod(shape)} elements"
            )
        return Step(name, src, op, dt, shape), nbytes
    assert isinstance(op, Patch)
    if op.data.dtype != dt:
        raise _fail(where, f"patch data is {op.data.dtype.str}, the source is {dt.str}")
    nblocks = -(-nbytes // op.block_size)
    if int(op.blocks[-1]) >= nblocks:
        raise _fail(where, f"block {int(op.blocks[-1])} is past the source's {nblocks} blocks")
    covered = len(op.blocks) * op.block_size
    if int(op.blocks[-1]) == nblocks - 1:
        covered -= nblocks * op.block_size - nbytes
    if covered != op.data.nbytes:
        raise _fail(where, f"the blocks hold {covered} bytes, the data {op.data.nbytes}")
    return Step(name, src, op, dt, shape), nbytes


# ----------------------------------------------------------------------------- the plan


def _contig_bytes(a: Array) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _words(a: Array) -> Array:
    """A C-contiguous array as one unsigned word (or a pair of uint64) per element."""
    flat = a.reshape(-1)
    size = a.dtype.itemsize
    if size == 16:
        return flat.view(np.uint64).reshape(-1, 2)
    return flat.view(np.dtype(f"u{size}"))


@dataclass(frozen=True, slots=True)
class Plan:
    """A decoded payload: what it says about itself, its ops, and the base keys it removes.

    ``removed`` and integer keys index the base's keys in canonical order (sorted by
    their UTF-8 bytes). Apply with :meth:`apply`, or :meth:`bind` and walk the steps."""

    header: _wire.PayloadHeader
    ops: tuple[Op, ...]
    removed: tuple[int, ...]

    def bind(
        self, base: State | None, *, digests: Mapping[str, EntryDigest] | None = None
    ) -> Binding:
        """Check the plan against a base (hash, keys, dtypes, shapes, the allocation bound).

        ``digests``: the base's entry digests, when the caller keeps them (a backend whose
        base lives in another library's tensors); then ``base`` is not looked at."""
        head = self.header
        if head.base_hash is None:
            bd: Mapping[str, EntryDigest] = {}
        else:
            if digests is not None:
                bd = digests
                have = state_hash_from_digests(bd)
            elif base is None:
                raise BaseMismatch("the payload is a delta but no base state was given")
            else:
                bd = state_digests(base)
                have = (
                    base.state_hash
                    if isinstance(base, HashedState)
                    else state_hash_from_digests(bd)
                )
            if have != head.base_hash:
                raise BaseMismatch(
                    "the payload was encoded against another base state "
                    f"({head.base_hash.hex()[:16]}..., the base given is "
                    f"{have.hex()[:16]}...)",
                    hint="send a full snapshot or a delta against the state the receiver holds",
                )
        keys = sorted(bd)

        def name_of(k: Key, where: str) -> str:
            if type(k) is int:
                if k >= len(keys):
                    raise _fail(where, f"base key index {k} is out of range ({len(keys)} keys)")
                return keys[k]
            assert isinstance(k, str)
            if k in bd:
                raise _fail(where, f"names the base key {k!r} by string")
            return k

        removed = set()
        for i, r in enumerate(self.removed):
            name = name_of(r, f"removed[{i}]")
            if name in removed:
                raise _fail(f"removed[{i}]", f"{name!r} is removed twice")
            removed.add(name)
        steps = []
        targets: set[str] = set()
        alloc = 0
        for i, op in enumerate(self.ops):
            where = f"op {i}"
            name = name_of(op.key, where)
            if name in targets:
                raise _fail(where, f"key {name!r} is written twice")
            if name in removed:
                raise _fail(where, f"key {name!r} is both removed and written")
            targets.add(name)
            src = None
            if not isinstance(op, (Full, Scalar, Plain)):
                src = name_of(op.src, f"{where} src")
            step, nb = _bind_step(op, name, src, bd, where)
            steps.append(step)
            alloc += nb
        base_nbytes = sum(d.nbytes for d in bd.values())
        bound = _wire.alloc_bound(head.size, base_nbytes)
        if alloc > bound:
            raise LimitExceeded(
                f"applying the payload would allocate {alloc} bytes, over the bound of {bound} "
                f"(base of {base_nbytes} bytes, payload of {head.size})"
            )
        keep = tuple(k for k in keys if k not in removed and k not in targets)
        return Binding(keep, tuple(steps), bd, alloc)

    def apply(self, base: State | None) -> HashedState:
        """Apply to ``base`` (None for a full snapshot); verify and return the result."""
        b = self.bind(base)
        bd = b.base_digests
        out: dict[str, Any] = {}
        digests: dict[str, EntryDigest] = {}
        src_state: State = base if base is not None else {}
        for k in b.keep:
            out[k] = src_state[k]
            digests[k] = bd[k]
        with np.errstate(all="ignore"):
            for step in b.steps:
                value = _run(step, src_state)
                out[step.name] = value
                op = step.op
                if isinstance(op, Ref):
                    assert step.src is not None
                    digests[step.name] = bd[step.src]
                elif isinstance(op, View):
                    assert step.src is not None and step.shape is not None
                    digests[step.name] = EntryDigest(
                        KIND_ARRAY, op.dtype.str, step.shape, bd[step.src].data_hash
                    )
                elif isinstance(value, np.ndarray):  # built here: dtype and key already checked
                    digests[step.name] = EntryDigest(
                        KIND_ARRAY,
                        value.dtype.str,
                        value.shape,
                        xxhash.xxh3_128_digest(_contig_bytes(value).data),
                    )
                else:
                    try:
                        digests[step.name] = entry_digest(step.name, value)
                    except StateError as exc:
                        raise PayloadCorrupt(f"op for {step.name!r}: {exc}") from exc
        if state_hash_from_digests(digests) != self.header.state_hash:
            raise StateHashMismatch(
                "applying the payload did not give the state hash it names",
                hint="the receiver keeps its state; ask the sender for a full snapshot",
            )
        ordered = HashedState({k: out[k] for k in sorted(out)}, digests=digests)
        ordered._hash = self.header.state_hash  # verified above
        return ordered


def _run(step: Step, base: State) -> Any:
    op = step.op
    if isinstance(op, Full):
        return op.data
    if isinstance(op, (Scalar, Plain)):
        return op.value
    assert step.src is not None
    src = base[step.src]
    if isinstance(op, Ref):
        return src
    if isinstance(op, View):
        return _contig_bytes(src).view(op.dtype).reshape(op.shape)
    if isinstance(op, Cast):
        return np.asarray(src).astype(op.dtype, order="C")
    if isinstance(op, Grow):
        shape = list(src.shape)
        inner = _prod(shape[: op.axis] + shape[op.axis + 1 :])
        shape[op.axis] = op.data.size // inner
        # an explicit dtype: concatenate would turn a non-native byte order native
        return np.concatenate([src, op.data.reshape(shape)], axis=op.axis, dtype=src.dtype)
    if isinstance(op, Gather):
        assert step.shape is not None and step.dtype is not None
        if op.axis is None:
            return np.take(src, op.rows, axis=0)
        out = np.empty(step.shape, step.dtype)
        a = op.axis
        keep = src.shape[a]
        head = (slice(None),) * a + (slice(0, keep),)
        if len(op.rows) <= 64:
            inner_head = head[1:]
            for i, r in enumerate(op.rows.tolist()):
                out[i][inner_head] = src[r]
        else:
            out[head] = np.take(src, op.rows, axis=0)
        nrows = len(op.rows)
        k = step.shape[a] - keep
        cell = step.shape[1:a] + step.shape[a + 1 :]
        tail = np.empty((nrows, k, *cell), step.dtype)
        if op.dup is None:
            assert op.data is not None
            tail[...] = op.data.reshape(tail.shape)
        else:
            lit = op.dup == -1
            if op.data is not None:
                tail[lit] = op.data.reshape(-1, *cell)
            for i in range(1, nrows):
                copy = np.flatnonzero(op.dup[i] >= 0)
                if len(copy):
                    tail[i, copy] = tail[op.dup[i, copy], copy]
        out[(slice(None),) * a + (slice(keep, None),)] = np.moveaxis(tail, 1, a)
        return out
    if isinstance(op, Xor):
        out = np.empty(step.shape or (), op.data.dtype)
        np.bitwise_xor(
            _contig_bytes(src), op.data.view(np.uint8), out=out.reshape(-1).view(np.uint8)
        )
        return out
    if isinstance(op, Sparse):
        out = np.array(src, order="C", copy=True)
        w = _words(out)
        w[op.index] ^= _words(op.data)
        return out
    assert isinstance(op, Patch)
    out = np.array(src, order="C", copy=True)
    ob = out.reshape(-1).view(np.uint8)
    db = op.data.view(np.uint8)
    bs = op.block_size
    blocks = op.blocks
    # contiguous runs of blocks are copied in one go
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    at = 0
    for run in np.split(blocks, breaks):
        lo = int(run[0]) * bs
        hi = min((int(run[-1]) + 1) * bs, len(ob))
        ob[lo:hi] = db[at : at + hi - lo]
        at += hi - lo
    return out
