"""A store whose filesystem fills up mid-build: clear error, nothing partial."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nixery_trio.ops.maintenance import fsck

from .clients import skopeo_copy
from .server import Server, start_server


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs: room for small images, not for `large` (~25 MB gzipped)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mountpoint)],
                   check=True)  # fmt: skip
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def blob_names(server: Server) -> set[str]:
    return {p.name for p in (server.storage / "blobs" / "sha256").iterdir()}


def test_disk_full_fails_the_build_cleanly(small_store: Path, tmp_path: Path) -> None:
    server = start_server(tmp_path / "registry", storage=small_store / "store")
    try:
        hello = httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120)
        assert hello.status_code == 200
        blobs_before = blob_names(server)

        full = httpx.get(f"{server.url}/v2/large/manifests/latest", timeout=120)
        assert full.status_code == 500, full.text
        error = full.json()["errors"][0]
        assert error["code"] == "STORAGE_ERROR"
        assert "No space left on device" in error["message"]

        # Nothing partial: no temporary file, no record naming a missing blob,
        # and every blob that was there is still there.
        assert list((server.storage / "tmp").iterdir()) == []
        assert fsck(server.storage) == []
        assert blob_names(server) >= blobs_before

        # Cached images keep serving, and a real client can still pull them.
        again = httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120)
        assert again.content == hello.content
        skopeo_copy(server.host, "hello:latest", tmp_path / "oci")
        assert server.process.poll() is None
    finally:
        server.stop()


def test_a_disk_with_no_room_left_answers_storage_error(small_store: Path, tmp_path: Path) -> None:
    """Not a byte left, not even to note the failure for the other workers."""
    server = start_server(tmp_path / "registry", storage=small_store / "store")
    filler = small_store / "filler"
    try:
        assert httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=120).is_success
        with open(filler, "wb", buffering=0) as f:
            for size in (1 << 20, 4096, 1):  # to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)
        for _ in range(2):  # the second asks a worker that may have seen the first fail
            full = httpx.get(f"{server.url}/v2/docs/manifests/latest", timeout=120)
            assert full.status_code == 500, full.text
            error = full.json()["errors"][0]
            assert error["code"] == "STORAGE_ERROR", error
            assert str(small_store) not in full.text
        filler.unlink()
        assert httpx.get(f"{server.url}/v2/docs/manifests/latest", timeout=120).is_success
        assert fsck(server.storage) == []
        assert server.process.poll() is None
    finally:
        server.stop()
