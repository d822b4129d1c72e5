"""Cutting a snapshot payload into ``snap`` messages, and putting it back together.

    snaps = split_payload(payload, device=..., job=..., epoch=1, seq=7, base_seq=6, step=90)
    r = Reassembly(snaps[0], max_transfer=64 << 20)   # bounds checked before allocating
    for s in snaps: r.add(s)
    r.complete and r.payload() == payload
    r.missing()                                       # ((start, stop), ...) still absent

Chunk ``i`` of ``count`` carries bytes ``[i * size // count, (i + 1) * size // count)`` of the
payload (docs/protocol.md 3.1); the agent picks the smallest ``count`` whose chunks fit in
its maximum MQTT message, header included (default 120,000 bytes, under AWS IoT Core's 128 KB).

A :class:`Reassembly` checks every bound of a chunk before it keeps anything: the size
against ``max_transfer``, the count, the index, the exact chunk length, and that the chunk
belongs to this transfer. It holds only the bytes received (never more than ``size``) and a
one-byte-per-chunk map. This module owns chunk arithmetic; it never decides what to do with
a payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgpack

from edge_agent.errors import ChunkRejected, LocalProtocolError, TransferTooLarge
from edge_agent.protocol.messages import (
    MAX_CHUNKS,
    MAX_NEED_RANGES,
    PROTOCOL_VERSION,
    TYPE_CODES,
    Snap,
    chunk_span,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_MAX_TRANSFER",
    "ChunkPlan",
    "Reassembly",
    "check_chunk",
    "snap_overhead",
    "split_payload",
]

#: The largest MQTT payload an agent sends by default, header included (AWS IoT: 128 KB).
DEFAULT_MAX_MESSAGE: Final = 120_000
#: The largest transfer a server accepts by default.
DEFAULT_MAX_TRANSFER: Final = 1 << 30

_CHECK_SIZE: Final = 4


def snap_overhead(epoch: int, seq: int, base_seq: int | None, step: int, size: int) -> int:
    """An upper bound on what a ``snap`` message adds to its chunk's bytes, for a transfer
    of ``size`` bytes: the array, every field at its largest for this transfer (index and
    count at most ``size``), the data's bin header at its largest (5 bytes) and the check.
    (A transfer of one chunk takes the short form, smaller still.)"""
    body = msgpack.packb(
        [PROTOCOL_VERSION, TYPE_CODES["snap"], epoch, seq, base_seq, step, size, size, size, b""],
        use_bin_type=True,
    )
    return len(body) - 2 + 5 + _CHECK_SIZE  # the empty bin's 2-byte header grows to at most 5


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """How ``size`` bytes are cut into ``count`` chunks."""

    size: int
    count: int

    def __post_init__(self) -> None:
        if not (1 <= self.count <= self.size and self.count <= MAX_CHUNKS):
            raise LocalProtocolError(
                f"cannot cut {self.size} bytes into {self.count} chunks (1..{MAX_CHUNKS})"
            )

    @classmethod
    def fit(cls, size: int, overhead: int, max_message: int) -> ChunkPlan:
        """The fewest chunks whose messages (``overhead`` + chunk) fit in ``max_message``."""
        capacity = max_message - overhead
        if size < 1:
            raise LocalProtocolError("a payload is at least one byte")
        if capacity < 1:
            raise LocalProtocolError(
                f"max_message {max_message} leaves no room for data after a {overhead}-byte header",
                hint="raise the maximum message size",
            )
        count = -(-size // capacity)
        if count > MAX_CHUNKS:
            raise LocalProtocolError(
                f"a {size}-byte payload needs {count} chunks of {capacity} bytes, over "
                f"{MAX_CHUNKS}",
                hint="raise the maximum message size",
            )
        return cls(size, count)

    def span(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count:
            raise LocalProtocolError(f"chunk {index} is not in 0..{self.count - 1}")
        return chunk_span(index, self.count, self.size)


def split_payload(
    payload: bytes,
    *,
    device: str,
    job: str,
    epoch: int,
    seq: int,
    base_seq: int | None,
    step: int,
    max_message: int = DEFAULT_MAX_MESSAGE,
    indexes: range | list[int] | None = None,
) -> list[Snap]:
    """The ``snap`` messages of a payload (only ``indexes``, when given), each within
    ``max_message`` bytes once encoded. Chunks share the payload's memory (memoryviews)."""
    plan = ChunkPlan.fit(
        len(payload), snap_overhead(epoch, seq, base_seq, step, len(payload)), max_message
    )
    view = memoryview(payload)
    out = []
    for i in range(plan.count) if indexes is None else indexes:
        a, b = plan.span(i)
        out.append(
            Snap(device, job, epoch, seq, base_seq, step, i, plan.count, plan.size, view[a:b])
        )
    return out


