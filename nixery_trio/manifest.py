"""Image config and manifest JSON, in OCI's and Docker's formats. Pure, no I/O.

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

Every image has two manifests, an OCI image manifest and a Docker schema 2
one, that name the same config and layer blobs with their own media types;
each is a blob of its own, with its own digest.  Which one a request for a
tag gets is :func:`negotiate`'s rule: OCI when the client's ``Accept`` names
OCI's manifest type at least as much as Docker's, Docker's otherwise (no
``Accept``, only wildcards, or Docker's type alone).  Clients that accept
both send them in no fixed order (Docker's own client lists its types from
a Go map), so the order cannot decide, and OCI is the standard the client
declared it speaks; Docker's format stays for the clients that never
heard of OCI.

The same ``layers`` sequence must be passed to :func:`build_config` and
:func:`build_manifest`: the n-th ``diff_id`` in the config describes the
n-th layer of the manifest.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nixery_trio.digest import parse_digest
from nixery_trio.errors import DigestInvalid
from nixery_trio.image import Arch

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class Format(enum.Enum):
    """A manifest format: its manifest, config and gzipped layer media types."""

    OCI = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    DOCKER = (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP)

    @property
    def manifest_type(self) -> str:
        return self.value[0]

    @property
    def config_type(self) -> str:
        return self.value[1]

    @property
    def layer_type(self) -> str:
        return self.value[2]


MANIFEST_FORMATS = {fmt.manifest_type: fmt for fmt in Format}


def _accept_weights(accept: str) -> dict[str, float]:
    """Media type (or wildcard) to its ``q`` in an ``Accept`` header; the highest wins."""
    weights: dict[str, float] = {}
    for entry in accept.split(","):
        media_type, *params = (part.strip() for part in entry.split(";"))
        if not media_type:
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    weight = 0.0
        key = media_type.lower()
        weights[key] = max(weights.get(key, 0.0), weight)
    return weights


def _weight(weights: dict[str, float], media_type: str) -> float:
    """How much ``weights`` accepts ``media_type``: by name, else by wildcard."""
    if media_type in weights:
        return weights[media_type]
    return weights.get(media_type.split("/")[0] + "/*", weights.get("*/*", 0.0))


@functools.lru_cache(maxsize=256)
def negotiate(accept: str | None) -> Format:
    """The manifest format a request for a tag gets (see the module's text)."""
    if not accept:
        return Format.DOCKER
    weights = _accept_weights(accept)
    oci = weights.get(OCI_MANIFEST, 0.0)  # named, not a wildcard
    if oci > 0 and oci >= _weight(weights, DOCKER_MANIFEST):
        return Format.OCI
    return Format.DOCKER


@functools.lru_cache(maxsize=256)
def acceptable(accept: str | None, media_type: str) -> bool:
    """Whether a client sending ``accept`` takes ``media_type`` (no ``Accept``: anything)."""
    return not accept or _weight(_accept_weights(accept), media_type) > 0


SCHEMA_VERSION = 2
#: Every image's creation time: fixed, so that the same packages always give
#: the same digests (the Nix store's files are dated 1 too).
CREATED = "1970-01-01T00:00:01Z"

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


def build_config(
    *,
    arch: Arch,
    layers: Sequence[LayerBlob],
    cmd: Sequence[str] | None = None,
    user: str | None = None,
    history: Sequence[str] = (),
) -> bytes:
    """The image config: architecture, layer ``diff_ids`` in order, env, command and user.

    ``history`` says what each layer holds (one text per layer, in order),
    for ``docker history``; every date is :data:`CREATED`.
    """
    if history and len(history) != len(layers):
        raise ValueError(f"{len(history)} history entries for {len(layers)} layers")
    runtime: dict[str, Any] = {"Env": list(IMAGE_ENV)}
    if cmd:
        runtime["Cmd"] = list(cmd)
    if user:
        runtime["User"] = user
    document: dict[str, Any] = {
        "architecture": arch.oci_arch,
        "os": "linux",
        "created": CREATED,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "config": runtime,
    }
    if history:
        document["history"] = [{"created": CREATED, "created_by": text} for text in history]
    return canonical_json(document)


def command(
    requested: Sequence[str], main_programs: dict[str, str], has_bash: bool
) -> list[str] | None:
    """The image's ``Cmd``: ``bash`` if the image has it (``shell/...`` asks for a
    shell); else the program of the one package asked for, if it names one
    (``meta.mainProgram``, linked at ``/bin``); else none (the user names it)."""
    if has_bash:
        return ["bash"]
    if len(requested) == 1 and requested[0] in main_programs:
        return [f"/bin/{main_programs[requested[0]]}"]
    return None


class Blob(Protocol):
    """What a manifest says of a blob: its digest and its size."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...


def build_manifest(
    *,
    config_digest: str,
    config_size: int,
    layers: Sequence[Blob],
    fmt: Format = Format.DOCKER,
) -> bytes:
    """The manifest in ``fmt`` naming the config blob and the layers, in the given order."""
    parse_digest(config_digest)
    if config_size < 0:
        raise ValueError(f"config size must not be negative, got {config_size}")
    return canonical_json(
        {
            "schemaVersion": SCHEMA_VERSION,
            "mediaType": fmt.manifest_type,
            "config": {"mediaType": fmt.config_type, "size": config_size, "digest": config_digest},
            "layers": [
                {"mediaType": fmt.layer_type, "size": layer.size, "digest": layer.digest}
                for layer in layers
            ],
        }
    )


def convert_manifest(data: bytes, fmt: Format) -> bytes | None:
    """A stored manifest of ours in another format (same blobs), or ``None`` if it is not one."""
    refs = manifest_refs(data)
    if refs is None:
        return None
    config, *layers = refs
    return build_manifest(config_digest=config.digest, config_size=config.size, layers=layers,
                          fmt=fmt)  # fmt: skip


@dataclass(frozen=True)
class BlobRef:
    """A blob a manifest names: its digest and its size."""

    digest: str
    size: int


def manifest_format(data: bytes) -> Format | None:
    """The format of a stored manifest, or ``None`` if ``data`` is not one we serve."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    return MANIFEST_FORMATS.get(str(document.get("mediaType")))


def manifest_refs(data: bytes) -> list[BlobRef] | None:
    """The config and layers a stored manifest names (config first), or ``None``
    if ``data`` is not an OCI or Docker schema 2 image manifest (with valid digests)."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("mediaType") not in MANIFEST_FORMATS:
            return None
        entries = [document["config"], *document["layers"]]
        return [BlobRef(parse_digest(entry["digest"]), int(entry["size"])) for entry in entries]
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return None
