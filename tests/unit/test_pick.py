"""What a request for a tag gets: a manifest or an index, by format and Accept."""

from __future__ import annotations

import pytest

from nixery_trio.build.builder import ImageManifests, Manifest
from nixery_trio.core.errors import ManifestUnknown
from nixery_trio.core.manifest import DOCKER_MANIFEST, OCI_MANIFEST, Format

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
EVERYTHING = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"


def doc(media_type: str, name: str) -> Manifest:
    return Manifest(name.encode(), "sha256:" + name * 64, media_type)


AMD64 = ImageManifests(
    {Format.DOCKER: doc(DOCKER_MANIFEST, "a"), Format.OCI: doc(OCI_MANIFEST, "b")}
)
INDEXES = ImageManifests(
    {Format.DOCKER: doc(DOCKER_LIST, "c"), Format.OCI: doc(OCI_INDEX, "d")}, single=AMD64
)
ZSTD = ImageManifests({Format.OCI: doc(OCI_MANIFEST, "e")})
ZSTD_INDEX = ImageManifests({Format.OCI: doc(OCI_INDEX, "f")}, single=ZSTD)


@pytest.mark.parametrize(
    ("accept", "oci", "media_type"),
    [
        (EVERYTHING, True, OCI_INDEX),
        (EVERYTHING, False, DOCKER_LIST),
        (f"{DOCKER_MANIFEST}, {DOCKER_LIST}", True, DOCKER_LIST),
        (f"{OCI_MANIFEST}, {OCI_INDEX}", True, OCI_INDEX),
        (f"{OCI_MANIFEST}, {OCI_INDEX}", False, DOCKER_MANIFEST),  # Docker's only, no list named
        (f"{DOCKER_MANIFEST}, {OCI_MANIFEST}", True, OCI_MANIFEST),  # no list: first platform
        (None, True, DOCKER_MANIFEST),
        ("*/*", True, DOCKER_MANIFEST),
    ],
)
def test_a_multi_platform_tag(accept: str | None, oci: bool, media_type: str) -> None:
    assert INDEXES.pick(accept, oci).media_type == media_type


def test_a_zstd_image_is_oci_only() -> None:
    assert ZSTD.pick(EVERYTHING).media_type == OCI_MANIFEST
    assert ZSTD_INDEX.pick(EVERYTHING).media_type == OCI_INDEX
    # A client naming Docker's list only gets the one manifest it can take: none.
    for image in (ZSTD, ZSTD_INDEX):
        for accept, oci in ((DOCKER_MANIFEST, True), (None, True), (EVERYTHING, False)):
            with pytest.raises(ManifestUnknown, match="zstd, which only OCI manifests"):
                image.pick(accept, oci)
    assert ZSTD_INDEX.pick(f"{DOCKER_LIST}, {OCI_MANIFEST}").media_type == OCI_MANIFEST
