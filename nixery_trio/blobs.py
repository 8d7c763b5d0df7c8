"""Serving blobs from the CAS: whole, as one byte range, or just the headers.

Blobs stream straight from their CAS file in large ``pread`` calls in worker
threads; the file is opened when the body starts and closed when it ends or
the client goes away, so a dropped download frees its descriptor at once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import trio
from quart import Response
from quart.wrappers.response import ResponseBody

from .cas import CAS
from .errors import BlobUnknown
from .httprange import parse_range

#: Bytes read from a blob file per worker-thread hop.  Every chunk costs a
#: thread hop and a trip through Quart, Hypercorn and h11, so bigger is
#: cheaper, up to the mmap threshold the server pins (``cli.MMAP_THRESHOLD``,
#: 1 MiB): a chunk above it, and Hypercorn's copy of it, become fresh
#: mappings whose pages fault in.  Just under it, one stream moved 0.90 GB/s
#: and 16 streams 1.32 GB/s here, against 0.77 and 1.09 with 4 MiB chunks.
BLOB_READ_SIZE = 1020 << 10


class BlobBody(ResponseBody):
    """A byte range of a CAS file, read in large chunks off the event loop."""

    def __init__(self, path: str, first: int, length: int) -> None:
        self.path = path
        self.first = first
        self.length = length
        self._fd: int | None = None

    async def __aenter__(self) -> BlobBody:
        self._fd = await trio.to_thread.run_sync(os.open, self.path, os.O_RDONLY)
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
    """The response for a blob GET or HEAD, whole or one range."""
    path = str(cas.path(digest))
    try:
        size = (await trio.Path(path).stat()).st_size
    except FileNotFoundError:
        raise BlobUnknown(f"blob {digest} is not in this registry", {"digest": digest}) from None
    headers: dict[str, Any] = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }
    status, first, length = 200, 0, size
    if range_header is not None:
        first, last = parse_range(range_header, size)
        status, length = 206, last - first + 1
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    if head or length == 0:
        response = Response(b"", status=status)
    else:
        response = Response(BlobBody(path, first, length), status=status)
    response.headers.update(headers)
    response.headers["Content-Length"] = str(length)
    return response
