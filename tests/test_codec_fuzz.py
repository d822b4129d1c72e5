"""Fuzzing the decoder: >= 10,000 mutated payloads per run see only the CodecError tree.

Mutations: bit flips (with the original checksum, and with a recomputed one so that the
deep validation runs), truncations, splices of two payloads, hostile headers (fields
replaced by huge, negative, wrongly typed or deeply nested values; sizes announcing 10**12
elements) re-packed with a valid checksum, wrong magic/version/flags, and garbage. Every
payload is applied to its own base, sometimes to a wrong base or to None. A decode either
fails with a typed CodecError or gives exactly the state the payload was made for; the
base is never changed.
"""

from __future__ import annotations

import copy
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash

from edge_agent.codec import apply_delta, decode, encode_delta, read_header, signature
from edge_agent.errors import CodecError, LimitExceeded, PayloadCorrupt
from edge_agent.state import state_hash
from tests.support.states import assert_same_state, random_mutation, random_state

ITERATIONS = 10_000


def _corpus() -> list[tuple[dict[str, Any] | None, bytes, dict[str, Any]]]:
    """(base, payload, expected) covering every op, both levels, signature bases."""
    rng = np.random.default_rng(2024)
    out: list[tuple[dict[str, Any] | None, bytes, dict[str, Any]]] = []
    kv = {f"past.{i}": rng.standard_normal((4, 2, 40, 16)).astype(np.float16) for i in range(2)}
    kv["w"] = rng.standard_normal((64, 64)).astype(np.float32)
    kv["ids"] = np.arange(40, dtype=np.int64)
    kv["meta"] = {"step": 40, "name": "kv", "scores": [0.5, -1.25]}
    kv["s"] = np.float32(2.5)
    grown = dict(kv)
    for i in range(2):
        tail = rng.standard_normal((4, 2, 3, 16)).astype(np.float16)
        tail[1] = tail[0]
        grown[f"past.{i}"] = np.concatenate([kv[f"past.{i}"][[1, 1, 0, 3]], tail], axis=2)
    w = kv["w"].copy()
    w.reshape(-1)[::37] += 1
    grown["w"] = w
    grown["ids"] = np.arange(43, dtype=np.int64)
    grown["meta"] = {"step": 43, "name": "kv", "scores": [0.5]}
    grown["renamed"] = kv["s"]
    grown["half"] = kv["w"].astype(np.float16)
    grown["dense"] = kv["w"] * np.float32(1.001)
    big = dict(grown)
    big["w2"] = grown["w"].reshape(32, 128)
    big["ids"] = grown["ids"].astype(np.float64)
    for level in ("small", "fast"):
        out.append((None, encode_delta(None, kv, level=level), kv))
        out.append((kv, encode_delta(kv, grown, level=level), grown))
        out.append((grown, encode_delta(grown, big, level=level), big))
    out.append((kv, encode_delta(signature(kv, block_size=256), grown), grown))
    for seed in range(6):
        r = np.random.default_rng(seed)
        base = random_state(r, 6)
        new = random_mutation(r, base)
        out.append((base, encode_delta(base, new), new))
    return out


def _split(payload: bytes) -> tuple[bytes, Any, bytes]:
    """(fixed prefix up to the header length, msgpack header, bulk) of a valid payload."""
    fixed = 5 + 16 + (16 if payload[4] & 1 else 0)
    (hlen,) = struct.unpack_from("<I", payload, fixed)
    meta = msgpack.unpackb(payload[fixed + 4 : fixed + 4 + hlen], raw=False, strict_map_key=False)
    return payload[:fixed], meta, payload[fixed + 4 + hlen : -8]


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def _pack(prefix: bytes, meta: Any, bulk: bytes) -> bytes:
    head = msgpack.packb(meta, use_bin_type=True)
    return _seal(prefix + struct.pack("<I", len(head)) + head + bulk)


HOSTILE: list[Any] = [
    0, 1, -1, 2, 7, 255, 256, 2**31, 2**32, 2**32 + 1, 10**12, 2**62, 2**63 - 1, 2**64 - 1,
    -(2**63), None, True, False, 1.5, float("nan"), "", "<f4", "|b1", ">c16", "x" * 300,
    b"", b"\x00" * 16, [], [0], [-1], [10**12], [10**6, 10**6], [2**62, 2**62], {}, {"a": 1},
    [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]], list(range(300)),
]  # fmt: skip


