"""One S3 bucket, with exactly the operations a registry store needs from it.

This is the groundwork of the S3 backend (issue #14): a thin, typed layer
over boto3 that says, for each S3 call the registry will make, why it makes
it.  Every method blocks on the network; the shell calls them from worker
threads (``trio.to_thread.run_sync``), as it does the :class:`~.cas.CAS`.

The properties the registry relies on, and the S3 feature that gives each:

* A layer is streamed from the one-pass writer with bounded memory and is
  visible only when whole: :meth:`S3Bucket.put_stream` fills one part
  (:data:`PART_SIZE`) while it sends the one before as a part of a
  multipart upload, which S3 makes into an object only at
  ``CompleteMultipartUpload``.
* A build lease is taken and renewed without a lock server:
  :meth:`S3Bucket.put_if_absent` (``If-None-Match: *``) and
  :meth:`S3Bucket.put_if_match` (``If-Match: <etag>``) are S3's conditional
  writes; of racing writers exactly one succeeds, the others get 412.
* A client is sent to the bucket rather than through the server:
  :meth:`S3Bucket.presigned_get` signs only the host, so the client may add
  its own ``Range`` header.

Failures of the store become :class:`~nixery_trio.core.errors.StorageError`;
"not there" is ``None`` and "precondition failed" is ``False``, since a
caller decides on those rather than reports them.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..core.errors import RangeNotSatisfiable, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        HeadObjectOutputTypeDef,
        PutObjectOutputTypeDef,
    )

#: Parts of one stream sent at once (each on its own thread) while the
#: next one fills: a stream holds this many parts plus one in memory.
PARTS_IN_FLIGHT = 2
#: Bytes in one part of a multipart upload.
#: S3 wants at least 5 MiB in every part but the last, and at most 10 000
#: parts: 8 MiB parts carry layers of up to 78 GiB.
PART_SIZE = 8 << 20
#: S3's smallest part (every part but the last).
MIN_PART_SIZE = 5 << 20
#: Bytes per read of an object read in chunks (:meth:`S3Bucket.open_range`).
PROXY_CHUNK = 1 << 20
#: The largest object one ``CopyObject`` copies; a larger one is copied in parts.
COPY_LIMIT = 5 << 30
#: Connections kept open to the S3 service: one per worker thread that may
#: call it at once (layer writes, lookups, proxied blobs).
MAX_CONNECTIONS = 64


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(exc: ClientError) -> bool:
    """Whether S3 said that the key (not the bucket) does not exist."""
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "404", "NotFound")


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """Any failure of S3 (or of reaching it) in the block, as a :class:`StorageError`."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"S3 {what} failed: {exc}") from exc


