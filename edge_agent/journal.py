"""The agent's durable local journal: one folder per job under a journal directory.

Per job it keeps the newest local snapshot (a full codec payload, for crash recovery), the
state the server has acknowledged (the delta base), the in-flight transfer (so that after a
restart the agent can ``query`` it and resend only missing chunks) and a small metadata
record (device, epoch, owner, status, next seq, counters). docs/agent-io.md specifies the
layout; the rules it keeps:

* **Every write is atomic**: a temporary file in the job folder, fsync, rename over the
  final name, fsync the folder.
* **Data before the record that points at it** (restic's order): snapshot and transfer
  files are written first, the metadata record last. The metadata record is the commit
  point; a file it does not name does not exist as far as a reader is concerned, and is
  removed when a writer next opens the journal.
* **Nothing half-written is ever read**: every file starts with a magic and a format
  version and ends with an xxh3-64 checksum over everything before it; a reader checks
  both, and the fields the metadata record names, before it returns a byte.
* **Bounded disk**: at most three snapshot files per job exist at any instant, temporary
  files included (newest local, acknowledged, and the in-flight one), plus at most one
  transfer file. Files are never rewritten: acknowledging a seq whose snapshot is on disk
  only rewrites the metadata record.

One process writes a job's journal at a time (an exclusive ``flock`` on ``LOCK``);
read-only opens (``edge-agent status`` / ``verify``) take no lock.

This module owns the files; it never decides what to snapshot or send (the runner and the
protocol do), never talks to the network, and never returns bytes it has not verified.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgpack
import xxhash

from edge_agent.codec import apply_delta, read_header
from edge_agent.errors import CodecError, EdgeResumeError, JournalError, StateError
from edge_agent.state import state_hash

try:  # POSIX only; a gateway is Linux, but importing must not fail elsewhere
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "MAX_SNAPSHOT_FILES",
    "STATUSES",
    "Journal",
    "JournalMeta",
    "SnapshotRef",
    "Transfer",
    "VerifyReport",
    "list_jobs",
    "verify_journal",
]

#: The on-disk format version this build writes and reads (docs/agent-io.md, "Changes").
FORMAT_VERSION = 1
#: Snapshot files a job may hold at once, temporary files included.
MAX_SNAPSHOT_FILES = 3
STATUSES = ("running", "done", "released", "fenced")
OWNERS = ("edge", "server")
Status = Literal["running", "done", "released", "fenced"]

_MAGIC_META = b"ERJM"
_MAGIC_SNAP = b"ERJS"
_MAGIC_XFER = b"ERJX"
_KIND = {_MAGIC_META: "metadata record", _MAGIC_SNAP: "snapshot file", _MAGIC_XFER: "transfer file"}
_PREFIX = struct.Struct("<4sHI")  # magic, format version, header length
_TRAILER = struct.Struct("<Q")  # xxh3-64 of everything before it
_MAX_HEADER = 1 << 20
_META = "meta"
_LOCK = "LOCK"
_SNAP_RE = re.compile(r"^snap-([0-9a-f]{16})\.ers$")
_XFER_RE = re.compile(r"^xfer-([0-9a-f]{16})\.ers$")
_TMP_RE = re.compile(r"^\.[a-z]+-[0-9a-f]{16}\.[0-9]+\.tmp$|^\.meta\.[0-9]+\.tmp$")
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_SEQ = 2**63 - 1
_READER_ATTEMPTS = 3  # a read-only open re-reads a record that moved under it


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A full snapshot held on disk: its seq, job step, state hash, payload size and file."""

    seq: int
    step: int
    state_hash: bytes
    size: int
    file: str

    def _pack(self) -> list[Any]:
        return [self.seq, self.step, self.state_hash, self.size, self.file]


@dataclass(frozen=True, slots=True)
class Transfer:
    """The snapshot in flight to the server: seq, the acked seq it is a delta against (None:
    full), its chunk count and payload size, the file holding the payload (if kept) and
    the hash of the state it produces (if known)."""

    seq: int
    base_seq: int | None
    count: int
    size: int
    file: str | None
    state_hash: bytes | None = None  # the state the transfer produces, when known

    def _pack(self) -> list[Any]:
        return [self.seq, self.base_seq, self.count, self.size, self.file, self.state_hash]


