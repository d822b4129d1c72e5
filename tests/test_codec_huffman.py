"""The canonical Huffman plane coder: round trips, sizes, and refusal of malformed blobs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codec import _huffman as huf
from edge_agent.errors import PayloadCorrupt

WALKS = ["compiled", "numpy"] if huf._hufc is not None else ["numpy"]


@pytest.fixture(autouse=True, params=WALKS)
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each lane walk: the compiled one and the numpy one."""
    monkeypatch.setattr(huf, "USE_COMPILED", request.param == "compiled")
    return str(request.param)


def _fp16_high_bytes(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float16)
    return np.frombuffer(x.tobytes(), np.uint8)[1::2].copy()


def _roundtrip(sym: np.ndarray) -> bytes:
    lengths = huf.code_lengths(np.bincount(sym, minlength=256))
    blob = huf.encode(sym, lengths)
    out = huf.decode(memoryview(blob), len(sym))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, sym)
    return blob


@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 127, 1000, 4097, 70_000])
def test_roundtrip_sizes(n: int) -> None:
    sym = _fp16_high_bytes(n)
    if len(np.unique(sym)) < 2:
        sym[0] ^= 1
    _roundtrip(sym)


def test_size_is_near_entropy_and_estimate_is_an_upper_bound() -> None:
    sym = _fp16_high_bytes(200_000)
    counts = np.bincount(sym, minlength=256)
    lengths = huf.code_lengths(counts)
    blob = _roundtrip(sym)
    p = counts[counts > 0] / len(sym)
    entropy_bytes = -(p * np.log2(p)).sum() * len(sym) / 8
    assert len(blob) < entropy_bytes * 1.03
    assert len(blob) <= huf.encoded_size(counts, lengths, len(sym))
    assert len(blob) < 0.72 * len(sym)  # fp16's high byte: ~5.5 bits of 8


def test_lengths_are_limited_and_complete() -> None:
    counts = np.zeros(256, np.int64)
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts[:40] = fib  # a plain Huffman code would need 39-bit codes
    lengths = huf.code_lengths(counts)
    assert int(lengths.max()) == huf.MAX_BITS
    used = lengths[lengths > 0].astype(np.int64)
    assert int(np.sum(np.left_shift(1, huf.MAX_BITS - used))) == 1 << huf.MAX_BITS
    sym = np.repeat(np.arange(40, dtype=np.uint8), [min(f, 50) for f in fib])
    _roundtrip(np.random.default_rng(1).permutation(sym))


def test_uniform_bytes_cost_about_eight_bits() -> None:
    sym = np.random.default_rng(2).integers(0, 256, 50_000).astype(np.uint8)
    assert len(_roundtrip(sym)) < 50_000 * 1.01


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=2, max_size=3000), st.integers(0, 3))
def test_roundtrip_property(values: list[int], skew: int) -> None:
    sym = np.array(values, np.uint8) >> skew
    if len(np.unique(sym)) < 2:
        sym[0] = sym[1] ^ 1
    _roundtrip(sym)


def test_one_symbol_is_refused_by_the_builder() -> None:
    with pytest.raises(ValueError):
        huf.code_lengths(np.bincount(np.zeros(5, np.uint8), minlength=256))


def _blob() -> bytes:
    return _roundtrip(_fp16_high_bytes(5000, seed=3))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:0],
        lambda b: b[:10],
        lambda b: b[:-1],
        lambda b: b + b"\0",
        lambda b: bytes([7]) + b[1:],  # unknown table format
        lambda b: bytes([0]) + bytes([0xFF] * 128) + b[129:],  # lengths over 12 bits
        lambda b: bytes([0]) + bytes([0x11] * 128) + b[129:],  # over-subscribed code
    ],
)
def test_malformed_blobs_raise_payload_corrupt(mutate: object) -> None:
    blob = mutate(_blob())  # type: ignore[operator]
    with pytest.raises(PayloadCorrupt):
        huf.decode(memoryview(blob), 5000)


def test_random_corruption_never_escapes_as_another_error() -> None:
    blob = bytearray(_blob())
    rng = np.random.default_rng(4)
    for _ in range(300):
        b = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        try:
            out = huf.decode(memoryview(bytes(b)), 5000)
        except PayloadCorrupt:
            continue
        assert len(out) == 5000  # a flip in the bitstream can decode to other symbols


def test_wrong_symbol_count_is_caught() -> None:
    blob = _blob()
    with pytest.raises(PayloadCorrupt):
        huf.decode(memoryview(blob), 9000)
