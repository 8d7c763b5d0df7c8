"""A content-addressed blob store on the local filesystem.

Layout under the storage root::

    blobs/sha256/<64 hex>   one file per blob, named by its SHA-256
    tmp/<random>.part       blobs being written
    lock                    builds (shared) against gc (exclusive)

A blob is written to a temporary file, fsynced, then renamed to its digest
and the directory fsynced, so a blob path either does not exist or holds
exactly the bytes its name promises, whatever moment the machine dies at.
Temporary files left by a crash are removed at start-up.  The methods are
blocking; the shell calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .digest import digest_hex, parse_digest
from .errors import StorageError


class BlobWriter:
    """A temporary file that becomes a blob once its digest is known.

    Write with :meth:`write`; ``file`` is the open file itself.
    """

    def __init__(self, cas: CAS, file: BinaryIO, path: Path) -> None:
        self._cas = cas
        self.file = file
        self.path = path

    def write(self, data: bytes) -> int:
        """Append all of ``data`` (an unbuffered write may take only part of it)."""
        view = memoryview(data)
        while view:
            view = view[self.file.write(view) :]
        return len(data)

    def commit(self, digest: str) -> Path:
        """fsync, close and rename the file to ``digest``; return its path."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        target = self._cas.path(digest)
        os.rename(self.path, target)
        self._cas.sync_dir()
        return target

    def close(self) -> None:
        """Close the file (it stays a temporary file unless committed)."""
        self.file.close()


class CAS:
    """Blobs on disk, named by their SHA-256 digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.lock = StoreLock(root / "lock")

    def open_store(self) -> int:
        """Create the layout and remove leftovers of a crash; return how many."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        return self.blob_dir / digest_hex(parse_digest(digest))

    def size(self, digest: str) -> int | None:
        """The blob's size, or ``None`` if it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def sync_dir(self) -> None:
        fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        """A temporary blob file; removed unless ``commit`` was called."""
        path = self.tmp_dir / f"{secrets.token_hex(12)}.part"
        try:
            file = open(path, "xb", buffering=0)  # noqa: SIM115 - owned by BlobWriter
        except OSError as exc:
            raise StorageError(f"cannot create a blob in {self.tmp_dir}: {exc}") from exc
        blob = BlobWriter(self, file, path)
        try:
            yield blob
        except OSError as exc:
            raise StorageError(f"writing a blob failed: {exc}") from exc
        finally:
            try:
                blob.close()
            finally:
                path.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob (config, manifest); return its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.size(digest) == len(data):
            os.utime(self.path(digest))  # used again: fresh for gc
            return digest
        with self.writer() as w:
            w.write(data)
            w.commit(digest)
        return digest

    def read_bytes(self, digest: str, limit: int) -> bytes | None:
        """A small blob's bytes, or ``None`` if missing or over ``limit``."""
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= limit else None

    def digests(self) -> Iterator[str]:
        """Every stored digest."""
        for entry in os.scandir(self.blob_dir):
            yield "sha256:" + entry.name


class StoreLock:
    """An advisory lock between builds (shared) and garbage collection (exclusive).

    A build holds it shared from its first layer-cache lookup until its
    manifest is recorded, and a cache hit holds it while it checks and
    touches the manifest; ``gc`` holds it exclusively while it decides and
    deletes.  So gc never removes a blob a build has just decided to reuse.
    ``flock`` locks belong to the open file, so any thread may release them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def acquire(self, exclusive: bool = False) -> int:
        """Block until held; return the descriptor that releases it on close."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def held(self, exclusive: bool = False) -> Iterator[None]:
        fd = self.acquire(exclusive)
        try:
            yield
        finally:
            os.close(fd)