def _paths(obj: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    found = [prefix]
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            found += _paths(x, (*prefix, i))
    return found


def _replace(obj: Any, path: tuple[int, ...], value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _replace(obj[path[0]], path[1:], value)
    return obj


def _hostile_header(rng: np.random.Generator, payload: bytes) -> bytes:
    prefix, meta, bulk = _split(payload)
    meta = copy.deepcopy(meta)
    for _ in range(int(rng.integers(1, 3))):
        paths = _paths(meta)
        path = paths[rng.integers(len(paths))]
        r = rng.random()
        if r < 0.7:
            value = HOSTILE[rng.integers(len(HOSTILE))]
            if isinstance(value, list):
                value = list(value)
        elif r < 0.85:  # an int nudged a little: off-by-one sizes, counts, indexes
            value = int(rng.integers(-2, 3))
        else:  # an int made huge
            value = int(rng.choice([10**12, 2**40, 2**61]))
        meta = _replace(meta, path, value)
    return _pack(prefix, meta, bulk)


def _mutate(rng: np.random.Generator, payload: bytes, other: bytes) -> bytes:
    r = rng.random()
    b = bytearray(payload)
    if r < 0.15:  # bit flips, checksum left as it was
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if r < 0.35:  # bit flips with a valid checksum: the deep validation runs
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(len(b) - 8))
            b[i] ^= 1 << int(rng.integers(8))
        return _seal(bytes(b[:-8]))
    if r < 0.45:  # truncated
        cut = int(rng.integers(len(b)))
        return bytes(b[:cut]) if rng.random() < 0.5 else _seal(bytes(b[: max(cut - 8, 0)]))
    if r < 0.55:  # spliced with another payload
        i = int(rng.integers(len(payload)))
        j = int(rng.integers(len(other)))
        spliced = payload[:i] + other[j:]
        return _seal(spliced[:-8]) if rng.random() < 0.7 and len(spliced) > 8 else spliced
    if r < 0.9:
        return _hostile_header(rng, payload)
    if r < 0.95:  # magic, version, flags
        i = int(rng.integers(5))
        b[i] = int(rng.integers(256))
        return _seal(bytes(b[:-8])) if rng.random() < 0.5 else bytes(b)
    garbage = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    return _seal(payload[:5] + garbage) if rng.random() < 0.5 else garbage


def test_fuzz_only_typed_errors() -> None:
    corpus = _corpus()
    bases = [c[0] for c in corpus]
    hashes = [state_hash(b) if b is not None else None for b in bases]
    rng = np.random.default_rng(12345)
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for n in range(ITERATIONS):
        k = int(rng.integers(len(corpus)))
        base, payload, expected = corpus[k]
        other = corpus[int(rng.integers(len(corpus)))][1]
        bad = _mutate(rng, payload, other)
        target = base
        if rng.random() < 0.05:
            target = bases[int(rng.integers(len(bases)))]
        try:
            read_header(bad)
            out = apply_delta(target, bad)
        except CodecError as exc:
            name = type(exc).__name__
            outcomes[name] = outcomes.get(name, 0) + 1
            assert str(exc), "a typed error says what was wrong"
            continue
        except Exception as exc:  # pragma: no cover - this is the failure being hunted
            raise AssertionError(
                f"iteration {n}: {type(exc).__name__} escaped: {exc}; payload {bad.hex()[:400]}"
            ) from exc
        assert_same_state(out, expected)  # it decoded: then it must be the right state
        outcomes["ok"] = outcomes.get("ok", 0) + 1
    for b, h in zip(bases, hashes, strict=True):  # no base was written to
        assert (state_hash(b) if b is not None else None) == h
    assert time.perf_counter() - started < 60
    # every kind of refusal was exercised
    for name in ("PayloadCorrupt", "PayloadTruncated", "UnsupportedVersion", "LimitExceeded",
                 "BaseMismatch"):  # fmt: skip
        assert outcomes.get(name, 0) > 0, outcomes


def _payload_with(meta_edit: Any) -> tuple[dict[str, Any], bytes]:
    rng = np.random.default_rng(5)
    base = {"a": rng.standard_normal((8, 16)).astype(np.float32), "b": np.arange(10)}
    new = dict(base)
    new["a"] = np.concatenate([base["a"], rng.standard_normal((2, 16)).astype(np.float32)])
    new["c"] = rng.standard_normal(100).astype(np.float32)
    prefix, meta, bulk = _split(encode_delta(base, new))
    meta_edit(meta)
    return base, _pack(prefix, meta, bulk)


def _grow_op(meta: Any) -> list[Any]:
    return next(op for op in meta[2] if op[0] == 6)


def _full_op(meta: Any) -> list[Any]:
    return next(op for op in meta[2] if op[0] == 0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m[1][0].__setitem__(1, 10**12),  # a stream announcing 1 TB
        lambda m: _full_op(m).__setitem__(3, [10**6, 10**6]),  # 10**12 elements
        lambda m: _full_op(m).__setitem__(3, [2**40, 2**40, 2**40]),  # a product that overflows
        lambda m: _grow_op(m).__setitem__(4, 10**12),  # a grown slice of 10**12 elements
        lambda m: m[0].__setitem__(0, 10**12),  # a section longer than the payload
    ],
)
def test_huge_announced_sizes_are_refused_before_allocating(edit: Any) -> None:
    base, bad = _payload_with(edit)
    tracemalloc.start()
    try:
        with pytest.raises((LimitExceeded, PayloadCorrupt)):
            apply_delta(base, bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # nothing near the announced size was allocated


def test_a_gather_cannot_multiply_a_base_past_the_bound() -> None:
    base = {"big": np.zeros((2, 1 << 18), np.float32)}  # 2 MiB

    def edit(meta: Any) -> None:
        meta[2].append([7, "copies", 0, [0, 1] * 1000, None, 0, None, None])

    prefix, meta, bulk = _split(encode_delta(base, {**base, "x": 1}))
    edit(meta)
    with pytest.raises(LimitExceeded):
        decode(_pack(prefix, meta, bulk)).bind(base)
