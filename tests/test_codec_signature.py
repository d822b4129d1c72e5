"""Signature bases: hashes only on the encoding side, the full base on the receiving side."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.codec import (
    Full,
    Gather,
    Grow,
    Patch,
    Ref,
    View,
    apply_delta,
    decode,
    encode_delta,
    signature,
)
from edge_agent.errors import OptionError
from edge_agent.state import state_hash
from tests.support.states import assert_same_state

rng = np.random.default_rng(0)


def test_signature_holds_hashes_not_data() -> None:
    state = {"w": rng.standard_normal((256, 256)).astype(np.float32), "p": [1, 2]}
    sig = signature(state, block_size=1024)
    assert sig.state_hash == state_hash(state)
    assert sig.blocks["w"].dtype == np.uint64 and len(sig.blocks["w"]) == 256
    assert len(sig.rows["w"]) == 256
    assert sig.nbytes < state["w"].nbytes // 20
    with pytest.raises(OptionError):
        signature(state, block_size=100)


def test_patch_sends_changed_blocks_only() -> None:
    w = rng.standard_normal(1 << 16).astype(np.float32)
    new = w.copy()
    new[1000:1010] += 1  # one 1 KiB block
    new[40000] += 1  # another
    payload = encode_delta(signature({"w": w}, block_size=1024), {"w": new})
    (op,) = decode(payload).ops
    assert isinstance(op, Patch) and list(op.blocks) == [3, 156]
    assert len(payload) < 2 * 1024 + 200
    assert_same_state(apply_delta({"w": w}, payload), {"w": new})


def test_grow_gather_ref_view_work_from_hashes() -> None:
    cache = rng.standard_normal((4, 2, 16, 8)).astype(np.float32)
    base = {"cache": cache, "ids": np.arange(16), "w": np.ones(64, np.float32)}
    tail = rng.standard_normal((4, 2, 2, 8)).astype(np.float32)
    new = {
        "cache": np.concatenate([cache[[3, 3, 0, 1]], tail], axis=2),
        "ids": np.arange(18),
        "w2": base["w"],
        "w": base["w"].reshape(8, 8),
    }
    payload = encode_delta(signature(base), new)
    kinds = {type(op) for op in decode(payload).ops}
    assert {Gather, Grow, Ref, View} <= kinds
    assert Full not in kinds
    assert_same_state(apply_delta(base, payload), new)


def test_when_every_block_changed_the_entry_goes_full() -> None:
    w = rng.standard_normal(4096).astype(np.float32)
    payload = encode_delta(signature({"w": w}), {"w": -w})
    (op,) = decode(payload).ops
    assert isinstance(op, Full)
