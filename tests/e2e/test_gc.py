"""gc beside a serving registry: it frees space but never breaks a pull."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from nixery_trio.ops.maintenance import fsck

from .clients import skopeo_copy, umoci_unpack
from .server import start_server


def test_gc_while_serving_keeps_the_pull_in_progress(tmp_path: Path) -> None:
    server = start_server(tmp_path / "registry")
    try:
        for name in ("hello", "chain-a", "large"):
            assert httpx.get(f"{server.url}/v2/{name}/manifests/latest", timeout=120).is_success
        blobs = server.storage / "blobs" / "sha256"
        two_hours_ago = time.time() - 7200
        for blob in blobs.iterdir():
            os.utime(blob, (two_hours_ago, two_hours_ago))

        # A pull starts: it has the manifest, not yet the blobs.
        manifest = httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=60).json()
        gc = subprocess.run(
            [sys.executable, "-m", "nixery_trio", "gc", "--storage-path", str(server.storage),
             "--max-size", "0", "--grace", "600"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "still over 0 bytes" in gc.stdout
        left = {f"sha256:{p.name}" for p in blobs.iterdir()}
        wanted = {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
        assert wanted <= left, "gc removed a blob of a pull in progress"
        # and the image's two manifests (Docker's and OCI's, used together); all else went
        assert len(left) == len(wanted) + 2
        for digest in wanted:
            blob = httpx.get(f"{server.url}/v2/hello/blobs/{digest}", timeout=60)
            assert blob.status_code == 200

        # What gc removed is rebuilt on demand; the store stays consistent.
        skopeo_copy(server.host, "large:latest", tmp_path / "oci")
        rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
        assert len(list((rootfs / "share" / "large").iterdir())) == 28
        assert fsck(server.storage) == []
    finally:
        server.stop()
