"""Pull with real clients (skopeo, umoci, ctr, podman) and run what they pulled."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx

from .clients import (
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
        # This sandbox may not raise rlimits: pin the ones runc would set.
        result = podman(
            Path(workdir), "run", "--rm", "--network", "none",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
            ref, "/bin/sh", "-c", "hello && echo ok",
        )  # fmt: skip
        assert result.stdout == "Hello, world!\nok\n"


def test_podman_runs_a_nonroot_image_as_its_user(server: Server) -> None:
    ref = f"{server.host}/shell/nonroot/hello:latest"
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        podman(Path(workdir), "pull", "--tls-verify=false", ref)
        result = podman(
            Path(workdir), "run", "--rm", "--network", "none",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
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
