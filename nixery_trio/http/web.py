"""The web page at ``/``: what this registry is, how to pull from it, and what it is doing.

Routes::

    GET|HEAD /              the page (HTML, server-rendered)
    GET|HEAD /status.json   what the page shows, as JSON (the page polls it)

The page says how to pull from this registry by its own address, which
package source it builds from, the builds in progress in every worker (from
the store's activity board, ``store/activity.py``), recent builds and
failures, and what the store holds.  It is rendered by Jinja2 with
autoescaping on: image names, error messages and the request's ``Host``
are text, never markup.  It works without JavaScript; a small script only
polls ``/status.json`` every second and fills the tables in with
``textContent``, from rows the server formatted (:func:`view`), so the page
and its updates show the same cells.

The address comes from the request's ``Host`` header only when it is a
plain ``host[:port]`` (:func:`pull_host`), else from the socket the request
came in on.  What the page reads from disk is read in worker threads and
shared by the requests of the next moment: the board for
:data:`BOARD_SECONDS`, the store's images and size for :data:`STORE_SECONDS`.
Nothing here runs for a pull.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio
from jinja2 import Environment, PackageLoader, select_autoescape
from quart import Response, request
from quart_trio import QuartTrio

from .. import __version__
from ..build.builder import Builder
from ..build.sources import PathSource, Source
from ..store.activity import Activity, ActivityBoard, Snapshot, read_board
from ..store.inventory import HeldImage, blob_uses, held_images

T = TypeVar("T")

#: Seconds the board, and the store's images and size, are reused.
BOARD_SECONDS = 0.5
STORE_SECONDS = 3.0
#: Milliseconds between two polls of the page's script.
POLL_MS = 1000
#: Ended builds and failures the page shows.
SHOWN = 20
#: A ``Host`` header the page may repeat: a DNS name or IPv4 address, or an
#: IPv6 address in brackets, and an optional port.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::(\d{{1,5}}))?")

_templates = Environment(
    loader=PackageLoader("nixery_trio.http", "templates"),
    autoescape=select_autoescape(["html"], default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def pull_host(host_header: str | None, server: tuple[str, int | None] | None) -> str:
    """The address clients pull from: the ``Host`` header if it is a plain
    ``host[:port]`` (at most 255 characters, a port up to 65535), else the
    address the request came in on."""
    if host_header is not None and len(host_header) <= 255:
        match = HOST.fullmatch(host_header)
        if match is not None and (match.group(1) is None or int(match.group(1)) <= 65535):
            return host_header.lower()
    if server is None:
        return "localhost"
    host = f"[{server[0]}]" if ":" in server[0] else server[0]
    return host if server[1] is None else f"{host}:{server[1]}"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when else "-"


def _name(activity: Activity) -> str:
    return f"{activity.image}:{activity.tag}"


def _layers(activity: Activity) -> str:
    if not activity.layers_total:
        return "-"
    return f"{activity.layers_written + activity.layers_cached} of {activity.layers_total}" + (
        f" ({activity.layers_cached} cached)" if activity.layers_cached else ""
    )


@dataclass(frozen=True)
class Store:
    """What the store holds, as last read."""

    images: list[HeldImage]
    size: int


def view(board: Snapshot, store: Store, now: float) -> dict[str, Any]:
    """The page's tables as rows of text (the template and the script show
    these), and its one-line summaries."""
    return {
        "rows": {
            "building": [
                [_name(a), a.platform, a.phase, _layers(a), megabytes(a.bytes),
                 f"{max(0.0, now - a.started):.0f} s"]
                for a in board.building
            ],
            "built": [
                [_name(a), a.platform, utc(a.updated), str(a.layers_written),
                 str(a.layers_cached), megabytes(a.bytes), f"{a.updated - a.started:.1f} s"]
                for a in board.built
            ],
            "failed": [
                [_name(a), a.platform, utc(a.updated), a.code, a.message] for a in board.failed
            ],
            "images": [
                [f"{i.name}:{i.tag}", ", ".join(i.platforms), megabytes(i.size),
                 utc(i.created), utc(i.last_pulled)]
                for i in store.images
            ],
        },
        "summary": {
            "store": f"{len(store.images)} image{'s' * (len(store.images) != 1)}, "
            f"{megabytes(store.size)} of blobs",
            "updated": utc(now),
        },
    }


def status_document(
    host: str, source: Source, key: str | None, board: Snapshot, store: Store, now: float
) -> dict[str, Any]:
    """What ``/status.json`` answers, and what the page is rendered from."""
    return {
        "registry": {"host": host, "version": __version__},
        "source": {"description": source.describe(), "facts": source.facts(key)},
        "building": [a.public_json() for a in board.building],
        "built": [a.public_json() for a in board.built],
        "failed": [a.public_json() for a in board.failed],
        "store": {"size": store.size, "images": [dataclasses.asdict(i) for i in store.images]},
        **view(board, store, now),
    }


def render_page(status: dict[str, Any], nonce: str) -> str:
    """The page's HTML (autoescaped) for a :func:`status_document`; its
    script carries ``nonce`` (the Content-Security-Policy allows no other)."""
    return _templates.get_template("index.html").render(status, nonce=nonce, poll_ms=POLL_MS)


class Memo(Generic[T]):
    """A value read by ``load`` (a coroutine) at most every ``seconds``; one
    reader at a time, the others wait for its result."""

    def __init__(self, load: Callable[[], Awaitable[T]], seconds: float) -> None:
        self._load = load
        self._seconds = seconds
        self._value: tuple[T, float] | None = None
        self._lock = trio.Lock()

    async def get(self) -> T:
        async with self._lock:
            now = trio.current_time()
            if self._value is None or now - self._value[1] >= self._seconds:
                self._value = (await self._load(), now)
            return self._value[0]


def mount(app: QuartTrio, builder: Builder, package_set: str | None) -> None:
    """Serve the page and its status on ``app``, and keep ``builder``'s builds
    on the store's activity board (written while ``app`` serves)."""
    root = builder.config.storage_path
    board = ActivityBoard(root, package_set)
    builder.progress_hooks.append(board.report)
    writing = trio.CancelScope()

    async def write_board() -> None:
        with writing:
            await board.run()

    @app.before_serving
    async def start_board() -> None:
        app.nursery.start_soon(write_board)

    @app.after_serving
    async def stop_board() -> None:
        writing.cancel()

    async def read_store() -> Store:
        def read() -> Store:
            uses = blob_uses(builder.store)
            held = held_images(builder.store, uses)
            return Store(held, sum(size for size, _ in uses.values()))

        return await trio.to_thread.run_sync(read)

    async def read_key() -> str | None:
        if not isinstance(builder.config.source, PathSource) or builder.config.offline:
            return None
        return await trio.to_thread.run_sync(builder.config.source.cache_key, "latest")

    boards = Memo(lambda: trio.to_thread.run_sync(read_board, root, SHOWN), BOARD_SECONDS)
    stores = Memo(read_store, STORE_SECONDS)
    keys = Memo(read_key, STORE_SECONDS)

    async def status() -> dict[str, Any]:
        host = pull_host(request.headers.get("Host"), request.scope.get("server"))
        snapshot, store, key = await boards.get(), await stores.get(), await keys.get()
        return status_document(host, builder.config.source, key, snapshot, store, time.time())

    @app.route("/", methods=["GET", "HEAD"])
    async def page() -> Response:
        nonce = secrets.token_urlsafe(16)
        html = render_page(await status(), nonce)
        response = Response(html, status=200, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return _uncached(response)

    @app.route("/status.json", methods=["GET", "HEAD"])
    async def status_json() -> Response:
        body = json.dumps(await status()).encode()
        return _uncached(Response(body, status=200, content_type="application/json"))


def _uncached(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
