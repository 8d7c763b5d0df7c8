"""The s3 storage backend end to end: a registry whose store is a SeaweedFS bucket.

Blob GETs are 307 redirects to presigned bucket URLs (or, with presigning
off, proxied); real clients pull through them and run what they pulled;
a second server on the same bucket serves what the first built.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from .clients import (
    PODMAN_RUN,
    Containerd,
    Dockerd,
    chroot,
    podman,
    skopeo_copy,
    umoci_unpack,
)
from .s3test import ACCESS_KEY, REGION, SECRET_KEY
from .seaweed import Seaweed, s3_settings, start_on_bucket
from .server import Server, start_server, wait_for

OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def bucket(seaweed: Seaweed) -> str:
    return seaweed.create_bucket()


@pytest.fixture(scope="module")
def s3_server(
    tmp_path_factory: pytest.TempPathFactory, seaweed: Seaweed, bucket: str
) -> Iterator[Server]:
    running = start_on_bucket(tmp_path_factory.mktemp("s3reg"), seaweed, bucket)
    yield running
    running.stop()


def layers_of(server: Server, image: str) -> list[dict[str, object]]:
    manifest = httpx.get(f"{server.url}/v2/{image}/manifests/latest", headers={"Accept": OCI},
                         timeout=120)  # fmt: skip
    assert manifest.status_code == 200, manifest.text
    return list(manifest.json()["layers"])


def test_blob_gets_are_redirects_to_the_bucket(s3_server: Server, seaweed: Seaweed) -> None:
    layer = layers_of(s3_server, "hello")[0]
    digest, size = str(layer["digest"]), int(str(layer["size"]))
    url = f"{s3_server.url}/v2/hello/blobs/{digest}"
    redirect = httpx.get(url, timeout=30)
    assert redirect.status_code == 307
    assert redirect.headers["docker-content-digest"] == digest
    location = redirect.headers["location"]
    target = urlsplit(location)
    assert f"{target.scheme}://{target.netloc}" == seaweed.endpoint
    assert "X-Amz-Signature=" in target.query and "X-Amz-Expires=300" in target.query
    # The bucket answers the presigned URL with the blob, whole or a range.
    whole = httpx.get(location, timeout=30)
    assert whole.status_code == 200
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == digest
    assert len(whole.content) == size
    ranged = httpx.get(url, headers={"Range": "bytes=10-99"}, follow_redirects=True, timeout=30)
    assert ranged.status_code == 206 and ranged.content == whole.content[10:100]
    # Without the signature the bucket refuses.
    assert httpx.get(location.split("?")[0], timeout=30).status_code == 403
    # HEAD is the registry's own answer: no redirect.
    head = httpx.head(url, timeout=30)
    assert head.status_code == 200 and head.headers["content-length"] == str(size)


def test_an_unknown_blob_is_blob_unknown(s3_server: Server) -> None:
    url = f"{s3_server.url}/v2/hello/blobs/sha256:{'0' * 64}"
    for response in (httpx.get(url, timeout=30), httpx.head(url, timeout=30)):
        assert response.status_code == 404
    assert httpx.get(url, timeout=30).json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_skopeo_pulls_through_the_redirects(s3_server: Server, tmp_path: Path) -> None:
    skopeo_copy(s3_server.host, "shell/hello:latest", tmp_path / "oci")
    rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
    assert chroot(rootfs, "/bin/bash", "-c", "hello").stdout == "Hello, world!\n"


def test_ctr_pulls_through_the_redirects(s3_server: Server, containerd: Containerd) -> None:
    ref = f"{s3_server.host}/hello:latest"
    containerd.ctr("image", "pull", "--plain-http", ref)
    result = containerd.ctr("run", "--rm", ref, "nixery-s3-hello", "/bin/hello", timeout=120)
    assert result.stdout.strip() == "Hello, world!"


def test_podman_pulls_through_the_redirects(s3_server: Server) -> None:
    ref = f"{s3_server.host}/shell/hello:latest"
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        podman(Path(workdir), "pull", "--tls-verify=false", ref)
        result = podman(Path(workdir), *PODMAN_RUN, ref, "/bin/sh", "-c", "hello && echo ok")
        assert result.stdout == "Hello, world!\nok\n"


def test_docker_pulls_through_the_redirects(s3_server: Server, dockerd: Dockerd) -> None:
    ref = f"{s3_server.host}/hello:latest"
    dockerd.docker("pull", ref)
    result = dockerd.docker("run", "--rm", "--network", "none", ref, timeout=120)
    assert result.stdout == "Hello, world!\n"


def test_a_second_server_on_the_bucket_serves_what_the_first_built(
    s3_server: Server, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Records and blobs are in the bucket: a replica with an empty local
    directory answers from them, with no Nix build of its own."""
    first = httpx.get(f"{s3_server.url}/v2/hello/manifests/latest", headers={"Accept": OCI},
                      timeout=120)  # fmt: skip
    with start_on_bucket(tmp_path / "replica", seaweed, bucket) as replica:
        second = httpx.get(f"{replica.url}/v2/hello/manifests/latest", headers={"Accept": OCI},
                           timeout=120)  # fmt: skip
        assert second.status_code == 200
        assert second.content == first.content
        assert replica.count("image.built") == 0 and replica.count("layer.built") == 0
        catalog = httpx.get(f"{replica.url}/v2/_catalog", timeout=30).json()
        assert "hello" in catalog["repositories"]


