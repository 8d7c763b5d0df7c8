"""Pull with real clients (skopeo, umoci, ctr, podman) and run what they pulled."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import httpx

from .clients import (
    PODMAN_RUN,
    Containerd,
    Dockerd,
    chroot,
    podman,
    run,
    skopeo_copy,
    skopeo_inspect,
    umoci_unpack,
)
from .server import Server


def test_skopeo_umoci_hello_runs(server: Server, tmp_path: Path) -> None:
    skopeo_copy(server.host, "hello:latest", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"
    assert (rootfs / "etc" / "ssl" / "certs" / "ca-bundle.crt").read_text().count(
        "BEGIN CERTIFICATE"
    ) > 10
    assert (rootfs / "etc" / "services").exists()
    assert (rootfs / "tmp").is_dir() and (rootfs / "tmp").stat().st_mode & 0o1777 == 0o1777
    assert (rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["args"] == ["/bin/hello"]


def test_skopeo_umoci_shell_image(server: Server, tmp_path: Path) -> None:
    skopeo_copy(server.host, "shell/hello:latest", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert chroot(rootfs, "/bin/sh", "-c", "echo ok").stdout == "ok\n"
    assert chroot(rootfs, "/bin/bash", "-c", "hello").stdout == "Hello, world!\n"
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["args"] == ["bash"]


def test_arm64_image_on_x86_64(server: Server, tmp_path: Path) -> None:
    config = skopeo_inspect(server.host, "arm64/docs:latest", config=True)
    assert config["architecture"] == "arm64"
    skopeo_copy(server.host, "arm64/docs:latest", tmp_path / "oci")


def test_pull_by_digest(server: Server, tmp_path: Path) -> None:
    manifest = skopeo_inspect(server.host, "hello:latest")
    digest = manifest["Digest"]
    skopeo_copy(server.host, f"hello@{digest}", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"


def test_ctr_pull_and_run(server: Server, containerd: Containerd) -> None:
    ref = f"{server.host}/hello:latest"
    containerd.ctr("image", "pull", "--plain-http", ref)
    result = containerd.ctr("run", "--rm", ref, "nixery-hello", "/bin/hello", timeout=120)
    assert result.stdout.strip() == "Hello, world!"
    # With no command: the image's own, hello's meta.mainProgram.
    result = containerd.ctr("run", "--rm", ref, "nixery-hello-cmd", timeout=120)
    assert result.stdout.strip() == "Hello, world!"
    digest = skopeo_inspect(server.host, "hello:latest")["Digest"]
    containerd.ctr("image", "pull", "--plain-http", f"{server.host}/hello@{digest}")


def test_podman_pull_and_run(server: Server) -> None:
    ref = f"{server.host}/shell/hello:latest"
    # podman refuses a run root longer than 50 characters: use a short path.
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        podman(Path(workdir), "pull", "--tls-verify=false", ref)
        images = json.loads(podman(Path(workdir), "images", "--format", "json").stdout)
        assert any(ref in name for image in images for name in image.get("Names", []))
        result = podman(Path(workdir), *PODMAN_RUN, ref, "/bin/sh", "-c", "hello && echo ok")
        assert result.stdout == "Hello, world!\nok\n"


def test_podman_runs_a_nonroot_image_as_its_user(server: Server) -> None:
    ref = f"{server.host}/shell/nonroot/hello:latest"
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        podman(Path(workdir), "pull", "--tls-verify=false", ref)
        result = podman(
            Path(workdir), *PODMAN_RUN,
            ref, "/bin/sh", "-c", "id -u; id -un; echo home > ~/file && cat ~/file; pwd",
        )  # fmt: skip
        assert result.stdout.split("\n")[:3] == ["65532", "nonroot", "home"]


def test_docker_pulls_runs_and_tells_the_history(server: Server, dockerd: Dockerd) -> None:
    ref = f"{server.host}/hello:latest"
    dockerd.docker("pull", ref)
    # No command given: the image's own, hello's meta.mainProgram.
    run_hello = dockerd.docker("run", "--rm", "--network", "none", ref, timeout=120)
    assert run_hello.stdout == "Hello, world!\n"
    inspected = json.loads(dockerd.docker("image", "inspect", ref).stdout)[0]
    assert inspected["Created"] == "1970-01-01T00:00:01Z"
    assert inspected["Config"]["Cmd"] == ["/bin/hello"]
    history = dockerd.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", ref).stdout
    assert "nix store paths: /nix/store/" in history and "-hello" in history
    # Docker takes OCI manifests, so it got the OCI one; by digest too.
    digest = inspected["RepoDigests"][0].split("@", 1)[1]
    oci = httpx.get(f"{server.url}/v2/hello/manifests/latest", timeout=60,
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
    assert oci.headers["docker-content-digest"] == digest
    dockerd.docker("pull", f"{server.host}/hello@{digest}")
    # A nonroot image runs as its user.
    who = dockerd.docker(
        "run", "--rm", "--network", "none", f"{server.host}/shell/nonroot/hello",
        "sh", "-c", "id -u; hello", timeout=120,
    ).stdout  # fmt: skip
    assert who == "65532\nHello, world!\n"


def test_missing_package_reaches_the_client(server: Server, tmp_path: Path) -> None:
    result = run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{server.host}/hello/no-such-package:latest",
            f"oci:{tmp_path / 'oci'}:x",
        ],
        check=False,
    )
    assert result.returncode != 0
    assert "no-such-package" in result.stderr


# ---------------------------------------------------------------------------
# Multi-platform indexes and zstd layers, with each client's own options.
# The arm64 images run here under qemu-user (tests/emulation.py).

AARCH64, X86_64 = 183, 62  # e_machine of an ELF


def elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


def test_skopeo_umoci_pick_each_platform_of_an_index(
    multiarch: Server, tmp_path: Path, arm64_emulation: object
) -> None:
    raw = skopeo_inspect(multiarch.host, "hello:latest", raw=True)
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    for arch in ("amd64", "arm64"):
        layout = tmp_path / f"oci-{arch}"
        skopeo_copy(multiarch.host, "hello:latest", layout, override_arch=arch)
        rootfs = umoci_unpack(layout, tmp_path / f"bundle-{arch}")
        # hello is a script run by the image's busybox: built for that platform.
        busyboxes = list(rootfs.glob("nix/store/*-busybox/bin/busybox"))
        assert len(busyboxes) == 1
        assert elf_machine(busyboxes[0]) == (AARCH64 if arch == "arm64" else X86_64)
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"


def test_skopeo_copies_zstd_layers_which_umoci_refuses(server: Server, tmp_path: Path) -> None:
    layout = tmp_path / "oci"
    skopeo_copy(server.host, "zstd/hello:latest", layout)  # verifies every digest
    manifest = skopeo_inspect(server.host, "zstd/hello:latest", raw=True)
    config = skopeo_inspect(server.host, "zstd/hello:latest", config=True)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
        tar = subprocess.run(["zstd", "-dc", str(blob)], capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
    # umoci 0.4.7 (Debian 12) predates zstd: it names the media type it refuses.
    refused = run(["umoci", "unpack", "--image", f"{layout}:image", str(tmp_path / "b")],
                  check=False)  # fmt: skip
    assert refused.returncode != 0
    assert "application/vnd.oci.image.layer.v1.tar+zstd" in refused.stderr


def test_ctr_pulls_and_runs_each_platform_and_zstd(
    multiarch: Server, containerd: Containerd, arm64_emulation: object
) -> None:
    ref = f"{multiarch.host}/hello:latest"
    for platform in ("linux/arm64", "linux/amd64"):
        containerd.ctr("image", "pull", "--plain-http", "--platform", platform, ref)
        result = containerd.ctr(
            "run", "--rm", "--platform", platform, ref, f"nixery-{platform[6:]}", timeout=120
        )
        assert result.stdout.strip() == "Hello, world!"
    zstd = f"{multiarch.host}/zstd/hello:latest"
    containerd.ctr("image", "pull", "--plain-http", zstd)
    result = containerd.ctr("run", "--rm", zstd, "nixery-zstd", timeout=120)
    assert result.stdout.strip() == "Hello, world!"


def test_podman_pulls_and_runs_each_platform_and_zstd(
    multiarch: Server, arm64_emulation: object
) -> None:
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        limits = ("--network", "none", "--ulimit", "nofile=1024:1024",
                  "--ulimit", "nproc=4096:4096")  # fmt: skip
        for name, platform in (("hello", "linux/arm64"), ("zstd/hello", "linux/amd64")):
            ref = f"{multiarch.host}/{name}:latest"
            podman(Path(workdir), "pull", "--tls-verify=false", "--platform", platform, ref)
            inspected = json.loads(podman(Path(workdir), "image", "inspect", ref).stdout)[0]
            assert inspected["Architecture"] == platform[6:]
            result = podman(Path(workdir), "run", "--rm", *limits, ref, timeout=120)
            assert result.stdout == "Hello, world!\n"
        # By the digest of the index, for one platform of it.
        accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
        index = httpx.get(f"{multiarch.url}/v2/hello/manifests/latest", headers=accept)
        ref = f"{multiarch.host}/hello@{index.headers['docker-content-digest']}"
        podman(Path(workdir), "pull", "--tls-verify=false", "--platform", "linux/arm64", ref)
        result = podman(Path(workdir), "run", "--rm", "--arch", "arm64", *limits, ref, timeout=120)
        assert result.stdout == "Hello, world!\n"


def test_docker_pulls_and_runs_each_platform_and_zstd(
    multiarch: Server, dockerd: Dockerd, arm64_emulation: object
) -> None:
    ref = f"{multiarch.host}/hello:latest"
    for platform in ("linux/arm64", "linux/amd64"):
        dockerd.docker("pull", "--platform", platform, ref)
        inspected = json.loads(dockerd.docker("image", "inspect", ref).stdout)[0]
        assert inspected["Architecture"] == platform[6:]
        result = dockerd.docker(
            "run", "--rm", "--network", "none", "--platform", platform, ref, timeout=120
        )
        assert result.stdout == "Hello, world!\n"
    # Docker 20.10's daemon already reads zstd layers (moby 20.10 added them).
    zstd = f"{multiarch.host}/zstd/hello:latest"
    dockerd.docker("pull", zstd)
    result = dockerd.docker("run", "--rm", "--network", "none", zstd, timeout=120)
    assert result.stdout == "Hello, world!\n"
