"""The server's durable store: acknowledged snapshots, job records, outputs.

    from server.store import SQLiteStore

    with SQLiteStore("/var/lib/edge-resume/store") as store:
        store.record_birth("gw-1", "job-1", spec={...}, model_hash="...", codec_version=1)
        store.commit_snapshot("gw-1", "job-1", seq=1, base_seq=None, epoch=1,
                              payload=payload, state_hash=h, full_size=n)   # durable: ack now
        loaded = store.load_state("job-1")                                   # replayed, verified

:class:`Store` is the interface the ingest, the resume worker and the API use;
:class:`SQLiteStore` the embedded default; :class:`BlobStore` the blob interface behind it.
``python -m server.store verify PATH`` checks a whole store. ``docs/store.md`` specifies the
layout, the write order, compaction, retention and verification.
"""

from __future__ import annotations

from server.store.base import (
    JOB_STATUSES,
    OWNERS,
    CompactionPolicy,
    CompactionResult,
    DeviceRecord,
    JobRecord,
    JobStatus,
    LoadedState,
    Owner,
    RetentionPolicy,
    RetentionReport,
    SnapshotKind,
    SnapshotRecord,
    StatusChange,
    Store,
    VerifyReport,
)
from server.store.blobs import BlobInfo, BlobStore, FolderBlobStore, blob_key
from server.store.sqlite import SQLiteStore

__all__ = [
    "JOB_STATUSES",
    "OWNERS",
    "BlobInfo",
    "BlobStore",
    "CompactionPolicy",
    "CompactionResult",
    "DeviceRecord",
    "FolderBlobStore",
    "JobRecord",
    "JobStatus",
    "LoadedState",
    "Owner",
    "RetentionPolicy",
    "RetentionReport",
    "SQLiteStore",
    "SnapshotKind",
    "SnapshotRecord",
    "StatusChange",
    "Store",
    "VerifyReport",
    "blob_key",
    "verify_path",
]


def verify_path(path: str) -> VerifyReport:
    """Open the store at ``path`` (never creating one), verify it and close it."""
    with SQLiteStore(path, create=False) as store:
        return store.verify()