@dataclass(frozen=True, slots=True)
class JournalMeta:
    """The metadata record: the commit point of the journal."""

    job: str
    device: str
    epoch: int
    owner: str
    status: str
    next_seq: int
    snapshots: tuple[SnapshotRef, ...]  # every snapshot file the journal holds (<= 3)
    local_seq: int | None  # the newest local snapshot (crash recovery)
    acked_seq: int | None  # the state the server acknowledged (delta base)
    transfer: Transfer | None
    counters: Mapping[str, int] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    generation: int = 0
    created_ms: int = 0
    updated_ms: int = 0

    def snapshot(self, seq: int | None) -> SnapshotRef | None:
        if seq is None:
            return None
        for ref in self.snapshots:
            if ref.seq == seq:
                return ref
        return None

    @property
    def local(self) -> SnapshotRef | None:
        return self.snapshot(self.local_seq)

    @property
    def acked(self) -> SnapshotRef | None:
        return self.snapshot(self.acked_seq)

    def _pack(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "device": self.device,
            "epoch": self.epoch,
            "owner": self.owner,
            "status": self.status,
            "next_seq": self.next_seq,
            "snapshots": [r._pack() for r in self.snapshots],
            "local_seq": self.local_seq,
            "acked_seq": self.acked_seq,
            "transfer": self.transfer._pack() if self.transfer else None,
            "counters": dict(self.counters),
            "info": dict(self.info),
            "generation": self.generation,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`Journal.verify` found. ``ok`` is true when ``problems`` is empty."""

    job: str
    path: str
    problems: tuple[str, ...]
    checked: tuple[str, ...]  # files read and verified
    unreferenced: tuple[str, ...]  # leftovers a writer removes on its next open (harmless)
    local_seq: int | None = None
    acked_seq: int | None = None
    transfer_seq: int | None = None
    bytes_on_disk: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- file format


def _now_ms() -> int:
    return int(time.time() * 1000)


def _frame(
    magic: bytes, header: Mapping[str, Any], payload: bytes | memoryview = b""
) -> tuple[bytes, bytes | memoryview, bytes]:
    """The three pieces of a journal file: prefix+header, payload, checksum trailer."""
    head = msgpack.packb(dict(header), use_bin_type=True)
    prefix = _PREFIX.pack(magic, FORMAT_VERSION, len(head)) + head
    h = xxhash.xxh3_64()
    h.update(prefix)
    h.update(payload)
    return prefix, payload, _TRAILER.pack(h.intdigest())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(
    folder: Path,
    name: str,
    pieces: tuple[bytes | memoryview, ...],
    tmp: str,
    renamed: Callable[[], None] | None = None,
) -> int:
    """Write ``pieces`` to ``folder/name`` atomically; returns the bytes written.
    ``renamed`` runs once the new file has replaced the old name, before the folder is
    fsynced: from then on the new file is what a reader finds, even if that fsync fails."""
    tmp_path = folder / tmp
    final = folder / name
    n = 0
    try:
        with open(tmp_path, "wb") as f:
            for p in pieces:
                f.write(p)
                n += len(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise JournalError(f"cannot write {final}: {exc}") from exc
    if renamed is not None:
        renamed()
    try:
        _fsync_dir(folder)
    except OSError as exc:
        raise JournalError(f"cannot fsync the folder {folder}: {exc}") from exc
    return n


def _read_file(path: Path, magic: bytes) -> tuple[dict[str, Any], bytes]:
    """Read and verify one journal file; returns (header map, payload bytes).

    Raises JournalError naming the file for anything wrong: missing, wrong magic, unknown
    format version, truncated, checksum mismatch, malformed header.
    """
    kind = _KIND[magic]
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, fstat needs the handle
    except FileNotFoundError as exc:
        raise JournalError(f"{kind} {path} is missing") from exc
    except OSError as exc:
        raise JournalError(f"cannot read {kind} {path}: {exc}") from exc
    with f:
        try:
            total = os.fstat(f.fileno()).st_size
            if total < _PREFIX.size + _TRAILER.size:
                raise JournalError(
                    f"{kind} {path} is truncated: {total} bytes is shorter than any header"
                )
            prefix = f.read(_PREFIX.size)
            got_magic, version, hlen = _PREFIX.unpack(prefix)
            if got_magic != magic:
                raise JournalError(
                    f"{path} is not an edge-resume {kind} (magic {got_magic!r}, expected {magic!r})"
                )
            if version != FORMAT_VERSION:
                raise JournalError(
                    f"{kind} {path} has journal format version {version}; this build of "
                    f"edge-resume reads version {FORMAT_VERSION} only",
                    hint="run the edge-resume version that wrote it, or move the journal aside",
                )
            plen = total - _PREFIX.size - hlen - _TRAILER.size
            if hlen > _MAX_HEADER or plen < 0:
                raise JournalError(
                    f"{kind} {path} is truncated or corrupt: header of {hlen} bytes in a "
                    f"file of {total}"
                )
            head = f.read(hlen)
            payload = f.read(plen)
            trailer = f.read(_TRAILER.size)
        except OSError as exc:
            raise JournalError(f"cannot read {kind} {path}: {exc}") from exc
    if len(head) != hlen or len(payload) != plen or len(trailer) != _TRAILER.size:
        raise JournalError(f"{kind} {path} changed size while it was read")
    h = xxhash.xxh3_64()
    h.update(prefix)
    h.update(head)
    h.update(payload)
    if h.intdigest() != _TRAILER.unpack(trailer)[0]:
        raise JournalError(
            f"{kind} {path} is corrupt: checksum mismatch",
            hint="the disk or the file was damaged; `edge-agent verify` lists what is affected",
        )
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise JournalError(f"{kind} {path} has a malformed header: {exc}") from exc
    if not isinstance(header, dict):
        raise JournalError(f"{kind} {path} has a malformed header: not a map")
    return header, payload


# --------------------------------------------------------------------------- decoding


def _bad(path: Path, what: str) -> JournalError:
    return JournalError(f"metadata record {path} is inconsistent: {what}")


def _int(v: Any, path: Path, name: str, lo: int = 0, hi: int = _MAX_SEQ) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(path, f"{name} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _opt_int(v: Any, path: Path, name: str) -> int | None:
    return None if v is None else _int(v, path, name)


def _str(v: Any, path: Path, name: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        want = f"one of {choices}" if choices else "a string"
        raise _bad(path, f"{name} = {v!r} is not {want}")
    return v


def _file_name(v: Any, path: Path, name: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(v, str) or not pattern.match(v):
        raise _bad(path, f"{name} = {v!r} is not a journal file name")
    return v


def _decode_meta(header: dict[str, Any], path: Path) -> JournalMeta:
    try:
        snaps_raw = header["snapshots"]
        if not isinstance(snaps_raw, list) or len(snaps_raw) > MAX_SNAPSHOT_FILES:
            raise _bad(path, f"snapshots is not a list of at most {MAX_SNAPSHOT_FILES}")
        snaps: list[SnapshotRef] = []
        for i, s in enumerate(snaps_raw):
            if not isinstance(s, list) or len(s) != 5:
                raise _bad(path, f"snapshots[{i}] is not a 5-element list")
            h = s[2]
            if not isinstance(h, bytes) or len(h) != 16:
                raise _bad(path, f"snapshots[{i}] state hash is not 16 bytes")
            snaps.append(
                SnapshotRef(
                    _int(s[0], path, "snapshot seq"),
                    _int(s[1], path, "snapshot step"),
                    h,
                    _int(s[3], path, "snapshot size"),
                    _file_name(s[4], path, "snapshot file", _SNAP_RE),
                )
            )
        if len({s.seq for s in snaps}) != len(snaps) or len({s.file for s in snaps}) != len(snaps):
            raise _bad(path, "two snapshots share a seq or a file")
        t = header["transfer"]
        transfer = None
        if t is not None:
            if not isinstance(t, list) or len(t) != 6:
                raise _bad(path, "transfer is not a 6-element list")
            if t[5] is not None and (not isinstance(t[5], bytes) or len(t[5]) != 16):
                raise _bad(path, "transfer state hash is not 16 bytes")
            transfer = Transfer(
                _int(t[0], path, "transfer seq"),
                _opt_int(t[1], path, "transfer base seq"),
                _int(t[2], path, "transfer chunk count", 1),
                _int(t[3], path, "transfer size"),
                None if t[4] is None else _file_name(t[4], path, "transfer file", _XFER_RE),
                t[5],
            )
        counters = header["counters"]
        if not isinstance(counters, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in counters.items()
        ):
            raise _bad(path, "counters is not a map of str to int")
        info = header["info"]
        if not isinstance(info, dict):
            raise _bad(path, "info is not a map")
        meta = JournalMeta(
            job=_str(header["job"], path, "job"),
            device=_str(header["device"], path, "device"),
            epoch=_int(header["epoch"], path, "epoch"),
            owner=_str(header["owner"], path, "owner", OWNERS),
            status=_str(header["status"], path, "status", STATUSES),
            next_seq=_int(header["next_seq"], path, "next_seq"),
            snapshots=tuple(snaps),
            local_seq=_opt_int(header["local_seq"], path, "local_seq"),
            acked_seq=_opt_int(header["acked_seq"], path, "acked_seq"),
            transfer=transfer,
            counters=counters,
            info=info,
            generation=_int(header["generation"], path, "generation"),
            created_ms=_int(header["created_ms"], path, "created_ms"),
            updated_ms=_int(header["updated_ms"], path, "updated_ms"),
        )
    except KeyError as exc:
        raise _bad(path, f"field {exc.args[0]!r} is missing") from exc
    for name, seq in (("local_seq", meta.local_seq), ("acked_seq", meta.acked_seq)):
        if seq is not None and meta.snapshot(seq) is None:
            raise _bad(path, f"{name} {seq} names no snapshot file")
    for s in meta.snapshots:
        if s.seq >= meta.next_seq:
            raise _bad(path, f"snapshot seq {s.seq} is not below next_seq {meta.next_seq}")
    if meta.transfer is not None and meta.transfer.seq >= meta.next_seq:
        raise _bad(path, f"transfer seq {meta.transfer.seq} is not below next_seq")
    return meta


def _snap_name(seq: int) -> str:
    return f"snap-{seq:016x}.ers"


def _xfer_name(seq: int) -> str:
    return f"xfer-{seq:016x}.ers"


def _check_job_id(job: str) -> None:
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise JournalError(
            f"job id {job!r} is not valid for a journal",
            hint="job ids match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        )


def _full_header(payload: bytes, where: str) -> bytes:
    """The state hash a full codec payload names; JournalError if it is not a full one."""
    try:
        header = read_header(payload)
    except CodecError as exc:
        raise JournalError(f"{where}: not a valid codec payload: {exc}") from exc
    if header.base_hash is not None:
        raise JournalError(f"{where}: a delta payload where a full snapshot is required")
    return header.state_hash


# --------------------------------------------------------------------------- the journal


class Journal:
    """The journal of one job. Create with :meth:`create`, :meth:`open` or
    :meth:`open_or_create`; use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, meta: JournalMeta, *, readonly: bool, lock_fd: int | None):
        self.path = path
        self._meta = meta
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._pending: dict[str, int] = {}
        self._tmp_counter = 0

    # ----------------------------------------------------------------- opening

    @staticmethod
    def job_path(root: str | os.PathLike[str], job: str) -> Path:
        _check_job_id(job)
        return Path(root) / job

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        job: str,
        *,
        device: str,
        epoch: int = 1,
        owner: str = "edge",
        info: Mapping[str, Any] | None = None,
    ) -> Journal:
        """Create the journal of a new job; JournalError if one exists already."""
        path = cls.job_path(root, job)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal folder {path}: {exc}") from exc
        lock_fd = cls._lock(path)
        try:
            if (path / _META).exists():
                raise JournalError(
                    f"a journal for job {job!r} exists already in {path}",
                    hint="open it with Journal.open, or move it aside to start over",
                )
            now = _now_ms()
            meta = JournalMeta(
                job=job,
                device=device,
                epoch=epoch,
                owner=owner,
                status="running",
                next_seq=1,
                snapshots=(),
                local_seq=None,
                acked_seq=None,
                transfer=None,
                counters={},
                info=dict(info or {}),
                generation=0,
                created_ms=now,
                updated_ms=now,
            )
            j = cls(path, meta, readonly=False, lock_fd=lock_fd)
            j._check_values(meta)
            j._commit(meta)
            _fsync_dir(path.parent)
            j._remove_unreferenced()
            return j
        except BaseException:
            cls._unlock(lock_fd)
            raise

    @classmethod
    def open(cls, root: str | os.PathLike[str], job: str, *, readonly: bool = False) -> Journal:
        """Open an existing journal. A writer takes the job's lock and removes leftovers
        of interrupted writes; a read-only open does neither."""
        path = cls.job_path(root, job)
        if not (path / _META).exists():
            raise JournalError(f"no journal for job {job!r} in {path.parent}")
        lock_fd = None if readonly else cls._lock(path)
        try:
            for attempt in range(_READER_ATTEMPTS if readonly else 1):
                meta = cls._load_meta(path)
                if meta.job != job:
                    raise JournalError(
                        f"the journal in {path} belongs to job {meta.job!r}, not {job!r}"
                    )
                j = cls(path, meta, readonly=readonly, lock_fd=lock_fd)
                try:
                    j._check_files_exist()
                    break
                except JournalError:
                    # a reader racing the writer: a file named by the record it read may
                    # have been replaced since; only a record that stays put is damage
                    if attempt + 1 == _READER_ATTEMPTS or not readonly:
                        raise
                    if cls._load_meta(path).generation == meta.generation:
                        raise
            if not readonly:
                j._remove_unreferenced()
            return j
        except BaseException:
            cls._unlock(lock_fd)
            raise

    @classmethod
    def open_or_create(
        cls,
        root: str | os.PathLike[str],
        job: str,
        *,
        device: str,
        epoch: int = 1,
        owner: str = "edge",
        info: Mapping[str, Any] | None = None,
    ) -> Journal:
        """Open the job's journal, or create it; JournalError if it belongs to another device."""
        if (cls.job_path(root, job) / _META).exists():
            j = cls.open(root, job)
            if j.meta.device != device:
                j.close()
                raise JournalError(
                    f"the journal of job {job!r} belongs to device {j.meta.device!r}, "
                    f"not {device!r}"
                )
            return j
        return cls.create(root, job, device=device, epoch=epoch, owner=owner, info=info)

    @staticmethod
    def _lock(path: Path) -> int | None:
        if fcntl is None:  # pragma: no cover
            return None
        try:
            fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open the lock file in {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise JournalError(
                f"the journal in {path} is in use by another process",
                hint="is another edge-agent running this job? read-only commands still work",
            ) from exc
        return fd

    @staticmethod
    def _unlock(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    @staticmethod
    def _load_meta(path: Path) -> JournalMeta:
        header, payload = _read_file(path / _META, _MAGIC_META)
        if payload:
            raise _bad(path / _META, "unexpected bytes after the header")
        return _decode_meta(header, path / _META)

    def close(self) -> None:
        """Persist pending counters (writers) and release the lock."""
        if self._lock_fd is not None:
            try:
                if self._pending:
                    self.flush()
            finally:
                self._unlock(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- reading

    @property
    def meta(self) -> JournalMeta:
        """The committed metadata record (counters not yet flushed are not in it)."""
        return self._meta

    @property
    def job(self) -> str:
        return self._meta.job

    @property
    def next_seq(self) -> int:
        """The smallest seq a new snapshot or transfer may use."""
        return self._meta.next_seq

    @property
    def local(self) -> SnapshotRef | None:
        """The newest local snapshot (what a restart resumes from)."""
        return self._meta.local

    @property
    def acked(self) -> SnapshotRef | None:
        """The snapshot the server acknowledged (the delta base), if known."""
        return self._meta.acked

    @property
    def transfer(self) -> Transfer | None:
        """The transfer in flight, if any."""
        return self._meta.transfer

    @property
    def counters(self) -> dict[str, int]:
        """Counters including increments not yet flushed."""
        out = dict(self._meta.counters)
        for k, v in self._pending.items():
            out[k] = out.get(k, 0) + v
        return out

    def holds(self, seq: int, state_hash: bytes) -> bool:
        """Whether a snapshot of exactly this seq and state hash is on disk."""
        ref = self._meta.snapshot(seq)
        return ref is not None and ref.state_hash == state_hash

    def read_snapshot(self, seq: int) -> bytes:
        """The verified full codec payload of a held snapshot."""
        ref = self._meta.snapshot(seq)
        if ref is None:
            raise JournalError(f"job {self.job!r}: no snapshot with seq {seq} in the journal")
        return self._read_snapshot(ref)

    def read_local(self) -> bytes | None:
        """The verified payload of the newest local snapshot, or None when there is none."""
        ref = self._meta.local
        return None if ref is None else self._read_snapshot(ref)

    def read_acked(self) -> bytes | None:
        """The verified payload of the acknowledged snapshot, or None when there is none."""
        ref = self._meta.acked
        return None if ref is None else self._read_snapshot(ref)

    def read_transfer_payload(self) -> bytes | None:
        """The verified payload of the in-flight transfer, or None when none is kept."""
        t = self._meta.transfer
        if t is None or t.file is None:
            return None
        header, payload = _read_file(self.path / t.file, _MAGIC_XFER)
        want = {"job": self.job, "seq": t.seq, "base_seq": t.base_seq, "count": t.count}
        for k, v in want.items():
            if header.get(k) != v:
                raise JournalError(
                    f"transfer file {self.path / t.file} does not match the metadata record "
                    f"({k} = {header.get(k)!r}, expected {v!r})"
                )
        if len(payload) != t.size:
            raise JournalError(
                f"transfer file {self.path / t.file} holds {len(payload)} bytes, "
                f"the metadata record says {t.size}"
            )
        try:
            named = read_header(payload).state_hash
        except CodecError as exc:
            raise JournalError(f"transfer file {self.path / t.file}: {exc}") from exc
        if t.state_hash is not None and named != t.state_hash:
            raise JournalError(f"transfer file {self.path / t.file} names another state hash")
        return payload

    def _read_snapshot(self, ref: SnapshotRef) -> bytes:
        path = self.path / ref.file
        header, payload = _read_file(path, _MAGIC_SNAP)
        want = {"job": self.job, "seq": ref.seq, "step": ref.step, "hash": ref.state_hash}
        for k, v in want.items():
            if header.get(k) != v:
                raise JournalError(
                    f"snapshot file {path} does not match the metadata record "
                    f"({k} = {header.get(k)!r}, expected {v!r})"
                )
        if len(payload) != ref.size:
            raise JournalError(
                f"snapshot file {path} holds {len(payload)} bytes, the record says {ref.size}"
            )
        if _full_header(payload, f"snapshot file {path}") != ref.state_hash:
            raise JournalError(f"snapshot file {path}: the payload names another state hash")
        return payload

    # ----------------------------------------------------------------- writing

    def write_snapshot(
        self, seq: int, step: int, payload: bytes, *, state_hash: bytes | None = None
    ) -> SnapshotRef:
        """Make ``payload`` (a full codec payload) the newest local snapshot, as ``seq``.

        ``seq`` must be at least :attr:`next_seq`. When it returns, the snapshot survives a
        kill -9; the previous local snapshot is removed unless it is still acknowledged or
        in flight.
        """
        self._writable()
        m = self._meta
        self._running(m, "take a snapshot")
        _int_arg(seq, "seq")
        _int_arg(step, "step")
        if seq < m.next_seq:
            raise JournalError(
                f"job {self.job!r}: snapshot seq {seq} is below next_seq {m.next_seq}",
                hint="seqs only grow; take journal.next_seq",
            )
        h = _full_header(payload, f"snapshot {seq}")
        if state_hash is not None and state_hash != h:
            raise JournalError(f"snapshot {seq}: the payload names another state hash")
        # at most MAX_SNAPSHOT_FILES at any instant, the new one included: let go of the
        # in-flight snapshot's own file first if the new one would be a fourth (the local
        # and acknowledged ones stay until the new one is committed)
        if len(m.snapshots) + 1 > MAX_SNAPSHOT_FILES:
            self._release_held()
            m = self._meta
        ref = SnapshotRef(seq, step, h, len(payload), _snap_name(seq))
        self._write_snapshot_file(ref, payload)
        keep = {m.acked_seq, _tseq(m)}
        snaps = [s for s in m.snapshots if s.seq in keep] + [ref]
        self._commit(
            replace(m, snapshots=tuple(snaps), local_seq=seq, next_seq=max(m.next_seq, seq + 1))
        )
        self._remove_unreferenced()
        return ref

    def mark_acked(
        self,
        seq: int,
        state_hash: bytes,
        *,
        payload: bytes | None = None,
        step: int | None = None,
    ) -> SnapshotRef:
        """Record that the server holds state ``seq`` with ``state_hash``.

        When that snapshot is on disk (the common case: it is the local or the in-flight
        one) this only rewrites the metadata record. Otherwise ``payload`` (a full codec
        payload of that state) and ``step`` must be given and are written first. A
        transfer with a seq up to ``seq`` is settled by the same commit.
        """
        self._writable()
        m = self._meta
        _int_arg(seq, "seq")
        ref = m.snapshot(seq)
        if ref is not None and ref.state_hash != state_hash:
            raise JournalError(
                f"job {self.job!r}: the snapshot with seq {seq} on disk has state hash "
                f"{ref.state_hash.hex()}, not {state_hash.hex()}"
            )
        if ref is None:
            if payload is None or step is None:
                raise JournalError(
                    f"job {self.job!r}: no snapshot with seq {seq} on disk",
                    hint="pass the state's full payload and step to mark_acked",
                )
            _int_arg(step, "step")
            h = _full_header(payload, f"acknowledged snapshot {seq}")
            if h != state_hash:
                raise JournalError(f"acknowledged snapshot {seq}: the payload names another hash")
            if len(m.snapshots) + 1 > MAX_SNAPSHOT_FILES:
                self._release_held()
                m = self._meta
            ref = SnapshotRef(seq, step, h, len(payload), _snap_name(seq))
            self._write_snapshot_file(ref, payload)
        transfer = m.transfer
        if transfer is not None and transfer.seq <= seq:
            transfer = None
        keep_seqs = {m.local_seq, seq} | ({transfer.seq} if transfer else set())
        snaps = [s for s in m.snapshots if s.seq in keep_seqs and s.seq != seq] + [ref]
        self._commit(
            replace(
                m,
                snapshots=tuple(sorted(snaps, key=lambda s: s.seq)),
                acked_seq=seq,
                transfer=transfer,
                next_seq=max(m.next_seq, seq + 1),
            )
        )
        self._remove_unreferenced()
        return ref

    def clear_acked(self) -> None:
        """Forget the acknowledged state (the server holds something this journal does not):
        the next snapshot sent must be a full one."""
        self._writable()
        m = self._meta
        if m.acked_seq is None:
            return
        snaps = tuple(s for s in m.snapshots if s.seq in {m.local_seq, _tseq(m)})
        transfer = m.transfer if m.transfer is None or m.transfer.base_seq is None else None
        self._commit(replace(m, snapshots=snaps, acked_seq=None, transfer=transfer))
        self._remove_unreferenced()

    def begin_transfer(
        self,
        seq: int,
        *,
        base_seq: int | None,
        count: int,
        size: int | None = None,
        payload: bytes | None = None,
        state_hash: bytes | None = None,
    ) -> Transfer:
        """Record the transfer about to be sent: ``seq`` against ``base_seq`` (None: full) in
        ``count`` chunks. Keep ``payload`` (the codec payload being chunked) to be able to
        resend missing chunks after a restart; without it give ``size`` (and, if known, the
        ``state_hash`` it produces). Replaces any earlier transfer."""
        self._writable()
        m = self._meta
        self._running(m, "send a snapshot")
        _int_arg(seq, "seq")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise JournalError(f"transfer chunk count {count!r} is not a positive integer")
        if base_seq is not None and base_seq != m.acked_seq:
            raise JournalError(
                f"job {self.job!r}: transfer {seq} is a delta against seq {base_seq}, but the "
                f"acknowledged seq is {m.acked_seq}",
                hint="deltas are encoded against the acknowledged state only (invariant 1)",
            )
        if m.acked_seq is not None and seq <= m.acked_seq:
            raise JournalError(
                f"transfer seq {seq} is not above the acknowledged seq {m.acked_seq}"
            )
        if seq < m.next_seq and m.snapshot(seq) is None:
            raise JournalError(f"transfer seq {seq} is below next_seq {m.next_seq}")
        if payload is not None:
            if size is not None and size != len(payload):
                raise JournalError(f"transfer size {size} != len(payload) {len(payload)}")
            size = len(payload)
            h = self._check_transfer_payload(payload, seq, base_seq, m)
            if state_hash is not None and state_hash != h:
                raise JournalError(f"transfer {seq}: the payload names another state hash")
            state_hash = h
        if size is None or size < 1:
            raise JournalError("a transfer needs its payload or its size (>= 1)")
        if count > size:
            raise JournalError(f"transfer of {size} bytes cannot have {count} chunks")
        if m.transfer is not None and m.transfer.file is not None:
            # at most one transfer file at any instant: drop the old one first
            self._commit(replace(m, transfer=None))
            self._remove_unreferenced()
            m = self._meta
        file = None
        if payload is not None:
            file = _xfer_name(seq)
            header = {"job": self.job, "seq": seq, "base_seq": base_seq, "count": count}
            pieces = _frame(_MAGIC_XFER, header, payload)
            self._count_write(_write_atomic(self.path, file, pieces, self._tmp("xfer", seq)))
        t = Transfer(seq, base_seq, count, size, file, state_hash)
        snaps = tuple(s for s in m.snapshots if s.seq in {m.local_seq, m.acked_seq, seq})
        self._commit(replace(m, snapshots=snaps, transfer=t, next_seq=max(m.next_seq, seq + 1)))
        self._remove_unreferenced()
        return t

    def _check_transfer_payload(
        self, payload: bytes, seq: int, base_seq: int | None, m: JournalMeta
    ) -> bytes:
        try:
            header = read_header(payload)
        except CodecError as exc:
            raise JournalError(f"transfer {seq}: not a valid codec payload: {exc}") from exc
        base = m.acked
        want = None if base_seq is None or base is None else base.state_hash
        if header.base_hash != want:
            raise JournalError(
                f"transfer {seq}: the payload's base hash does not match "
                + ("a full snapshot" if want is None else f"the acknowledged state {base_seq}")
            )
        return header.state_hash

    def end_transfer(self) -> None:
        """Forget the in-flight transfer (nacked, abandoned or replaced by the caller)."""
        self._writable()
        m = self._meta
        if m.transfer is None:
            return
        snaps = tuple(s for s in m.snapshots if s.seq in {m.local_seq, m.acked_seq})
        self._commit(replace(m, snapshots=snaps, transfer=None))
        self._remove_unreferenced()

    def update(
        self,
        *,
        epoch: int | None = None,
        owner: str | None = None,
        status: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> JournalMeta:
        """Change the job's epoch, owner, status or info (one commit)."""
        self._writable()
        m = self._meta
        new = replace(
            m,
            epoch=m.epoch if epoch is None else epoch,
            owner=m.owner if owner is None else owner,
            status=m.status if status is None else status,
            info=m.info if info is None else dict(info),
        )
        self._check_values(new)
        if new.epoch < m.epoch:
            raise JournalError(f"epoch {new.epoch} is below the journal's epoch {m.epoch}")
        self._commit(new)
        return self._meta

    def add_counters(self, **increments: int) -> None:
        """Add to named counters (bytes_sent, bytes_full, ...). Kept in memory and written
        with the next commit (or :meth:`flush`): a crash may lose the latest increments."""
        for k, v in increments.items():
            if type(v) is not int:
                raise JournalError(f"counter {k} increment {v!r} is not an int")
            self._pending[k] = self._pending.get(k, 0) + v

    def flush(self) -> None:
        """Commit pending counter increments."""
        self._writable()
        if self._pending:
            self._commit(self._meta)

    # ----------------------------------------------------------------- verify

    def verify(self, *, deep: bool = False) -> VerifyReport:
        """Re-read the committed metadata record and every file it names, checking format
        versions, checksums and that each file matches the record. ``deep`` also decodes
        every snapshot and recomputes its state hash (and checks that the in-flight delta
        applies to the acknowledged state). Problems are reported, not raised. A read-only
        journal that a running agent changes meanwhile is verified again, on its new record."""
        for _ in range(_READER_ATTEMPTS - 1):
            report, generation = self._verify_once(deep)
            if report.ok or not self.readonly:
                return report
            try:
                if self._load_meta(self.path).generation == generation:
                    return report
            except JournalError:
                return report
        return self._verify_once(deep)[0]

    def _verify_once(self, deep: bool) -> tuple[VerifyReport, int]:
        problems: list[str] = []
        checked: list[str] = []
        try:
            meta = self._load_meta(self.path)
            checked.append(_META)
        except JournalError as exc:
            return VerifyReport(self._meta.job, str(self.path), (str(exc),), (), ()), -1
        view = Journal(self.path, meta, readonly=True, lock_fd=None)
        states: dict[int, Any] = {}
        for ref in meta.snapshots:
            try:
                payload = view._read_snapshot(ref)
                checked.append(ref.file)
                if deep:
                    state = apply_delta(None, payload)
                    if state_hash(state) != ref.state_hash:
                        problems.append(f"{ref.file}: decoded state does not hash to its record")
                    states[ref.seq] = state
            except (JournalError, CodecError, StateError) as exc:
                problems.append(str(exc))
        t = meta.transfer
        if t is not None and t.file is not None:
            try:
                xfer = view.read_transfer_payload()
                checked.append(t.file)
                if deep and xfer is not None:
                    base = states.get(t.base_seq) if t.base_seq is not None else None
                    if t.base_seq is None or base is not None:
                        apply_delta(base, xfer)
            except (JournalError, CodecError, StateError) as exc:
                problems.append(str(exc))
        if len(meta.snapshots) > MAX_SNAPSHOT_FILES:
            problems.append(f"{len(meta.snapshots)} snapshot files, more than {MAX_SNAPSHOT_FILES}")
        if meta.local_seq is None and meta.snapshots and meta.acked_seq is None:
            problems.append("snapshots are held but none is the local or acknowledged one")
        referenced = {_META, _LOCK} | {s.file for s in meta.snapshots}
        if t is not None and t.file is not None:
            referenced.add(t.file)
        unreferenced: list[str] = []
        total = 0
        try:
            for entry in os.scandir(self.path):
                try:
                    if not entry.is_file():
                        continue
                    total += entry.stat().st_size
                except FileNotFoundError:
                    continue  # removed by the writer since it was listed
                if entry.name not in referenced:
                    unreferenced.append(entry.name)
        except OSError as exc:
            problems.append(f"cannot list {self.path}: {exc}")
        return VerifyReport(
            job=meta.job,
            path=str(self.path),
            problems=tuple(problems),
            checked=tuple(checked),
            unreferenced=tuple(sorted(unreferenced)),
            local_seq=meta.local_seq,
            acked_seq=meta.acked_seq,
            transfer_seq=t.seq if t else None,
            bytes_on_disk=total,
        ), meta.generation

    # ----------------------------------------------------------------- internals

    def _writable(self) -> None:
        if self.readonly:
            raise JournalError(f"the journal of job {self.job!r} was opened read-only")
        if self._lock_fd is None and fcntl is not None:
            raise JournalError(f"the journal of job {self.job!r} is closed")

    def _running(self, m: JournalMeta, what: str) -> None:
        """A fenced or released job's journal takes no new snapshots (invariant 4)."""
        if m.status in ("fenced", "released"):
            raise JournalError(
                f"job {self.job!r} is {m.status} (owner {m.owner}, epoch {m.epoch}): cannot {what}",
                hint="the server owns this job; it runs again here only if handed back",
            )

    def _check_values(self, m: JournalMeta) -> None:
        _check_job_id(m.job)
        if not isinstance(m.device, str) or not _JOB_RE.match(m.device):
            raise JournalError(f"device id {m.device!r} is not valid")
        if m.owner not in OWNERS:
            raise JournalError(f"owner {m.owner!r} is not one of {OWNERS}")
        if m.status not in STATUSES:
            raise JournalError(f"status {m.status!r} is not one of {STATUSES}")
        if type(m.epoch) is not int or not 0 <= m.epoch <= _MAX_SEQ:
            raise JournalError(f"epoch {m.epoch!r} is not a non-negative integer")

    def _release_held(self) -> None:
        """Stop keeping the in-flight snapshot's own file (commit, then delete)."""
        m = self._meta
        snaps = tuple(s for s in m.snapshots if s.seq in {m.local_seq, m.acked_seq})
        if len(snaps) != len(m.snapshots):
            self._commit(replace(m, snapshots=snaps))
            self._remove_unreferenced()

    def _tmp(self, kind: str, seq: int) -> str:
        self._tmp_counter += 1
        return f".{kind}-{seq:016x}.{self._tmp_counter}.tmp"

    def _write_snapshot_file(self, ref: SnapshotRef, payload: bytes) -> None:
        header = {"job": self.job, "seq": ref.seq, "step": ref.step, "hash": ref.state_hash}
        pieces = _frame(_MAGIC_SNAP, header, payload)
        self._count_write(_write_atomic(self.path, ref.file, pieces, self._tmp("snap", ref.seq)))

    def _count_write(self, nbytes: int) -> None:
        self._pending["journal_bytes_written"] = (
            self._pending.get("journal_bytes_written", 0) + nbytes
        )

    def _commit(self, meta: JournalMeta) -> None:
        counters = dict(meta.counters)
        for k, v in self._pending.items():
            counters[k] = counters.get(k, 0) + v
        new = replace(
            meta,
            counters=counters,
            generation=self._meta.generation + 1,
            updated_ms=_now_ms(),
        )
        pieces = _frame(_MAGIC_META, new._pack())
        self._tmp_counter += 1

        def renamed() -> None:  # the record on disk is the new one: so is ours in memory
            self._meta = new
            self._pending = {}

        _write_atomic(self.path, _META, pieces, f".meta.{self._tmp_counter}.tmp", renamed)

    def _check_files_exist(self) -> None:
        m = self._meta
        files = [s.file for s in m.snapshots]
        if m.transfer is not None and m.transfer.file is not None:
            files.append(m.transfer.file)
        for name in files:
            if not (self.path / name).is_file():
                raise JournalError(
                    f"journal of job {self.job!r}: {name}, named by the metadata record, "
                    "is missing",
                    hint="the journal was damaged outside edge-resume; "
                    "`edge-agent verify` shows more",
                )

    def _remove_unreferenced(self) -> None:
        """Delete our own files that the committed record does not name (never other files)."""
        m = self._meta
        referenced = {s.file for s in m.snapshots}
        if m.transfer is not None and m.transfer.file is not None:
            referenced.add(m.transfer.file)
        for name in _own_files(self.path):
            if name not in referenced:
                with contextlib.suppress(FileNotFoundError):
                    try:
                        (self.path / name).unlink()
                    except OSError as exc:
                        raise JournalError(f"cannot remove {self.path / name}: {exc}") from exc


def _own_files(path: Path) -> Iterator[str]:
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise JournalError(f"cannot list {path}: {exc}") from exc
    for name in names:
        if _SNAP_RE.match(name) or _XFER_RE.match(name) or _TMP_RE.match(name):
            yield name


def _tseq(m: JournalMeta) -> int | None:
    return m.transfer.seq if m.transfer is not None else None


def _int_arg(v: Any, name: str) -> None:
    if type(v) is not int or not 0 <= v <= _MAX_SEQ:
        raise JournalError(f"{name} {v!r} is not a non-negative integer")


# --------------------------------------------------------------------------- directory


def list_jobs(root: str | os.PathLike[str]) -> list[str]:
    """The job ids that have a journal under ``root``, sorted."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(
        e.name
        for e in os.scandir(base)
        if e.is_dir() and _JOB_RE.match(e.name) and (base / e.name / _META).exists()
    )


def verify_journal(
    root: str | os.PathLike[str], job: str | None = None, *, deep: bool = False
) -> list[VerifyReport]:
    """Verify one job's journal, or every journal under ``root``; a journal that cannot even
    be opened is reported as a problem, not raised."""
    reports = []
    for j in [job] if job is not None else list_jobs(root):
        try:
            with Journal.open(root, j, readonly=True) as journal:
                reports.append(journal.verify(deep=deep))
        except EdgeResumeError as exc:
            reports.append(VerifyReport(j, str(Path(root) / j), (str(exc),), (), ()))
    return reports
