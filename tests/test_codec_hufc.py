"""The compiled HUF lane walk (``edge_agent.codec._hufc``) against the numpy one.

tests/test_codec_huffman.py runs every round trip and refusal with each walk; these tests
compare the two directly on corrupted planes and check the compiled walk's own guards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edge_agent.codec import _huffman as huf
from edge_agent.errors import PayloadCorrupt


def test_the_compiled_walk_is_built_where_a_compiler_is() -> None:
    """setup.py builds it wherever the install could compile C (as in CI): the numpy
    walk is the fallback, not the rule."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the numpy walk is the one in use")
    assert huf._hufc is not None and huf.USE_COMPILED


def _decode_both(
    blob: bytes, n: int, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, bytes | str]]:
    got: list[tuple[str, bytes | str]] = []
    for compiled in (True, False):
        monkeypatch.setattr(huf, "USE_COMPILED", compiled)
        try:
            got.append(("ok", huf.decode(memoryview(blob), n).tobytes()))
        except PayloadCorrupt as exc:
            got.append(("error", str(exc)))
    return got


@pytest.mark.skipif(huf._hufc is None, reason="the compiled walk was not built")
def test_both_walks_agree_on_corrupted_planes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same symbols, or the same error, from the compiled and the numpy walk, for
    planes with bit flips anywhere (header, lane table, bitstream) and truncations."""
    rng = np.random.default_rng(7)
    sym = rng.integers(0, 40, 20_000).astype(np.uint8)
    good = huf.encode(sym, huf.code_lengths(np.bincount(sym, minlength=256)))
    outcomes = set()
    for _ in range(1500):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        if rng.random() < 0.1:
            b = b[: int(rng.integers(1, len(b)))]
        compiled, numpy_walk = _decode_both(bytes(b), 20_000, monkeypatch)
        assert compiled == numpy_walk
        outcomes.add(compiled[0])
    assert outcomes == {"ok", "error"}  # both kinds were seen: the comparison had teeth


@pytest.mark.skipif(huf._hufc is None, reason="the compiled walk was not built")
def test_the_compiled_walk_refuses_inconsistent_buffers() -> None:
    """Its own argument checks (the Python side never calls it so): no read or write
    outside the buffers it was given."""
    assert huf._hufc is not None
    starts = np.zeros(4, np.int64)
    ends = np.zeros(4, np.int64)
    table = np.zeros(4096, np.uint16)
    out = np.zeros(4 * 16, np.uint8)
    for args in [
        (b"", starts, ends[:3], 16, table, out),  # starts and ends disagree
        (b"", starts, ends, 16, table[:100], out),  # a short table
        (b"", starts, ends, 16, table, out[:-1]),  # out is not lanes * per
        (b"", starts, ends, 0, table, out),  # no symbols per lane
    ]:
        with pytest.raises(ValueError, match="inconsistent buffer sizes"):
            huf._hufc.decode(*args)
    # a lane that starts past the stream, or meets bits that are no code, is reported
    assert huf._hufc.decode(b"", np.full(4, 9, np.int64), ends, 16, table, out) == 0
    assert huf._hufc.decode(b"\0" * 64, starts, ends, 16, table, out) == 0
