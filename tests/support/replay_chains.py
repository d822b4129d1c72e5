"""Chains of states whose deltas make the codec emit every op kind, and the check that
``server.replay`` replays them exactly like ``edge_agent.codec.apply_delta``.

Used in-process by tests/test_replay.py (against whichever codec this tree has) and run as
a script (``python tests/support/replay_chains.py``) by the same tests with another codec
tree ahead on ``sys.path`` (the tensor-aware codec while it is developed elsewhere). So it
imports nothing from ``tests``. Prints one line per chain and ``OPS <kinds>`` at the end.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

State = dict[str, Any]
#: every op kind of the tensor-aware codec (docs/wire-format.md)
ALL_OPS = frozenset(
    ["Full", "Scalar", "Plain", "Ref", "View", "Cast", "Grow", "Gather", "Xor", "Sparse", "Patch"]
)


def _kv(rng: np.random.Generator, beams: int, t: int, dtype: str = "<f2") -> np.ndarray:
    return rng.standard_normal((beams, 4, t, 16)).astype(dtype)


def chains(seed: int = 0) -> dict[str, list[tuple[State, bool]]]:
    """Named chains: lists of (state, encode the next delta against a signature?)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[State, bool]]] = {}

    # growth: a KV cache along axis 2, tokens along axis 0, scalars and plain values
    s: State = {
        "past.0.key": _kv(rng, 1, 7),
        "past.0.value": _kv(rng, 1, 7),
        "tokens": np.arange(7, dtype=np.int64),
        "step": 0,
        "rng": b"\x01" * 37,
        "loss": np.float32(1.5),
    }
    seq = [s]
    for i in range(1, 5):
        prev = seq[-1]
        nxt = dict(prev)
        for k in ("past.0.key", "past.0.value"):
            nxt[k] = np.concatenate([prev[k], _kv(rng, 1, i)], axis=2)
        nxt["tokens"] = np.concatenate([prev["tokens"], np.arange(i, dtype=np.int64) + 100])
        nxt["step"] = i
        nxt["rng"] = bytes([i]) * 37
        nxt["loss"] = np.float32(1.5 / (i + 1))
        seq.append(nxt)
    out["growth"] = [(x, False) for x in seq]

    # beam search: rows reordered (and repeated), then grown with cells shared by beams
    beams = _kv(rng, 4, 9, "<f4")
    g1 = {"beams": beams, "scores": rng.standard_normal((4, 3)).astype(np.float32)}
    g2 = {"beams": beams[[2, 0, 0, 3]], "scores": g1["scores"][[3, 1, 2, 0]]}
    tail = _kv(rng, 4, 2, "<f4")
    tail[1] = tail[0]  # beam 1 repeats beam 0's new cells
    g3 = {
        "beams": np.concatenate([g2["beams"][[1, 0, 3, 2]], tail], axis=2),
        "scores": g2["scores"],
    }
    tail2 = _kv(rng, 4, 3, "<f4")
    g4 = {
        "beams": np.concatenate([g3["beams"][[3, 2, 1, 0]], tail2], axis=2),
        "scores": g3["scores"],
    }
    g5 = {"beams": np.concatenate([g4["beams"], tail2[:, :, :1]], axis=2), "scores": g4["scores"]}
    out["beams"] = [(g1, False), (g2, False), (g3, False), (g4, False), (g5, False)]

    # in-place updates: dense XOR (every element nudged), sparse XOR, complex and 16-byte
    w = rng.standard_normal(1 << 15).astype(np.float32)
    c = (rng.standard_normal(4096) + 1j * rng.standard_normal(4096)).astype(np.complex128)
    b = rng.integers(0, 2, 8192).astype(bool)
    x1 = {"w": w, "c": c, "b": b, "be": rng.standard_normal(4096).astype(">f8")}
    w2 = w * np.float32(1.0 + 2.0**-20)  # low mantissa bits change: a dense XOR
    c2 = c.copy()
    c2[::97] += 1.0
    b2 = b.copy()
    b2[::61] = ~b2[::61]
    be2 = x1["be"].copy()
    be2[5::300] = -be2[5::300]
    x2 = {"w": w2, "c": c2, "b": b2, "be": be2}
    w3 = w2.copy()
    w3[1000:1004] = 0.0
    x3 = {"w": w3, "c": c2, "b": b2, "be": be2}
    out["xor"] = [(x1, False), (x2, False), (x3, False)]

    # views, casts, refs, keys added and removed
    a = rng.standard_normal((64, 32)).astype(np.float32)
    v1: State = {
        "a": a,
        "h": rng.standard_normal(1000).astype(np.float16),
        "i": rng.integers(-1000, 1000, 500).astype(np.int16),
        "u": rng.integers(0, 60000, 300).astype(np.uint16),
        "le": rng.standard_normal(300).astype("<f4"),
        "nan": np.array([np.nan, 1.0, -np.inf, 0.0], np.float32),
        "gone": np.zeros(10, np.int8),
        "note": "v1",
    }
    v2: State = {
        "a": a.reshape(32, 64),  # same bytes: VIEW
        "flat": a.reshape(-1).view(np.int32),  # another key, same bytes: VIEW
        "h": v1["h"].astype(np.float32),  # CAST f2 -> f4
        "i": v1["i"].astype(np.int64),  # CAST i2 -> i8
        "u": v1["u"].astype(np.float64),  # CAST u2 -> f8
        "le": v1["le"].astype(">f4"),  # CAST: a byte-order change
        "nan": v1["nan"].astype(np.float64),  # CAST with a NaN (host path)
        "copy": v1["i"],  # REF: another key, same entry
        "note": {"v": 2, "tags": ["x", "y"]},
        "added": np.arange(5, dtype=np.uint64),
    }
    v3: State = dict(v2)
    del v3["flat"]
    v3["h"] = v2["h"].astype(np.float64)  # CAST f4 -> f8
    v3["i"] = v2["i"].astype(np.float64)  # CAST i8 -> f8
    v3["s"] = np.int64(-7)
    v3["empty"] = np.zeros((0, 3), np.float32)
    out["views"] = [(v1, False), (v2, False), (v3, False)]

    # a signature base: changed blocks of a large array are PATCHed
    big = rng.standard_normal(1 << 16).astype(np.float32)
    p1 = {"big": big, "odd": rng.integers(0, 255, 70001).astype(np.uint8)}
    big2 = big.copy()
    big2[100:110] = 1.0
    big2[40000:40001] = 2.0
    odd2 = p1["odd"].copy()
    odd2[-3:] = 7  # the last, short block
    p2 = {"big": big2, "odd": odd2}
    out["patch"] = [(p1, True), (p2, False)]
    return out


