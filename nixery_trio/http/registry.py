"""The registry's HTTP face: the read-only part of the OCI distribution API.

Routes (everything under ``/v2/``)::

    GET  /v2/                              API version check
    GET|HEAD /v2/_catalog                  the repositories built into the store, by pages
    GET|HEAD /v2/<name>/manifests/<tag>    build if needed, then serve (OCI or Docker)
    GET|HEAD /v2/<name>/manifests/<digest> a stored manifest
    GET|HEAD /v2/<name>/blobs/<digest>     config and layers, with Range
    GET|HEAD /v2/<name>/tags/list          the source's tags (any name builds), or an
                                           offline mirror's for that name, by pages
    GET|HEAD /v2/<name>/referrers/<digest> an empty OCI index: nothing refers to anything

Beside them, ``/`` is the web page and ``/status.json`` what it shows
(``web.py``), and ``/metrics`` every worker's metrics (``metrics.py``).

Quart's URL routing only splits off ``/v2/``; the rest is parsed here,
because a repository name may hold any number of slashes and every bad
input must get the registry's own error, not a framework page.  Every
failure becomes ``{"errors": [{"code", "message", "detail"}]}`` in
:func:`error_response`, the one place that maps exceptions to statuses.

Blobs are served by ``blobs.py``.  :class:`FastLane` answers the requests
of every pull (manifests, and blobs by sendfile) before Quart sees them, with
the same bytes and the same JSON errors.
"""

from __future__ import annotations

import errno
import json
from typing import Any
from urllib.parse import urlencode

import trio
from quart import Response, request
from quart_trio import QuartTrio

from .. import __version__, logs, metrics
from ..build.builder import REQUESTER, Builder, ImageManifests, Manifest
from ..build.sources import LATEST, PathSource
from ..core.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    RegistryError,
    StorageError,
    Unauthorized,
    Unsupported,
)
from ..core.manifest import OCI_INDEX, acceptable
from ..core.routes import Kind, Route, page, parse_route
from ..store.cas import CAS
from ..store.s3store import S3Store
from ..version import source_version
from . import web
from .access import BasicAuth, requester
from .blobs import blob_response, send_blob, send_bucket_blob
from .httpserver import ZEROCOPYSEND

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
#: Registry clients send a few hundred bytes of headers; refuse the absurd.
MAX_HEADER_BYTES = 32 * 1024
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def error_body(exc: RegistryError, package_set: str | None) -> bytes:
    """The registry JSON error document for ``exc``, without host paths (but
    relative ones inside ``package_set``, see ``errors.public_text``)."""
    return json.dumps({"errors": [exc.public_json(package_set)]}).encode()


def internal_error(exc: Exception, path: str) -> RegistryError:
    """Log an unexpected failure of a request; the error the client gets for it.

    Out of space (or quota) anywhere in it is the store's disk: ``STORAGE_ERROR``.
    """
    logs.error("request.failed", path=path, error=repr(exc), exc_info=True)
    full = _disk_full(exc)
    if full is not None:
        return StorageError(f"the store's disk is full: {full}", {"errno": full.errno})
    return InternalError(
        f"internal error: {type(exc).__name__}: {exc}", {"type": type(exc).__name__}
    )


