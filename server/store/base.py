"""The store's interface: what ingest, the resume worker and the API may ask of it.

The store keeps, per job, the snapshots the server has acknowledged (a *baseline*, i.e. a
full-state payload, and the deltas after it), the job's record (birth, owner, epoch, status
with its history, progress, counters) and its outputs keyed by position; per device, when it
was seen and whether it is online. ``docs/store.md`` specifies the rules; in short:

* ``commit_snapshot`` is durable before it returns: an ack sent after it returns is safe
  against a kill -9 and a power cut.
* Data is written before the record that points at it; a crash leaves at worst
  unreferenced blobs, never a record pointing at a missing blob. Nothing is read unverified.
* ``raise_epoch`` is a durable compare-and-set: of two claims at the same epoch one wins,
  the other gets :class:`~edge_agent.errors.Fenced`. Snapshots and outputs stamped with an
  older epoch than the job's are refused the same way.
* Outputs are exactly-once by position.

Implementations: :class:`server.store.sqlite.SQLiteStore` (embedded default). This module
holds only the interface and the plain records it speaks in; it does no I/O.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy.typing as npt

from edge_agent.errors import StoreError

__all__ = [
    "JOB_STATUSES",
    "OWNERS",
    "CompactionPolicy",
    "CompactionResult",
    "DeviceRecord",
    "JobRecord",
    "JobStatus",
    "LoadedState",
    "Owner",
    "RetentionPolicy",
    "RetentionReport",
    "SnapshotKind",
    "SnapshotRecord",
    "StatusChange",
    "Store",
    "VerifyReport",
]

JobStatus = Literal["running", "offline", "resuming", "server-running", "completed", "failed"]
Owner = Literal["edge", "server"]
SnapshotKind = Literal["full", "delta"]

JOB_STATUSES: tuple[JobStatus, ...] = (
    "running",
    "offline",
    "resuming",
    "server-running",
    "completed",
    "failed",
)
OWNERS: tuple[Owner, ...] = ("edge", "server")


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device: str
    first_seen: float  # times are seconds since the Unix epoch, from the store's clock
    last_seen: float
    online: bool
    online_at: float  # when ``online`` last changed


@dataclass(frozen=True, slots=True)
class JobRecord:
    job: str
    device: str
    # birth
    spec: dict[str, Any]
    model_hash: str
    codec_version: int
    session: str
    born_at: float
    last_birth_at: float
    births: int
    # ownership
    owner: Owner
    epoch: int
    # status
    status: JobStatus
    status_at: float
    # progress
    step: int
    total_steps: int | None
    # the acknowledged state: None, None until the first snapshot is committed
    seq: int | None
    state_hash: bytes | None
    # counters
    bytes_received: int  # payload bytes committed over the job's life
    full_size: int  # canonical size of the newest acknowledged state
    snapshots: int  # snapshots committed over the job's life
    attempts: int  # server resume attempts


@dataclass(frozen=True, slots=True)
class StatusChange:
    job: str
    at: float
    status: JobStatus
    detail: str


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One acknowledged snapshot. ``kind`` says how it is stored now: ``full`` (a baseline,
    received as one or made by compaction) or ``delta`` (applies to the previous snapshot)."""

    job: str
    seq: int
    base_seq: int | None  # as received; None for a full snapshot
    epoch: int
    state_hash: bytes
    blob: str
    kind: SnapshotKind
    size: int  # bytes of the stored blob
    received_size: int  # bytes of the payload as received
    full_size: int
    committed_at: float


