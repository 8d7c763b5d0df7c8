"""Serving blobs: whole, as one byte range, or just the headers.

From the filesystem store, two ways to send the bytes, chosen per request:

* **sendfile** (:func:`send_blob`), when the server offers the ASGI
  ``http.response.zerocopysend`` extension (our Hypercorn, HTTP/1.1, see
  ``httpserver.py``): the kernel copies page-cache pages to the socket and
  the bytes never enter Python.  The blob's descriptor is opened once, in one
  worker-thread hop that also takes its size.  A piece not in the page cache
  is read in on a worker thread before it is sent, so that sendfile does not
  wait for the disk on the event loop (``pagecache.py``).
* **large reads** (:class:`BlobBody`, through Quart) otherwise: ``pread``
  calls in worker threads, each chunk handed to the server as bytes.

Either way the file is opened when the body starts and closed when it ends
or the client goes away, so a dropped download frees its descriptor at once.

From an S3 bucket (:func:`send_bucket_blob`), a GET is a ``307`` to a
presigned URL of the blob (the client sends its ``Range`` there), so the
bytes go from the bucket to the client; with presigning off, the registry
reads the blob from the bucket a chunk at a time and sends it on.  A HEAD is
answered by the registry either way, from the blob's size.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio
from quart import Response
from quart.wrappers.response import ResponseBody

from ..core.errors import BlobUnknown
from ..core.httprange import parse_range
from ..store.cas import CAS
from ..store.s3store import S3Store
from . import pagecache
from .httpserver import ZEROCOPYSEND

#: Bytes read from a blob file per worker-thread hop when sendfile is not
#: offered.  Every chunk costs a thread hop and a trip through Quart,
#: Hypercorn and h11, so bigger is cheaper, up to the mmap threshold the
#: server pins (``cli.MMAP_THRESHOLD``, 1 MiB): a chunk above it, and
#: Hypercorn's copy of it, become fresh mappings whose pages fault in.
BLOB_READ_SIZE = 1020 << 10
#: Bytes per ``zerocopysend`` message.  Each is one shielded sendfile loop in
#: the server, so this bounds how long a cancellation (shutdown, a timeout)
#: waits on a client that reads slowly; the per-message cost is negligible.
SENDFILE_PIECE = 8 << 20


@dataclass(frozen=True)
class BlobReply:
    """What a blob request gets: status, headers, and the byte range sent."""

    status: int
    headers: list[tuple[str, str]]
    first: int
    length: int


def plan_reply(digest: str, size: int, range_header: str | None) -> BlobReply:
    """The reply to a blob request, from the blob's size (pure).

    Raises :class:`~nixery_trio.core.errors.RangeNotSatisfiable` for a bad range.
    """
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", digest),
        ("ETag", f'"{digest}"'),
        ("Accept-Ranges", "bytes"),
        ("Cache-Control", "max-age=31536000"),
    ]
    status, first, length = 200, 0, size
    if range_header is not None:
        first, last = parse_range(range_header, size)
        status, length = 206, last - first + 1
        headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
    headers.append(("Content-Length", str(length)))
    return BlobReply(status, headers, first, length)


def _unknown(digest: str) -> BlobUnknown:
    return BlobUnknown(f"blob {digest} is not in this registry", {"digest": digest})


def _open_blob(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


async def send_blob(
    cas: CAS,
    digest: str,
    head: bool,
    range_header: str | None,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    extra_headers: list[tuple[bytes, bytes]],
) -> None:
    """Answer a blob request on ASGI ``send`` with ``zerocopysend``.

    Raises a :class:`~nixery_trio.core.errors.RegistryError` (unknown blob, bad
    range) before anything is sent, so the caller can answer it instead.
    """
    try:
        fd, size = await trio.to_thread.run_sync(_open_blob, str(cas.path(digest)))
    except FileNotFoundError:
        raise _unknown(digest) from None
    try:
        reply = plan_reply(digest, size, range_header)
        headers = [(k.encode(), v.encode()) for k, v in reply.headers] + extra_headers
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if head or reply.length == 0:
            await send({"type": "http.response.body", "body": b""})
            return
        offset, end = reply.first, reply.first + reply.length
        while offset < end:
            count = min(SENDFILE_PIECE, end - offset)
            if not pagecache.resident(fd, offset, count):
                await trio.to_thread.run_sync(pagecache.read_in, fd, offset, count)
            await send({"type": ZEROCOPYSEND, "file": fd, "offset": offset, "count": count,
                        "more_body": offset + count < end})  # fmt: skip
            offset += count
    finally:
        os.close(fd)


async def send_bucket_blob(
    store: S3Store,
    digest: str,
    head: bool,
    range_header: str | None,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    extra_headers: list[tuple[bytes, bytes]],
    presign_seconds: int | None,
) -> None:
    """Answer a blob request from the bucket on ASGI ``send``: a redirect to a
    URL valid for ``presign_seconds``, or (``None``) the bytes, proxied.

    Raises a :class:`~nixery_trio.core.errors.RegistryError` (unknown blob, bad
    range) before anything is sent.
    """
    size = store.known_size(digest)
    if size is None:
        size = await trio.to_thread.run_sync(store.size, digest)
    if size is None:
        raise _unknown(digest)
    if presign_seconds is not None and not head:
        url = await trio.to_thread.run_sync(store.presigned, digest, presign_seconds)
        headers = [(b"Location", url.encode()), (b"Docker-Content-Digest", digest.encode()),
                   (b"Content-Length", b"0")]  # fmt: skip
        await send({"type": "http.response.start", "status": 307,
                    "headers": headers + extra_headers})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
        return
    reply = plan_reply(digest, size, range_header)
    headers = [(k.encode(), v.encode()) for k, v in reply.headers] + extra_headers
    if head or reply.length == 0:
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    chunks = store.stream(digest, reply.first, reply.first + reply.length - 1)
    try:
        chunk = await trio.to_thread.run_sync(next, chunks, b"")
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        while chunk:
            following = await trio.to_thread.run_sync(next, chunks, b"")
            await send({"type": "http.response.body", "body": chunk, "more_body": bool(following)})
            chunk = following
    finally:
        await trio.to_thread.run_sync(chunks.close)


class BlobBody(ResponseBody):
    """A byte range of a CAS file, read in large chunks off the event loop."""

    def __init__(self, path: str, first: int, length: int) -> None:
        self.path = path
        self.first = first
        self.length = length
        self._fd: int | None = None

    async def __aenter__(self) -> BlobBody:
        self._fd = await trio.to_thread.run_sync(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self

    async def __aexit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._fd is not None, "BlobBody iterated outside its context"
        fd, offset, remaining = self._fd, self.first, self.length
        while remaining > 0:
            chunk = await trio.to_thread.run_sync(
                os.pread, fd, min(BLOB_READ_SIZE, remaining), offset
            )
            if not chunk:
                raise OSError(f"{self.path} ended {remaining} bytes early")
            offset += len(chunk)
            remaining -= len(chunk)
            yield chunk

    async def make_conditional(self, begin: int, end: int | None) -> int:
        raise NotImplementedError("ranges are handled by the registry itself")


async def blob_response(cas: CAS, digest: str, head: bool, range_header: str | None) -> Response:
    """The Quart response for a blob GET or HEAD, whole or one range."""
    path = str(cas.path(digest))
    try:
        size = (await trio.Path(path).stat()).st_size
    except FileNotFoundError:
        raise _unknown(digest) from None
    reply = plan_reply(digest, size, range_header)
    if head or reply.length == 0:
        response = Response(b"", status=reply.status)
    else:
        response = Response(BlobBody(path, reply.first, reply.length), status=reply.status)
    for key, value in reply.headers:
        response.headers[key] = value
    return response
