"""The codec: a state and a base state in, a payload (bytes) out, and back.

    from edge_agent.codec import encode_delta, apply_delta

    payload = encode_delta(None, state)            # a full snapshot
    payload = encode_delta(base, state)            # a delta against base
    state2 = apply_delta(base, payload)            # exact: same keys, dtypes, shapes, bytes

Also: ``read_header(payload)`` (cheap: version, base hash, state hash, size, after checking
the checksum); ``signature(state)`` (hashes only: a base for low-memory encoding);
``decode(payload) -> Plan`` (every check and all decompression, for other backends) and
``Plan.apply(base)`` / ``Plan.bind(base)``.

Pure code: no I/O, no clocks, no threads. The agent and the server run this same module.
The format is specified in docs/wire-format.md; usage and costs in docs/codec.md.
"""

from __future__ import annotations

from typing import Any

from edge_agent.codec._encode import encode_delta
from edge_agent.codec._plan import (
    Binding,
    Cast,
    Full,
    Gather,
    Grow,
    Key,
    Op,
    Patch,
    Plain,
    Plan,
    Ref,
    Scalar,
    Sparse,
    Step,
    View,
    Xor,
    cast_allowed,
    decode,
)
from edge_agent.codec._signature import DEFAULT_BLOCK_SIZE, Signature, signature
from edge_agent.codec._wire import FORMAT_VERSION, PayloadHeader, read_header
from edge_agent.state import HashedState, State

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FORMAT_VERSION",
    "Binding",
    "Cast",
    "Full",
    "Gather",
    "Grow",
    "HashedState",
    "Key",
    "Op",
    "Patch",
    "PayloadHeader",
    "Plain",
    "Plan",
    "Ref",
    "Scalar",
    "Signature",
    "Sparse",
    "Step",
    "View",
    "Xor",
    "apply_delta",
    "cast_allowed",
    "decode",
    "encode_delta",
    "read_header",
    "signature",
]


def apply_delta(base: State | None, payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Apply a payload to ``base`` (None for a full snapshot) and return the new state.

    Checks the checksum, that the payload was made against this base (BaseMismatch) and
    that the result has the state hash the payload names (StateHashMismatch); malformed
    payloads raise PayloadCorrupt, PayloadTruncated, UnsupportedVersion or
    LimitExceeded. ``base`` is never changed; unchanged arrays are shared with it. The
    result is a :class:`HashedState` (a dict that remembers its digests), so applying
    the next delta to it skips hashing it again.
    """
    return decode(payload).apply(base)