def test_with_presigning_off_blobs_are_proxied(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    with start_on_bucket(tmp_path, seaweed, bucket, "--s3-use-presigned-urls", "0") as proxy:
        layer = layers_of(proxy, "hello")[-1]
        digest, size = str(layer["digest"]), int(str(layer["size"]))
        url = f"{proxy.url}/v2/hello/blobs/{digest}"
        whole = httpx.get(url, timeout=30)
        assert whole.status_code == 200 and len(whole.content) == size
        assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == digest
        ranged = httpx.get(url, headers={"Range": f"bytes=5-{size - 1}"}, timeout=30)
        assert ranged.status_code == 206 and ranged.content == whole.content[5:]
        assert ranged.headers["content-range"] == f"bytes 5-{size - 1}/{size}"
        bad = httpx.get(url, headers={"Range": f"bytes={size}-"}, timeout=30)
        assert bad.status_code == 416
        skopeo_copy(proxy.host, "hello:latest", tmp_path / "oci")
        rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"


def test_a_wrong_bucket_or_key_fails_the_start(seaweed: Seaweed, tmp_path: Path) -> None:
    flags, env = s3_settings(seaweed, "no-such-bucket")
    with pytest.raises(RuntimeError, match="no-such-bucket"):
        start_server(tmp_path / "a", extra=[*flags, "--workers", "1"], env=env)
    flags, env = s3_settings(seaweed, seaweed.create_bucket())
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    with pytest.raises(RuntimeError, match=r"S3 access to the bucket .* failed"):
        start_server(tmp_path / "b", extra=[*flags, "--workers", "1"], env=env)


def test_records_are_in_the_bucket(s3_server: Server, seaweed: Seaweed, bucket: str) -> None:
    layers_of(s3_server, "hello")
    import boto3

    client = boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name=REGION)  # fmt: skip
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    prefixes = {key.split("/")[0] + "/" + key.split("/")[1] for key in keys}
    assert {"index/layers", "index/manifests", "blobs/sha256"} <= prefixes
    assert not any(key.startswith("uploads/") for key in keys)


