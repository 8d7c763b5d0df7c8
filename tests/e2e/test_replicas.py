"""Stateless replicas: two servers on one bucket build each image once between them.

Each replica has its own local directory (lock files) and its own Nix
store; they share only the bucket.  The package set is a fresh copy with a
new nonce, so Nix must really build the two-second ``slow`` package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .seaweed import Seaweed, start_on_bucket
from .server import Server, wait_for
from .test_concurrency import fresh_demo
from .test_s3_backend import OCI


def pull(server: Server, image: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v2/{image}/manifests/latest", headers={"Accept": OCI},
                     timeout=120)  # fmt: skip


def test_twenty_pulls_split_between_two_replicas_build_once(
    seaweed: Seaweed, tmp_path: Path
) -> None:
    demo, _ = fresh_demo(tmp_path)
    bucket = seaweed.create_bucket()
    source = ("--pkgs-path", str(demo))
    with (
        start_on_bucket(tmp_path / "a", seaweed, bucket, *source, "--workers", "2") as first,
        start_on_bucket(tmp_path / "b", seaweed, bucket, *source, "--workers", "2") as second,
    ):
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda n: pull((first, second)[n % 2], "slow/hello"),
                                    range(20)))  # fmt: skip
        assert [r.status_code for r in replies] == [200] * 20
        assert len({r.headers["docker-content-digest"] for r in replies}) == 1
        builds = first.events("nix.build") + second.events("nix.build")
        assert len(builds) == 1, builds
        assert first.count("image.built") + second.count("image.built") == 1
        # The replica that did not build waited on the other's lease.
        waiter = second if first.count("image.built") else first
        assert waiter.count("lease.waiting") >= 1
        assert waiter.count("nix.build") == 0


def test_a_replica_killed_mid_build_is_taken_over_when_its_lease_expires(
    seaweed: Seaweed, tmp_path: Path
) -> None:
    demo, _ = fresh_demo(tmp_path)
    bucket = seaweed.create_bucket()
    options = ("--pkgs-path", str(demo), "--build-lease-seconds", "3")
    with (
        start_on_bucket(tmp_path / "a", seaweed, bucket, *options) as doomed,
        start_on_bucket(tmp_path / "b", seaweed, bucket, *options) as survivor,
    ):
        threading.Thread(target=lambda: _ignore_errors(pull, doomed, "slow/docs"),
                         daemon=True).start()  # fmt: skip
        wait_for(lambda: doomed.count("nix.build"), 30, "the first replica's build")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(pull, survivor, "slow/docs")
            wait_for(lambda: survivor.count("lease.waiting"), 30, "the second to wait")
            os.kill(doomed.process.pid, signal.SIGKILL)
            reply = waiting.result(timeout=120)
        assert reply.status_code == 200, reply.text
        assert survivor.count("lease.taken_over") == 1
        assert survivor.count("image.built") == 1
        # The image is whole: every blob it names is served.
        manifest = reply.json()
        for blob in [manifest["config"], *manifest["layers"]]:
            got = httpx.get(f"{survivor.url}/v2/slow/docs/blobs/{blob['digest']}",
                            follow_redirects=True, timeout=60)  # fmt: skip
            assert got.status_code == 200 and len(got.content) == blob["size"]


def _ignore_errors(function: object, *args: object) -> None:
    with contextlib.suppress(httpx.HTTPError):  # its server was killed
        function(*args)  # type: ignore[operator]
