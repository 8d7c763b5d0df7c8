"""The ``s3`` storage backend: blobs and cache records in one S3 bucket.

Several servers (replicas) on one bucket share everything a pull needs, so
any of them answers for an image another one built.  Layout of the bucket::

    blobs/sha256/<64 hex>     one object per blob, named by its SHA-256
    uploads/<random>          a large blob streamed before its digest was known
    used/<64 hex>             empty: its time is the blob's last use (gc)
    index/<kind>/<blake3>     the cache records (cache.py), one object each
    leases/<blake3>           build leases between replicas (leases.py)

A blob is visible whole or not at all.  A small one (a config, a manifest,
a layer under one part) is one ``PutObject`` under its digest.  A layer is
streamed from the one-pass writer as a multipart upload to ``uploads/``
(its digest is known only at its end), completed, then copied inside the
bucket to its digest's name and the upload deleted: S3 cannot rename, and
the copy does not send the bytes through the registry.  A crash leaves at
worst an upload or an ``uploads/`` object, which ``fsck --repair`` removes.

What stays on the local disk (``STORAGE_PATH``) is each replica's own: the
lock files its workers share, the activity board, the quota counts.

The sizes of blobs seen present are remembered for :data:`SIZE_SECONDS`:
blobs never change, and a warm manifest check, or a blob request, then
costs no round trip.  Only ``gc`` deletes a sound blob, and only one unused
for its grace period (two minutes at least), well beyond those seconds.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Generator, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.digest import digest_hex, parse_digest, sha256_digest
from ..core.errors import BlobUnknown, RangeNotSatisfiable
from .cas import StoreLock
from .storage import BlobEntry, Leftover

if TYPE_CHECKING:  # boto3 is imported only by a server that uses a bucket
    from .s3 import S3Bucket, S3StreamWriter

#: Seconds a blob's size, once seen, is trusted without asking the bucket.
SIZE_SECONDS = 30.0
#: Blob sizes remembered at most.
SIZE_ENTRIES = 65536

BLOB_PREFIX = "blobs/sha256/"
UPLOAD_PREFIX = "uploads/"
USED_PREFIX = "used/"
INDEX_PREFIX = "index/"
LEASE_PREFIX = "leases/"
#: Seconds between two marks of one blob's use by one process.
USED_INTERVAL = 60.0


def blob_key(digest: str) -> str:
    """The object key of the blob ``digest``."""
    return BLOB_PREFIX + digest_hex(parse_digest(digest))


class BucketRecords:
    """A record namespace as the objects under one key prefix."""

    def __init__(self, bucket: S3Bucket, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix

    def open_files(self) -> None:
        """Nothing to create: a prefix exists once a key has it."""

    def read(self, name: str) -> bytes | None:
        return self.bucket.get(self.prefix + name)

    def write(self, name: str, data: bytes) -> None:
        self.bucket.put(self.prefix + name, data)

    def remove(self, name: str) -> None:
        self.bucket.delete(self.prefix + name)

    def may_have(self, name: str) -> bool:
        """Always ``True``: only a request to the bucket could tell."""
        return True

    def names(self) -> Iterator[str]:
        for key in self.bucket.list(self.prefix):
            yield key[len(self.prefix) :]


class S3BlobSink:
    """A blob streamed into the bucket (see the module's docstring)."""

    def __init__(self, store: S3Store, stream: S3StreamWriter) -> None:
        self._store = store
        self._stream = stream

    def write(self, data: bytes, /) -> int:
        return self._stream.write(data)

    def commit(self, digest: str) -> str:
        """Put the bytes under ``digest``'s key; the key."""
        target = blob_key(digest)
        size = self._stream.size
        if not self._stream.multipart:
            self._stream.commit(target)
        else:
            self._stream.commit()
            try:
                if self._store.size(digest) != size:
                    self._store.bucket.copy(self._stream.key, target, size)
            finally:
                self._store.bucket.delete(self._stream.key)
        self._store.remember(digest, size)
        return target


class S3Store:
    """Blobs and records in an S3 bucket: the ``s3`` backend of
    :class:`~nixery_trio.store.storage.Storage`."""

    def __init__(self, bucket: S3Bucket, local: Path) -> None:
        self.bucket = bucket
        self.local = local
        self.lock = StoreLock(local / "lock")
        self._sizes: dict[str, tuple[int, float]] = {}
        #: Guards ``_sizes`` and ``_marked`` (worker threads share the store).
        self._lock = threading.Lock()
        #: When this process last marked each blob used.
        self._marked: dict[str, float] = {}

    def open_store(self, clean: bool = True) -> int | None:
        """Check the bucket answers (a wrong bucket or key fails the start, not
        the first pull).  Nothing is cleaned at start: another replica's
        uploads look just like a crash's leftovers; gc removes old ones."""
        self.local.mkdir(parents=True, exist_ok=True)
        self.bucket.check()
        return 0

    # -- blobs

    def remember(self, digest: str, size: int) -> None:
        """Note that ``digest`` is stored with ``size`` bytes."""
        with self._lock:
            if len(self._sizes) >= SIZE_ENTRIES:
                self._sizes.clear()
            self._sizes[digest] = (size, time.monotonic())

    def known_size(self, digest: str) -> int | None:
        """The size remembered for ``digest``, if recent enough (no request)."""
        with self._lock:
            known = self._sizes.get(digest)
        if known is not None and time.monotonic() - known[1] < SIZE_SECONDS:
            return known[0]
        return None

    def size(self, digest: str) -> int | None:
        known = self.known_size(digest)
        if known is not None:
            return known
        found = self.bucket.stat(blob_key(digest))
        if found is None:
            with self._lock:
                self._sizes.pop(digest, None)
            return None
        self.remember(digest, found[0])
        return found[0]

    @contextlib.contextmanager
    def writer(self) -> Iterator[S3BlobSink]:
        with self.bucket.put_stream(UPLOAD_PREFIX + secrets.token_hex(12)) as stream:
            yield S3BlobSink(self, stream)

    def put_bytes(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Put each blob not known to be there (asking first would cost as
        much as the put of a small blob)."""
        digests = []
        for data in blobs:
            digest = sha256_digest(data)
            if self.known_size(digest) != len(data):
                self.bucket.put(blob_key(digest), data)
                self.remember(digest, len(data))
            digests.append(digest)
        return digests

    def read_bytes(self, digest: str, limit: int) -> bytes | None:
        size = self.size(digest)
        if size is None or size > limit:
            return None
        return self.bucket.get(blob_key(digest))

    def presigned(self, digest: str, seconds: int) -> str:
        """A URL that fetches the blob, with no credentials, for ``seconds``."""
        return self.bucket.presigned_get(blob_key(digest), seconds)

    def stream(
        self, digest: str, first: int = 0, last: int | None = None
    ) -> Generator[bytes, None, None]:
        size = self.size(digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": digest})
        if last is None:
            if not size:  # a range of an empty object is not satisfiable
                return
            last = size - 1
        elif not 0 <= first <= last < size:
            raise RangeNotSatisfiable(f"bytes {first}-{last} are outside {digest}")
        yield from self.bucket.open_range(blob_key(digest), first, last)

    def blob_entries(self) -> Iterator[BlobEntry]:
        """Each blob, its last use the later of its own time and its mark's."""
        marks = {
            key[len(USED_PREFIX) :]: modified
            for key, _, modified in self.bucket.list_entries(USED_PREFIX)
        }
        for key, size, modified in self.bucket.list_entries(BLOB_PREFIX):
            name = key[len(BLOB_PREFIX) :]
            used = max(modified, marks.get(name, 0.0))
            yield BlobEntry(name, size, used, partial(self._remove, name))

    def last_use(self, digest: str) -> float:
        """When the blob was last marked used (0 if never), asked now: gc looks
        again just before it deletes, in case a replica used it meanwhile
        (the blob's own time is not asked: gc has it from its listing)."""
        found = self.bucket.stat_time(USED_PREFIX + digest_hex(parse_digest(digest)))
        return 0.0 if found is None else found

    def leftovers(self, older_than: float) -> Iterator[Leftover]:
        """Uploads never completed, ``uploads/`` objects never copied to their
        name, and leases not renewed (a holder renews every few seconds)."""
        cutoff = time.time() - older_than
        for key, upload_id, started in self.bucket.uploads(""):
            if started < cutoff:
                yield Leftover(f"upload of {key}",
                               partial(self.bucket.abort_upload, key, upload_id))  # fmt: skip
        for prefix in (UPLOAD_PREFIX, LEASE_PREFIX):
            for key, _, modified in self.bucket.list_entries(prefix):
                if modified < cutoff:
                    yield Leftover(key, partial(self.bucket.delete, key))

    def delete(self, digest: str) -> None:
        self._remove(digest_hex(parse_digest(digest)))

    def _remove(self, name: str) -> None:
        """Remove the blob stored under ``name`` and its mark of use."""
        with self._lock:
            self._sizes.pop("sha256:" + name, None)
        self.bucket.delete(BLOB_PREFIX + name)
        self.bucket.delete(USED_PREFIX + name)

    def used(self, digest: str) -> None:
        """Write the blob's mark of use (an empty ``used/`` object: an object's
        time cannot be refreshed without rewriting it), at most once every
        :data:`USED_INTERVAL` seconds per process."""
        now = time.monotonic()
        with self._lock:
            last = self._marked.get(digest)
            if last is not None and now - last < USED_INTERVAL:
                return
            if len(self._marked) >= SIZE_ENTRIES:
                self._marked.clear()
            self._marked[digest] = now
        self.bucket.put(USED_PREFIX + digest_hex(parse_digest(digest)), b"")

    # -- records

    def records(self, kind: str) -> BucketRecords:
        return BucketRecords(self.bucket, f"{INDEX_PREFIX}{kind}/")
