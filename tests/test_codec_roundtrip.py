"""Property tests: random states through random mutations of every kind round-trip
exactly, at both levels and against a Signature base, and never change the base."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from edge_agent.codec import apply_delta, encode_delta, read_header, signature
from edge_agent.state import state_hash
from tests.support.states import (
    MUTATIONS,
    assert_same_state,
    mutate,
    random_mutation,
    random_state,
    snapshot,
    state_pairs,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(base: dict[str, Any], new: dict[str, Any], **kw: Any) -> bytes:
    before = snapshot(base)
    payload = encode_delta(base, new, **kw)
    head = read_header(payload)
    assert head.base_hash == state_hash(base)
    assert head.state_hash == state_hash(new)
    out = apply_delta(base, payload)
    assert_same_state(out, new)
    assert_same_state(base, before)  # the base was not written to
    return payload


@SETTINGS
@given(state_pairs())
def test_delta_roundtrip_small(pair: tuple[dict[str, Any], dict[str, Any], list[str]]) -> None:
    base, new, _ = pair
    _check(base, new)


@SETTINGS
@given(state_pairs())
def test_delta_roundtrip_fast(pair: tuple[dict[str, Any], dict[str, Any], list[str]]) -> None:
    base, new, _ = pair
    _check(base, new, level="fast")


@SETTINGS
@given(state_pairs())
def test_delta_roundtrip_signature(pair: tuple[dict[str, Any], dict[str, Any], list[str]]) -> None:
    base, new, _ = pair
    before = snapshot(base)
    payload = encode_delta(signature(base, block_size=64), new)
    assert_same_state(apply_delta(base, payload), new)
    assert_same_state(base, before)


@SETTINGS
@given(state_pairs())
def test_full_roundtrip(pair: tuple[dict[str, Any], dict[str, Any], list[str]]) -> None:
    _, new, _ = pair
    payload = encode_delta(None, new)
    assert read_header(payload).base_hash is None
    assert_same_state(apply_delta(None, payload), new)
    assert_same_state(apply_delta({"ignored": 1}, payload), new)  # a full snapshot needs no base


@pytest.mark.parametrize("kind", MUTATIONS)
def test_every_mutation_kind_round_trips_through_a_chain(kind: str) -> None:
    """Each mutation kind, 12 times in a chain, the receiver applying to its own result."""
    rng = np.random.default_rng(sum(map(ord, kind)))
    state = random_state(rng, 6)
    received = apply_delta(None, encode_delta(None, state))
    for _ in range(12):
        new = mutate(rng, state, kind)
        for level in ("small", "fast"):
            payload = encode_delta(state, new, level=level)
            assert_same_state(apply_delta(received, payload), new)
        received = apply_delta(received, encode_delta(state, new))
        state = new


def test_random_chains_with_signature_and_levels() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        state = random_state(rng)
        for _ in range(5):
            new = random_mutation(rng, state)
            _check(state, new)
            _check(state, new, level="fast")
            assert_same_state(apply_delta(state, encode_delta(signature(state), new)), new)
            state = new


def test_special_values() -> None:
    base = {
        "zero_size": np.zeros((0, 3, 4), np.float32),
        "zero_d": np.array(3.5, ">f8"),
        "scalar": np.float16(1.5),
        "bool_scalar": np.bool_(True),
        "big_endian": np.arange(12, dtype=">i4").reshape(3, 4),
        "noncontig": np.arange(40, dtype=np.int16).reshape(5, 8)[:, ::2],
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "complex": (np.arange(6) * (1 + 2j)).astype(np.complex64),
        "nan": np.array([np.nan, -0.0, np.inf], np.float64),
        "plain": {"a": [1, 2.5, "x", b"y", None, True, {"n": -(2**63)}], 7: 2**64 - 1},
        "empty": [],
    }
    new = dict(base)
    new["zero_size"] = np.zeros((0, 3, 5), np.float32)
    new["zero_d"] = np.array(4.5, ">f8")
    new["noncontig"] = base["noncontig"][::-1]
    new["scalar2"] = np.uint64(2**64 - 1)
    for level in ("small", "fast"):
        _check(base, new, level=level)
        _check(new, base, level=level)
        assert_same_state(apply_delta(None, encode_delta(None, new, level=level)), new)
