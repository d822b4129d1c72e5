"""Content-addressed blobs: the store's bulk data, behind a five-method interface.

A blob is an immutable byte string named by the xxh3-128 of its content (32 lowercase hex
digits). :class:`BlobStore` is the interface (``put``, ``get``, ``delete``, ``list``,
``close``, plus an optional ``sweep`` of leftovers); :class:`FolderBlobStore` is the embedded
implementation, a folder with 256 fan-out subfolders. An object-storage implementation (S3,
GCS, MinIO) would map ``put`` to a PUT of ``blobs/<key>`` (atomic there), ``get`` to a GET,
``list`` to a paginated LIST with ``LastModified`` as ``mtime``.

Guarantees every implementation must give:

* ``put`` is durable when it returns and atomic: a reader never sees a partial blob under
  its final name. Putting a blob that already exists is a no-op that refreshes its ``mtime``
  (so that a garbage collector with a grace period does not take a blob that is being
  re-referenced) and repairs it if the existing copy is damaged.
* ``get`` verifies: a blob whose content does not hash to its name raises
  :class:`~edge_agent.errors.StoreCorrupt`, a missing one too. Nothing unverified is returned.

This module owns the blob files and nothing else: it never decides which blobs are needed
(the store's rows do) and never touches the database.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from edge_agent.errors import StoreCorrupt, StoreError

__all__ = ["BlobInfo", "BlobStore", "FolderBlobStore", "blob_key", "is_blob_key"]

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_TEMP_PREFIX = ".tmp-"


def blob_key(data: bytes | memoryview) -> str:
    """The name of a blob: the xxh3-128 of its content, 32 lowercase hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def is_blob_key(key: str) -> bool:
    return _KEY_RE.match(key) is not None


def _check_key(key: str) -> None:
    if not is_blob_key(key):
        raise StoreError(f"{key!r} is not a blob key (32 lowercase hex digits)")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob as ``list`` reports it."""

    key: str
    size: int
    mtime: float  # seconds since the epoch; refreshed by a put of the same content


class BlobStore(abc.ABC):
    """Where the store keeps payload bytes. Content-addressed, immutable, verified on read."""

    @abc.abstractmethod
    def put(self, data: bytes | memoryview) -> str:
        """Store ``data`` durably and return its key. Idempotent."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The blob's bytes, verified against its key (StoreCorrupt if damaged or missing)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob. Deleting a missing blob is not an error."""

    @abc.abstractmethod
    def list(self) -> Iterator[BlobInfo]:
        """Every stored blob (in no particular order). Leftover temporaries are not listed."""

    def sweep(self, older_than: float) -> int:
        """Remove leftovers of interrupted puts last modified before ``older_than`` (a time);
        returns how many. Stores whose puts are atomic by themselves have none."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release resources."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderBlobStore(BlobStore):
    """Blobs as files: ``<root>/<key[:2]>/<key>``.

    A put writes ``<root>/<key[:2]>/.tmp-<key>-<random>`` with ``O_EXCL``, fsyncs it, renames
    it over the final name and fsyncs the subfolder (and the root when the subfolder is new).
    A kill at any instant leaves either no file, a temporary (removed by ``sweep``), or the
    complete blob.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            if not create:
                raise StoreError(f"blob folder {self.root} does not exist")
            try:
                self.root.mkdir(parents=True)
                _fsync_dir(self.root.parent)
            except OSError as exc:
                raise StoreError(f"cannot create blob folder {self.root}: {exc}") from exc

    def path(self, key: str) -> Path:
        """Where the blob ``key`` lives (whether or not it exists)."""
        _check_key(key)
        return self.root / key[:2] / key

    def put(self, data: bytes | memoryview) -> str:
        key = blob_key(data)
        final = self.path(key)
        try:
            if final.exists():
                try:
                    self._read_verified(key, final)
                except StoreCorrupt:
                    pass  # damaged copy: rewrite it below
                else:
                    try:
                        os.utime(final)  # re-referenced now: restart its grace period
                        return key
                    except FileNotFoundError:
                        pass  # collected meanwhile by another process: write it again
            sub = final.parent
            if not sub.is_dir():
                with contextlib.suppress(FileExistsError):
                    sub.mkdir()
                _fsync_dir(self.root)
            tmp = sub / f"{_TEMP_PREFIX}{key}-{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
                    f.flush()
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(sub)
        except OSError as exc:
            raise StoreError(f"cannot write blob {key}: {exc}") from exc
        return key

    def _read_verified(self, key: str, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreCorrupt(f"blob {key} is missing", hint="run verify") from exc
        except OSError as exc:
            raise StoreError(f"cannot read blob {key}: {exc}") from exc
        actual = blob_key(data)
        if actual != key:
            raise StoreCorrupt(
                f"blob {key} is damaged: its {len(data)} bytes hash to {actual}",
                hint="restore it from a backup or resync the job from its device",
            )
        return data

    def get(self, key: str) -> bytes:
        return self._read_verified(key, self.path(key))

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete blob {key}: {exc}") from exc

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self.root) as top:
                subs = [e.path for e in top if e.is_dir() and len(e.name) == 2]
            for sub in subs:
                try:
                    it = os.scandir(sub)
                except FileNotFoundError:
                    continue  # removed meanwhile (by hand: the store never removes one)
                with it:
                    yield from it
        except OSError as exc:
            raise StoreError(f"cannot list blob folder {self.root}: {exc}") from exc

    def list(self) -> Iterator[BlobInfo]:
        for entry in self._entries():
            if is_blob_key(entry.name):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield BlobInfo(entry.name, st.st_size, st.st_mtime)

    def sweep(self, older_than: float) -> int:
        removed = 0
        for entry in self._entries():
            if entry.name.startswith(_TEMP_PREFIX):
                try:
                    if entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StoreError(f"cannot remove {entry.path}: {exc}") from exc
        return removed

    def temporaries(self) -> int:
        """How many leftover temporaries there are (verify reports it)."""
        return sum(1 for e in self._entries() if e.name.startswith(_TEMP_PREFIX))
