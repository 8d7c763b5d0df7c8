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

Blobs are served by ``blobs.py``.
"""

from __future__ import annotations

import json
import re

from quart import Response, request
from quart_trio import QuartTrio

from . import __version__, logs
from .blobs import blob_response
from .builder import Builder, Manifest
from .digest import parse_digest
from .errors import (
    BadRequest,
    NameInvalid,
    NotFound,
    RegistryError,
    Unsupported,
)
from .version import source_version

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ENDPOINT = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)


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
            digest = parse_digest(reference)
            return await blob_response(builder.cas, digest, head, request.headers.get("Range"))
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