def nixery(command: str, seaweed: Seaweed, bucket: str, local: Path,
           *args: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``nixery-trio COMMAND`` on the bucket."""
    flags, env = s3_settings(seaweed, bucket)
    return subprocess.run(
        [sys.executable, "-m", "nixery_trio", command, "--storage-path", str(local), *flags,
         *args], env=os.environ | env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_fsck_and_gc_on_the_bucket(seaweed: Seaweed, tmp_path: Path) -> None:
    bucket = seaweed.create_bucket()
    local = tmp_path / "ops"
    with start_on_bucket(tmp_path / "reg", seaweed, bucket) as server:
        layers = layers_of(server, "hello")
        layers_of(server, "shell/hello")
        checked = nixery("fsck", seaweed, bucket, local)
        assert checked.returncode == 0 and "fsck: 0 problem(s)" in checked.stdout, checked
        # Beside the running server, gc removes nothing it served within --grace.
        collected = nixery("gc", seaweed, bucket, local, "--max-size", "0", "--grace", "120")
        assert collected.returncode == 0, collected
        assert "removed 0 blob(s)" in collected.stdout and "still over 0 bytes" in collected.stdout
        assert httpx.get(f"{server.url}/v2/hello/blobs/{layers[0]['digest']}",
                         follow_redirects=True, timeout=30).status_code == 200  # fmt: skip
    # A layer's bytes go bad in the bucket: fsck says so, and --repair drops
    # the blob and the records that name it.
    from nixery_trio.config import S3Settings
    from nixery_trio.store.s3store import S3Store, blob_key
    from nixery_trio.store.storage import open_storage

    settings = S3Settings(bucket=bucket, endpoint_url=seaweed.endpoint, region=REGION,
                          access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)  # fmt: skip
    store = open_storage(local, settings)
    assert isinstance(store, S3Store)
    store.bucket.put(blob_key(str(layers[0]["digest"])), b"rotten")
    damaged = nixery("fsck", seaweed, bucket, local)
    assert damaged.returncode == 1
    assert f"blob {layers[0]['digest']}: content hashes to" in damaged.stdout
    assert "layer-record" in damaged.stdout and "manifest-record" in damaged.stdout
    assert nixery("fsck", seaweed, bucket, local, "--repair").returncode == 0
    assert nixery("fsck", seaweed, bucket, local).stdout.strip() == "fsck: 0 problem(s), 0 repaired"
    # An hour on with nothing served, gc empties the bucket to fit 0 bytes,
    # records and all; a server on it then builds afresh.
    from nixery_trio.ops import maintenance

    report = maintenance.gc(store, 0, grace=120, now=time.time() + 3600)
    assert report.removed and report.size_after == 0
    assert list(store.blob_entries()) == []
    assert nixery("fsck", seaweed, bucket, local).returncode == 0
    with start_on_bucket(tmp_path / "again", seaweed, bucket) as server:
        skopeo_copy(server.host, "hello:latest", tmp_path / "oci")
        rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"
        assert server.count("image.built") == 1


def test_the_page_metrics_and_ls_see_the_bucket(
    s3_server: Server, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    skopeo_copy(s3_server.host, "hello:latest", tmp_path / "oci")  # a pull by tag records it
    def hello_listed() -> list[str]:
        listing = nixery("ls", seaweed, bucket, tmp_path / "ops", "--json").stdout
        return [line for line in listing.splitlines() if '"name": "hello", "tag": "latest"' in line]

    listed = wait_for(hello_listed, 30, "ls to list hello:latest")
    held = json.loads(listed[0])
    assert held["size"] > 0 and held["last_pulled"] > 0
    status = httpx.get(f"{s3_server.url}/status.json", timeout=30).json()
    assert status["store"]["size"] > 0
    metrics = httpx.get(f"{s3_server.url}/metrics", timeout=30).text
    blobs = [line for line in metrics.splitlines() if line.startswith("nixery_store_blobs ")]
    assert blobs and float(blobs[0].split()[1]) > 0


def test_export_and_import_refuse_a_bucket(seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "in.tar").write_bytes(b"")  # the bundle must exist for click to go on
    for command, args in (("export", ("-o", str(tmp_path / "out.tar"))),
                          ("import", (str(tmp_path / "in.tar"),))):  # fmt: skip
        refused = nixery(command, seaweed, bucket, tmp_path / "ops", *args)
        assert refused.returncode == 1
        assert f"works on the filesystem backend only; this store is the bucket {bucket}" in (
            refused.stderr
        )
