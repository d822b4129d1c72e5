"""Random states and random mutations of them, for the codec's property and fuzz tests.

Hypothesis strategies (``states()``, ``mutated()``) and a plain seeded generator
(``random_state``/``random_mutation``) for loops that need thousands of cases quickly.
``assert_same_state`` compares exactly: keys, kinds, dtypes (with byte order), shapes,
bytes, and plain values with their types (NaN-safe, -0.0 distinct).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from hypothesis import strategies as st

from edge_agent.codec import cast_allowed
from edge_agent.state import SUPPORTED_DTYPES

DTYPES = sorted(SUPPORTED_DTYPES)
NATIVE = sorted(d for d in DTYPES if np.dtype(d).isnative)
KEY_ALPHABET = "abcxyz._/0é€"

# ------------------------------------------------------------------ exact comparison


def _plain_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_plain_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return (
            set(a) == set(b)
            and all(
                type(k1) is type(k2)
                for k1, k2 in zip(sorted(a, key=repr), sorted(b, key=repr), strict=True)
            )
            and all(_plain_equal(a[k], b[k]) for k in a)
        )
    return bool(a == b)


def _bytes(a: Any) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def assert_same_state(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, w in want.items():
        g = got[k]
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray), k
            assert g.dtype.str == w.dtype.str and g.shape == w.shape, (k, g.dtype, g.shape)
            assert _bytes(g) == _bytes(w), k
        elif isinstance(w, np.generic):
            assert isinstance(g, np.generic) and not isinstance(g, np.ndarray), k
            assert g.dtype.str == w.dtype.str and _bytes(g) == _bytes(w), k
        else:
            assert _plain_equal(g, w), (k, g, w)


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a state's bytes, to check later that nobody wrote into it."""
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}


# ------------------------------------------------------------------ seeded generator


def random_array(
    rng: np.random.Generator, dtype: str | None = None, ndim: int | None = None
) -> np.ndarray:
    dt = np.dtype(dtype or DTYPES[rng.integers(len(DTYPES))])
    nd = int(rng.integers(0, 5)) if ndim is None else ndim
    shape = tuple(int(x) for x in rng.integers(0, 6, size=nd))
    if rng.random() < 0.3 and nd:
        shape = tuple(max(1, s) * 3 for s in shape)
    n = int(np.prod(shape)) * dt.itemsize
    kind = rng.random()
    if dt.kind in "fc" and kind < 0.5:
        arr = rng.standard_normal(int(np.prod(shape)) * (2 if dt.kind == "c" else 1)) * 3
        arr = arr.astype(np.float64).view(np.complex128) if dt.kind == "c" else arr
        out = np.asarray(arr).astype(dt).reshape(shape)
    elif kind < 0.7:
        out = (
            np.frombuffer(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), dt)
            .reshape(shape)
            .copy()
        )
    else:
        out = (rng.integers(0, 4, int(np.prod(shape)))).astype(dt).reshape(shape)
    if dt.kind == "b":
        out = out.view(np.uint8).astype(bool).astype(dt).reshape(shape)
    if rng.random() < 0.2 and out.ndim >= 1 and out.size:
        out = out[::-1]  # non-contiguous input
    if rng.random() < 0.1 and out.ndim >= 2:
        out = out.T
    return out