def payloads(chain: list[tuple[State, bool]]) -> list[bytes]:
    from edge_agent import codec

    signature = getattr(codec, "signature", None)  # the stand-in codec has none
    out = [codec.encode_delta(None, chain[0][0])]
    for (prev, sig), (cur, _) in itertools.pairwise(chain):
        base = signature(prev) if sig and signature is not None else prev
        out.append(codec.encode_delta(base, cur))
    return out


def op_kinds(payload: bytes) -> set[str]:
    """The op kinds of a payload (empty when the codec has no ``decode``)."""
    from edge_agent import codec

    decode = getattr(codec, "decode", None)
    if decode is None:
        return set()
    return {type(op).__name__ for op in decode(payload).ops}


def assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Exactly equal: keys, kinds, dtypes with byte order, shapes, bytes, plain values."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, w in want.items():
        g = got[k]
        if isinstance(w, (np.ndarray, np.generic)):
            assert type(g) is type(w) or (
                isinstance(g, np.ndarray) and isinstance(w, np.ndarray)
            ), (k, type(g), type(w))
            assert g.dtype.str == w.dtype.str and g.shape == w.shape, (k, g.dtype, g.shape)
            assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(w).tobytes(), k
        else:
            assert type(g) is type(w) and g == w, (k, g, w)


def check_chains(
    replay: Callable[[list[bytes]], dict[str, Any]], seed: int = 0
) -> Iterator[tuple[str, set[str]]]:
    """For every chain and every prefix of it: ``replay(payloads)`` equals sequential
    ``apply_delta``. Yields (chain name, op kinds its payloads used)."""
    from edge_agent import codec

    for name, chain in chains(seed).items():
        ps = payloads(chain)
        kinds: set[str] = set()
        want: dict[str, Any] | None = None
        for n, p in enumerate(ps, 1):
            want = codec.apply_delta(want, p)
            kinds |= op_kinds(p)
            assert_same_state(replay(ps[:n]), dict(want))
        yield name, kinds


def main() -> int:
    from server.replay import plan_backend_available, replay_payloads

    backend = "torch" if plan_backend_available() else "numpy"
    seen: set[str] = set()
    for name, kinds in check_chains(lambda ps: replay_payloads(ps, backend=backend).state):
        seen |= kinds
        print(f"{name}: {backend} ok, ops {sorted(kinds)}")
    print("OPS", " ".join(sorted(seen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
