"""kill -9 during cold builds: restart, pull again, nothing stored is wrong."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from nixery_trio.ops.maintenance import fsck

from .clients import skopeo_copy, umoci_unpack
from .server import start_server, wait_for

#: When each trial kills the server: (event to wait for, seconds after it).
#: Two kills land while Nix runs, eight at 0 to 70 ms into the layer writes
#: (a layer write shows as a temporary file in the store).
MOMENTS = [("nix", 0.0), ("nix", 0.05)] + [("write", i * 0.01) for i in range(8)]


def doomed_pull(url: str) -> None:
    """A pull whose connection dies with the server."""
    with contextlib.suppress(httpx.TransportError):
        httpx.get(url, timeout=60)


def test_kill_nine_during_cold_builds(tmp_path: Path) -> None:
    interrupted = 0
    for trial, (event, delay) in enumerate(MOMENTS):
        workdir = tmp_path / f"trial-{trial}"
        server = start_server(workdir)
        url = f"{server.url}/v2/large/hello/manifests/latest"
        client = threading.Thread(target=doomed_pull, args=(url,), daemon=True)
        client.start()
        tmp = server.storage / "tmp"
        if event == "nix":
            wait_for(lambda server=server: server.count("nix.build"), 30, "Nix to start",
                     interval=0.002)  # fmt: skip
        else:
            wait_for(lambda tmp=tmp: any(tmp.iterdir()), 30, "a layer write", interval=0.001)
        time.sleep(delay)  # the moment of the crash is what this test varies
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        client.join(60)
        tmp_files = list(tmp.iterdir())
        interrupted += bool(tmp_files)
        # Even before a restart, no record points at a missing or wrong blob.
        assert fsck(server.storage) == [], f"trial {trial}"

        restarted = start_server(workdir, storage=server.storage)
        try:
            assert list((server.storage / "tmp").iterdir()) == []
            skopeo_copy(restarted.host, "large/hello:latest", workdir / "oci")
            rootfs = umoci_unpack(workdir / "oci", workdir / "bundle")
            assert (rootfs / "bin" / "hello").exists()
        finally:
            restarted.stop()
        assert fsck(server.storage) == [], f"trial {trial} after the pull"
    # The test means something only if some kills hit a write in progress.
    assert interrupted >= 3, f"only {interrupted} of {len(MOMENTS)} kills interrupted a write"
