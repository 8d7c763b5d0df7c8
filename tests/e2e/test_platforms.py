"""Multi-platform indexes and zstd layers over real HTTP, built with real Nix."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import httpx
import zstandard

from nixery_trio.ops import maintenance

from .conftest import MULTIARCH
from .server import Server, start_server

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: What containerd, podman and Docker send, in substance.
EVERYTHING = f"{DOCKER}, {DOCKER_LIST}, {OCI}, {OCI_INDEX}"


def get(server: Server, path: str, accept: str | None = EVERYTHING, method: str = "GET"
        ) -> httpx.Response:  # fmt: skip
    headers = {} if accept is None else {"Accept": accept}
    return httpx.request(method, server.url + path, headers=headers, timeout=120)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 404, response.text
    [error] = response.json()["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    return dict(error)


def test_zstd_layers_hold_the_same_tars_in_oci_manifests_only(server: Server) -> None:
    gzipped = get(server, "/v2/hello/manifests/latest", OCI).json()
    response = get(server, "/v2/zstd/hello/manifests/latest", OCI)
    assert response.status_code == 200, response.text
    manifest = response.json()
    assert response.headers["content-type"] == OCI == manifest["mediaType"]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {ZSTD_LAYER}
    # The same tars: the same diff_ids, so the same config blob as hello's.
    assert manifest["config"] == gzipped["config"]
    config = get(server, f"/v2/hello/blobs/{manifest['config']['digest']}").json()
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = get(server, f"/v2/zstd/hello/blobs/{layer['digest']}").content
        assert digest_of(blob) == layer["digest"] and len(blob) == layer["size"]
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                            read_across_frames=True)  # fmt: skip
        assert digest_of(reader.read()) == diff_id
    gzip_layers = {layer["digest"] for layer in gzipped["layers"]}
    assert not gzip_layers & {layer["digest"] for layer in manifest["layers"]}
    # By digest it is served as stored; by tag, a client that takes only
    # Docker's format is told why there is nothing for it.
    digest = response.headers["docker-content-digest"]
    assert get(server, f"/v2/zstd/hello/manifests/{digest}", OCI).content == response.content
    for accept in (DOCKER, None):
        error = error_of(get(server, "/v2/zstd/hello/manifests/latest", accept))
        assert "zstd" in error["message"] and "without zstd/" in error["message"]
    # Cached like any image: asking again builds nothing.
    layers_built = server.count("layer.built")
    assert get(server, "/v2/zstd/hello/manifests/latest", OCI).content == response.content
    assert server.count("layer.built") == layers_built


def test_a_tag_answers_with_an_index_of_every_platform(multiarch: Server) -> None:
    index = get(multiarch, "/v2/hello/manifests/latest")
    assert index.status_code == 200, index.text
    assert index.headers["content-type"] == OCI_INDEX == index.json()["mediaType"]
    assert index.headers["docker-content-digest"] == digest_of(index.content)
    entries = index.json()["manifests"]
    assert [entry["platform"] for entry in entries] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    # Each platform's manifest is the image its own name gives: arm64/ still
    # gives one arm64 image, the same one.
    arm64 = get(multiarch, "/v2/arm64/hello/manifests/latest")
    assert arm64.headers["content-type"] == OCI
    assert entries[1]["digest"] == arm64.headers["docker-content-digest"]
    assert entries[1]["size"] == len(arm64.content)
    configs = []
    for entry in entries:
        assert entry["mediaType"] == OCI
        manifest = get(multiarch, f"/v2/hello/manifests/{entry['digest']}")
        assert manifest.status_code == 200 and digest_of(manifest.content) == entry["digest"]
        config_digest = manifest.json()["config"]["digest"]
        configs.append(get(multiarch, f"/v2/hello/blobs/{config_digest}").json())
        for layer in manifest.json()["layers"]:
            head = get(multiarch, f"/v2/hello/blobs/{layer['digest']}", method="HEAD")
            assert int(head.headers["content-length"]) == layer["size"]
    assert [(c["architecture"], c.get("variant")) for c in configs] == [
        ("amd64", None), ("arm64", "v8")
    ]  # fmt: skip
    assert configs[0]["config"]["Cmd"] == configs[1]["config"]["Cmd"] == ["/bin/hello"]
    # Two Nix builds, one per platform, each under its own system.
    systems = {e["system"] for e in multiarch.events("nix.build") if e["image"] == "hello"}
    assert systems == {"x86_64-linux", "aarch64-linux"}

    # The index by digest, as stored.
    digest = index.headers["docker-content-digest"]
    assert get(multiarch, f"/v2/hello/manifests/{digest}").content == index.content
    head = get(multiarch, "/v2/hello/manifests/latest", method="HEAD")
    assert head.headers["docker-content-digest"] == digest and head.content == b""


def test_the_index_format_follows_accept(multiarch: Server) -> None:
    answers = {}
    for accept in (EVERYTHING, f"{DOCKER}, {DOCKER_LIST}", f"{DOCKER}, {OCI}", DOCKER, None):
        response = get(multiarch, "/v2/hello/manifests/latest", accept)
        assert response.status_code == 200, response.text
        answers[accept] = response
    assert {accept: r.headers["content-type"] for accept, r in answers.items()} == {
        EVERYTHING: OCI_INDEX,
        f"{DOCKER}, {DOCKER_LIST}": DOCKER_LIST,
        f"{DOCKER}, {OCI}": OCI,  # no list type named: the first platform's manifest
        DOCKER: DOCKER,
        None: DOCKER,
    }
    docker_list = answers[f"{DOCKER}, {DOCKER_LIST}"].json()
    oci_index = answers[EVERYTHING].json()
    assert [e["mediaType"] for e in docker_list["manifests"]] == [DOCKER, DOCKER]
    assert [e["platform"] for e in docker_list["manifests"]] == [
        e["platform"] for e in oci_index["manifests"]
    ]
    # The first platform's manifests are the ones the lists name first.
    assert docker_list["manifests"][0]["digest"] == answers[DOCKER].headers["docker-content-digest"]
    assert (
        oci_index["manifests"][0]["digest"]
        == answers[f"{DOCKER}, {OCI}"].headers["docker-content-digest"]
    )


def test_a_zstd_index_is_oci_only(multiarch: Server) -> None:
    index = get(multiarch, "/v2/zstd/hello/manifests/latest")
    assert index.headers["content-type"] == OCI_INDEX, index.text
    for entry in index.json()["manifests"]:
        manifest = get(multiarch, f"/v2/zstd/hello/manifests/{entry['digest']}").json()
        assert {layer["mediaType"] for layer in manifest["layers"]} == {ZSTD_LAYER}
    assert (
        "zstd"
        in error_of(get(multiarch, "/v2/zstd/hello/manifests/latest", DOCKER_LIST))["message"]
    )


def test_a_package_missing_on_one_platform_fails_the_index(multiarch: Server) -> None:
    response = get(multiarch, "/v2/hello/no-such-package/manifests/latest")
    assert "no-such-package" in error_of(response)["message"]


def test_gc_keeps_what_an_index_names_and_fsck_is_clean(tmp_path: Path) -> None:
    with start_server(tmp_path, extra=MULTIARCH) as multiarch:
        gc_keeps_what_an_index_names(multiarch)


def gc_keeps_what_an_index_names(multiarch: Server) -> None:
    assert get(multiarch, "/v2/zstd/hello/manifests/latest").status_code == 200
    index = get(multiarch, "/v2/hello/manifests/latest")
    digest = index.headers["docker-content-digest"]
    assert maintenance.fsck(multiarch.storage) == []
    # Only the index was used lately: its time reaches its manifests, and
    # theirs their configs and layers, so gc keeps them all and nothing else.
    named = {digest}
    for entry in index.json()["manifests"]:
        manifest = get(multiarch, f"/v2/hello/manifests/{entry['digest']}").json()
        named |= {entry["digest"], manifest["config"]["digest"]}
        named |= {layer["digest"] for layer in manifest["layers"]}
    blobs = multiarch.storage / "blobs" / "sha256"
    long_ago = time.time() - 7200
    for blob in blobs.iterdir():
        if "sha256:" + blob.name != digest:
            os.utime(blob, (long_ago, long_ago))
    report = maintenance.gc(multiarch.storage, max_size=0, grace=3600)
    kept = {"sha256:" + blob.name for blob in blobs.iterdir()}
    assert kept == named and report.removed
    assert get(multiarch, f"/v2/hello/manifests/{digest}").content == index.content
    assert maintenance.fsck(multiarch.storage) == []
