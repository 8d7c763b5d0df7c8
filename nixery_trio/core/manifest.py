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

An image made for several platforms is answered by an *index* naming one
manifest per platform: an OCI image index of the OCI manifests, or a Docker
manifest list of the Docker ones; :func:`index_formats` picks it the same
way, but only for a client that names a list type in its ``Accept`` (a
client that does not gets the first platform's manifest, as CNCF
distribution does).  Layers compressed with zstd exist in OCI manifests
only: Docker's schema 2 has no media type for them.

The same ``layers`` sequence must be passed to :func:`build_config` and
:func:`build_manifest`: the n-th ``diff_id`` in the config describes the
n-th layer of the manifest.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .digest import parse_digest
from .errors import DigestInvalid
from .image import Arch

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


class Format(enum.Enum):
    """A manifest format: its manifest, config, gzipped layer and index media types."""

    OCI = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP, OCI_INDEX)
    DOCKER = (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_LIST)

    @property
    def manifest_type(self) -> str:
        return self.value[0]

    @property
    def config_type(self) -> str:
        return self.value[1]

    @property
    def layer_type(self) -> str:
        return self.value[2]

    @property
    def index_type(self) -> str:
        return self.value[3]

    def holds(self, compression: str) -> bool:
        """Whether its manifests can hold layers compressed with ``compression``."""
        return compression == "gzip" or (compression == "zstd" and self is Format.OCI)

    def layer_type_for(self, compression: str) -> str:
        """The media type of a layer compressed with ``gzip`` or ``zstd`` (OCI only)."""
        if not self.holds(compression):
            raise ValueError(f"{self.name} manifests cannot hold {compression} layers")
        return self.layer_type if compression == "gzip" else OCI_LAYER_ZSTD


MANIFEST_FORMATS = {fmt.manifest_type: fmt for fmt in Format}
INDEX_FORMATS = {fmt.index_type: fmt for fmt in Format}
#: Manifests and indexes are small; anything bigger in the CAS is not one of ours.
DOCUMENT_LIMIT = 4 << 20


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
def index_formats(accept: str | None) -> tuple[Format, ...]:
    """The index formats a client names in ``accept``, preferred first (OCI's
    when its ``q`` is at least Docker's); none: it gets one platform's manifest."""
    weights = _accept_weights(accept) if accept else {}
    oci, docker = weights.get(OCI_INDEX, 0.0), weights.get(DOCKER_LIST, 0.0)
    named = [(weight, fmt) for weight, fmt in ((oci, Format.OCI), (docker, Format.DOCKER))
             if weight > 0]  # fmt: skip
    return tuple(fmt for _, fmt in sorted(named, key=lambda pair: -pair[0]))


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
    if arch.oci_variant:
        document["variant"] = arch.oci_variant
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
    compression: str = "gzip",
) -> bytes:
    """The manifest in ``fmt`` naming the config blob and the layers, in the given order.

    ``compression`` says how the layers are compressed: ``gzip``, or
    ``zstd`` (OCI only).
    """
    parse_digest(config_digest)
    if config_size < 0:
        raise ValueError(f"config size must not be negative, got {config_size}")
    layer_type = fmt.layer_type_for(compression)
    return canonical_json(
        {
            "schemaVersion": SCHEMA_VERSION,
            "mediaType": fmt.manifest_type,
            "config": {"mediaType": fmt.config_type, "size": config_size, "digest": config_digest},
            "layers": [
                {"mediaType": layer_type, "size": layer.size, "digest": layer.digest}
                for layer in layers
            ],
        }
    )