def _disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space error in ``exc``, its groups or its causes, if any."""
    pending: list[BaseException | None] = [exc]
    while pending:
        found = pending.pop()
        if isinstance(found, OSError) and found.errno in (errno.ENOSPC, errno.EDQUOT):
            return found
        if isinstance(found, BaseExceptionGroup):
            pending.extend(found.exceptions)
        if found is not None:
            pending.append(found.__cause__)
    return None


def error_response(exc: RegistryError, package_set: str | None) -> Response:
    """The registry JSON error for ``exc``, with its status and headers."""
    response = Response(
        error_body(exc, package_set), status=exc.status, content_type="application/json"
    )
    response.headers[API_VERSION_HEADER[0]] = API_VERSION_HEADER[1]
    for key, value in exc.headers().items():
        response.headers[key] = value
    return response


def manifest_headers(manifest: Manifest) -> list[tuple[str, str]]:
    """The headers of a manifest response (GET and HEAD alike)."""
    return [
        ("Content-Type", manifest.media_type),
        ("Content-Length", str(len(manifest.data))),
        ("Docker-Content-Digest", manifest.digest),
        ("ETag", f'"{manifest.digest}"'),
        ("Vary", "Accept"),
    ]


def _manifest_response(manifest: Manifest, head: bool) -> Response:
    response = Response(b"" if head else manifest.data, status=200)
    for key, value in manifest_headers(manifest):
        response.headers[key] = value
    return response


class FastLane:
    """ASGI front of the Quart app for the requests of every pull.

    * Manifest GETs and HEADs, by tag or digest: a warm one is answered from
      memory at once (:meth:`Builder.recent_manifest`,
      :meth:`Builder.recent_by_digest`), and fleets of clients repeat it; the
      others wait for the builder here, and a client that goes away stops
      only its own wait, as in Quart.  Quart's request and response objects
      would cost more than a warm lookup.
    * Blob GETs and HEADs, when the server offers sendfile (the
      ``http.response.zerocopysend`` extension, see ``httpserver.py``) and
      ``NIXERY_BLOB_SENDFILE`` allows it.

    In front of both, with ``--htpasswd``, the credentials of every request
    are checked (``access.py``), and whom it counts against for
    ``--cold-builds-per-minute`` is set (``builder.REQUESTER``).

    Everything else goes to the Quart app, including every request whose
    path or headers need its checks, and blob errors (an unknown blob, a bad
    range), which Quart answers as usual.
    """

    def __init__(self, app: QuartTrio, builder: Builder, server_header: str) -> None:
        self.app = app
        self.builder = builder
        htpasswd = builder.config.htpasswd
        self.auth = BasicAuth(htpasswd) if htpasswd is not None else None
        self.sendfile = builder.config.blob_sendfile
        s3 = builder.config.s3
        self.presign_seconds = s3.presign_seconds if s3 and s3.presigned_urls else None
        # Where blobs come from, decided once: files to sendfile, or a bucket.
        store = builder.store
        self.files = store if isinstance(store, CAS) else None
        self.bucket = store if isinstance(store, S3Store) else None
        self.package_set = package_set_path(builder)
        self._common = [
            (API_VERSION_HEADER[0].encode(), API_VERSION_HEADER[1].encode()),
            (b"Server", server_header.encode()),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Parsed once: the fast lane's route is also the requests' metrics label.
        route = self._route(scope) if scope["method"] in ("GET", "HEAD") else None
        counted = _Counted(send)
        try:
            await self._serve(route, scope, receive, counted)
        finally:
            label = metrics.route_label(scope["path"]) if route is None else route.kind.value
            metrics.METRICS.request(label, counted.status, counted.sent)

    async def _serve(self, route: Route | None, scope: Any, receive: Any, send: Any) -> None:
        user = None
        if self.auth is not None:
            try:
                user = await self.auth.user(scope)
            except Unauthorized as exc:
                await self._send_error(exc, send)
                return
        who = REQUESTER.set(requester(scope, user))
        try:
            if route is not None and await self._answer(route, scope, receive, send):
                return
            await self.app(scope, receive, send)
        finally:
            REQUESTER.reset(who)

    async def _answer(self, route: Route, scope: Any, receive: Any, send: Any) -> bool:
        head = scope["method"] == "HEAD"
        if route.kind is Kind.BLOB:
            range_header = _header(scope, b"range")
            if self.bucket is not None:
                try:
                    await send_bucket_blob(self.bucket, route.reference, head, range_header,
                                           send, self._common, self.presign_seconds)  # fmt: skip
                except RegistryError as exc:
                    await self._send_error(exc, send)
                return True
            if self.files is None or not self.sendfile or ZEROCOPYSEND not in scope["extensions"]:
                return False
            try:
                await send_blob(self.files, route.reference, head, range_header, send,
                                self._common)  # fmt: skip
            except RegistryError:
                return False  # nothing sent yet: Quart answers the error
            return True
        if route.kind is not Kind.MANIFEST:
            return False
        found: ImageManifests | Manifest | None
        if route.by_digest:
            found = self.builder.recent_by_digest(route.reference)
        else:
            found = self.builder.recent_manifest(route.name, route.reference)
        if found is None:
            answer = await self._wait_for_manifest(route, scope, receive)
            if answer is None:
                return True  # the client went away
            if isinstance(answer, RegistryError):
                await self._send_error(answer, send)
                return True
            found = answer
        try:
            manifest = negotiated(found, _header(scope, b"accept"), self.builder.config.oci)
        except RegistryError as exc:
            await self._send_error(exc, send)
            return True
        headers = [(k.encode(), v.encode()) for k, v in manifest_headers(manifest)]
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers + self._common})  # fmt: skip
        await send({"type": "http.response.body", "body": b"" if head else manifest.data})
        return True

    async def _send_error(self, error: RegistryError, send: Any) -> None:
        body = error_body(error, self.package_set)
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            *((k.encode(), v.encode()) for k, v in error.headers().items()),
            *self._common,
        ]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _wait_for_manifest(
        self, route: Route, scope: Any, receive: Any
    ) -> ImageManifests | Manifest | RegistryError | None:
        """The manifests or the error to answer; ``None`` if the client left first."""
        answer: ImageManifests | Manifest | RegistryError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                if route.by_digest:
                    answer = await self.builder.manifest_for_digest(route.reference)
                else:
                    answer = await self.builder.manifest_for_tag(route.name, route.reference)
            except RegistryError as exc:
                answer = exc
            except Exception as exc:
                answer = internal_error(exc, scope["path"])
            nursery.cancel_scope.cancel()
        return answer

    @staticmethod
    def _route(scope: Any) -> Route | None:
        path: str = scope["path"]
        if not path.startswith("/v2/") or b"%" in scope.get("raw_path", b"%"):
            return None
        if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            return None  # the app refuses it
        try:
            return parse_route(path[4:])
        except RegistryError:
            return None


class _Counted:
    """ASGI ``send`` that notes a response's status and body bytes, for metrics."""

    __slots__ = ("send", "sent", "status")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.status = 0  # no response (the client left first)
        self.sent = 0

    async def __call__(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind == ZEROCOPYSEND:
            self.sent += message.get("count") or 0
        elif kind == "http.response.start":
            self.status = message["status"]
        await self.send(message)


async def _cancel_on_disconnect(receive: Any, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _header(scope: Any, name: bytes) -> str | None:
    """A request header, its lines joined with commas (clients send Accept in
    one line or in several)."""
    values = [value.decode("latin-1") for key, value in scope["headers"] if key.lower() == name]
    return ", ".join(values) if values else None


def negotiated(found: ImageManifests | Manifest, accept: str | None, oci: bool) -> Manifest:
    """What to answer a manifest request with: for a tag, the format (and, for
    several platforms, the index) the client prefers (``ImageManifests.pick``),
    or Docker's without ``oci``; for a digest, the document as stored, if the
    client takes its type."""
    if isinstance(found, ImageManifests):
        return found.pick(accept, oci)
    if not acceptable(accept, found.media_type):
        raise ManifestUnknown(
            f"manifest {found.digest} is a {found.media_type}, which this request's "
            "Accept header does not take",
            {"mediaType": found.media_type},
        )
    return found


def create_app(builder: Builder) -> FastLane:
    """The Quart-Trio application serving ``builder``'s images."""
    app = QuartTrio("nixery_trio")
    server_header = f"nixery-trio/{__version__}+{source_version(builder.config.nix_dir)}"
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=10, MAX_CONTENT_LENGTH=0)
    package_set = package_set_path(builder)

    @app.errorhandler(RegistryError)
    async def registry_error(exc: RegistryError) -> Response:
        return error_response(exc, package_set)

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        status = getattr(exc, "code", None)
        if isinstance(status, int) and 400 <= status < 500:  # werkzeug HTTP errors
            return error_response(_http_error(status, exc), package_set)
        return error_response(internal_error(exc, request.path), package_set)

    # /v2 is answered as /v2/, not redirected: Quart's redirect would echo
    # the client's Host header into its Location.
    @app.route("/v2", methods=ALL_METHODS)
    @app.route("/v2/", methods=ALL_METHODS)
    @app.route("/v2/<path:rest>", methods=ALL_METHODS)
    async def v2(rest: str = "") -> Response:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(
                f"method {request.method} is not supported: this registry is read-only"
            )
        header_bytes = sum(len(k) + len(v) for k, v in request.scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge(
                f"request headers of {header_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"
            )
        raw_path = request.scope.get("raw_path", b"").decode("latin-1")
        route = parse_route(rest, raw_path)
        head = request.method == "HEAD"
        if route.kind is Kind.BASE:
            return Response(b"{}", status=200, content_type="application/json")
        if route.kind is Kind.TAGS:
            tags = await builder.tags_of(route.name)
            if builder.config.offline and not tags:
                raise NameUnknown(f"this mirror holds no image {route.name}", {"name": route.name})
            tags = tags or [LATEST]
            return _listing({"name": route.name}, "tags", tags, f"/v2/{route.name}/tags/list")
        if route.kind is Kind.CATALOG:
            return _listing({}, "repositories", await builder.catalog(), "/v2/_catalog")
        if route.kind is Kind.REFERRERS:
            return _referrers(request.args.get("artifactType"))
        if route.kind is Kind.BLOB:
            range_header = request.headers.get("Range")
            # FastLane answers every blob GET and HEAD of a bucket itself.
            assert isinstance(builder.store, CAS), "bucket blobs are FastLane's"
            return await blob_response(builder.store, route.reference, head, range_header)
        found: ImageManifests | Manifest
        if route.by_digest:
            found = await builder.manifest_for_digest(route.reference)
        else:
            found = await builder.manifest_for_tag(route.name, route.reference)
        accept = _header(request.scope, b"accept")
        return _manifest_response(negotiated(found, accept, builder.config.oci), head)

    web.mount(app, builder, package_set)  # / and /status.json
    store = metrics.StoreCollector(builder.store)

    @app.route("/metrics", methods=["GET", "HEAD"])
    async def prometheus() -> Response:
        """Every worker's metrics, in Prometheus' text format."""
        body = await trio.to_thread.run_sync(metrics.render, store)
        return Response(body, content_type=metrics.CONTENT_TYPE)

    @app.route("/<path:rest>", methods=ALL_METHODS)
    async def elsewhere(rest: str = "") -> Response:
        raise NotFound(f"/{rest[:200]} is not part of the registry API (see /v2/)")

    @app.after_request
    async def headers(response: Response) -> Response:
        response.headers.setdefault(API_VERSION_HEADER[0], API_VERSION_HEADER[1])
        response.headers.setdefault("Server", server_header)
        return response

    return FastLane(app, builder, server_header)


def package_set_path(builder: Builder) -> str | None:
    """The local package set's directory, which errors may name relative to it."""
    source = builder.config.source
    return str(source.path) if isinstance(source, PathSource) else None


def _http_error(status: int, exc: Exception) -> RegistryError:
    if status == 405:
        return Unsupported(str(exc))
    if status == 404:
        return NotFound(str(exc))
    return BadRequest(f"bad request: {exc}")


def _listing(document: dict[str, Any], key: str, entries: list[str], path: str) -> Response:
    """A page of ``entries`` under ``key``, after the request's ``last``, at most its
    ``n``, with a ``Link`` to the next page when there is one (the distribution spec's)."""
    chosen = page(entries, request.args.get("n"), request.args.get("last"))
    body = json.dumps({**document, key: chosen.entries}).encode()
    response = Response(body, status=200, content_type="application/json")
    if chosen.next_last is not None:
        query = urlencode({"n": chosen.n, "last": chosen.next_last})
        response.headers["Link"] = f'<{path}?{query}>; rel="next"'
    return response


def _referrers(artifact_type: str | None) -> Response:
    """No manifest here refers to another (no signatures, no SBOMs): an empty index.

    A filter by ``artifactType`` is applied, to nothing, and says so.
    """
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    response = Response(body, status=200, content_type=OCI_INDEX)
    if artifact_type is not None:
        response.headers["OCI-Filters-Applied"] = "artifactType"
    return response
