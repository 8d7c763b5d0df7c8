"""The registry's HTTP face: the read-only part of the OCI distribution API.

Routes (everything under ``/v2/``)::

    GET  /v2/                              API version check
    GET|HEAD /v2/<name>/manifests/<tag>    build if needed, then serve
    GET|HEAD /v2/<name>/manifests/<digest> a stored manifest
    GET|HEAD /v2/<name>/blobs/<digest>     config and layers, with Range
    GET|HEAD /v2/<name>/tags/list          ["latest"]: any name builds on demand

Quart's URL routing only splits off ``/v2/``; the rest is parsed here,
because a repository name may hold any number of slashes and every bad
input must get the registry's own error, not a framework page.  Every
failure becomes ``{"errors": [{"code", "message", "detail"}]}`` in
:func:`error_response`, the one place that maps exceptions to statuses.

Blobs stream straight from their CAS file in large ``pread`` calls in worker
threads; the file is opened when the body starts and closed when it ends or
the client goes away, so a dropped download frees its descriptor at once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import trio
from quart import Response, request
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio

from . import __version__, logs
from .builder import Builder, Manifest
from .digest import parse_digest
from .errors import (
    BadRequest,
    BlobUnknown,
    NameInvalid,
    NotFound,
    RegistryError,
    Unsupported,
)
from .httprange import parse_range
from .version import source_version

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Bytes read from a blob file per worker-thread hop.
BLOB_READ_SIZE = 1 << 20
_ENDPOINT = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


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


def error_response(exc: RegistryError, extra_headers: dict[str, str] | None = None) -> Response:
    """The registry JSON error for ``exc``, with its status."""
    body = json.dumps({"errors": [exc.to_json()]}).encode()
    response = Response(body, status=exc.status, content_type="application/json")
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    for key, value in (extra_headers or {}).items():
        response.headers[key] = value
    return response


def _manifest_response(manifest: Manifest, head: bool) -> Response:
    response = Response(b"" if head else manifest.data, status=200)
    response.headers["Content-Type"] = manifest.media_type
    response.headers["Content-Length"] = str(len(manifest.data))
    response.headers["Docker-Content-Digest"] = manifest.digest
    response.headers["ETag"] = f'"{manifest.digest}"'
    return response


def create_app(builder: Builder) -> QuartTrio:
    """The Quart-Trio application serving ``builder``'s images."""
    app = QuartTrio("nixery_trio")
    server_header = f"nixery-trio/{__version__}+{source_version(builder.config.nix_dir)}"
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=10, MAX_CONTENT_LENGTH=0)

    @app.errorhandler(RegistryError)
    async def registry_error(exc: RegistryError) -> Response:
        extra = {"Allow": "GET, HEAD"} if isinstance(exc, Unsupported) else None
        if isinstance(exc.detail, dict) and "size" in exc.detail and exc.status == 416:
            extra = {"Content-Range": f"bytes */{exc.detail['size']}"}
        return error_response(exc, extra)

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        status = getattr(exc, "code", None)
        if isinstance(status, int) and 400 <= status < 500:  # werkzeug HTTP errors
            return error_response(_http_error(status, exc))
        logs.error("request.failed", path=request.path, error=repr(exc), exc_info=True)
        failure = RegistryError(
            f"internal error: {type(exc).__name__}: {exc}", {"type": type(exc).__name__}
        )
        return error_response(failure)

    @app.route("/v2/", methods=ALL_METHODS)
    @app.route("/v2/<path:rest>", methods=ALL_METHODS)
    async def v2(rest: str = "") -> Response:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(
                f"method {request.method} is not supported: this registry is read-only"
            )
        raw_path = request.scope.get("raw_path", b"").decode("latin-1")
        if _ENCODED_SEPARATOR.search(raw_path):
            raise NameInvalid("encoded '/', '\\' or NUL characters are not allowed in paths")
        if rest == "":
            response = Response(b"{}", status=200, content_type="application/json")
            response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
            return response
        if rest.endswith("/tags/list"):
            return _tags(builder, rest.removesuffix("/tags/list"))
        match = _ENDPOINT.fullmatch(rest)
        if match is None:
            raise NotFound(f"/v2/{rest[:200]} is not an endpoint of this registry")
        name, kind, reference = match.group("name", "kind", "reference")
        head = request.method == "HEAD"
        if kind == "blobs":
            builder.parse(name, "latest")
            return await _blob(builder, parse_digest(reference), head)
        if ":" in reference:
            builder.parse(name, "latest")
            manifest = await builder.manifest_for_digest(parse_digest(reference))
        else:
            manifest = await builder.manifest_for_tag(name, reference)
        return _manifest_response(manifest, head)

    @app.route("/", methods=ALL_METHODS)
    @app.route("/<path:rest>", methods=ALL_METHODS)
    async def elsewhere(rest: str = "") -> Response:
        raise NotFound(f"/{rest[:200]} is not part of the registry API (see /v2/)")

    @app.after_request
    async def headers(response: Response) -> Response:
        response.headers.setdefault(API_VERSION_HEADER[0], API_VERSION_HEADER[1])
        response.headers.setdefault("Server", server_header)
        return response

    return app


def _http_error(status: int, exc: Exception) -> RegistryError:
    if status == 405:
        return Unsupported(str(exc))
    if status == 404:
        return NotFound(str(exc))
    return BadRequest(f"bad request: {exc}")


def _tags(builder: Builder, name: str) -> Response:
    """Every name can be built as ``latest``; other tags depend on the source."""
    builder.parse(name, "latest")
    body = json.dumps({"name": name, "tags": ["latest"]}).encode()
    return Response(body, status=200, content_type="application/json")


async def _blob(builder: Builder, digest: str, head: bool) -> Response:
    path = str(builder.cas.path(digest))
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
    range_header = request.headers.get("Range")
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
