"""Hypercorn with sendfile: the ASGI ``http.response.zerocopysend`` extension.

Hypercorn 0.18 moves every response body through Python: the app's bytes
become an h11 ``Data`` event, h11 frames them, and the connection's
``send_all`` copies them into the socket.  For blobs of hundreds of MB that
copy, on the one event-loop thread, is most of the server's work.  This
module teaches Hypercorn's HTTP/1.1 path the ASGI extension for zero-copy
send (``scope["extensions"]["http.response.zerocopysend"]``, see the ASGI
spec's extensions page), so the kernel moves file bytes straight from the
page cache to the socket with ``sendfile(2)``.

Hypercorn has no hook for it, so each layer that a body crosses is
subclassed, and nothing else changes::

    app ──zerocopysend──▶ ZeroCopyHTTPStream   (ASGI message -> FileBody event)
        ──FileBody──────▶ ZeroCopyH11Protocol  (h11 frames a placeholder of the
                                               body's length: Content-Length and
                                               keep-alive stay h11's business)
        ──SendFile──────▶ ZeroCopyTCPServer    (os.sendfile on the socket, under
                                               the same send lock as all bytes)

Every send of a connection, files and ordinary bytes alike, is bounded by
a *send timeout*, as nginx's ``send_timeout``: a client that takes no bytes
for that long has its connection closed.  Sends are shielded from
cancellation (a response cut short would leave the connection mid-body),
so without the bound a client that stops reading would hold its response,
and :func:`serve`'s graceful shutdown, forever.

The placeholder is h11's documented sendfile support
(``Connection.send_with_data_passthrough``): h11 only takes its ``len``.
HTTP/2 is not spoken at all (:meth:`ZeroCopyH11Protocol._check_protocol`
says why).
The subclasses touch Hypercorn internals, hence the pin to 0.18 in
``pyproject.toml``; ``tests/shell/test_httpserver.py`` breaks if they drift.

:func:`serve` is Hypercorn's ``worker_serve`` without QUIC and statsd,
running connections as :class:`ZeroCopyTCPServer` (over TLS too, without
sendfile), with an accept loop
that logs running out of descriptors once per interval (trio's logs a
traceback per try, ten a second) and a drain on shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import http
import math
import os
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.events import Event as ConnectionEvent
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, EndBody, Request, Response
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, suppress_body

from .. import logs

#: The ASGI extension's message type and ``scope["extensions"]`` key.
ZEROCOPYSEND = "http.response.zerocopysend"
#: Seconds a response may wait for its client to take more bytes (nginx's default).
SEND_TIMEOUT = 60.0
#: Seconds a request's head may take to arrive, from its first byte (or from
#: the connection's start for its first request).
HEADER_TIMEOUT = 20.0
#: Seconds between two tries to accept while the process is out of
#: descriptors, and between two log lines saying so.
ACCEPT_RETRY = 0.1
ACCEPT_LOG_INTERVAL = 10.0
_ACCEPT_CAPACITY = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
#: The reason phrase of every status code: the standard library's, with RFC 9110's
#: names where older Pythons keep RFC 7231's.
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus} | {
    413: b"Content Too Large",
    416: b"Range Not Satisfiable",
    422: b"Unprocessable Content",
}
#: Errors of a socket whose peer went away.
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


@dataclass(frozen=True)
class FileBody(StreamEvent):
    """Stream event: ``count`` bytes of open file ``fd`` from ``offset`` are body."""

    fd: int
    offset: int
    count: int


@dataclass(frozen=True)
class SendFile(ConnectionEvent):
    """Connection event: put these file bytes on the socket with sendfile."""

    fd: int
    offset: int
    count: int


class _Placeholder:
    """Stands for a file's bytes in h11, which only asks for their length."""

    __slots__ = ("body",)

    def __init__(self, body: FileBody) -> None:
        self.body = body

    def __len__(self) -> int:
        return self.body.count


