"""What the registry needs from a store, whichever holds the bytes.

Two backends implement :class:`Storage`: the content-addressed files of
``cas.py`` (the default, served with ``sendfile``) and an S3 bucket
(``s3store.py``, for replicas that share one store).  The builder, the
caches and the blob responses use only what is declared here; what differs
(a file to sendfile, or a URL to redirect to) is asked for by backend in
``http/blobs.py``.  ``tests/e2e/test_storage.py`` is the conformance suite
that every backend passes.

The interface is blocking, as boto3 and the filesystem are: the shell calls
it from worker threads.

A store holds two kinds of things:

* **blobs**, named by the SHA-256 of their bytes, written once and never
  changed: a blob is visible whole or not at all, so a reader never sees a
  part of one;
* **records**, small named values in a few namespaces (the layer, manifest
  and tag caches, ``cache.py``), each replaced whole by a write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import S3Settings
    from .cas import StoreLock

#: The record namespaces the caches use (``cache.py``).
RECORD_KINDS = ("layers", "manifests", "tags")
#: Bytes per chunk of a blob read by :meth:`Storage.stream`.
STREAM_CHUNK = 1 << 20


@dataclass(frozen=True)
class BlobEntry:
    """One stored blob as a listing shows it, for fsck and gc."""

    #: The name it is stored under: a digest's hex, unless something foreign.
    name: str
    size: int
    #: When it was last written or used (gc's "last used").
    used: float
    #: Removes it, whatever its name.
    remove: Callable[[], None]


@dataclass(frozen=True)
class Leftover:
    """Something a crash or a dead process left in a store: a temporary file,
    an upload never completed, an expired lease."""

    name: str
    remove: Callable[[], None]


class BlobSink(Protocol):
    """A blob being written whose digest is known only at its end (a layer
    from the one-pass writer).  Nothing is visible until :meth:`commit`;
    leaving the writer's ``with`` block without it discards what was written."""

    def write(self, data: bytes, /) -> int: ...

    def commit(self, digest: str) -> object:
        """Make the bytes written the blob ``digest`` (the caller hashed them)."""
        ...


class RecordFiles(Protocol):
    """One namespace of small records, by name (a hex string)."""

    def read(self, name: str) -> bytes | None:
        """The record's bytes, or ``None`` if there is none."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Replace the record whole: a reader sees the old bytes or the new."""
        ...

    def remove(self, name: str) -> None:
        """Drop the record; no error if it is gone."""
        ...

    def may_have(self, name: str) -> bool:
        """Whether the record may exist, answered without blocking for long:
        ``False`` only when it surely does not (a local ``stat``); a backend
        that cannot tell cheaply says ``True``."""
        ...

    def names(self) -> Iterator[str]:
        """Every record's name, in sorted order."""
        ...

    def open_files(self) -> None:
        """Create what the namespace needs (a directory), if anything."""
        ...


class Storage(Protocol):
    """A store of blobs and records: the filesystem CAS or an S3 bucket."""

    #: Builds (shared) against a local gc (exclusive); see :class:`StoreLock`.
    lock: StoreLock

    def open_store(self, clean: bool = True) -> int | None:
        """Make the store ready to serve; with ``clean``, remove what a crash
        left behind.  How many leftovers were removed, or ``None`` when
        another server holds the store and they were left alone."""
        ...

    def writer(self) -> contextlib.AbstractContextManager[BlobSink]:
        """A new blob of unknown digest (see :class:`BlobSink`)."""
        ...

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store small blobs (a config, manifests) whole; their digests."""
        ...

    def put_bytes(self, data: bytes) -> str:
        """Store one small blob; its digest."""
        ...

    def size(self, digest: str) -> int | None:
        """The blob's size, or ``None`` if it is not stored."""
        ...

    def read_bytes(self, digest: str, limit: int) -> bytes | None:
        """A small blob's bytes, or ``None`` if missing or over ``limit``."""
        ...

    def stream(
        self, digest: str, first: int = 0, last: int | None = None
    ) -> Generator[bytes, None, None]:
        """A blob, or its bytes ``first`` to ``last`` (both included, as HTTP's
        ``Range``), a chunk at a time: fsck re-hashes every blob so, a bucket
        proxies one so.  Raises (at the first ``next``)
        :class:`~nixery_trio.core.errors.BlobUnknown` if the blob is missing,
        ``RangeNotSatisfiable`` for a range past its end."""
        ...

    def blob_entries(self) -> Iterator[BlobEntry]:
        """Every stored blob with its size and last use (blocking: lists them all)."""
        ...

    def leftovers(self, older_than: float) -> Iterator[Leftover]:
        """What crashes left behind, untouched for ``older_than`` seconds
        (anything younger may be a write in progress)."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob (garbage collection); no error if it is gone."""
        ...

    def last_use(self, digest: str) -> float:
        """When the blob was last marked used, asked now (0 if never)."""
        ...

    def used(self, digest: str) -> None:
        """Note that a blob was used now (a manifest served, a cached layer
        reused), for gc's "least recently used"; at most once a minute."""
        ...

    def records(self, kind: str) -> RecordFiles:
        """The record namespace ``kind`` (one of :data:`RECORD_KINDS`)."""
        ...


def open_storage(storage_path: Path, s3: S3Settings | None) -> Storage:
    """The store a server or command uses: the files under ``storage_path``,
    or (``s3``) the bucket, with ``storage_path`` for the server's own state.
    Nothing is created or asked yet (``open_store`` does)."""
    from .cas import CAS  # cas.py imports this module's types

    if s3 is None:
        return CAS(storage_path)
    from .s3 import S3Bucket  # boto3 is loaded only for this backend
    from .s3store import S3Store

    bucket = S3Bucket(s3.endpoint_url, s3.bucket, s3.access_key_id, s3.secret_access_key,
                      s3.region)  # fmt: skip
    return S3Store(bucket, storage_path)
