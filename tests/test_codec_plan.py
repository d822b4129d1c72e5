"""decode / Plan.bind / Plan.apply: checks against the base, and the ops a backend walks."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash

from edge_agent.codec import (
    Full,
    Grow,
    HashedState,
    Plain,
    Ref,
    apply_delta,
    cast_allowed,
    decode,
    encode_delta,
)
from edge_agent.errors import BaseMismatch, PayloadCorrupt, StateHashMismatch
from edge_agent.state import state_hash

rng = np.random.default_rng(0)
BASE = {
    "a": rng.standard_normal((3, 5)).astype(np.float32),
    "b": np.arange(6, dtype=np.int16),
    "p": [1, "x"],
}
NEW = {
    "a": np.concatenate([BASE["a"], np.ones((2, 5), np.float32)]),
    "b": BASE["b"],
    "p2": [1, "x"],
    "q": 7,
}


def _repack(payload: bytes, edit: Any) -> bytes:
    fixed = 5 + 16 + (16 if payload[4] & 1 else 0)
    (hlen,) = struct.unpack_from("<I", payload, fixed)
    meta = msgpack.unpackb(payload[fixed + 4 : fixed + 4 + hlen], raw=False, strict_map_key=False)
    edit(meta)
    head = msgpack.packb(meta, use_bin_type=True)
    body = payload[:fixed] + struct.pack("<I", len(head)) + head + payload[fixed + 4 + hlen : -8]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_plan_ops_and_binding() -> None:
    payload = encode_delta(BASE, NEW)
    plan = decode(payload)
    assert plan.header.base_hash == state_hash(BASE)
    kinds = {type(op) for op in plan.ops}
    assert kinds == {Grow, Ref, Plain}
    assert plan.removed == (2,)  # "p", renamed to "p2"
    binding = plan.bind(BASE)
    assert binding.keep == ("b",)
    by_name = {s.name: s for s in binding.steps}
    assert by_name["a"].src == "a" and by_name["a"].shape == (5, 5)
    assert by_name["p2"].src == "p" and isinstance(by_name["p2"].op, Ref)
    assert by_name["q"].src is None and by_name["q"].shape is None
    grow = by_name["a"].op
    assert isinstance(grow, Grow) and grow.axis == 0 and grow.data.shape == (10,)
    out = plan.apply(BASE)
    assert isinstance(out, HashedState) and out.state_hash == state_hash(NEW)
    assert out["b"] is BASE["b"]  # unchanged arrays are shared, not copied


def test_plan_data_are_numpy_views_of_decoded_buffers_not_of_the_payload() -> None:
    payload = bytearray(encode_delta(None, NEW))
    plan = decode(payload)
    full = next(op for op in plan.ops if isinstance(op, Full))
    assert full.data.flags.writeable and full.data.flags.aligned
    payload[:] = b"\0" * len(payload)  # the plan does not depend on the payload's memory
    assert plan.apply(None)["a"].sum() == NEW["a"].sum()


def test_wrong_base_and_missing_base() -> None:
    payload = encode_delta(BASE, NEW)
    with pytest.raises(BaseMismatch, match="another base"):
        apply_delta(NEW, payload)
    with pytest.raises(BaseMismatch, match="no base"):
        apply_delta(None, payload)


def test_result_hash_is_verified() -> None:
    payload = bytearray(encode_delta(BASE, NEW))
    payload[5] ^= 1  # the state hash the payload names
    body = bytes(payload[:-8])
    bad = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    with pytest.raises(StateHashMismatch):
        apply_delta(BASE, bad)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m[2].append([3, "new", 99]), "out of range"),
        (lambda m: m[2].append([3, "a", 0]), "by string"),
        (lambda m: m[2].append([3, 0, 1]), "written twice"),
        (lambda m: m[3].append(m[3][0]), "removed twice"),
        (lambda m: m[2].append([3, 2, 0]), "both removed and written"),
        (lambda m: m[2].append([4, "v", 2, "<f4", [1]]), "not an array"),
        (lambda m: m[2].append([4, "v", 0, "<f4", [1]]), "does not have"),
        (lambda m: m[2].append([5, "c", 0, "<i2"]), "not allowed"),
        (lambda m: m[2].append([7, "g", 0, [3], None, 0, None, None]), "out of range"),
        (lambda m: m[2].append([99, "z"]), "outside"),
        (lambda m: m[2].append([3, "z", None]), "src is nil"),
        (lambda m: m[2].append([3, 1, None]), "explicit src"),
        (lambda m: m[2].append([2, "z", {b"k": 1}]), "not a str or int"),
        (lambda m: m[2].append([0, "z", "<f8", [2], None]), "expected an int"),
        (lambda m: m.append(0), "fields"),
    ],
)
def test_hostile_ops_are_refused(edit: Any, match: str) -> None:
    bad = _repack(encode_delta(BASE, NEW), edit)
    with pytest.raises(PayloadCorrupt, match=match):
        apply_delta(BASE, bad)


def test_cast_rules() -> None:
    f2, f4, f8 = np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8")
    assert cast_allowed(f4, f8) and cast_allowed(f8, f4) and cast_allowed(f4, f2)
    assert not cast_allowed(f8, f2)  # double rounding differs between libraries
    assert cast_allowed(np.dtype("<i4"), np.dtype("<i8"))
    assert cast_allowed(np.dtype("<i4"), np.dtype(">i4"))
    assert not cast_allowed(np.dtype("<i8"), np.dtype("<i4"))
    assert not cast_allowed(f4, np.dtype("<i4"))
    assert not cast_allowed(np.dtype("<c8"), f4)
    assert not cast_allowed(f4, f4)


def test_applying_twice_gives_equal_independent_results() -> None:
    plan = decode(encode_delta(BASE, NEW))
    one, two = plan.apply(BASE), plan.apply(BASE)
    assert one["a"] is not two["a"]
    np.testing.assert_array_equal(one["a"], two["a"])


def test_bind_from_digests_alone() -> None:
    """A backend that keeps its base as other tensors binds with the base's digests."""
    from edge_agent.state import state_digests

    plan = decode(encode_delta(BASE, NEW))
    by_digests = plan.bind(None, digests=state_digests(BASE))
    assert by_digests.steps == plan.bind(BASE).steps
    with pytest.raises(BaseMismatch):
        plan.bind(None, digests=state_digests(NEW))
