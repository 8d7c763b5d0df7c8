"""``nixery-trio prefetch``: images built into a store with no client, then served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import MULTIARCH
from .server import DEMO, REPO, nix_env, start_server

EVERYTHING = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def prefetch(storage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "nixery_trio", "prefetch",
        "--pkgs-path", str(DEMO), "--storage-path", str(storage),
        "--popularity-url", str(DEMO / "popularity.json"), *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=nix_env(),
                          cwd=REPO)  # fmt: skip


def printed_digests(stdout: str) -> dict[str, dict[str, str]]:
    """``NAME:TAG: kind digest, kind digest`` lines, by NAME:TAG."""
    found = {}
    for line in stdout.splitlines():
        ref, sep, rest = line.partition(": ")
        if sep and rest.startswith(("oci ", "docker ")):
            found[ref] = dict(part.rsplit(" ", 1) for part in rest.split(", "))
    return found


def test_prefetched_images_are_served_without_running_nix(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    listing = tmp_path / "images.txt"
    listing.write_text("# the mirror's images\nshell/hello\n\nzstd/hello:latest  # zstd\n")
    done = prefetch(storage, *MULTIARCH, "--from-file", str(listing), "hello")
    assert done.returncode == 0, done.stderr
    digests = printed_digests(done.stdout)
    assert set(digests) == {"hello:latest", "shell/hello:latest", "zstd/hello:latest"}
    assert set(digests["hello:latest"]) == {"oci index", "docker list"}
    assert set(digests["zstd/hello:latest"]) == {"oci index"}  # zstd: OCI only
    assert "done" in done.stdout  # the progress table's last state

    with start_server(tmp_path / "serve", storage=storage, extra=MULTIARCH) as server:
        for ref, kinds in digests.items():
            name = ref.split(":")[0]
            response = httpx.get(f"{server.url}/v2/{name}/manifests/latest", timeout=60,
                                 headers={"Accept": EVERYTHING})  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.headers["docker-content-digest"] == kinds["oci index"]
        assert server.count("nix.build") == 0
        assert server.count("layer.built") == 0

    # Prefetching again finds everything built: nothing to do, same digests.
    again = prefetch(storage, *MULTIARCH, "--from-file", str(listing), "hello")
    assert again.returncode == 0, again.stderr
    assert printed_digests(again.stdout) == digests
    assert "cached" in again.stdout


def test_prefetch_names_what_failed_and_builds_the_rest(tmp_path: Path) -> None:
    done = prefetch(tmp_path / "store", "hello", "hello/no-such-package", "broken")
    assert done.returncode == 1
    assert "hello:latest: oci manifest sha256:" in done.stdout
    assert "failed: hello/no-such-package:latest: " in done.stderr
    assert "no-such-package" in done.stderr
    assert "failed: broken:latest: " in done.stderr


def test_prefetch_refuses_what_is_not_an_image_reference(tmp_path: Path) -> None:
    for ref in ("Hello", "hello@sha256:" + "0" * 64, "../x"):
        refused = prefetch(tmp_path / "store", ref)
        assert refused.returncode != 0
        assert "Error:" in refused.stderr, refused.stderr
    assert prefetch(tmp_path / "store").returncode != 0  # nothing named