@dataclass(frozen=True, slots=True)
class LoadedState:
    job: str
    seq: int
    state_hash: bytes
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CompactionPolicy:
    """When replaying a chain costs more than reading a baseline (see docs/store.md).

    A chain is folded into a new baseline when its deltas hold more than ``delta_ratio``
    times the baseline's bytes, or when it has more than ``max_deltas`` deltas (each applied
    delta costs a hash of the whole state, about 1/30 of reading it).

    ``baseline_level`` is the codec level of the baselines compaction writes. A server
    reads a baseline far more often than a link carries it, so the default is ``"fast"``
    (LZ4 only: applies at memory-copy speed) rather than the device's size-first
    ``"small"`` (on incompressible fp16 its entropy coding saves ~15% of the bytes and
    applies ~10x slower)."""

    delta_ratio: float = 1.0
    max_deltas: int = 32
    baseline_level: Literal["small", "fast"] = "fast"

    def __post_init__(self) -> None:
        if self.baseline_level not in ("small", "fast"):
            raise StoreError(
                f"baseline_level must be 'small' or 'fast', not {self.baseline_level!r}"
            )


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What is kept. Per job: the newest ``keep_baselines`` baselines at or before the
    acknowledged seq, and every snapshot after the oldest of them (each one a restore point);
    everything older goes. Blobs no snapshot references go once their last write is older
    than ``orphan_grace_s`` (protects a blob that another process has written and is about
    to reference)."""

    keep_baselines: int = 1
    orphan_grace_s: float = 600.0


@dataclass(frozen=True, slots=True)
class CompactionResult:
    job: str
    compacted: bool
    reason: str
    seq: int | None  # the seq that became a baseline
    deltas_before: int
    bytes_before: int  # blob bytes of the chain before
    bytes_after: int  # blob bytes of the new baseline
    rows_dropped: int
    blobs_deleted: int


@dataclass(frozen=True, slots=True)
class RetentionReport:
    rows_dropped: int
    blobs_deleted: int
    bytes_freed: int
    temporaries_removed: int


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` found. ``problems`` make it fail; ``notes`` are informational
    (unreferenced blobs a crash may leave, leftover temporaries)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blobs: int = 0
    blob_bytes: int = 0
    snapshots: int = 0
    jobs: int = 0
    states_replayed: int = 0
    outputs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [
            f"{'OK' if self.ok else 'PROBLEMS'}: {self.jobs} jobs, {self.snapshots} snapshots "
            f"({self.states_replayed} states replayed), {self.blobs} blobs "
            f"({self.blob_bytes} bytes), {self.outputs} outputs"
        ]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class Store(abc.ABC):
    """The server's durable store. Every method is safe to call from several threads.

    Errors: :class:`~edge_agent.errors.StoreError` for a request the store refuses (unknown
    job, a seq that does not advance, a base that is not the acknowledged state) and for I/O
    failures; :class:`~edge_agent.errors.StoreCorrupt` when data fails its checks;
    :class:`~edge_agent.errors.Fenced` for a stale epoch;
    :class:`~edge_agent.errors.OutputConflict` for an output written twice differently.
    """

    # -- devices ---------------------------------------------------------------------------

    @abc.abstractmethod
    def touch_device(self, device: str) -> DeviceRecord:
        """Record that a message from ``device`` arrived now (creating the device)."""

    @abc.abstractmethod
    def set_device_online(self, device: str, online: bool) -> DeviceRecord:
        """Record the device's online flag; its timestamp moves only when the flag changes."""

    @abc.abstractmethod
    def get_device(self, device: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]: ...

    # -- jobs ------------------------------------------------------------------------------

    @abc.abstractmethod
    def record_birth(
        self,
        device: str,
        job: str,
        *,
        spec: Mapping[str, Any],
        model_hash: str,
        codec_version: int,
        session: str = "",
    ) -> JobRecord:
        """Create the job at epoch 1, owner ``edge``, status ``running``; or, for a job that
        exists (a re-birth after a reconnect), count the birth. A re-birth from another
        device, or with another spec, model or codec version, is refused (StoreError)."""

    @abc.abstractmethod
    def get_job(self, job: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def list_jobs(self, device: str | None = None) -> list[JobRecord]: ...

    @abc.abstractmethod
    def set_status(
        self,
        job: str,
        status: JobStatus,
        *,
        detail: str = "",
        expect: Collection[JobStatus] | None = None,
    ) -> JobRecord:
        """Move the job to ``status`` and append the transition to its history. Setting
        the status it already has changes nothing. With ``expect``, a compare-and-set: the
        move happens only if the job's status is one of ``expect`` (checked in the same
        transaction); otherwise nothing changes. Returns the job's record after the call
        (compare its ``status`` to see whether the move happened)."""

    @abc.abstractmethod
    def status_history(self, job: str) -> list[StatusChange]:
        """Every transition, oldest first (the birth's ``running`` included)."""

    @abc.abstractmethod
    def set_progress(self, job: str, step: int, total_steps: int | None) -> None: ...

    @abc.abstractmethod
    def add_attempt(self, job: str) -> int:
        """Count one more server resume attempt; returns the new count."""

    @abc.abstractmethod
    def raise_epoch(
        self,
        job: str,
        expected_epoch: int,
        new_owner: Owner,
        *,
        status: JobStatus | None = None,
        detail: str = "",
    ) -> JobRecord:
        """Durable compare-and-set: if the job's epoch is ``expected_epoch``, make it
        ``expected_epoch + 1`` with ``new_owner`` (and ``status``, if given) in one
        transaction, and return the new record; otherwise raise Fenced and change nothing."""

    # -- snapshots -------------------------------------------------------------------------

    @abc.abstractmethod
    def commit_snapshot(
        self,
        device: str,
        job: str,
        seq: int,
        base_seq: int | None,
        epoch: int,
        payload: bytes,
        state_hash: bytes,
        full_size: int,
        *,
        step: int | None = None,
    ) -> SnapshotRecord:
        """Store a verified payload as the job's acknowledged state; durable on return.

        The caller (ingest) has applied ``payload`` and checked that it gives
        ``state_hash``; the store checks what it can without decoding: the payload's header
        names ``state_hash``; a delta's base hash is the job's acknowledged hash (a full
        snapshot has none and ``base_seq is None``); ``seq`` is above the acknowledged seq;
        ``epoch`` is the job's (older: Fenced). ``step`` updates the job's progress too.
        """

    @abc.abstractmethod
    def chain(self, job: str, seq: int | None = None) -> list[SnapshotRecord]:
        """The snapshots to replay for ``seq`` (default: the acknowledged one): the newest
        baseline at or before it, then every delta up to it, oldest first."""

    @abc.abstractmethod
    def snapshots(self, job: str) -> list[SnapshotRecord]:
        """Every snapshot the store holds for the job, oldest first."""

    @abc.abstractmethod
    def read_payload(self, job: str, seq: int) -> bytes:
        """The stored payload of one snapshot, verified against its blob name."""

    @abc.abstractmethod
    def load_state(self, job: str, seq: int | None = None) -> LoadedState:
        """Replay the chain of ``seq`` (default: acknowledged) and check every hash."""

    # -- outputs ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_outputs(
        self,
        job: str,
        start: int,
        arrays: Mapping[str, npt.NDArray[Any]],
        *,
        epoch: int | None = None,
    ) -> int:
        """Store outputs by position: row ``i`` of every array (all of one length along
        axis 0) is position ``start + i`` of that output. A position already written with
        the same dtype, shape and bytes is skipped; with different ones the whole call is
        refused (OutputConflict) and nothing is written. With ``epoch``, a call stamped
        older than the job's epoch is Fenced. Returns how many (output, position) entries
        were new."""

    @abc.abstractmethod
    def get_outputs(
        self, job: str, start: int = 0, stop: int | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Each output's rows for positions ``start`` .. ``stop`` - 1 stacked on axis 0
        (with ``stop=None``: up to the first position not yet written). A missing position
        below an explicit ``stop`` raises StoreError."""

    # -- maintenance -----------------------------------------------------------------------

    @abc.abstractmethod
    def compact(self, job: str, *, force: bool = False) -> CompactionResult:
        """Fold the acknowledged chain into a new baseline when the compaction policy says
        replaying costs more than reading a baseline (always with ``force``), then drop
        what retention no longer keeps for this job."""

    @abc.abstractmethod
    def retain(self) -> RetentionReport:
        """Apply the retention policy to every job; delete unreferenced blobs."""

    @abc.abstractmethod
    def verify(self) -> VerifyReport:
        """Re-read and re-hash every blob, replay every chain, check every state hash and
        every record → blob reference."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