def random_plain(rng: np.random.Generator, depth: int = 0) -> Any:
    r = rng.integers(0, 10 if depth < 3 else 7)
    if r == 0:
        return None
    if r == 1:
        return bool(rng.integers(0, 2))
    if r == 2:
        return int(rng.integers(-(2**63), 2**63, dtype=np.int64)) * int(rng.choice([1, 1, 0]))
    if r == 3:
        return float(rng.choice([0.0, -0.0, float("nan"), float("inf"), rng.standard_normal()]))
    if r == 4:
        return "".join(rng.choice(list(KEY_ALPHABET), size=int(rng.integers(0, 8))))
    if r == 5:
        return rng.integers(0, 256, int(rng.integers(0, 10)), dtype=np.uint8).tobytes()
    if r == 6:
        return 2**64 - 1
    if r in (7, 8):
        return [random_plain(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {
        (str(i) if rng.random() < 0.7 else i): random_plain(rng, depth + 1)
        for i in range(int(rng.integers(0, 4)))
    }


def random_value(rng: np.random.Generator) -> Any:
    r = rng.random()
    if r < 0.65:
        return random_array(rng)
    if r < 0.8:
        dt = np.dtype(NATIVE[rng.integers(len(NATIVE))])
        return np.frombuffer(rng.integers(0, 256, dt.itemsize, dtype=np.uint8).tobytes(), dt)[0]
    return random_plain(rng)


def random_key(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(KEY_ALPHABET), size=int(rng.integers(1, 7))))


def random_state(rng: np.random.Generator, n: int | None = None) -> dict[str, Any]:
    count = int(rng.integers(0, 8)) if n is None else n
    return {random_key(rng): random_value(rng) for _ in range(count)}


MUTATIONS = [
    "add", "remove", "rename", "replace", "cast", "reshape", "view", "grow", "gather",
    "gather_grow", "sparse", "dense", "swap", "plain", "dup_ref", "unchanged",
]  # fmt: skip


def _castable(rng: np.random.Generator, dt: np.dtype[Any]) -> np.dtype[Any] | None:
    options = [np.dtype(d) for d in DTYPES if cast_allowed(dt, np.dtype(d))]
    return options[rng.integers(len(options))] if options else None


def mutate(rng: np.random.Generator, state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """One mutation of a given kind (falls back to 'add' where it does not apply)."""
    new = dict(state)
    arrays = [k for k, v in new.items() if isinstance(v, np.ndarray)]
    sized = [k for k in arrays if new[k].size > 0]
    k = arrays[rng.integers(len(arrays))] if arrays else None
    ks = sized[rng.integers(len(sized))] if sized else None
    if kind == "remove" and new:
        del new[list(new)[rng.integers(len(new))]]
    elif kind == "rename" and new:
        old = list(new)[rng.integers(len(new))]
        new[old + "~" + random_key(rng)] = new.pop(old)
    elif kind == "replace" and new:
        new[list(new)[rng.integers(len(new))]] = random_value(rng)
    elif kind == "cast" and k is not None:
        dt = _castable(rng, new[k].dtype)
        if dt is not None:
            with np.errstate(all="ignore"):
                new[k] = new[k].astype(dt)
    elif kind == "reshape" and k is not None:
        new[k] = np.ascontiguousarray(new[k]).reshape(-1)
        if new[k].size % 2 == 0 and new[k].size:
            new[k] = new[k].reshape(2, -1)
    elif kind == "view" and ks is not None:
        b = np.ascontiguousarray(new[ks]).reshape(-1).view(np.uint8)
        options = [d for d in DTYPES if b.size % np.dtype(d).itemsize == 0]
        new[ks] = b.view(np.dtype(options[rng.integers(len(options))]))
    elif kind == "grow" and k is not None and new[k].ndim:
        a = new[k]
        axis = int(rng.integers(a.ndim))
        shape = list(a.shape)
        shape[axis] = int(rng.integers(1, 4))
        fresh = np.frombuffer(
            rng.integers(0, 256, int(np.prod(shape)) * a.dtype.itemsize, dtype=np.uint8).tobytes(),
            a.dtype,
        ).reshape(shape)
        new[k] = np.concatenate([a, fresh], axis=axis)
    elif (
        kind in ("gather", "gather_grow") and k is not None and new[k].ndim >= 2 and new[k].shape[0]
    ):
        a = new[k]
        rows = rng.integers(0, a.shape[0], size=int(rng.integers(1, a.shape[0] + 2)))
        g = a[rows]
        if kind == "gather_grow":
            axis = int(rng.integers(1, a.ndim))
            shape = list(g.shape)
            shape[axis] = int(rng.integers(1, 3))
            fresh = rng.standard_normal(int(np.prod(shape))).astype(a.dtype).reshape(shape)
            if shape[0] >= 2 and fresh.size:
                fresh[1] = fresh[0]  # repeated cells, as beams that share history
            g = np.concatenate([g, fresh], axis=axis)
        new[k] = g
    elif kind == "sparse" and ks is not None:
        a = np.array(new[ks], copy=True)
        flat = a.reshape(-1).view(np.uint8)
        for i in rng.integers(0, flat.size, size=int(rng.integers(1, 4))):
            flat[i] ^= 1 << int(rng.integers(0, 8))
        new[ks] = a
    elif kind == "dense" and ks is not None:
        a = new[ks]
        if a.dtype.kind == "f":
            with np.errstate(all="ignore"):
                new[ks] = (a * a.dtype.type(1.0001)).astype(a.dtype)
        else:
            new[ks] = (
                np.bitwise_xor(np.ascontiguousarray(a).view(np.uint8), np.uint8(1))
                .view(a.dtype)
                .reshape(a.shape)
            )
    elif kind == "swap" and len(new) >= 2:
        a, b = rng.choice(list(new), size=2, replace=False)
        new[a], new[b] = new[b], new[a]
    elif kind == "plain":
        new[random_key(rng)] = random_plain(rng)
    elif kind == "dup_ref" and new:
        src = list(new)[rng.integers(len(new))]
        new[src + "#copy"] = new[src]
    elif kind == "unchanged":
        pass
    else:
        new[random_key(rng)] = random_value(rng)
    return new


def random_mutation(rng: np.random.Generator, state: Mapping[str, Any]) -> dict[str, Any]:
    new = dict(state)
    for _ in range(int(rng.integers(1, 4))):
        new = mutate(rng, new, MUTATIONS[rng.integers(len(MUTATIONS))])
    return new


# ------------------------------------------------------------------ hypothesis


@st.composite
def state_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(base, new, the mutation kinds applied): a random state and a mutation of it."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = random_state(rng, draw(st.integers(0, 7)))
    kinds = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4))
    new = base
    for kind in kinds:
        new = mutate(rng, new, kind)
    return base, new, kinds
