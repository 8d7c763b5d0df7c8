"""Bundles: the images a store holds, as one OCI image layout archive
(``export``), and back into a store (``import``).

A bundle is what an air-gapped mirror is filled from: a plain tar holding an
OCI image layout, which skopeo (``oci-archive:``), ``podman load`` and
``ctr image import`` read as they are::

    oci-layout                  {"imageLayoutVersion": "1.0.0"}
    index.json                  one entry per name:tag, its OCI manifest or index
    manifest.json               the same images for `docker load` and `podman load`
    blobs/sha256/<hex>          every blob the images take, in digest order

``manifest.json`` makes the same tar a ``docker save`` archive too (each
image's first platform, its layers named by their paths under ``blobs/``):
podman 4.3 loads an OCI archive only when it holds one image, and Docker's
``load`` reads no OCI archive at all.

Each entry of ``index.json`` is the document an OCI client pulling the tag
gets (an OCI image index for a multi-platform image), annotated with
``org.opencontainers.image.ref.name`` = ``name:tag`` (the full reference,
as ``ctr`` and ``podman`` name what they load), its platforms, when the
store first recorded it and, when the image has Docker manifests too, the
digest of Docker's document (:data:`DOCKER_ANNOTATION`): its blobs are in
the bundle, so an importing registry serves both formats.  Every platform the tag has is in it.

The bytes depend only on what the store holds for the chosen tags: entries
sorted, every header the same fixed ustar/pax fields ``archive.py`` writes
for layers (mtime 1, root, mode 0644).  So one store gives one bundle, byte
for byte, which can be checksummed and signed.  ``since`` leaves out the
blobs an earlier bundle carried (its ``index.json`` still names every
image): a weekly delta moves only what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO

from ..build.archive import tar_header
from ..core.digest import parse_digest
from ..core.errors import DigestInvalid, RegistryError
from ..core.manifest import (
    DOCUMENT_LIMIT,
    INDEX_FORMATS,
    MANIFEST_FORMATS,
    OCI_INDEX,
    Format,
    canonical_json,
    closure,
    parse_document,
)
from ..store.cache import MANIFEST_KEYS, TagCache
from ..store.cas import CAS

#: The annotation naming an image in an OCI layout.
REF_NAME = "org.opencontainers.image.ref.name"
#: The annotation carrying the digest of the image's Docker manifest (or list).
DOCKER_ANNOTATION = "dev.nixery-trio.docker.digest"
#: The annotation carrying the platforms of the image, comma-separated.
PLATFORMS_ANNOTATION = "dev.nixery-trio.platforms"
#: The annotation carrying when the store first gave these digests for the
#: tag (seconds since the epoch, as ``nixery-trio ls`` shows it).
CREATED_ANNOTATION = "dev.nixery-trio.created"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_BLOCK = 512
_COPY = 1 << 20
_NO_BASE = (
    "which neither the bundle nor the store holds: a delta needs its base bundle "
    "imported first (or with it)"
)


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
    # Shared, as a build holds it: gc cannot remove what is being exported.
    with cas.lock.held():
        return _export(cas, TagCache(cas), out, list(names), since)


def _export(
    cas: CAS, tags: TagCache, out: BinaryIO, names: list[str], since: Path | None
) -> Exported:
    records = _chosen(tags.records(), names)
    entries: list[dict[str, Any]] = []
    loadable: list[dict[str, Any]] = []
    refs: list[str] = []
    digests: set[str] = set()
    for record in records:
        docs = {fmt: str(record[key]) for fmt, key in MANIFEST_KEYS.items() if key in record}
        top = docs.get(Format.OCI) or docs[Format.DOCKER]
        digests |= _stored_closure(cas, docs.values())
        annotations = {REF_NAME: f"{record['name']}:{record['tag']}",
                       PLATFORMS_ANNOTATION: ",".join(record.get("platforms", [])),
                       CREATED_ANNOTATION: repr(float(record.get("at", 0.0)))}  # fmt: skip
        if Format.OCI in docs and Format.DOCKER in docs:
            annotations[DOCKER_ANNOTATION] = docs[Format.DOCKER]
        data = _read(cas, top)
        document = parse_document(data)
        assert document is not None  # _stored_closure read it
        refs.append(annotations[REF_NAME])
        entries.append({"mediaType": document.media_type, "digest": top, "size": len(data),
                        "annotations": annotations})  # fmt: skip
        loadable.append(_docker_archive_entry(cas, docs, annotations[REF_NAME]))
    carried = _bundle_blobs(since) if since is not None else set()
    included = sorted(digests - carried)
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    size = 0
    manifest = canonical_json(loadable)
    for name, data in (("oci-layout", LAYOUT), ("index.json", index), ("manifest.json", manifest)):
        size += _write_member(out, name, len(data), [data])
    for digest in included:
        path = cas.path(digest)
        size += _write_member(out, _member_name(digest), path.stat().st_size,
                              _chunks(path))  # fmt: skip
    out.write(bytes(2 * _BLOCK))
    size += 2 * _BLOCK
    return Exported(refs, len(included), len(digests & carried), size)


def _docker_archive_entry(cas: CAS, docs: dict[Format, str], ref: str) -> dict[str, Any]:
    """The image's entry in ``manifest.json``, the index of the ``docker save``
    format, naming the first platform's config and layers by their paths in
    this same tar: ``podman load`` (which takes an OCI archive of one image
    only) and ``docker load`` read every image of the bundle from it."""
    document = parse_document(_read(cas, docs.get(Format.DOCKER) or docs[Format.OCI]))
    if document is not None and document.is_index:
        document = parse_document(_read(cas, document.refs[0].digest))
    assert document is not None  # _stored_closure read them
    config, *layers = document.refs
    return {
        "Config": _member_name(config.digest),
        "RepoTags": [ref],
        "Layers": [_member_name(layer.digest) for layer in layers],
    }


def _member_name(digest: str) -> str:
    return f"blobs/sha256/{digest.split(':', 1)[1]}"


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


def _stored_closure(cas: CAS, tops: Iterable[str]) -> set[str]:
    """Every blob the documents ``tops`` name, all checked to be in the store."""
    try:
        found = closure(tops, lambda digest: cas.read_bytes(digest, DOCUMENT_LIMIT))
    except LookupError as exc:
        raise BundleError(f"the store lacks {exc} (run fsck)") from exc
    except ValueError as exc:
        raise BundleError(f"the store is damaged: {exc} (run fsck)") from exc
    for digest, size in found.blobs.items():
        if cas.size(digest) != size:
            raise BundleError(f"the store lacks {digest}, or it is damaged (run fsck)")
    return set(found.blobs)


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


# ---------------------------------------------------------------------------
# Import: a bundle (or a base and its deltas) into a store, all or nothing.


@dataclass(frozen=True)
class Imported:
    """What an import added: the tags, and the blobs new to the store."""

    refs: list[str]
    blobs: int


def import_bundles(root: Path, paths: list[Path]) -> Imported:
    """Load ``paths`` (a bundle, or a base then deltas made ``--since`` it) into
    the store at ``root``.

    Every blob is hashed against its name as it is read, into temporary
    files; then every image's documents and everything they name must be
    there (in these bundles or already in the store).  Only then do the
    blobs become visible (renamed into place, fsynced) and the tags
    recorded.  Any problem raises :class:`BundleError` naming it, with the
    store as it was.  Safe beside a server on the same store.
    """
    cas = CAS(root)
    cas.open_store(clean=True)  # counts as a server: nobody clears our temporary files
    tags = TagCache(cas)
    tags.index.open_index()
    staged: dict[str, Path] = {}
    try:
        entries: list[tuple[Path, dict[str, Any]]] = []
        for path in paths:
            entries += [(path, entry) for entry in _stage(cas, path, staged)]
        records = [_checked(cas, staged, path, entry) for path, entry in entries]
        try:
            with cas.lock.held():
                for digest, temporary in sorted(staged.items()):
                    os.replace(temporary, cas.path(digest))
                cas.sync_dir()
                for record in records:
                    tags.put(**record)
        except (OSError, RegistryError) as exc:
            # Blobs already renamed are whole and stay (gc removes them if
            # nothing names them); no tag was recorded unless all its blobs are in.
            raise BundleError(f"storing the images failed: {exc}") from exc
        new = len(staged)
        staged.clear()
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
    return Imported([f"{r['name']}:{r['tag']}" for r in records], new)


def _stage(cas: CAS, path: Path, staged: dict[str, Path]) -> list[dict[str, Any]]:
    """Hash ``path``'s blobs into temporary files; its ``index.json`` entries."""
    index: dict[str, Any] | None = None
    layout = False
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                if name == "oci-layout" and member.isfile():
                    reader = tar.extractfile(member)
                    layout = reader is not None and json.loads(reader.read()) == json.loads(LAYOUT)
                elif name == "manifest.json" and member.isfile():
                    pass  # the docker save index of the same blobs: index.json says it all
                elif name == "index.json" and member.isfile():
                    reader = tar.extractfile(member)
                    index = json.loads(reader.read()) if reader is not None else None
                elif name.startswith("blobs/sha256/") and member.isfile():
                    digest = "sha256:" + name.removeprefix("blobs/sha256/")
                    parse_digest(digest)
                    reader = tar.extractfile(member)
                    if reader is None:
                        raise BundleError(f"{path}: {name} cannot be read")
                    _stage_blob(cas, path, digest, reader, member.size, staged)
                elif not member.isdir():
                    raise BundleError(f"{path}: {name} is not part of an OCI image layout")
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path} is not a whole tar (truncated or damaged): {exc}") from exc
    except ValueError as exc:  # JSON, or a blob name that is no digest
        raise BundleError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not layout or index is None or not isinstance(index.get("manifests"), list):
        raise BundleError(f"{path} is not an OCI image layout (oci-layout and index.json)")
    return list(index["manifests"])


