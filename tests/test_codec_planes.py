"""The plane coder: shuffle, per-plane RAW/CONST/LZ4/HUF choice, and decoding."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest

from edge_agent.codec import _planes
from edge_agent.errors import PayloadCorrupt


def _encode(
    data: np.ndarray, level: str = "small", huffman: bool = True
) -> tuple[list[int], list[memoryview]]:
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    w = data.dtype.itemsize // 2 if data.dtype.kind == "c" else data.dtype.itemsize
    choices = _planes.encode_stream([_planes.BytesChunk(raw)], w, len(raw), level)  # type: ignore[arg-type]
    if huffman:
        for c in choices:
            if c.plane is not None:
                c.try_huffman()
    return [c.code for c in choices], [
        memoryview(c.section) for c in choices if c.section is not None
    ]


def _roundtrip(data: np.ndarray, level: str = "small") -> list[int]:
    codes, sections = _encode(data, level)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    w = data.dtype.itemsize // 2 if data.dtype.kind == "c" else data.dtype.itemsize
    out = _planes.decode_stream(codes, sections, len(raw), w)
    np.testing.assert_array_equal(out, raw)
    assert out.flags.writeable and out.flags.aligned
    return codes


def test_float32_planes_choose_huffman_for_the_exponent_and_raw_for_mantissas() -> None:
    x = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    codes = _roundtrip(x)
    assert [c & 3 for c in codes] == [_planes.RAW, _planes.RAW, _planes.RAW, _planes.HUF]


def test_fast_level_never_uses_huffman() -> None:
    x = np.random.default_rng(1).standard_normal(50_000).astype(np.float16)
    codes = _roundtrip(x, "fast")
    assert all(c & 3 != _planes.HUF for c in codes)


def test_constant_planes_cost_nothing() -> None:
    x = np.arange(10_000, dtype=np.int64)  # bytes 2..7 of every element are zero
    codes = _roundtrip(x)
    assert codes[2:] == [_planes.CONST] * 6
    assert _encode(np.full(100, 7, np.uint8))[0] == [_planes.CONST | (7 << 2)]


def test_runs_use_lz4() -> None:
    x = np.zeros(100_000, np.float32)
    x[::97] = 1.5
    codes = _roundtrip(x)
    assert _planes.LZ4 in [c & 3 for c in codes]


@pytest.mark.parametrize(
    "dtype", ["|b1", "|u1", "<i2", ">i4", "<u8", "<f2", ">f4", "<f8", "<c8", ">c16"]
)
def test_every_width_round_trips(dtype: str) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(3000) * 100).astype(np.dtype(dtype))
    _roundtrip(x)
    _roundtrip(x, "fast")


def test_xor_chunks_code_the_xor() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal(4096).astype(np.float32)
    b = a * np.float32(1.001)
    ab, bb = a.view(np.uint8), b.view(np.uint8)
    choices = _planes.encode_stream([_planes.XorChunk(ab, bb)], 4, ab.size, "small")
    codes = [c.code for c in choices]
    secs = [memoryview(c.section) for c in choices if c.section is not None]
    out = _planes.decode_stream(codes, secs, ab.size, 4)
    np.testing.assert_array_equal(out, ab ^ bb)
    assert sum(c.size for c in choices) < 0.75 * ab.size


def test_estimate_orders_random_above_skewed() -> None:
    rng = np.random.default_rng(4)
    assert _planes.estimate(rng.integers(0, 256, 10_000).astype(np.uint8), "small") > 9000
    assert _planes.estimate(np.zeros(10_000, np.uint8), "small") < 10
    skew = np.minimum(rng.geometric(0.5, 10_000), 255).astype(np.uint8)
    assert _planes.estimate(skew, "small") < 4000


def test_bad_plane_codes_and_sections_are_refused() -> None:
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.CONST | (300 << 2), None, 4)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.RAW | 4, memoryview(b"abcd"), 4)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.RAW, memoryview(b"abc"), 4)
    lz = lz4.block.compress(b"x" * 100, store_size=False)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.LZ4, memoryview(lz), 99)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.LZ4, memoryview(lz), 101)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.LZ4, memoryview(b"\xff\xff\xff"), 100)
    with pytest.raises(PayloadCorrupt):
        _planes.decode_plane(_planes.HUF, memoryview(b"\x05"), 100)
