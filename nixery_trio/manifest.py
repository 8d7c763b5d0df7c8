"""Image config and manifest JSON (Docker image manifest v2, schema 2). Pure, no I/O.

A pulled image is three kinds of blob: the layers (gzipped tars), a *config*
naming the architecture, the uncompressed layer digests (``diff_ids``) and the
runtime settings, and a *manifest* pointing at the config and the layers by
digest.  The builder writes the layers, then asks this module for the config
bytes, stores them, and asks for the manifest that names them.

Both documents are returned as bytes, not dicts, because their digest *is*
their name: the bytes we hash must be the bytes we serve.  They are encoded
canonically (sorted keys, no whitespace, ASCII) and carry no timestamps, so
the same layers always give the same config and manifest digests, and a
rebuilt image is byte-identical to the cached one.

We emit Docker's media types (as Nixery does) because every client, old or
new, accepts them.  The same ``layers`` sequence must be passed to
:func:`build_config` and :func:`build_manifest`: the n-th ``diff_id`` in the
config describes the n-th layer of the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nixery_trio.digest import parse_digest
from nixery_trio.errors import DigestInvalid
from nixery_trio.image import Arch

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

SCHEMA_VERSION = 2

IMAGE_ENV: tuple[str, ...] = (
    # cacert is in every image; point OpenSSL and friends at its bundle.
    "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
    # The symlink forest puts every package's bin/ under /bin.
    "PATH=/bin:/usr/bin",
)


@dataclass(frozen=True)
class LayerBlob:
    """A layer as stored: what the manifest and config need to know of it.

    ``digest`` is the sha256 of the gzipped bytes (the blob's name in the
    registry); ``diff_id`` the sha256 of the uncompressed tar (what the
    runtime verifies after unpacking); ``size`` the gzipped size in bytes.
    Both digests are validated on construction.
    """

    digest: str
    diff_id: str
    size: int

    def __post_init__(self) -> None:
        parse_digest(self.digest)
        parse_digest(self.diff_id)
        if self.size < 0:
            raise ValueError(f"layer {self.digest} has a negative size: {self.size}")


def canonical_json(document: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators, ASCII only."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def build_config(*, arch: Arch, layers: Sequence[LayerBlob], has_bash: bool) -> bytes:
    """The image config: architecture, layer ``diff_ids`` in order, env, and ``bash`` if present.

    ``Cmd`` is set only when the image has ``bashInteractive``; otherwise
    there is no sensible default and the user names the command to run.
    """
    runtime: dict[str, Any] = {"Env": list(IMAGE_ENV)}
    if has_bash:
        runtime["Cmd"] = ["bash"]
    return canonical_json(
        {
            "architecture": arch.oci_arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "config": runtime,
        }
    )


def build_manifest(*, config_digest: str, config_size: int, layers: Sequence[LayerBlob]) -> bytes:
    """The schema 2 manifest naming the config blob and the layers, in the given order."""
    parse_digest(config_digest)
    if config_size < 0:
        raise ValueError(f"config size must not be negative, got {config_size}")
    return canonical_json(
        {
            "schemaVersion": SCHEMA_VERSION,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": config_size, "digest": config_digest},
            "layers": [
                {"mediaType": DOCKER_LAYER_GZIP, "size": layer.size, "digest": layer.digest}
                for layer in layers
            ],
        }
    )


@dataclass(frozen=True)
class BlobRef:
    """A blob a manifest names: its digest and its size."""

    digest: str
    size: int


def manifest_refs(data: bytes) -> list[BlobRef] | None:
    """The config and layers a stored manifest names, or ``None`` if ``data``
    is not a Docker schema 2 manifest (with valid digests)."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("mediaType") != DOCKER_MANIFEST:
            return None
        entries = [document["config"], *document["layers"]]
        return [BlobRef(parse_digest(entry["digest"]), int(entry["size"])) for entry in entries]
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return None