def check_chunk(snap: Snap, max_transfer: int) -> None:
    """Raise :class:`TransferTooLarge` or :class:`ChunkRejected` unless ``snap``'s header is
    within bounds and its data has exactly the length its index, count and size give."""
    if not 1 <= snap.size <= max_transfer:
        raise TransferTooLarge(
            f"snapshot {snap.seq} announces {snap.size} bytes; the most accepted is {max_transfer}",
            hint="raise the server's max_transfer, or send derivable entries less often",
        )
    if not 1 <= snap.count <= min(snap.size, MAX_CHUNKS):
        raise ChunkRejected(f"snapshot {snap.seq}: {snap.count} chunks for {snap.size} bytes")
    if not 0 <= snap.index < snap.count:
        raise ChunkRejected(f"snapshot {snap.seq}: chunk {snap.index} of {snap.count}")
    start, stop = chunk_span(snap.index, snap.count, snap.size)
    if len(snap.data) != stop - start:
        raise ChunkRejected(
            f"snapshot {snap.seq}: chunk {snap.index} holds {len(snap.data)} bytes, not "
            f"{stop - start}"
        )


class Reassembly:
    """The chunks of one transfer (one ``seq``) received so far.

    Built from the transfer's first chunk seen (any index), which fixes ``seq``, ``base_seq``,
    ``step``, ``count`` and ``size``; :meth:`add` refuses a chunk that disagrees with them."""

    __slots__ = ("_chunks", "_have", "base_seq", "count", "max_transfer", "received_bytes",
                 "received_count", "seq", "size", "step")  # fmt: skip

    def __init__(self, first: Snap, *, max_transfer: int = DEFAULT_MAX_TRANSFER) -> None:
        check_chunk(first, max_transfer)  # before allocating anything
        self.seq = first.seq
        self.base_seq = first.base_seq
        self.step = first.step
        self.count = first.count
        self.size = first.size
        self.max_transfer = max_transfer
        self.received_count = 0
        self.received_bytes = 0
        self._have = bytearray(self.count)  # 1 where a chunk is held; count <= size, MAX_CHUNKS
        self._chunks: dict[int, bytes] = {}
        self.add(first)

    def belongs(self, snap: Snap) -> bool:
        """Whether ``snap`` is a chunk of this transfer (same seq and header)."""
        return (snap.seq, snap.base_seq, snap.step, snap.count, snap.size) == (
            self.seq, self.base_seq, self.step, self.count, self.size,
        )  # fmt: skip

    def add(self, snap: Snap) -> bool:
        """Keep a chunk; True if it was new, False for a duplicate (the first copy stays).
        Raises :class:`ChunkRejected` for a chunk of another transfer or out of bounds."""
        check_chunk(snap, self.max_transfer)
        if not self.belongs(snap):
            raise ChunkRejected(
                f"a chunk of snapshot {snap.seq} ({snap.count} chunks, {snap.size} bytes, base "
                f"{snap.base_seq}) does not belong to transfer {self.seq} ({self.count} chunks, "
                f"{self.size} bytes, base {self.base_seq})"
            )
        if self._have[snap.index]:
            return False
        self._have[snap.index] = 1
        self._chunks[snap.index] = bytes(snap.data)
        self.received_count += 1
        self.received_bytes += len(snap.data)
        return True

    @property
    def complete(self) -> bool:
        return self.received_count == self.count

    def missing(self, limit: int = MAX_NEED_RANGES) -> tuple[tuple[int, int], ...]:
        """The ranges ``[start, stop)`` of chunks not yet received, in order, at most
        ``limit`` of them (the first ones)."""
        out: list[tuple[int, int]] = []
        have, pos = self._have, 0
        while len(out) < limit:
            start = have.find(0, pos)
            if start < 0:
                break
            stop = have.find(1, start)
            stop = self.count if stop < 0 else stop
            out.append((start, stop))
            pos = stop
        return tuple(out)

    def payload(self) -> bytes:
        """The whole payload; only once :attr:`complete`."""
        if not self.complete:
            raise LocalProtocolError(
                f"transfer {self.seq} has {self.received_count} of {self.count} chunks"
            )
        return b"".join(self._chunks[i] for i in range(self.count))
