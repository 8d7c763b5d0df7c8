"""Single flight, disconnecting clients and Nix timeouts, counted from the logs."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.common import children

from .server import DEMO, Server, start_server, wait_for


def fresh_demo(tmp_path: Path) -> tuple[Path, str]:
    """A copy of the demo set whose `slow` and `hang` Nix has never built."""
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo)
    nonce = secrets.token_hex(8)
    (demo / "test-nonce").write_text(nonce)
    return demo, nonce


def serve_fresh_demo(tmp_path: Path, timeout: int) -> Iterator[tuple[Server, str]]:
    demo, nonce = fresh_demo(tmp_path)
    server = start_server(
        tmp_path / "registry",
        source=("--pkgs-path", str(demo)),
        extra=("--nix-timeout", str(timeout)),
    )
    yield server, nonce
    server.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    yield from serve_fresh_demo(tmp_path, timeout=120)


@pytest.fixture
def impatient_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    yield from serve_fresh_demo(tmp_path, timeout=4)


def manifest_url(server: Server, name: str) -> str:
    return f"{server.url}/v2/{name}/manifests/latest"


def builder_pids(nonce: str) -> list[int]:
    """Processes of builds whose environment carries ``NONCE=nonce``."""
    found = []
    marker = f"NONCE={nonce}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_fifty_concurrent_pulls_run_one_build(fresh_server: tuple[Server, str]) -> None:
    server, _ = fresh_server
    url = manifest_url(server, "slow/hello")
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: httpx.get(url, timeout=120), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.content for r in responses}) == 1
    assert server.count("nix.build") == 1
    built = Counter(event["layer"] for event in server.events("layer.built"))
    assert built and max(built.values()) == 1


def test_images_sharing_layers_build_each_once(fresh_server: tuple[Server, str]) -> None:
    server, _ = fresh_server
    names = ["slow/diamond-left", "slow/diamond-right", "slow/diamond-top", "slow/hello"]
    with ThreadPoolExecutor(len(names) * 3) as pool:
        responses = list(
            pool.map(lambda name: httpx.get(manifest_url(server, name), timeout=120), names * 3)
        )
    assert [r.status_code for r in responses] == [200] * len(responses), [
        r.text for r in responses if r.status_code != 200
    ]
    assert server.count("nix.build") == len(names)
    digests = [{layer["digest"] for layer in r.json()["layers"]} for r in responses[: len(names)]]
    assert set.intersection(*digests), "the images share layers"
    built = Counter(event["layer"] for event in server.events("layer.built"))
    assert max(built.values()) == 1


def test_a_client_leaving_does_not_cancel_the_build(
    fresh_server: tuple[Server, str], tmp_path: Path
) -> None:
    server, _ = fresh_server
    url = manifest_url(server, "slow")
    with pytest.raises(httpx.TimeoutException):
        httpx.get(url, timeout=0.5)  # gives up while Nix builds
    response = httpx.get(url, timeout=120)
    assert response.status_code == 200
    assert server.count("nix.build") == 1

    # A build whose only client left still finishes and is cached.
    (tmp_path / "demo" / "test-nonce").write_text(secrets.token_hex(8))  # `slow` anew
    lonely = manifest_url(server, "slow/chain-a")
    with pytest.raises(httpx.TimeoutException):
        httpx.get(lonely, timeout=0.5)
    wait_for(
        lambda: any(e["image"] == "slow/chain-a" for e in server.events("image.built")),
        60,
        "the abandoned build to finish",
    )
    assert httpx.get(lonely, timeout=120).status_code == 200
    assert server.count("nix.build") == 2
    assert any(e["image"] == "slow/chain-a" for e in server.events("manifest.cached"))


def test_nix_timeout_kills_the_build_and_tells_every_waiter(
    impatient_server: tuple[Server, str],
) -> None:
    server, nonce = impatient_server
    url = manifest_url(server, "hang")
    results: list[httpx.Response] = []

    def pull() -> None:
        results.append(httpx.get(url, timeout=120))

    clients = [threading.Thread(target=pull) for _ in range(3)]
    for client in clients:
        client.start()
    wait_for(lambda: builder_pids(nonce), 30, "the hanging builder to start")
    for client in clients:
        client.join()
    assert [r.status_code for r in results] == [500] * 3
    for response in results:
        error = response.json()["errors"][0]
        assert error["code"] == "BUILD_TIMEOUT"
        assert "timed out after 4 s" in error["message"]
    assert server.count("nix.build") == 1
    wait_for(lambda: not builder_pids(nonce), 30, "the builder processes to be killed")
    assert httpx.get(f"{server.url}/v2/", timeout=10).status_code == 200


def server_pids(server: Server) -> list[int]:
    """The server's process and its workers."""
    return children(server.process.pid)


def open_blob_fds(server: Server) -> list[str]:
    targets = []
    for pid in server_pids(server):
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if "/blobs/sha256/" in target:
                targets.append(target)
    return targets


def test_a_dropped_download_frees_its_file(server: Server) -> None:
    manifest = httpx.get(manifest_url(server, "large"), timeout=120).json()
    layer = max(manifest["layers"], key=lambda entry: entry["size"])
    assert layer["size"] > 10 << 20
    host, port = server.host.rsplit(":", 1)
    # A small receive buffer, so that the server cannot hand the whole blob
    # to the kernel (loopback buffers may hold tens of MB) and must wait.
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    client.settimeout(60)
    try:
        client.connect((host, int(port)))
        path = f"/v2/large/blobs/{layer['digest']}"
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        received = b""
        while len(received) < 256 << 10:
            received += client.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        wait_for(lambda: open_blob_fds(server), 10, "the blob to be open while it streams")
    finally:
        client.close()
    wait_for(lambda: not open_blob_fds(server), 10, "the blob file to be closed")
    assert httpx.get(f"{server.url}/v2/", timeout=10).status_code == 200
