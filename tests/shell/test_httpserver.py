"""Hypercorn with sendfile (``httpserver.py``), over real sockets.

A tiny ASGI app sends files with ``http.response.zerocopysend``; an h11
client checks the framing byte for byte, on kept-alive connections, so a
body that sendfile put on the wire with the wrong length or at the wrong
moment breaks the next response.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import hypercorn.config
import pytest
import trio
import trustme

from nixery_trio.http.httpserver import ZEROCOPYSEND, serve

DATA = os.urandom(3 << 20) + b"tail"


async def lifespan(scope: Any, receive: Any, send: Any) -> bool:
    """Answer the ASGI lifespan protocol if that is what ``scope`` is; whether it was."""
    if scope["type"] != "lifespan":
        return False
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
    return True


class FileApp:
    """Serves ``path`` per the query: ``offset``, ``count``, ``pieces``, ``chunked``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scopes: list[dict[str, Any]] = []
        self.finished = trio.Event()
        self.sent_pieces = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        self.scopes.append(scope)
        query = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
        offset, count = int(query.get("offset", 0)), int(query.get("count", len(DATA)))
        pieces = int(query.get("pieces", 1))
        headers = [] if "chunked" in query else [(b"content-length", str(count).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if "plain" in query:  # ordinary body messages, through the same framing
            data = DATA[offset : offset + count]
            for i in range(pieces):
                step = len(data) // pieces
                part = data[i * step : None if i == pieces - 1 else (i + 1) * step]
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        with open(self.path, "rb") as f:
            if "position" in query:  # no offset: from the file's position, which advances
                f.seek(offset)
                for _ in range(pieces):
                    await send({"type": ZEROCOPYSEND, "file": f, "count": count // pieces,
                                "more_body": True})  # fmt: skip
                assert f.tell() == offset + count
                await send({"type": "http.response.body", "body": b""})
            else:
                step = count // pieces
                for i in range(pieces):
                    last = i == pieces - 1
                    size = count - step * i if last else step
                    await send({"type": ZEROCOPYSEND, "file": f.fileno(),
                                "offset": offset + step * i, "count": size,
                                "more_body": not last})  # fmt: skip
                    self.sent_pieces += 1
        self.finished.set()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, FileApp]]:
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    app = FileApp(path)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config, [sock])
        yield port, app
        nursery.cancel_scope.cancel()


def quiet_config() -> hypercorn.config.Config:
    """Hypercorn's configuration without its access and error logs."""
    config = hypercorn.config.Config()
    config.accesslog = config.errorlog = None
    return config


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, target: str, method: str = "GET") -> tuple[h11.Response, bytes]:
        request = h11.Request(method=method, target=target, headers=[("Host", "test")])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        response, body = None, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(10):  # a response held back never comes
                    self.conn.receive_data(await self.stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                self.conn.start_next_cycle()
                return response, bytes(body)


async def test_files_go_out_whole_and_the_connection_stays_usable(server: Any) -> None:
    port, app = server
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    response, body = await client.get("/")
    assert response.status_code == 200 and body == DATA
    response, body = await client.get("/?offset=1000&count=70000&pieces=3")
    assert body == DATA[1000:71000]
    response, body = await client.get("/?offset=5&count=100&chunked=1")
    assert (b"transfer-encoding", b"chunked") in response.headers and body == DATA[5:105]
    response, body = await client.get("/?offset=7&count=1000&pieces=4&position=1")
    assert body == DATA[7:1007]
    response, body = await client.get("/?count=10", method="HEAD")
    assert body == b"" and (b"content-length", b"10") in response.headers
    response, body = await client.get("/?offset=2&count=3")
    assert body == DATA[2:5]
    for query in ("plain=1&count=5", "plain=1&count=9000&pieces=3", "plain=1&count=70&chunked=1"):
        response, body = await client.get("/?" + query)
        assert body == DATA[: int(query.split("count=")[1].split("&")[0])]
    response, body = await client.get("/?plain=1&count=10", method="HEAD")
    assert body == b""
    assert all(ZEROCOPYSEND in scope["extensions"] for scope in app.scopes)


async def test_a_client_that_leaves_mid_body_does_not_stop_the_server(server: Any) -> None:
    port, app = server
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b"GET /?pieces=48 HTTP/1.1\r\nhost: test\r\n\r\n"
    await stream.send_all(request)
    await stream.receive_some(1000)
    # Reset the connection with most of the 3 MiB body unread.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    await stream.aclose()
    with trio.fail_after(10):
        await app.finished.wait()
    assert app.sent_pieces == 48  # the app was told nothing, and finished
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    assert (await client.get("/?count=4"))[1] == DATA[:4]


async def test_a_file_shorter_than_promised_closes_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"0123456789")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"20")]})  # fmt: skip
        with open(path, "rb") as f:
            await send({"type": ZEROCOPYSEND, "file": f, "offset": 0, "count": 20})

    sock = socket.create_server(("127.0.0.1", 0))
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, app, config, [sock])
        stream = await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1])
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(1000):
                received += chunk
        assert received.endswith(b"\r\n\r\n0123456789")  # then closed, never hangs
        nursery.cancel_scope.cancel()


