"""The embedded store: one SQLite file plus a folder of content-addressed blobs.

Layout of a store folder (``docs/store.md`` has the full specification)::

    <root>/FORMAT             "edge-resume store" and the format version; written last at creation
    <root>/store.sqlite3      devices, jobs, status history, snapshot rows, outputs (WAL mode)
    <root>/blobs/ab/ab12...   payloads, named by the xxh3-128 of their content

Write order (restic's): a payload is written to its blob (temp, fsync, rename, fsync the
folder) *before* the transaction that inserts the row naming it; blobs are deleted only
*after* the transaction that dropped their last row is checkpointed into the database file.
A kill -9 at any instant leaves at worst unreferenced blobs, never a row without its blob.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: every commit fsyncs the WAL, so a
commit that returned survives a power cut (``NORMAL`` in WAL mode survives a process kill
but may lose the newest commits on power loss, and an ack promises the state is kept).

Threads: each thread gets its own connection (WAL readers never wait for the writer); write
transactions are serialised by a process-wide lock and opened with ``BEGIN IMMEDIATE``, so
that writers in other processes sharing the file wait on SQLite's lock (busy timeout) instead
of failing half-way. A shared/exclusive guard keeps the blob garbage collector from deleting
a blob that a commit in this process has written and is about to reference; across processes
the retention grace period does that job.

This module owns the SQLite schema and the write order. It never decodes a payload except
to replay it (``load_state``, ``compact``, ``verify``) and never holds protocol logic.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt
import xxhash

from edge_agent.codec import apply_delta, encode_delta, read_header
from edge_agent.errors import (
    CodecError,
    Fenced,
    OutputConflict,
    StateError,
    StoreCorrupt,
    StoreError,
)
from edge_agent.state import SUPPORTED_DTYPES, canonical_plain, check_dtype, state_hash
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
from server.store.blobs import BlobStore, FolderBlobStore

__all__ = ["DB_NAME", "FORMAT_NAME", "FORMAT_VERSION", "SQLiteStore"]

FORMAT_VERSION = 1
DB_NAME = "store.sqlite3"
FORMAT_NAME = "FORMAT"
BLOBS_NAME = "blobs"
_FORMAT_TEXT = f"edge-resume store\nversion {FORMAT_VERSION}\n"
_APPLICATION_ID = 0x45525331  # "ERS1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HASH_LEN = 16
_R = TypeVar("_R")

_SCHEMA = """
CREATE TABLE devices (
    device      TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    online      INTEGER NOT NULL,
    online_at   REAL NOT NULL
);
CREATE TABLE jobs (
    job            TEXT PRIMARY KEY,
    device         TEXT NOT NULL REFERENCES devices(device),
    spec           BLOB NOT NULL,
    model_hash     TEXT NOT NULL,
    codec_version  INTEGER NOT NULL,
    session        TEXT NOT NULL,
    born_at        REAL NOT NULL,
    last_birth_at  REAL NOT NULL,
    births         INTEGER NOT NULL,
    owner          TEXT NOT NULL CHECK (owner IN ('edge', 'server')),
    epoch          INTEGER NOT NULL CHECK (epoch >= 1),
    status         TEXT NOT NULL,
    status_at      REAL NOT NULL,
    step           INTEGER NOT NULL,
    total_steps    INTEGER,
    seq            INTEGER,
    state_hash     BLOB,
    bytes_received INTEGER NOT NULL,
    full_size      INTEGER NOT NULL,
    snapshots      INTEGER NOT NULL,
    attempts       INTEGER NOT NULL
);
CREATE INDEX jobs_device ON jobs(device);
CREATE TABLE status_history (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job     TEXT NOT NULL REFERENCES jobs(job),
    at      REAL NOT NULL,
    status  TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX status_history_job ON status_history(job, id);
CREATE TABLE snapshots (
    job            TEXT NOT NULL REFERENCES jobs(job),
    seq            INTEGER NOT NULL,
    base_seq       INTEGER,
    epoch          INTEGER NOT NULL,
    state_hash     BLOB NOT NULL,
    blob           TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('full', 'delta')),
    size           INTEGER NOT NULL,
    received_size  INTEGER NOT NULL,
    full_size      INTEGER NOT NULL,
    committed_at   REAL NOT NULL,
    PRIMARY KEY (job, seq)
) WITHOUT ROWID;
CREATE INDEX snapshots_blob ON snapshots(blob);
CREATE TABLE outputs (
    job     TEXT NOT NULL REFERENCES jobs(job),
    name    TEXT NOT NULL,
    pos     INTEGER NOT NULL,
    dtype   TEXT NOT NULL,
    shape   TEXT NOT NULL,
    data    BLOB NOT NULL,
    digest  BLOB NOT NULL,
    PRIMARY KEY (job, name, pos)
) WITHOUT ROWID;
CREATE TABLE dropped_blobs (
    blob        TEXT PRIMARY KEY,
    dropped_at  REAL NOT NULL
) WITHOUT ROWID;
"""

_JOB_COLUMNS = (
    "job, device, spec, model_hash, codec_version, session, born_at, last_birth_at, births, "
    "owner, epoch, status, status_at, step, total_steps, seq, state_hash, bytes_received, "
    "full_size, snapshots, attempts"
)
_SNAP_COLUMNS = (
    "job, seq, base_seq, epoch, state_hash, blob, kind, size, received_size, full_size, "
    "committed_at"
)


@contextlib.contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    """Translate sqlite3's exceptions into the store's, once, at the seam."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        msg = str(exc)
        if any(s in msg for s in ("malformed", "not a database", "corrupt")):
            raise StoreCorrupt(
                f"{what}: the database is damaged: {msg}", hint="run verify; restore a backup"
            ) from exc
        raise StoreError(f"{what}: {msg}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc
    except UnicodeDecodeError as exc:  # text in a damaged file (or in SQLite's message on it)
        raise StoreCorrupt(f"{what}: the database holds invalid text: {exc}") from exc


_TYPES: dict[str, tuple[type, ...]] = {
    "s": (str,),
    "i": (int,),
    "I": (int, type(None)),
    "f": (float, int),
    "b": (bytes,),
    "h": (bytes,),
    "H": (bytes, type(None)),
}


def _typed(row: tuple[Any, ...], codes: str, what: str) -> tuple[Any, ...]:
    """Check the types SQLite handed back (its columns are dynamically typed, so a damaged
    file can hold anything): s str, i int, I int|None, f number, b bytes, h/H 16-byte hash."""
    codes = codes.replace(" ", "")
    if len(row) != len(codes):
        raise StoreCorrupt(f"{what}: a row has {len(row)} columns, not {len(codes)}")
    for value, code in zip(row, codes, strict=True):
        if (
            not isinstance(value, _TYPES[code])
            or isinstance(value, bool)
            or (code in "hH" and isinstance(value, bytes) and len(value) != _HASH_LEN)
        ):
            raise StoreCorrupt(f"{what}: a row holds {type(value).__name__} {value!r:.40}")
    return row


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_id(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise StoreError(f"{kind} id {value!r} does not match {_ID_RE.pattern}")
    return value


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise StoreError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


class _SharedExclusive:
    """A small shared/exclusive lock (writer-preferring, not re-entrant).

    Shared: a commit between writing its blob and committing the row that names it, or a
    reader replaying blobs. Exclusive: deleting blobs that no row names."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class SQLiteStore(Store):
    """The embedded store in the folder ``root`` (created unless ``create=False``).

    ``compaction`` and ``retention`` set the policies; ``clock`` gives the times recorded in
    rows (seconds since the epoch); ``blobs`` replaces the blob folder (an object store)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = True,
        compaction: CompactionPolicy | None = None,
        retention: RetentionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        blobs: BlobStore | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.compaction = compaction or CompactionPolicy()
        self.retention = retention or RetentionPolicy()
        if self.retention.keep_baselines < 1:
            raise StoreError("retention must keep at least one baseline")
        self._clock = clock
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._gc = _SharedExclusive()
        self._closed = False
        db = self.root / DB_NAME
        marker = self.root / FORMAT_NAME
        if not db.exists():
            if not create:
                raise StoreError(f"{self.root} holds no store ({DB_NAME} is missing)")
            if marker.exists():
                raise StoreCorrupt(
                    f"{self.root}: {DB_NAME} is missing but {FORMAT_NAME} says a store was here",
                    hint="restore the database from a backup",
                )
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {self.root}: {exc}") from exc
        self.blobs = (
            blobs if blobs is not None else FolderBlobStore(self.root / BLOBS_NAME, create=create)
        )
        try:
            self._open_schema(marker)
        except BaseException:
            self.close()
            raise

    # -- connections and transactions ----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with _sqlite_errors(f"open {self.root / DB_NAME}"):
                conn = sqlite3.connect(
                    self.root / DB_NAME, isolation_level=None, check_same_thread=False
                )
                try:
                    conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                    conn.execute("PRAGMA synchronous = FULL")
                    conn.execute("PRAGMA foreign_keys = ON")
                except BaseException:
                    conn.close()
                    raise
            with self._conns_lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT (durable on return)."""
        with self._write_lock, _sqlite_errors(what):
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot across several SELECTs)."""
        with _sqlite_errors(what):
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")

    def _open_schema(self, marker: Path) -> None:
        with _sqlite_errors(f"open {self.root / DB_NAME}"):
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if marker.exists():
                    raise StoreCorrupt(
                        f"{self.root}: the database is empty but {FORMAT_NAME} says a store "
                        "was created here: the database or its WAL was lost or truncated",
                        hint="restore the database from a backup",
                    )
                self._wal_mode(conn)
                with self._write("create the schema") as c:
                    if c.execute("PRAGMA user_version").fetchone()[0] == 0:
                        if c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                            raise StoreError(f"{self.root / DB_NAME} is not an edge-resume store")
                        # one by one: executescript() would COMMIT the transaction first
                        for stmt in _SCHEMA.split(";"):
                            if stmt.strip():
                                c.execute(stmt)
                        c.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                        c.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
                self._checkpoint()
                version = FORMAT_VERSION
            if version != FORMAT_VERSION:
                raise StoreError(
                    f"{self.root}: store format version {version} is not {FORMAT_VERSION}, "
                    "the one this build reads",
                    hint="use the edge-resume release that wrote it",
                )
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            if app != _APPLICATION_ID:
                raise StoreError(f"{self.root / DB_NAME} is not an edge-resume store")
            self._wal_mode(conn)  # persistent in the file; re-asserted in case a tool changed it
        if not marker.exists():
            self._write_marker(marker)
        else:
            try:
                text = marker.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise StoreError(f"cannot read {marker}: {exc}") from exc
            if text != _FORMAT_TEXT:
                raise StoreError(
                    f"{marker} says {text.strip()!r}; this build reads {_FORMAT_TEXT.strip()!r}"
                )

    @staticmethod
    def _wal_mode(conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot put {DB_NAME} in WAL mode (got {mode!r})")

    def _write_marker(self, marker: Path) -> None:
        tmp = marker.with_name(f".{marker.name}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(_FORMAT_TEXT)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, marker)
            _fsync_dir(self.root)
        except OSError as exc:
            raise StoreError(f"cannot write {marker}: {exc}") from exc

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database file and sync it. False if readers held it up."""
        with self._write_lock, _sqlite_errors("checkpoint"):
            busy, _, _ = self._conn().execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        return not busy

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self.blobs.close()

    # -- row helpers -----------------------------------------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    @staticmethod
    def _job_from_row(row: tuple[Any, ...]) -> JobRecord:
        _typed(row, "ssbsis ffis isfi IIH iiii", "jobs")
        try:
            spec = msgpack.unpackb(row[2], raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many types
            raise StoreCorrupt(f"job {row[0]}: its stored spec is unreadable: {exc}") from exc
        return JobRecord(
            job=row[0], device=row[1], spec=spec, model_hash=row[3], codec_version=row[4],
            session=row[5], born_at=row[6], last_birth_at=row[7], births=row[8],
            owner=row[9], epoch=row[10], status=row[11], status_at=row[12], step=row[13],
            total_steps=row[14], seq=row[15],
            state_hash=row[16],
            bytes_received=row[17], full_size=row[18], snapshots=row[19], attempts=row[20],
        )  # fmt: skip

    @staticmethod
    def _snap_from_row(row: tuple[Any, ...]) -> SnapshotRecord:
        _typed(row, "siIi hss iiif", "snapshots")
        if row[6] not in ("full", "delta"):
            raise StoreCorrupt(f"snapshots: job {row[0]} seq {row[1]} has kind {row[6]!r}")
        return SnapshotRecord(
            job=row[0], seq=row[1], base_seq=row[2], epoch=row[3], state_hash=row[4],
            blob=row[5], kind=row[6], size=row[7], received_size=row[8], full_size=row[9],
            committed_at=row[10],
        )  # fmt: skip

    def _job_row(self, c: sqlite3.Connection, job: str) -> JobRecord | None:
        row = c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = ?", (job,)).fetchone()
        return self._job_from_row(row) if row is not None else None

    def _need_job(self, c: sqlite3.Connection, job: str) -> JobRecord:
        rec = self._job_row(c, _check_id("job", job))
        if rec is None:
            raise StoreError(f"unknown job {job!r}", hint="it has no birth in this store")
        return rec

    def _device_row(self, c: sqlite3.Connection, device: str) -> DeviceRecord | None:
        row = c.execute(
            "SELECT device, first_seen, last_seen, online, online_at FROM devices WHERE device = ?",
            (device,),
        ).fetchone()
        if row is None:
            return None
        _typed(row, "sffif", "devices")
        return DeviceRecord(row[0], row[1], row[2], bool(row[3]), row[4])

    def _ensure_device(self, c: sqlite3.Connection, device: str, now: float) -> None:
        c.execute(
            "INSERT INTO devices (device, first_seen, last_seen, online, online_at) "
            "VALUES (?, ?, ?, 0, ?) ON CONFLICT (device) DO NOTHING",
            (device, now, now, now),
        )

    # -- devices ---------------------------------------------------------------------------

    def touch_device(self, device: str) -> DeviceRecord:
        _check_id("device", device)
        with self._write("touch device") as c:
            now = self._now()
            self._ensure_device(c, device, now)
            c.execute("UPDATE devices SET last_seen = ? WHERE device = ?", (now, device))
            rec = self._device_row(c, device)
        assert rec is not None
        return rec

    def set_device_online(self, device: str, online: bool) -> DeviceRecord:
        _check_id("device", device)
        with self._write("set device online") as c:
            now = self._now()
            self._ensure_device(c, device, now)
            c.execute(
                "UPDATE devices SET online = ?, online_at = ? WHERE device = ? AND online != ?",
                (int(online), now, device, int(online)),
            )
            rec = self._device_row(c, device)
        assert rec is not None
        return rec

    def get_device(self, device: str) -> DeviceRecord | None:
        with self._read("get device") as c:
            return self._device_row(c, _check_id("device", device))

    def list_devices(self) -> list[DeviceRecord]:
        with self._read("list devices") as c:
            rows = c.execute(
                "SELECT device, first_seen, last_seen, online, online_at FROM devices "
                "ORDER BY device"
            ).fetchall()
        return [
            DeviceRecord(r[0], r[1], r[2], bool(r[3]), r[4])
            for r in rows
            if _typed(r, "sffif", "devices")
        ]

    # -- jobs ------------------------------------------------------------------------------

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
        _check_id("device", device)
        _check_id("job", job)
        if not isinstance(spec, Mapping):
            raise StoreError(f"job {job}: spec must be a mapping, not {type(spec).__name__}")
        if not isinstance(model_hash, str) or not isinstance(session, str):
            raise StoreError(f"job {job}: model_hash and session must be str")
        _check_int("codec_version", codec_version)
        try:
            spec_bytes = canonical_plain(dict(spec))
        except (TypeError, ValueError, OverflowError) as exc:
            raise StoreError(f"job {job}: spec is not a plain msgpack map: {exc}") from exc
        with self._write("record birth") as c:
            now = self._now()
            self._ensure_device(c, device, now)
            c.execute("UPDATE devices SET last_seen = ? WHERE device = ?", (now, device))
            row = c.execute(
                "SELECT device, spec, model_hash, codec_version FROM jobs WHERE job = ?", (job,)
            ).fetchone()
            if row is None:
                c.execute(
                    f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, 1, 'edge', 1, 'running', ?, 0, NULL, NULL, NULL, "
                    "0, 0, 0, 0)",
                    (job, device, spec_bytes, model_hash, codec_version, session, now, now, now),
                )
                c.execute(
                    "INSERT INTO status_history (job, at, status, detail) "
                    "VALUES (?, ?, 'running', 'born')",
                    (job, now),
                )
            else:
                if row[0] != device:
                    raise StoreError(f"job {job} belongs to device {row[0]}, not {device}")
                if (row[1], row[2], row[3]) != (spec_bytes, model_hash, codec_version):
                    raise StoreError(
                        f"job {job} was born with another spec, model or codec version",
                        hint="a changed job needs a new job id",
                    )
                c.execute(
                    "UPDATE jobs SET births = births + 1, last_birth_at = ?, session = ? "
                    "WHERE job = ?",
                    (now, session, job),
                )
            return self._need_job(c, job)

    def get_job(self, job: str) -> JobRecord | None:
        with self._read("get job") as c:
            return self._job_row(c, _check_id("job", job))

    def list_jobs(self, device: str | None = None) -> list[JobRecord]:
        with self._read("list jobs") as c:
            if device is None:
                rows = c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY job").fetchall()
            else:
                rows = c.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE device = ? ORDER BY job",
                    (_check_id("device", device),),
                ).fetchall()
        return [self._job_from_row(r) for r in rows]

    def _set_status(
        self, c: sqlite3.Connection, rec: JobRecord, status: JobStatus, detail: str, now: float
    ) -> None:
        if status not in JOB_STATUSES:
            raise StoreError(f"{status!r} is not a job status ({', '.join(JOB_STATUSES)})")
        if status == rec.status:
            return
        c.execute("UPDATE jobs SET status = ?, status_at = ? WHERE job = ?", (status, now, rec.job))
        c.execute(
            "INSERT INTO status_history (job, at, status, detail) VALUES (?, ?, ?, ?)",
            (rec.job, now, status, str(detail)),
        )

    def set_status(
        self,
        job: str,
        status: JobStatus,
        *,
        detail: str = "",
        expect: Collection[JobStatus] | None = None,
    ) -> JobRecord:
        if expect is not None:
            expect = frozenset(expect)
            for e in expect:
                if e not in JOB_STATUSES:
                    raise StoreError(f"{e!r} is not a job status ({', '.join(JOB_STATUSES)})")
        with self._write("set status") as c:
            rec = self._need_job(c, job)
            if expect is not None and rec.status not in expect:
                return rec
            self._set_status(c, rec, status, detail, self._now())
            return self._need_job(c, job)

    def status_history(self, job: str) -> list[StatusChange]:
        with self._read("status history") as c:
            self._need_job(c, job)
            rows = c.execute(
                "SELECT at, status, detail FROM status_history WHERE job = ? ORDER BY id",
                (job,),
            ).fetchall()
        return [StatusChange(job, r[0], r[1], r[2]) for r in rows if _typed(r, "fss", "history")]

    def set_progress(self, job: str, step: int, total_steps: int | None) -> None:
        _check_int("step", step)
        if total_steps is not None:
            _check_int("total_steps", total_steps)
        with self._write("set progress") as c:
            self._need_job(c, job)
            c.execute(
                "UPDATE jobs SET step = ?, total_steps = ? WHERE job = ?",
                (step, total_steps, job),
            )

    def add_attempt(self, job: str) -> int:
        with self._write("add attempt") as c:
            self._need_job(c, job)
            c.execute("UPDATE jobs SET attempts = attempts + 1 WHERE job = ?", (job,))
            return int(c.execute("SELECT attempts FROM jobs WHERE job = ?", (job,)).fetchone()[0])

    def raise_epoch(
        self,
        job: str,
        expected_epoch: int,
        new_owner: Owner,
        *,
        status: JobStatus | None = None,
        detail: str = "",
    ) -> JobRecord:
        _check_int("expected_epoch", expected_epoch, 1)
        if new_owner not in OWNERS:
            raise StoreError(f"{new_owner!r} is not an owner ({', '.join(OWNERS)})")
        with self._write("raise epoch") as c:
            rec = self._need_job(c, job)
            cur = c.execute(
                "UPDATE jobs SET epoch = epoch + 1, owner = ? WHERE job = ? AND epoch = ?",
                (new_owner, job, expected_epoch),
            )
            if cur.rowcount != 1:
                raise Fenced(
                    f"job {job} is at epoch {rec.epoch} (owner {rec.owner}), not "
                    f"{expected_epoch}: another claim won",
                    hint="re-read the job; do not run it",
                )
            if status is not None:
                self._set_status(c, rec, status, detail, self._now())
            return self._need_job(c, job)

    # -- snapshots -------------------------------------------------------------------------

    def _check_commit(
        self,
        c: sqlite3.Connection,
        device: str,
        job: str,
        seq: int,
        epoch: int,
        base_hash: bytes | None,
        state_hash_: bytes,
    ) -> tuple[JobRecord, SnapshotRecord | None]:
        """Refuse what must not be committed; return the job and, for a repeat of a
        snapshot already stored with the same hash, that snapshot."""
        rec = self._need_job(c, job)
        if rec.device != device:
            raise StoreError(f"job {job} belongs to device {rec.device}, not {device}")
        if epoch < rec.epoch:
            raise Fenced(
                f"job {job} is at epoch {rec.epoch}; a snapshot of epoch {epoch} is fenced"
            )
        if epoch > rec.epoch:
            raise StoreError(
                f"job {job} is at epoch {rec.epoch}; epoch {epoch} was never raised",
                hint="epochs are raised with raise_epoch",
            )
        row = c.execute(
            f"SELECT {_SNAP_COLUMNS} FROM snapshots WHERE job = ? AND seq = ?", (job, seq)
        ).fetchone()
        if row is not None:
            existing = self._snap_from_row(row)
            if existing.state_hash == state_hash_:
                return rec, existing
            raise StoreError(f"job {job} seq {seq} is already stored with another state hash")
        if rec.seq is not None and seq <= rec.seq:
            raise StoreError(f"job {job}: seq {seq} is not above the acknowledged seq {rec.seq}")
        if base_hash is not None and base_hash != rec.state_hash:
            raise StoreError(
                f"job {job}: the delta's base is not the acknowledged state (seq {rec.seq})",
                hint="a delta must be made against the acknowledged state (nack base)",
            )
        return rec, None

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
        _check_id("device", device)
        _check_id("job", job)
        _check_int("seq", seq)
        _check_int("epoch", epoch, 1)
        _check_int("full_size", full_size)
        if step is not None:
            _check_int("step", step)
        if base_seq is not None and (_check_int("base_seq", base_seq) >= seq):
            raise StoreError(f"job {job}: base_seq {base_seq} is not below seq {seq}")
        if not isinstance(state_hash, bytes) or len(state_hash) != _HASH_LEN:
            raise StoreError(f"job {job}: a state hash is {_HASH_LEN} bytes")
        if not isinstance(payload, (bytes, bytearray)) or not payload:
            raise StoreError(f"job {job} seq {seq}: the payload must be non-empty bytes")
        payload = bytes(payload)
        try:
            header = read_header(payload)
        except CodecError as exc:
            raise StoreError(f"job {job} seq {seq}: not a codec payload: {exc}") from exc
        if header.state_hash != state_hash:
            raise StoreError(f"job {job} seq {seq}: the payload names another state hash")
        if (header.base_hash is None) != (base_seq is None):
            raise StoreError(
                f"job {job} seq {seq}: base_seq {base_seq} but the payload is "
                f"{'a full snapshot' if header.base_hash is None else 'a delta'}"
            )
        kind: SnapshotKind = "full" if header.base_hash is None else "delta"
        # Check first (no blob is written for a refused commit), then blob, then row.
        with self._read("check commit") as c:
            _, existing = self._check_commit(
                c, device, job, seq, epoch, header.base_hash, state_hash
            )
        if existing is not None:
            return existing
        with self._gc.shared():
            key = self.blobs.put(payload)
            with self._write("commit snapshot") as c:
                _, existing = self._check_commit(
                    c, device, job, seq, epoch, header.base_hash, state_hash
                )
                if existing is not None:
                    return existing
                now = self._now()
                c.execute(
                    f"INSERT INTO snapshots ({_SNAP_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (job, seq, base_seq, epoch, state_hash, key, kind, len(payload),
                     len(payload), full_size, now),
                )  # fmt: skip
                c.execute(
                    "UPDATE jobs SET seq = ?, state_hash = ?, bytes_received = bytes_received "
                    "+ ?, full_size = ?, snapshots = snapshots + 1, step = coalesce(?, step) "
                    "WHERE job = ?",
                    (seq, state_hash, len(payload), full_size, step, job),
                )
        return SnapshotRecord(
            job, seq, base_seq, epoch, state_hash, key, kind, len(payload), len(payload),
            full_size, now,
        )  # fmt: skip

    def _chain(self, c: sqlite3.Connection, job: str, seq: int | None) -> list[SnapshotRecord]:
        rec = self._need_job(c, job)
        target = rec.seq if seq is None else _check_int("seq", seq)
        if target is None:
            raise StoreError(f"job {job} has no acknowledged snapshot yet")
        if (
            c.execute("SELECT 1 FROM snapshots WHERE job = ? AND seq = ?", (job, target)).fetchone()
            is None
        ):
            raise StoreError(
                f"job {job} seq {target} is not stored",
                hint="it was never acknowledged, or retention dropped it",
            )
        base = c.execute(
            "SELECT max(seq) FROM snapshots WHERE job = ? AND seq <= ? AND kind = 'full'",
            (job, target),
        ).fetchone()[0]
        if base is None:
            raise StoreCorrupt(f"job {job} seq {target} has no baseline before it")
        rows = c.execute(
            f"SELECT {_SNAP_COLUMNS} FROM snapshots WHERE job = ? AND seq BETWEEN ? AND ? "
            "ORDER BY seq",
            (job, base, target),
        ).fetchall()
        return [self._snap_from_row(r) for r in rows]

    def chain(self, job: str, seq: int | None = None) -> list[SnapshotRecord]:
        with self._read("chain") as c:
            return self._chain(c, job, seq)

    def snapshots(self, job: str) -> list[SnapshotRecord]:
        with self._read("snapshots") as c:
            self._need_job(c, job)
            rows = c.execute(
                f"SELECT {_SNAP_COLUMNS} FROM snapshots WHERE job = ? ORDER BY seq", (job,)
            ).fetchall()
        return [self._snap_from_row(r) for r in rows]

    def read_payload(self, job: str, seq: int) -> bytes:
        with self._read("read payload") as c:
            self._need_job(c, job)
            row = c.execute(
                "SELECT blob FROM snapshots WHERE job = ? AND seq = ?", (job, seq)
            ).fetchone()
        if row is None:
            raise StoreError(f"job {job} seq {seq} is not stored")
        return self.blobs.get(row[0])

    def _replay(self, records: list[SnapshotRecord]) -> dict[str, Any]:
        state: dict[str, Any] | None = None
        for r in records:
            payload = self.blobs.get(r.blob)
            try:
                state = apply_delta(None if r.kind == "full" else state, payload)
                actual = state_hash(state)
            except (CodecError, StateError) as exc:
                raise StoreCorrupt(f"job {r.job} seq {r.seq} does not replay: {exc}") from exc
            if actual != r.state_hash:
                raise StoreCorrupt(f"job {r.job} seq {r.seq} replays to another state hash")
        assert state is not None
        return state

    def load_state(self, job: str, seq: int | None = None) -> LoadedState:
        last: list[SnapshotRecord] | None = None
        for _ in range(3):
            records = self.chain(job, seq)
            try:
                with self._gc.shared():
                    state = self._replay(records)
            except StoreCorrupt:
                # Another process may have compacted this chain and deleted its old blobs
                # between our reading the rows and the blobs: re-read once it changed.
                if records == last or self.chain(job, seq) == records:
                    raise
                last = records
                continue
            top = records[-1]
            return LoadedState(job, top.seq, top.state_hash, state)
        raise StoreError(f"job {job}: its chain kept changing while it was read")

    # -- outputs ---------------------------------------------------------------------------

    def put_outputs(
        self,
        job: str,
        start: int,
        arrays: Mapping[str, npt.NDArray[Any]],
        *,
        epoch: int | None = None,
    ) -> int:
        _check_id("job", job)
        _check_int("start", start)
        if not isinstance(arrays, Mapping) or not arrays:
            raise StoreError(f"job {job}: outputs are a non-empty mapping of name to array")
        rows: list[tuple[str, int, str, str, bytes, bytes]] = []
        length: int | None = None
        for name, arr in arrays.items():
            if not isinstance(name, str) or not name:
                raise StoreError(f"job {job}: output name {name!r} is not a non-empty str")
            if not isinstance(arr, np.ndarray) or arr.ndim < 1:
                raise StoreError(f"job {job}: output {name!r} is not an array with a position axis")
            if length is None:
                length = arr.shape[0]
            elif arr.shape[0] != length:
                raise StoreError(f"job {job}: outputs cover different numbers of positions")
            try:
                dt = check_dtype(arr.dtype, f"output {name!r}")
            except StateError as exc:
                raise StoreError(str(exc)) from exc
            shape = json.dumps(list(arr.shape[1:]))
            for i in range(arr.shape[0]):
                data = np.ascontiguousarray(arr[i]).tobytes()
                rows.append((name, start + i, dt, shape, data, xxhash.xxh3_64_digest(data)))
        new = 0
        with self._write("put outputs") as c:
            rec = self._need_job(c, job)
            if epoch is not None and epoch < rec.epoch:
                raise Fenced(
                    f"job {job} is at epoch {rec.epoch}; outputs of epoch {epoch} are fenced"
                )
            for name, pos, dt, shape, data, digest in rows:
                cur = c.execute(
                    "INSERT INTO outputs (job, name, pos, dtype, shape, data, digest) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (job, name, pos, dt, shape, data, digest),
                )
                if cur.rowcount == 1:
                    new += 1
                    continue
                old = c.execute(
                    "SELECT dtype, shape, data FROM outputs WHERE job = ? AND name = ? AND pos = ?",
                    (job, name, pos),
                ).fetchone()
                if (old[0], old[1], old[2]) != (dt, shape, data):
                    raise OutputConflict(
                        f"job {job}: output {name!r} position {pos} already holds other data",
                        hint="outputs are exactly-once; a resumed job must reproduce them",
                    )
        return new

    def get_outputs(
        self, job: str, start: int = 0, stop: int | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        _check_int("start", start)
        if stop is not None and _check_int("stop", stop) < start:
            raise StoreError(f"stop {stop} is below start {start}")
        out: dict[str, npt.NDArray[Any]] = {}
        with self._read("get outputs") as c:
            self._need_job(c, job)
            names = [r[0] for r in c.execute(
                "SELECT DISTINCT name FROM outputs WHERE job = ? ORDER BY name", (job,)
            )]  # fmt: skip
            for name in names:
                rows = c.execute(
                    "SELECT pos, dtype, shape, data, digest FROM outputs WHERE job = ? AND "
                    "name = ? AND pos >= ? AND pos < ? ORDER BY pos",
                    (job, name, start, stop if stop is not None else 2**63 - 1),
                ).fetchall()
                out[name] = self._stack_outputs(job, name, start, stop, rows)
        return out

    @staticmethod
    def _stack_outputs(
        job: str, name: str, start: int, stop: int | None, rows: list[tuple[Any, ...]]
    ) -> npt.NDArray[Any]:
        parts: list[npt.NDArray[Any]] = []
        dtype: np.dtype[Any] | None = None
        shape: tuple[int, ...] = ()
        for expect, row in enumerate(rows, start):
            pos, dt, shape_json, data, digest = _typed(row, "issbb", f"output {name!r}")
            if pos != expect:
                break
            if xxhash.xxh3_64_digest(data) != digest or dt not in SUPPORTED_DTYPES:
                raise StoreCorrupt(f"job {job}: output {name!r} position {pos} is damaged")
            try:
                row_shape = tuple(json.loads(shape_json))
                if dtype is None:
                    dtype, shape = np.dtype(dt), row_shape
                elif (np.dtype(dt), row_shape) != (dtype, shape):
                    raise StoreError(
                        f"job {job}: output {name!r} changes dtype or shape at position {pos}"
                    )
                parts.append(np.frombuffer(data, dtype=dtype).reshape(shape))
            except (ValueError, TypeError) as exc:
                raise StoreCorrupt(f"job {job}: output {name!r} position {pos}: {exc}") from exc
        if stop is not None and start + len(parts) < stop:
            raise StoreError(f"job {job}: output {name!r} has no position {start + len(parts)} yet")
        if not parts:
            dt0 = np.dtype(rows[0][1]) if rows else np.dtype("u1")
            return np.empty((0,), dtype=dt0)
        return np.stack(parts)

    # -- maintenance -----------------------------------------------------------------------

    def _oldest_kept(self, c: sqlite3.Connection, rec: JobRecord) -> int | None:
        """The seq below which retention drops a job's snapshots (None: keep everything)."""
        if rec.seq is None:
            return None
        kept = c.execute(
            "SELECT seq FROM snapshots WHERE job = ? AND seq <= ? AND kind = 'full' "
            "ORDER BY seq DESC LIMIT ?",
            (rec.job, rec.seq, self.retention.keep_baselines),
        ).fetchall()
        return int(kept[-1][0]) if kept else None

    def _has_unretained(self, c: sqlite3.Connection, rec: JobRecord) -> bool:
        oldest = self._oldest_kept(c, rec)
        return (
            oldest is not None
            and c.execute(
                "SELECT 1 FROM snapshots WHERE job = ? AND seq < ? LIMIT 1", (rec.job, oldest)
            ).fetchone()
            is not None
        )

    def _drop_unretained(self, c: sqlite3.Connection, rec: JobRecord) -> list[str]:
        """Delete the rows retention does not keep for one job; return their blobs."""
        oldest = self._oldest_kept(c, rec)
        if oldest is None:
            return []
        blobs = [r[0] for r in c.execute(
            "SELECT blob FROM snapshots WHERE job = ? AND seq < ?", (rec.job, oldest)
        )]  # fmt: skip
        c.execute("DELETE FROM snapshots WHERE job = ? AND seq < ?", (rec.job, oldest))
        self._mark_dropped(c, blobs)
        return blobs

    def _mark_dropped(self, c: sqlite3.Connection, blobs: list[str]) -> None:
        """Record, with the rows' removal, that these blobs were committed once and dropped:
        until they are deleted, verify knows them from blobs that never had a row."""
        now = self._now()
        c.executemany(
            "INSERT INTO dropped_blobs (blob, dropped_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(b, now) for b in blobs],
        )

    def _delete_unreferenced(self, candidates: set[str]) -> tuple[int, int]:
        """Delete the candidate blobs no row names, once the dropping transaction is in the
        database file (a WAL truncated later cannot bring back a row without its blob).
        Returns (blobs deleted, bytes freed)."""
        if not candidates or not self._checkpoint():
            return 0, 0  # left in dropped_blobs: retain() takes them later
        deleted = freed = 0
        with self._gc.exclusive():
            with self._read("find unreferenced blobs") as c:
                gone = [
                    k for k in sorted(candidates)
                    if c.execute("SELECT 1 FROM snapshots WHERE blob = ?", (k,)).fetchone() is None
                ]  # fmt: skip
            sizes = {}
            if isinstance(self.blobs, FolderBlobStore):
                for k in gone:
                    with contextlib.suppress(OSError):
                        sizes[k] = self.blobs.path(k).stat().st_size
            for k in gone:
                self.blobs.delete(k)
                deleted += 1
                freed += sizes.get(k, 0)
        with self._write("forget dropped blobs") as c:
            c.executemany("DELETE FROM dropped_blobs WHERE blob = ?", [(k,) for k in candidates])
        return deleted, freed

    def compaction_due(self, records: list[SnapshotRecord]) -> str | None:
        """Why the chain ``records`` should be folded into a new baseline, or None."""
        deltas = records[1:]
        if not deltas:
            return None
        delta_bytes = sum(r.size for r in deltas)
        if delta_bytes > self.compaction.delta_ratio * records[0].size:
            return (
                f"{len(deltas)} deltas hold {delta_bytes} bytes > {self.compaction.delta_ratio:g}"
                f" x the baseline's {records[0].size}"
            )
        if len(deltas) > self.compaction.max_deltas:
            return f"{len(deltas)} deltas > {self.compaction.max_deltas}"
        return None

    def compact(self, job: str, *, force: bool = False) -> CompactionResult:
        with self._read("compact") as c:
            rec = self._need_job(c, job)
            if rec.seq is None:
                return CompactionResult(job, False, "no acknowledged snapshot", None, 0, 0, 0, 0, 0)
            records = self._chain(c, job, None)
            unretained = self._has_unretained(c, rec)
        top = records[-1]
        deltas = len(records) - 1
        bytes_before = sum(r.size for r in records)
        reason = self.compaction_due(records)
        if deltas == 0:
            reason, due = "the acknowledged state is a baseline already", False
        elif force:
            reason, due = reason or "forced", True
        else:
            due = reason is not None
            reason = reason or f"{deltas} deltas: replay is cheaper than a new baseline"
        key = top.blob
        new_size = top.size
        if due:
            loaded = self.load_state(job, top.seq)
            try:
                payload = encode_delta(None, loaded.state, level=self.compaction.baseline_level)
            except (CodecError, StateError) as exc:
                raise StoreError(f"job {job}: cannot encode a baseline: {exc}") from exc
            new_size = len(payload)
            with self._gc.shared():
                key = self.blobs.put(payload)
                check = self.blobs.get(key)  # verify what is on disk before the switch
                try:
                    ok = state_hash(apply_delta(None, check)) == top.state_hash
                except (CodecError, StateError) as exc:
                    raise StoreCorrupt(
                        f"job {job}: the new baseline does not decode: {exc}"
                    ) from exc
                if not ok:
                    raise StoreCorrupt(f"job {job}: the new baseline has another state hash")
                with self._write("compact") as c:
                    row = c.execute(
                        "SELECT blob FROM snapshots WHERE job = ? AND seq = ?", (job, top.seq)
                    ).fetchone()
                    if row is None or row[0] != top.blob:
                        return CompactionResult(
                            job, False, "the chain changed meanwhile", None, deltas,
                            bytes_before, 0, 0, 0,
                        )  # fmt: skip
                    c.execute(
                        "UPDATE snapshots SET blob = ?, kind = 'full', size = ? "
                        "WHERE job = ? AND seq = ?",
                        (key, new_size, job, top.seq),
                    )
                    self._mark_dropped(c, [top.blob])
                    dropped_blobs = self._drop_unretained(c, self._need_job(c, job))
                    candidates = {top.blob, *dropped_blobs}
                    dropped = len(dropped_blobs)
        elif unretained:  # not due: only apply retention, and only write when it drops rows
            with self._write("retain job") as c:
                dropped_blobs = self._drop_unretained(c, self._need_job(c, job))
                candidates = set(dropped_blobs)
                dropped = len(dropped_blobs)
        else:
            candidates, dropped = set(), 0
        deleted, _ = self._delete_unreferenced(candidates - {key})
        return CompactionResult(
            job, due, reason, top.seq if due else None, deltas, bytes_before,
            new_size if due else 0, dropped, deleted,
        )  # fmt: skip

    def retain(self) -> RetentionReport:
        candidates: set[str] = set()
        dropped = 0
        with self._write("retain") as c:
            jobs = [self._job_from_row(r) for r in c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs")]
            for rec in jobs:
                blobs = self._drop_unretained(c, rec)
                dropped += len(blobs)
                candidates.update(blobs)
            # and what an earlier compaction or retention dropped but could not delete yet
            candidates.update(r[0] for r in c.execute("SELECT blob FROM dropped_blobs"))
        deleted, freed = self._delete_unreferenced(candidates)
        temporaries = 0
        if self._checkpoint():
            cutoff = time.time() - self.retention.orphan_grace_s
            with self._gc.exclusive():
                with self._read("list referenced blobs") as c:
                    referenced = {r[0] for r in c.execute("SELECT DISTINCT blob FROM snapshots")}
                swept = []
                for info in list(self.blobs.list()):
                    if info.key not in referenced and info.mtime < cutoff:
                        self.blobs.delete(info.key)
                        swept.append(info.key)
                        deleted += 1
                        freed += info.size
                temporaries = self.blobs.sweep(cutoff)
            if swept:
                with self._write("forget dropped blobs") as c:
                    c.executemany("DELETE FROM dropped_blobs WHERE blob = ?", [(k,) for k in swept])
        return RetentionReport(dropped, deleted, freed, temporaries)

    def verify(self) -> VerifyReport:
        report = VerifyReport()
        with self._read("verify") as c:
            check = [r[0] for r in c.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                report.problems += [f"database: {m}" for m in check[:20]]
            jobs = self._parse_rows(
                c.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY job"),
                self._job_from_row, report,
            )  # fmt: skip
            snaps = self._parse_rows(
                c.execute(f"SELECT {_SNAP_COLUMNS} FROM snapshots ORDER BY job, seq"),
                self._snap_from_row, report,
            )  # fmt: skip
            outputs = c.execute(
                "SELECT job, name, pos, dtype, shape, data, digest FROM outputs"
            ).fetchall()
            dropped = {r[0] for r in c.execute("SELECT blob FROM dropped_blobs")}
        report.jobs, report.snapshots, report.outputs = len(jobs), len(snaps), len(outputs)
        listed = {info.key: info for info in self.blobs.list()}
        report.blobs = len(listed)
        report.blob_bytes = sum(i.size for i in listed.values())
        by_job: dict[str, list[SnapshotRecord]] = {}
        for s in snaps:
            by_job.setdefault(s.job, []).append(s)
        job_names = {j.job for j in jobs}
        for name in sorted(set(by_job) - job_names):
            report.problems.append(f"snapshots of job {name}, which has no record")
        referenced: set[str] = set()
        for rec in jobs:
            rows = by_job.get(rec.job, [])
            referenced.update(r.blob for r in rows)
            self._verify_job(rec, rows, listed, report)
        for row in outputs:
            job, name, pos, dt, _, data, digest = row
            if (
                not isinstance(data, bytes)
                or not isinstance(digest, bytes)
                or xxhash.xxh3_64_digest(data) != digest
                or dt not in SUPPORTED_DTYPES
            ):
                report.problems.append(f"job {job}: output {name!r} position {pos} is damaged")
        orphans = sorted(set(listed) - referenced)
        self._verify_orphans(orphans, dropped, jobs, snaps, report)
        if orphans:
            size = sum(listed[k].size for k in orphans)
            pending = len(dropped.intersection(orphans))
            report.notes.append(
                f"{len(orphans)} unreferenced blobs ({size} bytes; {pending} of them dropped by "
                "compaction or retention), as an interrupted commit, compaction or retention "
                "leaves them; retain() removes them"
            )
        if isinstance(self.blobs, FolderBlobStore) and (n := self.blobs.temporaries()):
            report.notes.append(f"{n} temporary blob files left by interrupted writes")
        self._verify_wal(report)
        return report

    @staticmethod
    def _parse_rows(
        rows: Iterator[tuple[Any, ...]],
        parse: Callable[[tuple[Any, ...]], _R],
        report: VerifyReport,
    ) -> list[_R]:
        out = []
        for row in rows:
            try:
                out.append(parse(row))
            except StoreCorrupt as exc:
                report.problems.append(str(exc))
        return out

    def _verify_orphans(
        self,
        orphans: list[str],
        dropped: set[str],
        jobs: list[JobRecord],
        snaps: list[SnapshotRecord],
        report: VerifyReport,
    ) -> None:
        """Re-hash unreferenced blobs and look in them for acknowledged snapshots that the
        database lost (docs/store.md, section 8)."""
        committed = {s.state_hash for s in snaps}
        links: dict[bytes, set[bytes]] = {}
        fulls: list[bytes] = []
        for key in orphans:
            try:
                header = read_header(self.blobs.get(key))
            except StoreCorrupt as exc:
                report.problems.append(f"unreferenced {exc}")
                continue
            except CodecError:
                continue  # not a payload: counted with the other unreferenced blobs
            if key in dropped or header.state_hash in committed:
                continue  # committed once and dropped, or a compaction's unused baseline
            if header.base_hash is None:
                fulls.append(header.state_hash)
            else:
                links.setdefault(header.base_hash, set()).add(header.state_hash)
        for rec in jobs:
            depth = _longest_path(rec.state_hash, links) if rec.state_hash else 0
            if depth >= 2:
                report.problems.append(
                    f"job {rec.job}: unreferenced blobs continue its acknowledged state by "
                    f"{depth} snapshots, so at least {depth - 1} acknowledged snapshot(s) were "
                    "lost from the database (a truncated WAL or a restored copy?)"
                )
        for full in fulls:
            depth = _longest_path(full, links)
            if depth >= 1:
                report.problems.append(
                    f"unreferenced blobs hold a full snapshot (state {full.hex()}) and {depth} "
                    "snapshot(s) made against it, which no row names: acknowledged snapshots "
                    "were lost from the database (a truncated WAL or a restored copy?)"
                )

    def _verify_job(
        self,
        rec: JobRecord,
        rows: list[SnapshotRecord],
        listed: Mapping[str, Any],
        report: VerifyReport,
    ) -> None:
        where = f"job {rec.job}"
        if rec.status not in JOB_STATUSES or rec.owner not in OWNERS:
            report.problems.append(f"{where}: status {rec.status!r} / owner {rec.owner!r}")
        if not rows:
            if rec.seq is not None:
                report.problems.append(f"{where}: acknowledged seq {rec.seq} has no snapshot")
            return
        last = rows[-1]
        if (rec.seq, rec.state_hash) != (last.seq, last.state_hash):
            report.problems.append(
                f"{where}: record says seq {rec.seq}, its newest snapshot is seq {last.seq}"
            )
        state: dict[str, Any] | None = None
        prev: SnapshotRecord | None = None
        for r in rows:
            at = f"{where} seq {r.seq}"
            if r.blob not in listed:
                report.problems.append(f"{at}: blob {r.blob} is missing")
                state, prev = None, r
                continue
            try:
                payload = self.blobs.get(r.blob)
                header = read_header(payload)
            except StoreCorrupt as exc:
                report.problems.append(f"{at}: {exc}")
                state, prev = None, r
                continue
            except CodecError as exc:
                report.problems.append(f"{at}: blob {r.blob} is not a payload: {exc}")
                state, prev = None, r
                continue
            if header.state_hash != r.state_hash:
                report.problems.append(f"{at}: the payload names another state hash")
            if r.kind == "full":
                base = None
                if header.base_hash is not None:
                    report.problems.append(f"{at}: stored as a baseline but is a delta")
            else:
                if prev is None:
                    report.problems.append(f"{at}: a delta with no baseline before it")
                    state, prev = None, r
                    continue
                if header.base_hash != prev.state_hash:
                    report.problems.append(f"{at}: its base is not seq {prev.seq}'s state")
                if state is None:
                    report.problems.append(f"{at}: not checked (an earlier link failed)")
                    prev = r
                    continue
                base = state
            try:
                state = apply_delta(base, payload)
                ok = state_hash(state) == r.state_hash
            except (CodecError, StateError) as exc:
                report.problems.append(f"{at}: does not replay: {exc}")
                state, prev = None, r
                continue
            report.states_replayed += 1
            if not ok:
                report.problems.append(f"{at}: replays to another state hash")
                state = None
            prev = r

    def _verify_wal(self, report: VerifyReport) -> None:
        wal = self.root / f"{DB_NAME}-wal"
        try:
            size = wal.stat().st_size
        except FileNotFoundError:
            return
        with self._read("page size") as c:
            page = c.execute("PRAGMA page_size").fetchone()[0]
        if size and (size < 32 or (size - 32) % (24 + page)):
            report.notes.append(
                f"the WAL ends inside a frame ({size} bytes): SQLite ignored its torn tail "
                "(a power cut during a write, or a truncated file)"
            )


def _longest_path(start: bytes, links: Mapping[bytes, set[bytes]]) -> int:
    """How many steps the hashes reachable from ``start`` through ``links`` lie from it at
    most (breadth-first distances, so cycles and diamonds cost nothing)."""
    seen = {start}
    frontier = [start]
    depth = 0
    while True:
        frontier = [n for node in frontier for n in links.get(node, ()) if n not in seen]
        if not frontier:
            return depth
        seen.update(frontier)
        depth += 1
