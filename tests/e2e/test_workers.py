"""Several server processes on one store: builds done once, workers supervised.

``NIXERY_WORKERS`` forks processes that share the socket; which worker gets
a connection is the kernel's choice, so the cross-process single flight is
tested deterministically with two whole servers on one store (the same
``KeyLocks`` path), and the worker processes by their life cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from nixery_trio.http import supervisor
from nixery_trio.store import locks

from .server import Server, start_server, wait_for
from .test_concurrency import builder_pids, fresh_demo, server_pids
from .test_hostile import connect, largest_layer, until_closed


@pytest.fixture
def two_servers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Server]]:
    demo, nonce = fresh_demo(tmp_path)
    timeout = getattr(request, "param", 120)
    servers = [
        start_server(
            tmp_path / name,
            source=("--pkgs-path", str(demo)),
            extra=("--nix-timeout", str(timeout), "--workers", "1"),
            storage=tmp_path / "store",
        )
        for name in ("a", "b")
    ]
    for server in servers:
        server.nonce = nonce  # type: ignore[attr-defined]
    yield servers
    for server in servers:
        server.stop()


def pull_from_both(servers: list[Server], name: str, each: int) -> list[httpx.Response]:
    urls = [f"{s.url}/v2/{name}/manifests/latest" for s in servers] * each
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda url: httpx.get(url, timeout=120), urls))


def test_two_processes_on_one_store_build_an_image_once(two_servers: list[Server]) -> None:
    responses = pull_from_both(two_servers, "slow/hello", 10)
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.content for r in responses}) == 1
    assert sum(s.count("nix.build") for s in two_servers) == 1
    built = Counter(e["layer"] for s in two_servers for e in s.events("layer.built"))
    assert built and max(built.values()) == 1
    # The process that waited found the other's manifest in the store.
    assert all(s.count("manifest.cached") + s.count("image.built") >= 1 for s in two_servers)


@pytest.mark.parametrize("two_servers", [4], indirect=True)
def test_a_timeout_in_one_process_answers_the_others_waiting(
    two_servers: list[Server],
) -> None:
    responses = pull_from_both(two_servers, "hang", 2)
    assert [r.status_code for r in responses] == [500] * 4
    for response in responses:
        error = response.json()["errors"][0]
        assert error["code"] == "BUILD_TIMEOUT", error
        assert "timed out after 4 s" in error["message"]
    assert sum(s.count("nix.build") for s in two_servers) == 1
    nonce = two_servers[0].nonce  # type: ignore[attr-defined]
    wait_for(lambda: not builder_pids(nonce), 30, "the builder processes to be killed")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra=("--workers", "2"))
    workers = server_pids(server)[1:]
    assert len(workers) == 2
    assert httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).status_code == 200
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    wait_for(lambda: all(gone(pid) for pid in workers), 10, "the workers to die")


def test_a_dead_worker_is_replaced(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra=("--workers", "2"))
    try:
        first, second = server_pids(server)[1:]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: server.count("worker.replaced"), 30, "a new worker")
        (replaced,) = server.events("worker.replaced")
        assert replaced["replaces"] == first
        assert set(server_pids(server)[1:]) == {second, replaced["worker"]}
        assert server.process.poll() is None
        for _ in range(4):  # both workers answer
            assert httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).is_success
    finally:
        server.stop()


def test_workers_that_keep_dying_stop_the_server(tmp_path: Path) -> None:
    with start_server(tmp_path, extra=("--workers", "2")) as server:
        for death in range(1, supervisor.MAX_RESTARTS + 2):
            os.kill(server_pids(server)[1], signal.SIGKILL)

            def replaced_or_stopped(death: int = death) -> bool:
                if server.process.poll() is not None:
                    return True
                return server.count("worker.exited") == death and len(server_pids(server)) == 3

            wait_for(replaced_or_stopped, 30, "the worker to be replaced or the server to give up")
        assert server.process.wait(30) == 1  # for the service manager to restart it
        assert server.count("worker.replaced") == supervisor.MAX_RESTARTS
        assert server.count("server.failing") == 1


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra=("--workers", "2"))
    workers = server_pids(server)[1:]
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    wait_for(lambda: all(gone(pid) for pid in workers), 10, "the workers to stop")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_server_leaves_the_first_ones_work_in_progress_alone(
    tmp_path: Path, workers: str
) -> None:
    storage = tmp_path / "store"
    first = start_server(tmp_path / "first", extra=("--workers", workers), storage=storage)
    work = storage / "tmp" / "in-progress.part"  # a layer the first server is writing
    try:
        work.write_bytes(b"half a layer")
        second = start_server(tmp_path / "second", extra=("--workers", workers), storage=storage)
        try:
            assert work.exists()
            assert second.count("storage.in_use") == 1
            assert second.count("storage.leftovers_removed") == 0
            assert httpx.get(f"{second.url}/v2/", timeout=30).status_code == 200
        finally:
            second.stop()
    finally:
        first.stop()
    # Alone on the store, a server clears what a dead one left.
    third = start_server(tmp_path / "third", extra=("--workers", workers), storage=storage)
    try:
        assert not work.exists()
        assert third.count("storage.leftovers_removed") == 1
        assert third.count("storage.in_use") == 0
    finally:
        third.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_the_responses_in_flight(tmp_path: Path, workers: str) -> None:
    with start_server(tmp_path, extra=("--workers", workers, "--drain-timeout", "30")) as server:
        layer = largest_layer(server)
        downloading = connect(server, receive_buffer=64 << 10)
        idle = connect(server)
        try:
            request = f"GET /v2/large/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n"
            downloading.sendall(request.encode())
            head = downloading.recv(1 << 16)
            assert head.startswith(b"HTTP/1.1 200")
            idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(1 << 16).startswith(b"HTTP/1.1 200")

            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: server.count("server.draining"), 10, "the server to drain")
            _, closed = until_closed(idle, 10)
            assert closed is not None, "an idle connection stays open while draining"
            host, port = server.host.rsplit(":", 1)
            wait_for(lambda: refused(host, int(port)), 10, "new connections to be refused")
            assert server.process.poll() is None  # still sending the blob

            rest, closed = until_closed(downloading, 60)
            body = (head + rest).split(b"\r\n\r\n", 1)[1]
            assert len(body) == layer["size"]
            assert "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
        finally:
            downloading.close()
            idle.close()
        assert server.process.wait(30) == 0


def test_a_tag_served_just_before_sigterm_is_still_recorded(tmp_path: Path) -> None:
    """Tag records are written a moment after the response (``TAG_RECORD_DELAY``);
    a drain that ends within that moment writes them before the worker exits."""
    with start_server(tmp_path, extra=("--workers", "1")) as server:
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        pulled = httpx.get(f"{server.url}/v2/hello/manifests/latest", headers=accept, timeout=120)
        assert pulled.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    listed = subprocess.run(
        [sys.executable, "-m", "nixery_trio", "ls", "--storage-path", str(server.storage),
         "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    held = [json.loads(line) for line in listed.splitlines()]
    assert [(i["name"], i["tag"]) for i in held] == [("hello", "latest")]
    assert held[0]["digest"] == pulled.headers["docker-content-digest"]


def test_a_response_that_outlasts_the_drain_timeout_is_cut_off(tmp_path: Path) -> None:
    with start_server(tmp_path, extra=("--workers", "2", "--drain-timeout", "1")) as server:
        layer = largest_layer(server)
        with connect(server, receive_buffer=64 << 10) as stalled:
            stalled.sendall(
                f"GET /v2/large/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert stalled.recv(1 << 16).startswith(b"HTTP/1.1 200")
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0  # it did not wait for the client to read
        assert server.count("server.killing_workers") == 0


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stuck_process_holding_a_build_delays_the_others_only_so_long(
    two_servers: list[Server],
) -> None:
    """A process stopped mid-build (SIGSTOP) stops refreshing its lock; the
    other process, waiting for it, builds the image itself once it is stale."""
    stuck, other = two_servers
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.get, f"{stuck.url}/v2/slow/hello/manifests/latest", timeout=120)
        wait_for(lambda: stuck.count("nix.build"), 30, "the first build to start")
        os.kill(stuck.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = httpx.get(f"{other.url}/v2/slow/hello/manifests/latest", timeout=120)
            waited = time.monotonic() - started
            assert response.status_code == 200, response.text
            assert locks.STALE_SECONDS <= waited < locks.STALE_SECONDS + 30
            (stale,) = other.events("lock.stale")
            assert stale["kind"] == "image"
        finally:
            os.kill(stuck.process.pid, signal.SIGCONT)
        assert first.result().status_code == 200
    assert first.result().content == response.content
