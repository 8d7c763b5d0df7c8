"""Bundles: the images a store holds, as one OCI image layout archive (``export``).

A bundle is what an air-gapped mirror is filled from: a plain tar holding an
OCI image layout, which skopeo (``oci-archive:``), ``podman load`` and
``ctr image import`` read as they are::

    oci-layout                  {"imageLayoutVersion": "1.0.0"}
    index.json                  one entry per name:tag, its OCI manifest or index
    blobs/sha256/<hex>          every blob the images take, in digest order

Each entry of ``index.json`` is the document an OCI client pulling the tag
gets (an OCI image index for a multi-platform image), annotated with
``org.opencontainers.image.ref.name`` = ``name:tag`` (the full reference,
as ``ctr`` and ``podman`` name what they load) and, when the image has
Docker manifests too, the digest of Docker's document
(:data:`DOCKER_ANNOTATION`): its blobs are in the bundle, so an importing
registry serves both formats.  Every platform the tag has is in it.

The bytes depend only on what the store holds for the chosen tags: entries
sorted, every header the same fixed ustar/pax fields ``archive.py`` writes
for layers (mtime 1, root, mode 0644).  So one store gives one bundle, byte
for byte, which can be checksummed and signed.  ``since`` leaves out the
blobs an earlier bundle carried (its ``index.json`` still names every
image): a weekly delta moves only what is new.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .archive import tar_header
from .cache import MANIFEST_KEYS, TagCache
from .cas import CAS
from .manifest import OCI_INDEX, Format, canonical_json, document_type, is_index, manifest_refs

#: The annotation naming an image in an OCI layout.
REF_NAME = "org.opencontainers.image.ref.name"
#: The annotation carrying the digest of the image's Docker manifest (or list).
DOCKER_ANNOTATION = "dev.nixery-trio.docker.digest"
#: The annotation carrying the platforms of the image, comma-separated.
PLATFORMS_ANNOTATION = "dev.nixery-trio.platforms"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
#: Documents (manifests, indexes) are small; what is bigger is a layer.
DOCUMENT_LIMIT = 4 << 20
_BLOCK = 512
_COPY = 1 << 20


class BundleError(Exception):
    """A bundle cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the tags, the blobs in it, those left to the base."""

    refs: list[str]
    blobs: int
    left_out: int
    size: int


def export(
    root: Path, out: BinaryIO, names: Iterable[str] = (), since: Path | None = None
) -> Exported:
    """Write the bundle of ``names`` (``NAME`` or ``NAME:TAG``; none: every tag
    the store holds) to ``out``."""
    cas = CAS(root)
    records = _chosen(TagCache(root, cas).records(), list(names))
    entries: list[dict[str, Any]] = []
    refs: list[str] = []
    digests: set[str] = set()
    for record in records:
        docs = {fmt: str(record[key]) for fmt, key in MANIFEST_KEYS.items() if key in record}
        top = docs.get(Format.OCI) or docs[Format.DOCKER]
        for digest in docs.values():
            digests |= _closure(cas, digest)
        annotations = {REF_NAME: f"{record['name']}:{record['tag']}",
                       PLATFORMS_ANNOTATION: ",".join(record.get("platforms", []))}  # fmt: skip
        if Format.OCI in docs and Format.DOCKER in docs:
            annotations[DOCKER_ANNOTATION] = docs[Format.DOCKER]
        data = _read(cas, top)
        refs.append(annotations[REF_NAME])
        entries.append({"mediaType": document_type(data), "digest": top, "size": len(data),
                        "annotations": annotations})  # fmt: skip
    carried = _bundle_blobs(since) if since is not None else set()
    included = sorted(digests - carried)
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    size = 0
    for name, data in (("oci-layout", LAYOUT), ("index.json", index)):
        size += _write_member(out, name, len(data), [data])
    for digest in included:
        path = cas.path(digest)
        size += _write_member(out, f"blobs/sha256/{digest.split(':', 1)[1]}",
                              path.stat().st_size, _chunks(path))  # fmt: skip
    out.write(bytes(2 * _BLOCK))
    size += 2 * _BLOCK
    return Exported(refs, len(included), len(digests & carried), size)


def _chosen(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The tag records asked for, sorted by name:tag; BundleError for a name not held."""
    by_ref = {f"{r['name']}:{r['tag']}": r for r in records if "name" in r and "tag" in r}
    if not names:
        return [by_ref[ref] for ref in sorted(by_ref)]
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        found = {ref: r for ref, r in by_ref.items() if ref == name or r["name"] == name}
        if not found:
            raise BundleError(f"the store holds no image {name} (nixery-trio ls lists them)")
        chosen |= found
    return [chosen[ref] for ref in sorted(chosen)]


def _closure(cas: CAS, digest: str) -> set[str]:
    """``digest`` and every blob it names, through indexes and manifests."""
    data = _read(cas, digest)
    refs = manifest_refs(data)
    if refs is None:
        raise BundleError(f"{digest} is not a manifest or index")
    found = {digest}
    for ref in refs:
        if cas.size(ref.digest) != ref.size:
            raise BundleError(f"{digest} names {ref.digest}, which the store lacks (run fsck)")
        found |= _closure(cas, ref.digest) if is_index(data) else {ref.digest}
    return found


def _read(cas: CAS, digest: str) -> bytes:
    data = cas.read_bytes(digest, DOCUMENT_LIMIT)
    if data is None:
        raise BundleError(f"the store lacks {digest} (run fsck)")
    return data


def _chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_COPY):
            yield chunk


def _write_member(out: BinaryIO, name: str, size: int, chunks: Iterable[bytes]) -> int:
    header = tar_header(name, "file", 0o644, size)
    out.write(header)
    written = 0
    for chunk in chunks:
        out.write(chunk)
        written += len(chunk)
    if written != size:
        raise BundleError(f"{name} changed while it was exported ({written} of {size} bytes)")
    padding = -size % _BLOCK
    out.write(bytes(padding))
    return len(header) + size + padding


def _bundle_blobs(path: Path) -> set[str]:
    """The blobs an earlier bundle carried (by their member names)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return {
                "sha256:" + os.path.basename(member.name)
                for member in tar
                if member.isfile() and member.name.startswith("blobs/sha256/")
            }
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"cannot read the earlier bundle {path}: {exc}") from exc


def bundle_index(path: Path) -> dict[str, Any]:
    """The ``index.json`` of a bundle (for tests and tools)."""
    with tarfile.open(path, "r:") as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise BundleError(f"{path} has no index.json")
        return dict(json.loads(member.read()))
