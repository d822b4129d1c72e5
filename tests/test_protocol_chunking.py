"""Chunking: every chunk message fits, reassembly in any order, bounds checked before
allocating, missing ranges, and fuzzing of chunk headers against a Reassembly."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import ChunkRejected, LocalProtocolError, TransferTooLarge
from edge_agent.protocol.chunking import (
    DEFAULT_MAX_MESSAGE,
    ChunkPlan,
    Reassembly,
    snap_overhead,
    split_payload,
)
from edge_agent.protocol.messages import MAX_CHUNKS, MAX_INT, Snap, chunk_span, encode


def split(payload: bytes, max_message: int = DEFAULT_MAX_MESSAGE, **kw: object) -> list[Snap]:
    args: dict[str, object] = dict(device="gw-1", job="j1", epoch=1, seq=5, base_seq=4, step=9)
    args.update(kw)
    return split_payload(payload, max_message=max_message, **args)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40_000), st.integers(100, 5_000), st.randoms(use_true_random=False))
def test_split_fits_and_reassembles_in_any_order(
    size: int, max_message: int, rnd: random.Random
) -> None:
    payload = rnd.randbytes(size)
    snaps = split(
        payload, max_message, seq=MAX_INT, base_seq=MAX_INT - 1, step=MAX_INT, epoch=MAX_INT
    )
    assert all(len(encode(s)) <= max_message for s in snaps)
    assert len(snaps) == -(
        -size // (max_message - snap_overhead(MAX_INT, MAX_INT, MAX_INT - 1, MAX_INT, size))
    )
    order = list(snaps)
    rnd.shuffle(order)
    r = Reassembly(order[0], max_transfer=size)
    for s in order[1:] + order[: rnd.randint(0, 3)]:  # with duplicates
        r.add(s)
    assert r.complete and r.payload() == payload and r.missing() == ()


def test_default_chunks_stay_under_aws_limit() -> None:
    payload = random.Random(1).randbytes(1_000_000)
    snaps = split(payload)
    assert len(snaps) == 9
    assert max(len(encode(s)) for s in snaps) <= 120_000 < 128 * 1024
    assert sum(len(s.data) for s in snaps) == len(payload)


def test_selected_chunks_only() -> None:
    payload = bytes(range(256)) * 40
    snaps = split(payload, 1000)
    some = split(payload, 1000, indexes=[2, 5])
    assert [s.index for s in some] == [2, 5]
    assert some[0] == snaps[2] and some[1] == snaps[5]


def test_impossible_plans_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        split(b"")
    with pytest.raises(LocalProtocolError, match="no room"):
        split(b"abc", 12)
    with pytest.raises(LocalProtocolError):
        ChunkPlan(3, 4)
    with pytest.raises(LocalProtocolError, match="chunks"):
        ChunkPlan.fit(MAX_CHUNKS * 10 + 1, 10, 20)
    with pytest.raises(LocalProtocolError):
        ChunkPlan(10, 2).span(2)


def test_missing_ranges() -> None:
    payload = bytes(1000)
    snaps = split(payload, 100)
    count = len(snaps)
    r = Reassembly(snaps[3], max_transfer=1000)
    assert r.missing() == ((0, 3), (4, count))
    for i in (0, 1, 7, count - 1):
        r.add(snaps[i])
    assert r.missing() == ((2, 3), (4, 7), (8, count - 1))
    assert r.missing(limit=2) == ((2, 3), (4, 7))
    assert r.received_count == 5 and not r.complete
    assert r.received_bytes == sum(len(snaps[i].data) for i in (0, 1, 3, 7, count - 1))
    assert r.add(snaps[0]) is False  # a duplicate
    with pytest.raises(LocalProtocolError):
        r.payload()


def test_chunks_of_another_transfer_are_refused() -> None:
    a = split(bytes(1000), 200)
    r = Reassembly(a[0], max_transfer=10_000)
    for other in [
        split(bytes(1000), 200, seq=6)[1],
        split(bytes(1001), 200)[1],
        split(bytes(1000), 300)[1],
        split(bytes(1000), 200, base_seq=3)[1],
        split(bytes(1000), 200, step=10)[1],
    ]:
        with pytest.raises(ChunkRejected, match="does not belong"):
            r.add(other)
    assert r.received_count == 1


def make_unchecked(**fields: object) -> Snap:
    """A Snap built without its own validation, the way a buggy decoder might produce one."""
    snap = object.__new__(Snap)
    defaults: dict[str, object] = dict(
        device="gw-1",
        job="j1",
        epoch=1,
        seq=1,
        base_seq=None,
        step=0,
        index=0,
        count=1,
        size=1,
        data=b"x",
    )
    defaults.update(fields)
    for k, v in defaults.items():
        object.__setattr__(snap, k, v)
    return snap


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (dict(size=2**40, count=1, data=b""), TransferTooLarge),
        (dict(size=0, count=1, data=b""), TransferTooLarge),
        (dict(size=10, count=11, data=b""), ChunkRejected),
        (dict(size=10**7, count=MAX_CHUNKS + 1, data=b""), ChunkRejected),
        (dict(size=10, count=2, index=2, data=b"x" * 5), ChunkRejected),
        (dict(size=10, count=2, index=-1, data=b"x" * 5), ChunkRejected),
        (dict(size=10, count=2, index=0, data=b"x" * 4), ChunkRejected),
        (dict(size=10, count=2, index=0, data=b"x" * 6), ChunkRejected),
    ],
)
def test_check_chunk(fields: dict[str, object], error: type[Exception]) -> None:
    snap = make_unchecked(**fields)
    tracemalloc.start()
    try:
        with pytest.raises(error):
            Reassembly(snap, max_transfer=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # refused before anything the size of the claim was allocated


def test_memory_is_what_was_received() -> None:
    size = 50_000_000  # announced: 50 MB in 1,000 chunks of 50 kB
    first = Snap("gw-1", "j1", 1, 1, None, 0, 0, 1000, size, bytes(50_000))
    tracemalloc.start()
    try:
        r = Reassembly(first, max_transfer=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.received_bytes == 50_000
    assert peak < 200_000  # one chunk and a 1,000-byte map, not 50 MB


def test_fuzz_chunk_headers_against_a_reassembly() -> None:
    """20,000 random (often lying) chunk headers against live transfers: each is either
    refused with ChunkRejected, or is a chunk of exactly this transfer with exactly the length
    its span gives; a completed transfer is exactly ``size`` bytes. (Whether the bytes are the
    right ones is the codec's checksum's business, once the payload is whole.)"""
    rng = random.Random(7)
    payload = rng.randbytes(5000)
    good = split(payload, 400)
    g = good[0]
    completed = refused = 0
    for _ in range(40):
        r = Reassembly(rng.choice(good), max_transfer=6000)
        for _ in range(500):
            if rng.random() < 0.3:
                snap = rng.choice(good)
            else:
                size = rng.choice([5000, 4999, 5001, rng.randint(-1, 7000)])
                count = rng.choice([len(good), len(good) + 1, rng.randint(-1, 30)])
                index = rng.choice([rng.randint(-1, 30), count, count - 1, 0])
                span = chunk_span(index, count, size) if count > 0 else (0, 0)
                length = max(
                    0, rng.choice([span[1] - span[0], span[1] - span[0] + 1, span[1] - span[0] - 1])
                )
                snap = make_unchecked(
                    seq=rng.choice([g.seq, g.seq + 1]),
                    base_seq=rng.choice([g.base_seq, 1]),
                    step=g.step,
                    index=index,
                    count=count,
                    size=size,
                    data=rng.randbytes(length),
                )
            try:
                r.add(snap)
            except ChunkRejected:
                refused += 1
                continue
            assert (snap.seq, snap.count, snap.size) == (r.seq, r.count, r.size)
            a, b = chunk_span(snap.index, snap.count, snap.size)
            assert 0 <= snap.index < r.count and len(snap.data) == b - a
        if r.complete:
            completed += 1
            assert len(r.payload()) == r.size
    assert refused > 10_000 and completed > 0