async def sendfile_all(
    sock: trio.socket.SocketType, fd: int, offset: int, count: int, stall: float = math.inf
) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` on non-blocking ``sock``.

    Raises :class:`BrokenPipeError` and friends when the peer goes away,
    :class:`EOFError` if the file ends before ``count`` bytes, and
    :class:`trio.TooSlowError` if the peer takes no bytes for ``stall`` seconds.
    """
    out = sock.fileno()

    def write(done: int) -> int:
        return os.sendfile(out, fd, offset + done, count - done)

    await _transmit(sock, count, write, stall)


async def send_all(sock: trio.socket.SocketType, data: bytes, stall: float = math.inf) -> None:
    """Send all of ``data`` on non-blocking ``sock``, with :func:`sendfile_all`'s errors."""
    out, view = sock.fileno(), memoryview(data)
    await _transmit(sock, len(view), lambda done: os.write(out, view[done:]), stall)


async def _transmit(
    sock: trio.socket.SocketType, count: int, write: Callable[[int], int], stall: float
) -> None:
    """Call ``write(bytes_done)`` until ``count`` bytes are out, waiting while ``sock`` is full."""
    done = 0
    while done < count:
        try:
            sent = write(done)
        except BlockingIOError:
            with trio.move_on_after(stall):
                await trio.lowlevel.wait_writable(sock)
                continue
            raise trio.TooSlowError(f"the client took no bytes for {stall} s") from None
        if sent == 0:
            raise EOFError(f"the body ended {count - done} bytes before the response did")
        done += sent
    await trio.lowlevel.checkpoint()


async def send_stream(stream: trio.abc.SendStream, data: bytes, stall: float) -> None:
    """Send ``data`` on a stream Trio wraps (TLS), giving up after ``stall`` seconds.

    Unlike :func:`send_all`, the bound is on the whole write, not on each
    step of progress: a response's writes are at most a few MiB, so a
    client that takes one slower than ``stall`` is a stalled one.
    """
    with trio.fail_after(stall):
        await stream.send_all(data)


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The socket under a plain or TLS connection."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


class _Advertised:
    """The app, told by its scope that this stream can send files."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> None:
        scope["extensions"][ZEROCOPYSEND] = {}
        await self.app(scope, receive, send, sync_spawn, call_soon)


class ZeroCopyHTTPStream(HTTPStream):
    """An HTTP/1 stream that also takes ``http.response.zerocopysend``."""

    def __init__(self, app: Any, *args: Any) -> None:
        super().__init__(_Advertised(app), *args)

    async def app_send(self, message: Any) -> None:
        if message is None or message["type"] != ZEROCOPYSEND:
            await super().app_send(message)
            return
        if self.closed:
            return  # the client went away: drop the rest of the body
        if self.state != ASGIHTTPState.RESPONSE:
            raise RuntimeError(f"{ZEROCOPYSEND} before http.response.start")
        if not suppress_body(self.scope["method"], int(self.response["status"])):
            fd = message["file"] if isinstance(message["file"], int) else message["file"].fileno()
            offset = message.get("offset")
            if offset is None:
                offset = os.lseek(fd, 0, os.SEEK_CUR)
            count = message.get("count")
            if count is None:
                count = os.fstat(fd).st_size - offset
            if count > 0:
                body = FileBody(stream_id=self.stream_id, fd=fd, offset=offset, count=count)
                await self.send(body)
            if message.get("offset") is None:
                os.lseek(fd, offset + count, os.SEEK_SET)
        if not message.get("more_body", False):
            await self._send_closed()


class ZeroCopyH11Protocol(H11Protocol):
    """HTTP/1.1 whose streams can send files; the framing stays h11's.

    It also writes a response's head together with its first body bytes:
    Hypercorn sends the head, each body message and h11's (often empty) end
    of message separately, three trips to the socket for a small response.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._forward = self.send
        self.send = self._coalesce
        self._held: list[bytes] | None = None

    async def _coalesce(self, event: ConnectionEvent) -> None:
        if isinstance(event, RawData):
            if self._held is not None:
                self._held.append(event.data)
                return
            if not event.data:
                return  # the end of a Content-Length body: nothing to write
        else:
            await self._release()
        await self._forward(event)

    async def _release(self) -> None:
        held, self._held = self._held, None
        if held:
            await self._forward(RawData(data=b"".join(held)))

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200:
            self._held = []  # until the body starts or ends
            await super().stream_send(event)
            return
        if not isinstance(event, FileBody):
            await super().stream_send(event)
            if isinstance(event, (Body, EndBody)):
                await self._release()
            return
        try:
            parts = self._h11().send_with_data_passthrough(
                h11.Data(data=_Placeholder(event))  # type: ignore[arg-type]
            )
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        for part in parts or ():
            if isinstance(part, _Placeholder):
                body = part.body
                await self.send(SendFile(fd=body.fd, offset=body.offset, count=body.count))
            else:
                await self.send(RawData(data=bytes(part)))

    def _h11(self) -> h11.Connection:
        assert isinstance(self.connection, h11.Connection), "file body on a websocket"
        return self.connection

    async def _send_h11_event(self, event: Any) -> None:
        # Hypercorn leaves the reason phrase out ("HTTP/1.1 200 "); RFC 9112
        # allows it, but people and some tools read the status line.
        if isinstance(event, (h11.Response, h11.InformationalResponse)) and not event.reason:
            event = type(event)(
                status_code=event.status_code,
                headers=event.headers,
                http_version=event.http_version,
                reason=_REASONS.get(event.status_code, b""),
            )
        await super()._send_h11_event(event)

    async def _check_protocol(self, event: h11.Request) -> None:
        """Speak HTTP/1.1 only: an ``Upgrade: h2c`` is ignored, as RFC 9113 lets a server do.

        (Hypercorn would switch to HTTP/2, whose streams each queue a whole
        response while their client keeps its flow-control window shut, and
        whose responses go without sendfile.)  The HTTP/2 preface of a client
        that assumes HTTP/2 is refused in :meth:`_create_stream`.
        """

    async def _create_stream(self, request: h11.Request) -> None:
        if request.http_version != b"1.1" and request.http_version != b"1.0":
            # "PRI * HTTP/2.0", the preface of HTTP/2 with prior knowledge.
            await self._send_error_response(505)
            await self.send(Closed())
            return
        # Hypercorn's own method, less websockets (which this registry does
        # not serve: they get Hypercorn's stream) and with our HTTP stream.
        if any(name.lower() == b"upgrade" for name, _ in request.headers):
            await super()._create_stream(request)
            return
        # Over TLS the kernel cannot send a file's bytes (no kTLS here): the
        # app is not offered zerocopysend, and reads blobs through Python.
        self.stream = (HTTPStream if self.ssl else ZeroCopyHTTPStream)(
            self.app, self.config, self.context, self.task_group, self.ssl,
            self.client, self.server, self.stream_send, STREAM_ID,
        )  # fmt: skip
        if self.config.h11_pass_raw_headers:
            headers = request.headers.raw_items()
        else:
            headers = list(request.headers)
        await self.stream.handle(
            Request(
                stream_id=STREAM_ID,
                headers=headers,
                http_version=request.http_version.decode(),
                method=request.method.decode("ascii").upper(),
                raw_path=request.target,
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()


class Sends:
    """The sends in progress on a server's connections, so that a drain can end them.

    A send is shielded from cancellation (see :class:`ZeroCopyTCPServer`),
    so the end of a drain cannot cut it short by cancelling its connection;
    it sets the deadline of every send in progress, and of every later one.
    """

    def __init__(self) -> None:
        self.deadline = math.inf
        self._scopes: set[trio.CancelScope] = set()

    @contextlib.contextmanager
    def shielded(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope(shield=True, deadline=self.deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def cut_off_at(self, deadline: float) -> None:
        self.deadline = deadline
        for scope in self._scopes:
            scope.deadline = deadline


class ZeroCopyTCPServer(TCPServer):
    """A plain-TCP connection whose HTTP/1.1 responses can carry files.

    Its clocks, each of which closes the connection when it runs out:

    - *send*: a response's client has taken no bytes for ``send_timeout``
      seconds;
    - *header*: a request's head is not complete ``header_timeout`` seconds
      after its first byte arrived, or a new connection has sent no whole
      request head for that long (a client trickling headers holds a
      connection for no longer);
    - *keep-alive* (Hypercorn's idle timer, ``config.keep_alive_timeout``):
      no byte of a next request for that long after a response.
    """

    def __init__(
        self,
        *args: Any,
        send_timeout: float = SEND_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        sends: Sends | None = None,
    ) -> None:
        super().__init__(*args)
        #: Whether the connection is TLS (decided once: every send asks).
        self.tls = isinstance(self.stream, trio.SSLStream)
        self.sends = sends or Sends()
        self.send_timeout = send_timeout
        self.header_timeout = header_timeout
        self.peer = ""  # the client's address, for logs
        #: Whether a request's head arrived and its response has not ended.
        self._in_request = False
        #: Whether the header clock runs for the request being received.
        self._heading = True

    async def run(self) -> None:
        sock = _socket_of(self.stream)
        try:
            peername = sock.getpeername()
            client = parse_socket_addr(sock.family, peername)
            server = parse_socket_addr(sock.family, sock.getsockname())
            self.peer = repr_socket_addr(sock.family, peername)
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = ProtocolWrapper(
                    self.app, self.config, self.context, task_group,
                    ConnectionState(self.state), self.tls, client, server,
                    self.protocol_send, "http/1.1",
                )  # fmt: skip
                # Same arguments, our HTTP/1.1 (h2c upgrades still replace it).
                self.protocol.protocol = ZeroCopyH11Protocol(
                    self.app, self.config, self.context, task_group,
                    ConnectionState(self.state), self.tls, client, server, self.protocol_send,
                )  # fmt: skip
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._header_clock)
                await self._read_data()
                # The client closed its side: the idle clock must not keep
                # the connection (and the kernel's pages it sent) for up to
                # the keep-alive timeout.
                await self.idle_task.stop()
        except OSError:
            pass
        finally:
            await self._close()

    async def _read_data(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if data and not self._in_request and not self._heading:
                self._heading = True  # the first bytes of a request: its head has a deadline
                await self.idle_task.restart(self._task_group, self._header_clock)
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())

    async def _header_clock(self) -> None:
        with trio.move_on_after(self.header_timeout):
            await self.context.terminated.wait()
            return  # shutting down: close at once, as Hypercorn's idle clock does
        logs.info("client.header_timeout", client=self.peer, header_timeout=self.header_timeout)
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()

    async def _close(self) -> None:
        # A TLS close_notify is a send like any other: bounded like them
        # (``_connection`` closes the socket after it either way).
        with trio.move_on_after(self.send_timeout):
            await super()._close()

    async def protocol_send(self, event: ConnectionEvent) -> None:
        if isinstance(event, RawData):
            if self.tls:
                sending = partial(send_stream, self.stream, event.data, self.send_timeout)
            else:
                sending = partial(send_all, self.stream.socket, event.data, self.send_timeout)
        elif isinstance(event, SendFile):
            sock = self.stream.socket  # TLS streams are never offered files
            sending = partial(
                sendfile_all, sock, event.fd, event.offset, event.count, self.send_timeout
            )
        else:
            if isinstance(event, Updated):
                self._in_request, self._heading = not event.idle, False
            # Closing the connection, or arming its idle timer, must not be
            # cancellable: both come from the app's task after the response
            # ends, and Quart-Trio cancels that task's scope as soon as the
            # stream reports the disconnect that ends every response.  Stock
            # Hypercorn then never closed a Connection: close response nor
            # timed out the idle connection after a kept-alive one.
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                # Shielded like Hypercorn's own sends: a response cut short
                # by cancellation would leave the connection mid-body.  Only
                # the end of a drain cuts it short, and then the connection.
                with self.sends.shielded() as scope:
                    await sending()
                if scope.cancelled_caught:
                    logs.warning("client.cut_off", client=self.peer, detail="the drain timed out")
                    raise trio.ClosedResourceError
            except (OSError, EOFError, trio.TooSlowError, trio.ClosedResourceError) as exc:
                # The response cannot go on, so neither can the connection.
                if isinstance(exc, trio.TooSlowError):
                    logs.warning("client.stalled", client=self.peer, send_timeout=self.send_timeout)
                elif isinstance(exc, OSError) and exc.errno not in _GONE:
                    logs.warning("client.send_failed", client=self.peer, error=str(exc))
                await self._close()
                await self.protocol.handle(Closed())


async def serve(
    app: Callable[..., Awaitable[None]],
    config: Config,
    sockets: list[socket.socket],
    *,
    send_timeout: float = SEND_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    shutdown: trio.Event | None = None,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ASGI ``app`` on listening ``sockets`` until ``shutdown`` is set.

    With a ``tls`` context, every connection is TLS (the handshake runs
    under the header clock, as a request head does).

    Hypercorn's ``worker_serve`` for plain TCP: lifespan startup, then every
    connection in :class:`ZeroCopyTCPServer` (with ``send_timeout`` and
    ``header_timeout``).  On ``shutdown`` it drains: it stops accepting and
    closes its listening sockets, closes idle connections, lets the
    responses in flight finish for up to ``config.graceful_timeout`` seconds,
    cancels what is left, runs the lifespan shutdown and returns.  Cancelling
    it stops everything at once.
    """
    if shutdown is None:
        shutdown = trio.Event()
    sends = Sends()
    wrapped = ASGIWrapper(app)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            handler = partial(
                ZeroCopyTCPServer,
                wrapped,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                send_timeout=send_timeout,
                header_timeout=header_timeout,
                sends=sends,
            )
            async with trio.open_nursery() as accepting:
                for sock in sockets:
                    listener: trio.abc.Listener[Any] = trio.SocketListener(
                        trio.socket.from_stdlib_socket(sock)
                    )
                    if tls is not None:
                        listener = trio.SSLListener(listener, tls, https_compatible=True)
                    accepting.start_soon(_accept, listener, handler, connections)
                task_status.started()
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            await context.terminated.set()  # idle connections close, busy ones after their response
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
            sends.cut_off_at(connections.cancel_scope.deadline)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _accept(
    listener: trio.abc.Listener[Any],
    handler: Callable[[Any], Awaitable[None]],
    connections: trio.Nursery,
) -> None:
    """Accept connections into ``connections`` until cancelled; then close ``listener``.

    Out of descriptors (or memory), accept fails until some connection ends:
    it is retried every :data:`ACCEPT_RETRY` seconds and logged at most once
    every :data:`ACCEPT_LOG_INTERVAL`, with how often it failed meanwhile.
    """
    logged_at, failures = -math.inf, 0
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY:
                    raise
                failures += 1
                if trio.current_time() - logged_at >= ACCEPT_LOG_INTERVAL:
                    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                    logs.error("accept.failed", error=os.strerror(exc.errno or 0),
                               failures=failures, open_files_limit=soft)  # fmt: skip
                    logged_at, failures = trio.current_time(), 0
                await trio.sleep(ACCEPT_RETRY)
            else:
                connections.start_soon(_connection, handler, stream)


async def _connection(handler: Callable[[Any], Awaitable[None]], stream: trio.abc.Stream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