def _stage_blob(cas: CAS, bundle: Path, digest: str, reader: IO[bytes], size: int,
                staged: dict[str, Path]) -> None:  # fmt: skip
    """Hash one blob of the bundle, refusing it unless it is ``digest``; copy it
    into a temporary file unless the store (or an earlier bundle of this
    import) has it already.  A blob that is not needed is checked all the
    same: a damaged bundle is refused whatever it would have added."""
    needed = digest not in staged and cas.size(digest) != size
    hasher = hashlib.sha256()
    temporary = cas.tmp_dir / f"{secrets.token_hex(12)}.import"
    try:
        with open(temporary if needed else os.devnull, "wb") as out:
            if needed:
                staged[digest] = temporary
            while chunk := reader.read(_COPY):
                hasher.update(chunk)
                out.write(chunk)
            if needed:
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:  # reading a bundle that ends early is a TarError, not this
        raise BundleError(f"cannot write into the store: {exc}") from exc
    if "sha256:" + hasher.hexdigest() != digest:
        raise BundleError(f"{bundle}: blob {digest} does not hash to its name: it was damaged")


def _checked(cas: CAS, staged: dict[str, Path], bundle: Path, entry: Any) -> dict[str, Any]:
    """The tag record of one ``index.json`` entry, once everything it names is there."""
    try:
        annotations = entry["annotations"]
        ref = str(annotations[REF_NAME])
        name, _, tag = ref.rpartition(":")
        top = parse_digest(str(entry["digest"]))
    except (TypeError, KeyError, DigestInvalid) as exc:
        raise BundleError(f"{bundle}: index.json has an entry that is not an image: {exc}") from exc
    if not name or not tag:
        raise BundleError(f"{bundle}: image {ref!r} is not named NAME:TAG")
    tops = [top, *([str(annotations[DOCKER_ANNOTATION])] if DOCKER_ANNOTATION in annotations
                   else [])]  # fmt: skip
    try:
        found = closure(tops, partial(_staged_bytes, cas, staged))
    except LookupError as exc:
        raise BundleError(f"{bundle}: {ref} needs {exc}, {_NO_BASE}") from exc
    except ValueError as exc:
        raise BundleError(f"{bundle}: {ref}: {exc}") from exc
    for digest, named in found.blobs.items():
        held = staged.get(digest)
        size = held.stat().st_size if held is not None else cas.size(digest)
        if size is None:
            raise BundleError(f"{bundle}: {ref} needs blob {digest}, {_NO_BASE}")
        if size != named:
            raise BundleError(f"{bundle}: blob {digest} has {size} bytes, {ref} says {named}")
    digests: dict[Format, str] = {}
    index = False
    for digest in tops:
        document = parse_document(_staged_bytes(cas, staged, digest) or b"")
        assert document is not None  # closure read it
        fmt = MANIFEST_FORMATS.get(document.media_type) or INDEX_FORMATS[document.media_type]
        digests[fmt] = digest
        index = document.is_index
    platforms = [p for p in str(annotations.get(PLATFORMS_ANNOTATION, "")).split(",") if p]
    try:
        at: float | None = float(annotations[CREATED_ANNOTATION])
    except (KeyError, TypeError, ValueError):
        at = None
    return {"name": name, "tag": tag, "digests": digests, "index": index,
            "platforms": platforms, "at": at}  # fmt: skip


def _staged_bytes(cas: CAS, staged: dict[str, Path], digest: str) -> bytes | None:
    """A document of the bundles being imported, or of the store; ``None`` if neither has it."""
    try:
        with open(staged.get(digest) or cas.path(digest), "rb") as f:
            data = f.read(DOCUMENT_LIMIT + 1)
    except (OSError, DigestInvalid):
        return None
    return data if len(data) <= DOCUMENT_LIMIT else None