BIG = 64 << 20  # far more than the kernel buffers of a loopback connection


class BigApp:
    """Answers every request with ``BIG`` bytes: a sparse file, or plain body messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if await lifespan(scope, receive, send):
            return
        size = BIG if scope["path"] == "/big" else 5
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(size).encode())]})  # fmt: skip
        if "plain" in scope["query_string"].decode() or size != BIG:
            piece = bytes(min(size, 1 << 20))
            for _ in range(size // len(piece)):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            with open(self.path, "rb") as f:
                await send({"type": ZEROCOPYSEND, "file": f.fileno(), "offset": 0, "count": BIG})
        self.finished += 1


@pytest.mark.parametrize("body", ["file", "plain"])
async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(BIG)
    app = BigApp(path)
    sock = socket.create_server(("127.0.0.1", 0))
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config, [sock], send_timeout=0.5))
        stalled = trio.socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await stalled.connect(sock.getsockname())
            query = "?plain=1" if body == "plain" else ""
            await stalled.send(f"GET /big{query} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
            received = len(await stalled.recv(1000))
            # Stop reading: the response stalls, then the server gives up on it
            # and the app, whose sends now go nowhere, finishes.
            with trio.fail_after(10):
                while not app.finished:
                    await trio.sleep(0.05)
            assert any(r.getMessage() == "client.stalled" for r in caplog.records)
            # Meanwhile and after, other clients are served.
            client = Client(await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1]))
            assert (await client.get("/small"))[1] == bytes(5)
            # What the server had sent before it closed is there, then the end.
            with trio.fail_after(10):
                while chunk := await stalled.recv(1 << 20):
                    received += len(chunk)
            assert received < BIG
        finally:
            # Reset the connection, so a server that still waits stops waiting.
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            stalled.close()
        nursery.cancel_scope.cancel()


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def tls_client(ca: trustme.CA, port: int) -> Client:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context,
                            server_hostname="127.0.0.1")  # fmt: skip
    return Client(stream)  # type: ignore[arg-type]


async def test_over_tls_bodies_go_through_python_and_connections_stay_usable(
    tmp_path: Path, tls_ca: trustme.CA
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(DATA)
    app = FileApp(path)
    sock = socket.create_server(("127.0.0.1", 0))
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config, [sock], tls=server_tls(tls_ca)))
        client = await tls_client(tls_ca, sock.getsockname()[1])
        for query in ("plain=1&pieces=3", "plain=1&offset=5&count=100"):
            response, body = await client.get(f"/?{query}")
            assert response.status_code == 200
            offset = 5 if "offset" in query else 0
            count = 100 if "count" in query else len(DATA)
            assert body == DATA[offset : offset + count]
        # The app is told it is HTTPS, and is not offered the kernel's sendfile.
        assert all(s["scheme"] == "https" for s in app.scopes)
        assert all(ZEROCOPYSEND not in s["extensions"] for s in app.scopes)
        # Plain HTTP on the TLS port gets no HTTP answer.
        plain = await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1])
        await plain.send_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        with trio.fail_after(10):
            answer = b""
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await plain.receive_some(1000):
                    answer += chunk
        assert not answer.startswith(b"HTTP/")
        nursery.cancel_scope.cancel()


async def test_a_tls_handshake_that_never_comes_is_closed_after_the_header_timeout(
    tls_ca: trustme.CA,
) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, FileApp(Path("/nonexistent")), config, [sock],
                                    header_timeout=0.5, tls=server_tls(tls_ca)))  # fmt: skip
        silent = await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1])
        with trio.fail_after(10):
            assert await silent.receive_some(100) == b""  # closed by the server
        nursery.cancel_scope.cancel()


async def test_a_tls_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    tmp_path: Path, tls_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    app = BigApp(tmp_path / "unused")
    sock = socket.create_server(("127.0.0.1", 0))
    config = quiet_config()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config, [sock], send_timeout=0.5,
                                    tls=server_tls(tls_ca)))  # fmt: skip
        stalled = await tls_client(tls_ca, sock.getsockname()[1])
        request = h11.Request(method="GET", target="/big?plain=1", headers=[("Host", "t")])
        await stalled.stream.send_all(stalled.conn.send(request))
        assert await stalled.stream.receive_some(1000)
        with trio.fail_after(10):
            while not app.finished:
                await trio.sleep(0.05)
        assert any(r.getMessage() == "client.stalled" for r in caplog.records)
        other = await tls_client(tls_ca, sock.getsockname()[1])
        assert (await other.get("/small"))[1] == bytes(5)
        nursery.cancel_scope.cancel()