def build_index(fmt: Format, manifests: Sequence[tuple[Blob, Arch]]) -> bytes:
    """The index in ``fmt`` (OCI image index or Docker manifest list) naming one
    manifest of ``fmt`` per platform, in the given order."""
    entries = []
    for manifest, arch in manifests:
        parse_digest(manifest.digest)
        platform = {"architecture": arch.oci_arch, "os": "linux"}
        if arch.oci_variant:
            platform["variant"] = arch.oci_variant
        entries.append({"mediaType": fmt.manifest_type, "size": manifest.size,
                        "digest": manifest.digest, "platform": platform})  # fmt: skip
    return canonical_json(
        {"schemaVersion": SCHEMA_VERSION, "mediaType": fmt.index_type, "manifests": entries}
    )


def convert_manifest(data: bytes, fmt: Format) -> bytes | None:
    """A stored gzip manifest of ours in another format (same blobs), or ``None``
    if it is not one."""
    document = parse_document(data)
    source = None if document is None else MANIFEST_FORMATS.get(document.media_type)
    if document is None or source is None:
        return None
    config, *layers = document.refs
    if any(layer.media_type != source.layer_type for layer in layers):
        return None  # zstd layers have no Docker type
    return build_manifest(config_digest=config.digest, config_size=config.size, layers=layers,
                          fmt=fmt)  # fmt: skip


@dataclass(frozen=True)
class BlobRef:
    """A blob a document names: its digest and size (and media type, which
    does not take part in comparisons: two formats name the same blobs)."""

    digest: str
    size: int
    media_type: str = field(default="", compare=False)


@dataclass(frozen=True)
class Document:
    """A stored manifest or index: its media type and the blobs it names (a
    manifest's config first, then its layers; an index's manifests)."""

    media_type: str
    refs: list[BlobRef]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_FORMATS


def parse_document(data: bytes) -> Document | None:
    """``data`` as a manifest or index we serve, or ``None`` if it is neither
    (or names a blob by an invalid digest)."""
    try:
        document = json.loads(data)
        media_type = document.get("mediaType") if isinstance(document, dict) else None
        if media_type in MANIFEST_FORMATS:
            entries = [document["config"], *document["layers"]]
        elif media_type in INDEX_FORMATS:
            entries = list(document["manifests"])
        else:
            return None
        refs = [BlobRef(parse_digest(entry["digest"]), int(entry["size"]),
                        str(entry.get("mediaType", ""))) for entry in entries]  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, DigestInvalid):
        return None
    return Document(media_type, refs)


def manifest_format(data: bytes) -> Format | None:
    """The format of a stored manifest, or ``None`` if ``data`` is not one we serve."""
    document = parse_document(data)
    return None if document is None else MANIFEST_FORMATS.get(document.media_type)


def manifest_refs(data: bytes) -> list[BlobRef] | None:
    """What a stored manifest or index names (see :class:`Document`), or ``None``."""
    document = parse_document(data)
    return None if document is None else document.refs


@dataclass(frozen=True)
class Closure:
    """What documents name, through indexes: every blob with the size it is
    named with (a top document: its own), and the documents that were read."""

    blobs: dict[str, int]
    documents: list[str]


def closure(tops: Iterable[str], read: Callable[[str], bytes | None]) -> Closure:
    """The :class:`Closure` of the documents ``tops``, read with ``read``
    (``None``: not there).  LookupError (its argument the digest) for a
    document that is not there, ValueError for one that is no manifest or
    index, or not the size named."""
    blobs: dict[str, int] = {}
    documents: list[str] = []
    pending: list[tuple[str, int | None]] = [(top, None) for top in reversed(list(tops))]
    while pending:
        digest, named = pending.pop()
        if digest in documents:
            continue
        data = read(digest)
        if data is None:
            raise LookupError(digest)
        document = parse_document(data)
        if document is None:
            raise ValueError(f"{digest} is no manifest or index")
        if named is not None and named != len(data):
            raise ValueError(f"{digest} has {len(data)} bytes, its index says {named}")
        blobs[digest] = len(data)
        documents.append(digest)
        for ref in document.refs:
            if document.is_index:
                pending.append((ref.digest, ref.size))  # a platform's manifest: read it too
            else:
                blobs.setdefault(ref.digest, ref.size)
    return Closure(blobs, documents)