class S3Bucket:
    """One bucket of an S3 service (AWS, or a compatible one at ``endpoint_url``).

    With an ``endpoint_url`` the bucket is addressed by path
    (``http://host/bucket/key``), which every S3-compatible server accepts
    whatever its DNS; without one (AWS itself), boto3's default applies.
    The boto3 client is thread-safe, so one ``S3Bucket`` serves every
    worker thread.
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str,
        part_size: int = PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        self.bucket = bucket
        self.part_size = part_size
        config = Config(
            region_name=region,
            signature_version="s3v4",
            retries={"mode": "standard"},
            max_pool_connections=MAX_CONNECTIONS,
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        # A session of its own: boto3's default session is not thread-safe.
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )

    def check(self) -> None:
        """Fail with :class:`StorageError` unless the bucket exists and these
        credentials reach it (``HeadBucket``): a server finds out at start."""
        with _storage_errors(f"access to the bucket {self.bucket}"):
            self._client.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` whole (a small blob, a cache record)."""
        with _storage_errors(f"put of {key}"):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def copy(self, source: str, target: str, size: int) -> None:
        """Copy ``source`` (of ``size`` bytes) to ``target`` inside the bucket,
        without the bytes leaving S3: how a streamed blob gets its digest's
        name, which was not known when its upload started."""
        with _storage_errors(f"copy of {source} to {target}"):
            if size <= COPY_LIMIT:
                self._client.copy_object(
                    Bucket=self.bucket, Key=target,
                    CopySource={"Bucket": self.bucket, "Key": source},
                )  # fmt: skip
            else:  # boto3's managed copy sends it as parts (UploadPartCopy)
                self._client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target)

    def put_stream(self, key: str) -> contextlib.AbstractContextManager[S3StreamWriter]:
        """A writer for a blob of unknown size (a layer from the one-pass writer).

        Memory stays at two parts however large the blob, and nobody sees the
        object until :meth:`S3StreamWriter.commit`; leaving the ``with``
        block without committing aborts the upload, so S3 keeps no parts.
        """
        return _open_stream(self, key)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` unless it exists (``If-None-Match: *``): its ETag, or
        ``None`` if it existed.

        This takes a build lease: of several writers racing, exactly one gets
        an ETag (which renews it).  A request retried after a lost reply may
        find the object its first attempt made and say ``None``: the lease is
        then held by nobody who knows it, and expires, which is safe.
        """
        return self._conditionally(
            key,
            lambda: self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*"
            ),
        )

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace ``key`` if it still has ``etag`` (``If-Match``): the new ETag,
        or ``None`` if it was not replaced.

        This renews or hands over a lease: ``None`` means someone else wrote
        it since ``etag`` was read (or it is gone), so the lease is lost.

        Ceph's RADOS Gateway (16) compares ``If-Match`` with the ETag stripped
        of its quotes, so the quoted ETag that S3 hands out never matches
        there.  When the precondition fails but the object still has
        ``etag``, the write is tried once more with the ETag unquoted: on a
        server that compares as AWS does that fails too, and the answer is
        the same ``None``.
        """
        written = self._conditionally(
            key,
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfMatch=etag),
        )
        if written is not None or not etag.startswith('"'):
            return written
        current = self.stat(key)
        if current is None or current[1] != etag:
            return None  # really changed, or gone
        bare = etag.strip('"')
        return self._conditionally(
            key,
            lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=data, IfMatch=bare),
        )

    def _conditionally(self, key: str, put: Callable[[], PutObjectOutputTypeDef]) -> str | None:
        """The ETag the conditional ``put`` of ``key`` wrote: ``None`` when its
        precondition failed, :class:`StorageError` when the store did."""
        with _storage_errors(f"conditional put of {key}"):
            try:
                return put()["ETag"]
            except ClientError as exc:
                # 409: a conditional write racing another on the same key (AWS);
                # 404: ``If-Match`` on a key that is gone (AWS; SeaweedFS says 412).
                if _status(exc) in (412, 409) or _missing(exc):
                    return None
                raise

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The whole object and its ETag (which :meth:`put_if_match` needs), or
        ``None``: a lease, read to decide whether to wait or take it over."""
        with _storage_errors(f"get of {key}"):
            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=key)
                return reply["Body"].read(), reply["ETag"]
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise

    def get(self, key: str) -> bytes | None:
        """The whole object, or ``None`` if there is none: for small records
        (manifests, index entries, leases) read in one go."""
        found = self.get_tagged(key)
        return None if found is None else found[0]

    def open_range(self, key: str, first: int, last: int) -> Generator[bytes, None, None]:
        """Bytes ``first`` to ``last`` of ``key`` (both included, as in HTTP's
        ``Range``), as chunks read one at a time (each ``next`` blocks): a blob
        re-hashed by fsck, or proxied through the registry, without holding
        more than a chunk of it.  A range past the end raises
        :class:`RangeNotSatisfiable`; a missing object is a
        :class:`StorageError`, since the caller found it first."""
        with _storage_errors(f"ranged get of {key}"):
            try:
                reply = self._client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}"
                )
            except ClientError as exc:
                if _status(exc) == 416:
                    raise RangeNotSatisfiable(f"bytes {first}-{last} are outside {key}") from exc
                raise
        body = reply["Body"]
        try:
            while True:
                with _storage_errors(f"read of {key}"):
                    chunk = body.read(PROXY_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def _head(self, key: str) -> HeadObjectOutputTypeDef | None:
        with _storage_errors(f"stat of {key}"):
            try:
                return self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise

    def stat(self, key: str) -> tuple[int, str] | None:
        """``(size, etag)`` of ``key``, or ``None``: whether a blob is there and how
        large (HEAD of a blob), and the ETag that :meth:`put_if_match` needs."""
        reply = self._head(key)
        return None if reply is None else (reply["ContentLength"], reply["ETag"])

    def stat_time(self, key: str) -> float | None:
        """When ``key`` was last written (Unix seconds), or ``None`` if it is not there."""
        reply = self._head(key)
        return None if reply is None else reply["LastModified"].timestamp()

    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in S3's (lexical) order, page by page."""
        for key, _, _ in self.list_entries(prefix):
            yield key

    def list_entries(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """Every key under ``prefix`` with its size and last-modified time (Unix
        seconds): what fsck and gc need of each object, from the listing alone."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        with _storage_errors(f"list of {prefix!r}"):
            for page in pages:
                for entry in page.get("Contents", []):
                    yield entry["Key"], entry["Size"], entry["LastModified"].timestamp()

    def uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """The multipart uploads under ``prefix`` never completed nor aborted:
        key, upload id and when each began (a crash mid-layer leaves one)."""
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        with _storage_errors(f"list of the uploads under {prefix!r}"):
            for page in pages:
                for upload in page.get("Uploads", []):
                    yield upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload: S3 drops its parts."""
        with _storage_errors(f"abort of an upload of {key}"):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def delete(self, key: str) -> None:
        """Remove ``key`` (garbage collection, a released lease); no error if it is gone."""
        with _storage_errors(f"delete of {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def presigned_get(self, key: str, expires_seconds: int) -> str:
        """A URL that fetches ``key`` without credentials until ``expires_seconds``
        from now: the registry redirects a blob GET there, so layers do not pass
        through it.  Only the host is signed, so the client may send ``Range``.
        Made locally, with no request."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_seconds
        )


class S3StreamWriter:
    """A multipart upload fed by :meth:`write`, holding at most
    :data:`PARTS_IN_FLIGHT` + 1 parts in memory.

    A full part is sent on a thread of the writer's own while :meth:`write`
    fills another buffer, so making the next part (compressing a layer)
    overlaps sending the ones before, and up to :data:`PARTS_IN_FLIGHT`
    parts are sent at once (an S3 server takes parallel parts faster than
    one after the other); a write that fills a buffer while that many are
    being sent waits for the oldest.  Buffers of ``part_size`` bytes are
    reused, so memory does not grow with the blob.  The upload is started
    only when the first part is full: a blob smaller than a part is one
    ``PutObject`` at :meth:`commit`.
    """

    def __init__(self, bucket: S3Bucket, key: str) -> None:
        self._bucket = bucket
        self._client = bucket._client
        self.key = key
        self._part = bytearray(bucket.part_size)
        self._filled = 0
        #: Buffers whose parts were sent, for reuse.
        self._spare: list[bytearray] = []
        self._sender: ThreadPoolExecutor | None = None
        #: The parts being sent, oldest first.
        self._sending: collections.deque[Future[None]] = collections.deque()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        #: The number of the last part handed to the sender.
        self._number = 0
        self.done = False
        #: Bytes written so far.
        self.size = 0

    @property
    def buffered(self) -> int:
        """Bytes written but not yet handed to the sender (less than one part)."""
        return self._filled

    def write(self, data: bytes) -> int:
        """Append ``data``, handing each part to the sender as it fills."""
        if self.done:
            raise ValueError(f"write to {self.key} after commit or abort")
        self.size += len(data)
        view = memoryview(data)
        while view:
            room = len(self._part) - self._filled
            chunk = view[:room]
            self._part[self._filled : self._filled + len(chunk)] = chunk
            self._filled += len(chunk)
            view = view[len(chunk) :]
            if self._filled == len(self._part):
                self._hand_off()
        return len(data)

    def _hand_off(self) -> None:
        """Send the full buffer in the background; go on filling another one."""
        while len(self._sending) >= PARTS_IN_FLIGHT:
            self._sending.popleft().result()  # its error, if any, is raised here
        if self._upload_id is None:
            with _storage_errors(f"start of the upload of {self.key}"):
                created = self._client.create_multipart_upload(
                    Bucket=self._bucket.bucket, Key=self.key
                )
            self._upload_id = created["UploadId"]
        full = self._part
        self._part = self._spare.pop() if self._spare else bytearray(len(full))
        self._filled = 0
        if self._sender is None:
            self._sender = ThreadPoolExecutor(PARTS_IN_FLIGHT, "s3-part")
        self._number += 1
        self._sending.append(self._sender.submit(self._send, full, self._number))

    def _send(self, body: bytearray, number: int) -> None:
        """Upload ``body`` as part ``number``; keep its buffer for reuse."""
        assert self._upload_id is not None
        with _storage_errors(f"upload of part {number} of {self.key}"):
            # botocore takes a bytearray as it is (its validator lists the
            # type, its stubs do not): no copy of the part.
            sent = self._client.upload_part(
                Bucket=self._bucket.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=cast(bytes, body),
            )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})  # list.append is atomic
        if len(body) == self._bucket.part_size:
            self._spare.append(body)

    def _wait_sent(self) -> None:
        """Wait for every part being sent; raise the first error."""
        while self._sending:
            self._sending.popleft().result()

    def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.shutdown(wait=True)

    @property
    def multipart(self) -> bool:
        """Whether a multipart upload was started (more than one part was written)."""
        return self._upload_id is not None

    def commit(self, key: str | None = None) -> str:
        """Make the object, whole, visible under its key; its ETag.

        An object that fits in one part was never uploaded: it is put now,
        under ``key`` if given (its name may be known only now), else under
        the writer's key.  A multipart upload's ETag is not the MD5 of the
        object (and Ceph 16 answers an empty one), so the registry names
        blobs by their own digest, never by it.
        """
        if self.done:
            raise ValueError(f"{self.key} was already committed or aborted")
        if key is not None and self.multipart:
            raise ValueError(f"{self.key} is a multipart upload: it cannot be renamed")
        try:
            if self._upload_id is None:
                del self._part[self._filled :]
                with _storage_errors(f"put of {key or self.key}"):
                    reply = self._client.put_object(
                        Bucket=self._bucket.bucket, Key=key or self.key,
                        Body=cast(bytes, self._part),
                    )  # fmt: skip
                etag = reply["ETag"]
            else:
                self._wait_sent()
                if self._filled:
                    del self._part[self._filled :]  # the last, short part
                    self._number += 1
                    self._send(self._part, self._number)
                parts = sorted(self._parts, key=lambda part: part["PartNumber"])
                with _storage_errors(f"commit of {self.key}"):
                    completed = self._client.complete_multipart_upload(
                        Bucket=self._bucket.bucket,
                        Key=self.key,
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": parts},
                    )
                etag = completed["ETag"]
        finally:
            self._stop_sender()
        self.done = True
        self._part = bytearray()
        self._spare = []
        return etag

    def abort(self) -> None:
        """Drop what was written: S3 deletes the parts sent so far (they are billed
        until then).  Idempotent, and a no-op after :meth:`commit`."""
        if self.done:
            return
        self.done = True
        while self._sending:
            with contextlib.suppress(StorageError):  # a failed part is dropped with the rest
                self._sending.popleft().result()
        self._stop_sender()
        self._part = bytearray()
        self._spare = []
        if self._upload_id is None:
            return
        with _storage_errors(f"abort of the upload of {self.key}"):
            self._client.abort_multipart_upload(
                Bucket=self._bucket.bucket, Key=self.key, UploadId=self._upload_id
            )


@contextlib.contextmanager
def _open_stream(bucket: S3Bucket, key: str) -> Iterator[S3StreamWriter]:
    writer = S3StreamWriter(bucket, key)
    try:
        yield writer
    finally:
        writer.abort()
