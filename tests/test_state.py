"""The state model: validation, the canonical form and hash, HashedState's cache."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.errors import StateError
from edge_agent.state import (
    MAX_KEY_BYTES,
    HashedState,
    canonical_plain,
    entry_digest,
    state_digests,
    state_hash,
    state_nbytes,
    validate_state,
)


def test_hash_is_stable_across_versions() -> None:
    # a golden value: the canonical form is part of the wire format (docs/wire-format.md)
    state = {"a": np.arange(4, dtype="<i4"), "s": np.float32(1.5), "p": {"b": 1, "a": [None]}}
    assert state_hash(state).hex() == GOLDEN


GOLDEN = "3dfd65507a9cfea23750847857d0e0c7"  # computed by the skeleton's state.py


def test_hash_depends_on_everything_that_round_trips() -> None:
    a = np.arange(6, dtype=np.int32)
    h = state_hash({"a": a})
    assert state_hash({"a": a.reshape(2, 3)}) != h
    assert state_hash({"a": a.astype(">i4")}) != h
    assert state_hash({"b": a}) != h
    assert state_hash({"a": a.astype(np.int64)}) != h
    assert state_hash({"a": np.int32(0)}) != state_hash({"a": np.array(0, np.int32)})
    assert state_hash({"a": 1}) != state_hash({"a": True})
    assert state_hash({"a": 1}) != state_hash({"a": 1.0})
    assert state_hash({"a": 0.0}) != state_hash({"a": -0.0})
    assert state_hash({"a": a}) == state_hash({"a": a.copy()})
    assert state_hash({"a": a[::2]}) == state_hash({"a": np.ascontiguousarray(a[::2])})
    assert state_hash({"x": 1, "y": 2}) == state_hash({"y": 2, "x": 1})
    assert state_hash({"d": {"x": 1, "y": 2}}) == state_hash({"d": {"y": 2, "x": 1}})


def test_canonical_plain_sorts_keys_and_keeps_float64() -> None:
    assert canonical_plain({"b": 1, "a": 2}) == canonical_plain({"a": 2, "b": 1})
    assert canonical_plain(0.5)[0] == 0xCB  # msgpack float 64


@pytest.mark.parametrize(
    "bad",
    [
        {"x": np.zeros(2, np.float128)},
        {"x": np.zeros(2, "U3")},
        {"x": np.zeros(2, [("a", "i4")])},
        {"x": (1, 2)},
        {"x": {1.5: 2}},
        {"x": 2**64},
        {"x": np.float64(1.0).item().__class__},
        {3: 1},
        {"k" * (MAX_KEY_BYTES + 1): 1},
        {"\ud800": 1},
    ],
)
def test_invalid_states(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(StateError):
        validate_state(bad)
    with pytest.raises(StateError):
        state_hash(bad)


def test_too_deep_is_refused() -> None:
    v: list = []  # type: ignore[type-arg]
    for _ in range(40):
        v = [v]
    with pytest.raises(StateError, match="deeper"):
        validate_state({"v": v})


def test_digest_and_nbytes() -> None:
    d = entry_digest("a", np.zeros((3, 4), ">f8"))
    assert d.dtype == ">f8" and d.shape == (3, 4) and d.nbytes == 96
    assert entry_digest("p", [1]).nbytes == 0
    assert state_nbytes({"a": np.zeros(3, np.int16), "s": np.int8(1), "p": "ab"}) == 6 + 1 + 3


def test_hashed_state_caches_and_invalidates() -> None:
    h = HashedState({"a": np.arange(3)})
    first = h.state_hash
    assert first == state_hash({"a": np.arange(3)})
    assert state_digests(h) == dict(h.digests)
    h["b"] = 1
    assert h.state_hash == state_hash({"a": np.arange(3), "b": 1})
    del h["b"]
    assert h.state_hash == first
    h.update(c=2)
    h.pop("c")
    h.setdefault("d", 4)
    h.popitem()
    h |= {"e": 5}
    assert h.state_hash == state_hash(dict(h))
    h.clear()
    assert h.state_hash == state_hash({})
    with pytest.raises(StateError):
        HashedState({"a": 1}, digests={})
