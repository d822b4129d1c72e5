"""The encoder picks the op each kind of change calls for, and it costs what it should."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.codec import (
    Cast,
    Full,
    Gather,
    Grow,
    HashedState,
    Plain,
    Ref,
    Scalar,
    Sparse,
    View,
    Xor,
    apply_delta,
    decode,
    encode_delta,
)
from edge_agent.errors import OptionError, StateError
from tests.support.states import assert_same_state


def _ops(base: Any, new: dict[str, Any], **kw: Any) -> tuple[bytes, list[Any]]:
    payload = encode_delta(base, new, **kw)
    if not hasattr(base, "block_size"):
        assert_same_state(apply_delta(base, payload), new)
    return payload, list(decode(payload).ops)


def _kv(
    rng: np.random.Generator, seq: int, dtype: Any = np.float32, batch: int = 1
) -> dict[str, Any]:
    # transformer-like: layer-normed activations through a random projection
    state: dict[str, Any] = {"step": seq, "tokens": np.arange(seq, dtype=np.int64)}
    for layer in range(4):
        for kv in ("key", "value"):
            x = rng.standard_normal((batch, 8, seq, 32)).astype(np.float32)
            state[f"past.{layer}.{kv}"] = (x @ (rng.standard_normal((32, 32)) / 6)).astype(dtype)
    return state


def _grow(rng: np.random.Generator, state: dict[str, Any], k: int) -> dict[str, Any]:
    new = dict(state)
    new["step"] = state["step"] + k
    new["tokens"] = np.arange(state["step"] + k, dtype=np.int64)
    for name, v in state.items():
        if name.startswith("past."):
            add = (rng.standard_normal((*v.shape[:2], k, v.shape[3])) * 0.6).astype(v.dtype)
            new[name] = np.concatenate([v, add], axis=2)
    return new


def test_an_unchanged_state_is_a_tiny_payload() -> None:
    rng = np.random.default_rng(0)
    state = _kv(rng, 64)
    copy = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    payload, ops = _ops(state, copy)
    assert ops == []
    assert len(payload) <= 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_grown_kv_cache_costs_about_its_new_slice(dtype: Any) -> None:
    rng = np.random.default_rng(1)
    base = _kv(rng, 256, dtype)
    new = _grow(rng, base, 16)
    payload, ops = _ops(base, new)
    grows = [op for op in ops if isinstance(op, Grow)]
    assert len(grows) == 9  # 8 cache entries and the token ids
    assert {op.axis for op in grows} == {0, 2}
    new_bytes = sum(v.nbytes - base[k].nbytes for k, v in new.items() if isinstance(v, np.ndarray))
    assert len(payload) < 0.95 * new_bytes + 300  # shuffled and entropy-coded: under raw
    fast = encode_delta(base, new, level="fast")
    assert len(fast) < new_bytes + 300


def test_a_beam_reorder_costs_the_new_slices_and_repeated_cells_are_copies() -> None:
    rng = np.random.default_rng(2)
    base = _kv(rng, 64, batch=4)
    new = dict(base)
    order = [2, 2, 0, 3]
    for name, v in base.items():
        if name.startswith("past."):
            tail = rng.standard_normal((4, 8, 3, 32)).astype(np.float32)
            tail[1, :, 0] = tail[0, :, 0]  # beams 0 and 1 share their first new token
            new[name] = np.concatenate([v[order], tail], axis=2)
    payload, ops = _ops(base, new)
    gathers = [op for op in ops if isinstance(op, Gather)]
    assert len(gathers) == 8
    assert all(list(op.rows) == order and op.axis == 2 for op in gathers)
    assert all(op.dup is not None and op.dup[1, 0] == 0 for op in gathers)
    literal = 8 * (4 * 3 - 1) * 8 * 32 * 4
    assert len(payload) < 0.95 * literal + 400


def test_a_pure_reorder_costs_a_few_bytes() -> None:
    rng = np.random.default_rng(3)
    base = {"cache": rng.standard_normal((4, 16, 128)).astype(np.float32)}
    payload, ops = _ops(base, {"cache": base["cache"][[3, 1, 1, 0]]})
    assert isinstance(ops[0], Gather) and ops[0].axis is None
    assert len(payload) < 100


def test_sparse_changes_cost_little() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    new = w.copy()
    idx = rng.choice(w.size, w.size // 100, replace=False)
    new.reshape(-1)[idx] -= np.float32(1e-3) * new.reshape(-1)[idx]
    payload, ops = _ops({"w": w}, {"w": new})
    assert isinstance(ops[0], Sparse)
    assert len(payload) < len(idx) * 4  # an index and a value XOR: < 4 bytes a change


def test_dense_small_changes_cost_less_than_raw() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    payload, ops = _ops({"w": w}, {"w": w * np.float32(1.0001)})
    assert isinstance(ops[0], Xor)
    assert len(payload) < 0.6 * w.nbytes


def test_unrelated_new_values_go_full() -> None:
    rng = np.random.default_rng(6)
    base = {"h": rng.standard_normal(4096).astype(np.float32)}
    _, ops = _ops(base, {"h": rng.standard_normal(4096).astype(np.float32)})
    assert isinstance(ops[0], (Full, Xor))


def test_structural_changes() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((64, 8)).astype(np.float32)
    base = {"a": a, "b": np.arange(10, dtype=np.int32), "c": {"x": 1}, "gone": np.zeros(3)}
    new = {
        "renamed": a,  # rename
        "b": np.arange(10, dtype=np.int64),  # widened dtype
        "c": {"x": 2},  # plain value
        "tiles": a.reshape(8, 8, 8),  # a new key holding the same bytes reshaped
        "half": a.astype(np.float16),  # a new key: full
        "s": np.float32(3),
    }
    payload, ops = _ops(base, new)
    kinds = {type(op) for op in ops}
    assert {Ref, Cast, Plain, View, Full, Scalar} <= kinds
    plan = decode(payload)
    assert len(plan.removed) == 2  # "a" (renamed away) and "gone"
    assert len(payload) < 0.6 * a.nbytes  # the fp16 copy is the only bulk


def test_reshape_and_reinterpret_in_place_are_views() -> None:
    a = np.arange(24, dtype=np.float32)
    _, ops = _ops({"a": a}, {"a": a.reshape(4, 6)})
    assert isinstance(ops[0], View) and ops[0].src == 0
    _, ops = _ops({"a": a}, {"a": a.view(np.int32)})
    assert isinstance(ops[0], View)


def test_casts_only_where_exact() -> None:
    x = np.linspace(-3, 3, 1000)
    _, ops = _ops({"x": x}, {"x": x.astype(np.float32)})
    assert isinstance(ops[0], Cast)
    _, ops = _ops({"x": x.astype(np.float32)}, {"x": x.astype(np.float32).astype(np.float64)})
    assert isinstance(ops[0], Cast)
    _, ops = _ops({"x": x}, {"x": x.astype(np.int16)})  # float -> int: not a CAST
    assert not isinstance(ops[0], Cast)


def test_hashed_states_skip_rehashing_and_apply_returns_one() -> None:
    rng = np.random.default_rng(8)
    base = HashedState(_kv(rng, 32))
    new = _grow(rng, base, 4)
    payload = encode_delta(base, new)
    out = apply_delta(base, payload)
    assert isinstance(out, HashedState) and isinstance(out, dict)
    assert out.state_hash == HashedState(dict(new)).state_hash
    out["extra"] = 1  # a mutation drops the cache
    assert out.state_hash == HashedState(dict(out)).state_hash


def test_bad_options_and_states_are_refused() -> None:
    with pytest.raises(OptionError):
        encode_delta(None, {}, level="tiny")  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        encode_delta(None, {}, window=3)
    with pytest.raises(StateError):
        encode_delta(None, {"x": np.zeros(2, np.float128)})
    with pytest.raises(StateError):
        encode_delta(None, {"x": (1, 2)})
    with pytest.raises(StateError):
        encode_delta(None, {3: 1})  # type: ignore[dict-item]


def test_full_snapshot_of_zeros_respects_the_allocation_bound() -> None:
    """A mostly-constant state compresses beyond the bound's factor: the encoder pads."""
    big = {"z": np.zeros(3 << 20, np.float32)}
    payload = encode_delta(None, big)
    assert len(payload) >= (big["z"].nbytes - (1 << 20)) // 1024
    assert_same_state(apply_delta(None, payload), big)
