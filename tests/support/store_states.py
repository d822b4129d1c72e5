"""Deterministic job states for the store's tests: the state at ``seq`` depends on ``seq``
alone, so a test can recompute the hash of any snapshot another process committed."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.codec import encode_delta
from edge_agent.state import state_hash, state_nbytes

DEVICE = "gw-1"
JOB = "job-1"


def state_for(seq: int, size: int = 4096) -> dict[str, Any]:
    """A state that changes a little from one seq to the next and grows its token list."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(size).astype(np.float32)
    x[: (seq * 7) % size] += np.float32(seq)
    return {
        "x": x,
        "tokens": np.arange(seq % 97, dtype=np.int64),
        "step": seq,
        "note": f"seq {seq}",
    }


def is_full(seq: int) -> bool:
    """Which seqs the streams send as full snapshots (a resync every 10)."""
    return seq % 10 == 1


def snapshot_for(seq: int, size: int = 4096) -> tuple[int | None, bytes, bytes, int]:
    """(base_seq, payload, state hash, full size) of the snapshot ``seq`` in a stream whose
    deltas are made against ``seq - 1``."""
    st = state_for(seq, size)
    if is_full(seq) or seq == 1:
        return None, encode_delta(None, st), state_hash(st), state_nbytes(st)
    return seq - 1, encode_delta(state_for(seq - 1, size), st), state_hash(st), state_nbytes(st)


def hash_for(seq: int, size: int = 4096) -> bytes:
    return state_hash(state_for(seq, size))
