"""A hostile client against a real server: connections, timeouts, descriptors, HTTP/2.

Every test speaks raw HTTP over real sockets, because the clients that hurt
a server are the ones that do not behave like a library: they keep
connections open, trickle headers, never read, or speak HTTP/2 in clear text.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import h11
import httpx
import pytest

from benchmarks.common import rss_bytes
from nixery_trio.ops.maintenance import fsck

from .server import DEMO, Server, start_server, wait_for
from .test_concurrency import server_pids

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
#: How much the server's memory may grow under an attack, during and after.
MEMORY_SLACK = 100 << 20


def connect(server: Server, receive_buffer: int | None = None) -> socket.socket:
    host, port = server.host.rsplit(":", 1)
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    return sock


def until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sends until it closes; seconds until then (None: still open)."""
    started = time.monotonic()
    data = b""
    sock.settimeout(0.05)
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


def rss(server: Server) -> int:
    """Resident memory of the server's processes, in bytes."""
    return rss_bytes(server_pids(server))


def sockets(server: Server) -> int:
    """Sockets the server's processes hold open."""
    count = 0
    for pid in server_pids(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += fd.readlink().name.startswith("socket:")
    return count


def largest_layer(server: Server, image: str = "large") -> dict:
    manifest = httpx.get(f"{server.url}/v2/{image}/manifests/latest", timeout=120).json()
    layer: dict = max(manifest["layers"], key=lambda entry: entry["size"])
    return layer


REQUESTS = {
    "version": b"GET /v2/",
    "not-found": b"GET /nope",
    "method": b"POST /v2/",
    "bad-name": b"GET /v2/UPPER/manifests/latest",
    "manifest": b"GET /v2/hello/manifests/latest",
    "blob": b"GET /v2/hello/blobs/{digest}",
}


@pytest.mark.parametrize("framing", ["connection-close", "http-1.0"])
@pytest.mark.parametrize("name", REQUESTS)
def test_every_response_honours_connection_close_and_http_1_0(
    server: Server, name: str, framing: str
) -> None:
    line = REQUESTS[name].replace(b"{digest}", largest_layer(server, "hello")["digest"].encode())
    if framing == "http-1.0":
        request = line + b" HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
    else:
        request = line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(request)
        data, closed = until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    assert closed is not None, f"still open after 10 s: {data[:100]!r}"


def test_a_connection_its_client_closed_is_closed_at_once(server: Server) -> None:
    before = sockets(server)
    for path in ("/v2/", "/nope", f"/v2/hello/blobs/{largest_layer(server, 'hello')['digest']}"):
        connection = httpx.Client(base_url=server.url)  # keep-alive
        assert connection.get(path).status_code in (200, 404)
        connection.close()
    wait_for(lambda: sockets(server) <= before, 10, "the server to close its side")


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose connections get one second to send headers or a next request."""
    server = start_server(
        tmp_path_factory.mktemp("strict"),
        extra=("--keepalive-timeout", "1", "--header-timeout", "1", "--workers", "1"),
    )
    yield server
    server.stop()


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(strict_server: Server) -> None:
    with connect(strict_server) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        data, closed = until_closed(sock, 10)
    assert data.startswith(b"HTTP/1.1 200")
    assert closed is not None and 0.9 < closed < 5, closed


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    strict_server: Server,
) -> None:
    with connect(strict_server) as sock:
        data, closed = until_closed(sock, 10)
    assert data == b""
    assert closed is not None and 0.9 < closed < 5, closed


@pytest.mark.parametrize("first_request", [False, True])
def test_headers_that_trickle_in_are_cut_off(strict_server: Server, first_request: bool) -> None:
    """A request head must be whole a header timeout after its first byte, however busy
    the client keeps the connection: on a new connection, and on a kept-alive one."""
    with connect(strict_server) as sock:
        if first_request:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = None
        while closed is None and time.monotonic() - started < 10:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - started
                break
            _, closed = until_closed(sock, 0.2)
    assert closed is not None and closed < 5, closed


def test_running_out_of_descriptors_is_logged_once_per_interval(tmp_path: Path) -> None:
    server = start_server(
        tmp_path, extra=("--workers", "1"), wrapper=("prlimit", "--nofile=128:128", "--")
    )
    clients: list[socket.socket] = []
    try:
        try:
            for _ in range(200):
                clients.append(connect(server))
            wait_for(lambda: server.count("accept.failed"), 20, "the server to run out")
            started = time.monotonic()
            while time.monotonic() - started < 1.5:  # it keeps failing meanwhile
                assert server.count("accept.failed") == 1
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: httpx.get(f"{server.url}/v2/", timeout=5).status_code == 200, 30,
                 "the server to serve again")  # fmt: skip
        log = server.log_path.read_text()
        assert log.count("Too many open files") == server.count("accept.failed")
        assert server.events("accept.failed")[0]["open_files_limit"] == 128
    finally:
        server.stop()


def h2_request_headers(server: Server, path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":path", path), (":scheme", "http"),
            (":authority", server.host)]  # fmt: skip


def test_http2_with_prior_knowledge_is_refused(server: Server) -> None:
    layer = largest_layer(server)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    for stream in range(1, 200, 2):  # 100 streams, each for a 31.6 MB blob
        path = f"/v2/large/blobs/{layer['digest']}"
        client.send_headers(stream, h2_request_headers(server, path), end_stream=True)
    before = rss(server)
    with connect(server) as sock:
        sock.sendall(client.data_to_send())
        data, closed = until_closed(sock, 10)
        assert rss(server) - before < MEMORY_SLACK
    assert data.startswith(b"HTTP/1.1 505 "), data[:100]
    assert closed is not None
    assert rss(server) - before < MEMORY_SLACK


def test_an_h2c_upgrade_is_answered_in_http_1_1(server: Server) -> None:
    layer = largest_layer(server)
    settings = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    encoded = settings.initiate_upgrade_connection(
        {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    request = (
        f"GET /v2/large/blobs/{layer['digest']} HTTP/1.1\r\nHost: {server.host}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        f"HTTP2-Settings: {base64.urlsafe_b64encode(encoded).decode().rstrip('=')}\r\n\r\n"
    ).encode()
    before = rss(server)
    attackers = [connect(server, receive_buffer=4096) for _ in range(20)]
    try:
        for sock in attackers:
            sock.sendall(request)
            sock.settimeout(10)
            assert sock.recv(12) == b"HTTP/1.1 200"
        # Twenty clients that stop reading a 31.6 MB blob cost the server no blob's worth.
        assert rss(server) - before < MEMORY_SLACK
    finally:
        for sock in attackers:
            sock.close()
    assert rss(server) - before < MEMORY_SLACK


def test_pipelined_requests_are_answered_in_order_with_bounded_memory(server: Server) -> None:
    layer = largest_layer(server)
    paths = [f"/v2/large/blobs/{layer['digest']}", "/v2/", "/v2/large/manifests/latest"] * 5
    data = b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path in paths)
    before = rss(server)
    with connect(server, receive_buffer=4096) as sock:
        sock.sendall(data)  # all at once, and nothing read yet
        assert rss(server) - before < MEMORY_SLACK
        sock.settimeout(60)
        client = h11.Connection(h11.CLIENT)
        for path in paths:
            client.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
            status, body = 0, hashlib.sha256()
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(1 << 20))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body.update(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert status == 200, path
            if "blobs" in path:
                assert "sha256:" + body.hexdigest() == layer["digest"]
            client.start_next_cycle()
    assert rss(server) - before < MEMORY_SLACK


def test_an_evaluation_error_names_no_host_path(tmp_path: Path) -> None:
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(
        f"args: (import {DEMO} args) // {{\n  evil = noSuchVariable;\n}}\n"
    )
    server = start_server(tmp_path / "registry", source=("--pkgs-path", str(pkgs)),
                          extra=("--workers", "1"))  # fmt: skip
    try:
        response = httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120)
    finally:
        server.stop()
    assert response.status_code == 500
    error = response.json()["errors"][0]
    assert error["code"] == "BUILD_FAILED"
    assert "undefined variable 'noSuchVariable'" in error["message"]
    assert "at default.nix:2:10" in error["detail"]["stderr"]  # what helps, relative
    for host_path in (str(tmp_path), str(DEMO), "/tmp/", "/work/", "/root/"):
        assert host_path not in response.text
    assert f"{pkgs}/default.nix:2:10" in server.log_path.read_text()  # the log keeps it


def test_store_folders_removed_while_serving_are_recreated(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra=("--workers", "2"))
    try:
        assert httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).is_success
        for name in ("tmp", "locks", "index"):
            shutil.rmtree(server.storage / name)
        (server.storage / "lock").unlink()
        for image in ("docs", "shell/hello", "hello"):
            response = httpx.get(f"{server.url}/v2/{image}/manifests/latest", timeout=120)
            assert response.status_code == 200, response.text
        for name in ("tmp", "locks", "index/layers", "index/manifests", "lock"):
            assert (server.storage / name).exists(), name
        assert fsck(server.storage) == []
    finally:
        server.stop()
