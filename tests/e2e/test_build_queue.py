"""Bounded builds: a queue for Nix, dropped when nobody waits, and misses remembered."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .server import Server, start_server, wait_for
from .test_concurrency import fresh_demo, manifest_url, server_pids

#: Images that all need the two-second `slow` package, and differ otherwise.
SLOW_IMAGES = ["slow/hello", "slow/docs", "slow/coreutils", "slow/nano", "slow/chain-a",
               "slow/diamond-top"]  # fmt: skip


def nix_builds(server: Server) -> list[int]:
    """The nix-build processes the server's workers run now."""
    workers = set(server_pids(server))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent in workers and argv[0].endswith(b"nix-build"):
            found.append(int(entry))
    return found


@pytest.fixture
def queued_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    demo, _ = fresh_demo(tmp_path)
    max_builds, workers = request.param
    server = start_server(
        tmp_path / "registry",
        source=("--pkgs-path", str(demo)),
        extra=("--max-builds", str(max_builds), "--workers", str(workers)),
    )
    yield server
    server.stop()


@pytest.mark.parametrize("queued_server", [(2, 2)], indirect=True)
def test_builds_beyond_the_limit_wait_in_a_queue(queued_server: Server) -> None:
    server = queued_server
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(nix_builds(server)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(SLOW_IMAGES)) as pool:
            urls = [manifest_url(server, name) for name in SLOW_IMAGES]
            responses = list(pool.map(lambda url: httpx.get(url, timeout=120), urls))
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200] * len(SLOW_IMAGES)
    assert sorted(e["image"] for e in server.events("nix.build")) == sorted(SLOW_IMAGES)
    assert 1 <= most <= 2
    queued = server.events("build.queued")
    assert queued and all(e["max_builds"] == 2 for e in queued)
    assert server.count("build.dequeued") == len(queued)


@pytest.mark.parametrize("queued_server", [(1, 1)], indirect=True)
def test_a_queued_build_whose_clients_left_is_dropped(queued_server: Server) -> None:
    server = queued_server
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.get, manifest_url(server, "slow/hello"), timeout=120)
        wait_for(lambda: server.count("nix.build"), 30, "the first build to start")
        with pytest.raises(httpx.TimeoutException):  # queued behind it, then gone
            httpx.get(manifest_url(server, "slow/docs"), timeout=0.5)
        assert server.count("build.queued") == 1
        assert first.result().status_code == 200
    wait_for(lambda: server.count("flight.dropped"), 10, "the queued build to be dropped")
    assert [e["image"] for e in server.events("nix.build")] == ["slow/hello"]
    assert server.count("build.dequeued") == 0
    # Asked again, it builds.
    assert httpx.get(manifest_url(server, "slow/docs"), timeout=120).status_code == 200


def test_a_missing_package_runs_nix_once(tmp_path: Path) -> None:
    server = start_server(tmp_path, extra=("--workers", "2", "--not-found-ttl", "3"))
    try:
        url = manifest_url(server, "shell/no-such-package")

        def pull(_: int) -> httpx.Response:
            return httpx.get(url, timeout=120)

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(pull, range(20)))
        responses += [pull(i) for i in range(10)]
        for response in responses:
            assert response.status_code == 404
            error = response.json()["errors"][0]
            assert error["code"] == "MANIFEST_UNKNOWN"
            assert error["detail"] == {"missing": ["no-such-package"]}
        assert server.count("nix.build") == 1
        # After the time to live, Nix is asked again (the package may exist by now).
        wait_for(lambda: pull(0).status_code == 404 and server.count("nix.build") == 2, 30,
                 "a second lookup")  # fmt: skip
    finally:
        server.stop()
