"""Operator commands on a store: ``fsck`` checks it, ``gc`` shrinks it
(``nixery-trio ls`` is ``store/inventory.py``'s ``held_images``, which the
web page shares).

**fsck** re-hashes every blob against its name, decompresses every cached
layer to check its ``diff_id``, and checks every cache record: that it is
whole, filed under its own key, and names blobs that are stored with the
right size (for a manifest: the manifest, its config and every layer).  With
``repair`` it drops what cannot be trusted: corrupt blobs, torn or dangling
records, and what crashes left (temporary files; in a bucket, uploads never
completed and leases nobody renews) older than an hour (younger ones may
belong to a write in progress).  Blobs are checked first, so a record naming
a corrupt blob is dropped in the same run.

**gc** removes the least recently used blobs, and the cache records naming
them, until the store fits ``max_size``.  A blob's "last use" is the latest
of its own mark of use (``Storage.used``: its mtime, or a bucket's ``used/``
object) and that of every manifest naming it; the server marks a manifest
when it serves it and a layer when a build reuses it.  So a layer is never
older than the images using it, a manifest goes before its blobs, and
nothing used within the grace period is removed: a pull that fetched its
manifest keeps its blobs.  On the filesystem gc holds the store lock
exclusively while it decides and deletes, and builds hold it shared; replicas
on a bucket share no lock, so gc reads a blob's mark once more just before
it deletes it.  Either way it is safe to run beside serving registries.

Both work on either backend through ``store/storage.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import zstandard
from isal import isal_zlib

from ..core.digest import parse_digest
from ..core.errors import DigestInvalid
from ..core.manifest import DOCUMENT_LIMIT, BlobRef, manifest_refs, parse_document
from ..store.cache import MANIFEST_KEYS, LayerCache, ManifestCache, RecordIndex, TagCache
from ..store.cas import CAS
from ..store.storage import Storage

#: The shortest grace period ``nixery-trio gc`` accepts: a server serves a
#: manifest from memory for a while after checking it (and refreshing its
#: mtime), so gc must not remove anything used more recently than that.
MIN_GRACE_SECONDS = 120
#: Temporary files younger than this may belong to a write in progress.
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class Finding:
    """One thing fsck found wrong, and whether it was repaired."""

    kind: str  # "blob", "tmp", "layer-record", "manifest-record", "tag-record"
    name: str
    problem: str
    repaired: bool = False

    def __str__(self) -> str:
        state = "removed" if self.repaired else "found"
        return f"{self.kind} {self.name}: {self.problem} ({state})"


def _sha256(chunks: Iterable[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _diff_id(chunks: Iterable[bytes]) -> str | None:
    """sha256 of the decompressed layer, or ``None`` if it is not one whole gzip
    (or whole zstd frames).

    ISA-L leaves the vector registers of the thread it runs on in a state
    that slows OpenSSL's SHA-256 there by a quarter (see ``archive.py``), so
    the layer is inflated on a thread of its own, a chunk ahead of the
    hashing on this one.
    """
    stream = iter(chunks)
    first = next(stream, b"")
    rest = itertools.chain([first], stream)
    if first[:4] == _ZSTD_MAGIC:
        return _zstd_diff_id(rest)
    hasher = hashlib.sha256()
    inflater = isal_zlib.decompressobj(16 + 15)
    try:
        with ThreadPoolExecutor(1) as inflating:
            ahead: Future[bytes] | None = None
            for chunk in rest:
                inflated = inflating.submit(inflater.decompress, chunk)
                if ahead is not None:
                    hasher.update(ahead.result())
                ahead = inflated
            if ahead is not None:
                hasher.update(ahead.result())
            hasher.update(inflating.submit(inflater.flush).result())
    except Exception:  # isal's error type is not typed as an exception
        return None
    if not inflater.eof or inflater.unused_data:
        return None
    return "sha256:" + hasher.hexdigest()


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_diff_id(chunks: Iterable[bytes]) -> str | None:
    """sha256 of a zstd layer's frames, or ``None`` unless every frame is whole."""
    hasher = hashlib.sha256()
    decompressor = zstandard.ZstdDecompressor()
    frame = None
    frames = 0
    try:
        for chunk in chunks:
            while chunk:
                if frame is None:
                    frame, frames = decompressor.decompressobj(), frames + 1
                hasher.update(frame.decompress(chunk))
                chunk = frame.unused_data if frame.eof else b""
                if frame.eof:
                    frame = None
    except zstandard.ZstdError:
        return None
    if frame is not None or not frames:  # cut inside a frame, or empty
        return None
    return "sha256:" + hasher.hexdigest()


class _Store:
    def __init__(self, storage: Storage | Path) -> None:
        self.cas = CAS(storage) if isinstance(storage, Path) else storage
        self.layers = LayerCache(self.cas)
        self.manifests = ManifestCache(self.cas)
        self.tags = TagCache(self.cas)
        self.cas.open_store(clean=False)
        for cache in (self.layers, self.manifests, self.tags):
            cache.index.open_index()


def fsck(storage: Storage | Path, repair: bool = False) -> list[Finding]:
    """Check every blob and record of a store (or the filesystem one at a
    path); drop the bad ones if asked."""
    store = _Store(storage)
    findings: list[Finding] = []

    def found(kind: str, name: str, problem: str, remove: Callable[[], None]) -> None:
        if repair:
            remove()
        findings.append(Finding(kind, name, problem, repair))

    for leftover in store.cas.leftovers(STALE_TMP_SECONDS):
        found("tmp", leftover.name, "stale temporary file", leftover.remove)

    good: set[str] = set()
    for entry in store.cas.blob_entries():
        try:
            digest = parse_digest("sha256:" + entry.name)
        except DigestInvalid:
            found("blob", entry.name, "file name is not a sha256 digest", entry.remove)
            continue
        actual = _sha256(store.cas.stream(digest))
        if actual != digest:
            found("blob", digest, f"content hashes to {actual}", entry.remove)
        else:
            good.add(digest)

    diff_ids: dict[str, str | None] = {}
    for name, record in store.layers.index.scan():
        problem = _layer_problem(store, record, good, diff_ids)
        if problem:
            found("layer-record", name, problem,
                  partial(store.layers.index.files.remove, name))

    for name, record in store.manifests.index.scan():
        problem = _manifest_problem(store, record, good)
        if problem:
            found("manifest-record", name, problem,
                  partial(store.manifests.index.files.remove, name))

    # A tag record names documents as a manifest record does (indexes too).
    for name, record in store.tags.index.scan():
        problem = _manifest_problem(store, record, good)
        if problem:
            found("tag-record", name, problem,
                  partial(store.tags.index.files.remove, name))
    return findings


def _layer_problem(
    store: _Store, record: dict[str, object] | None, good: set[str],
    diff_ids: dict[str, str | None],
) -> str | None:  # fmt: skip
    if record is None:
        return "torn, corrupt or misnamed record"
    digest, diff_id, size = record.get("digest"), record.get("diff_id"), record.get("size")
    if not isinstance(digest, str) or digest not in good:
        return f"names blob {digest} which is missing or corrupt"
    if store.cas.size(digest) != size:
        return f"size {size} does not match blob {digest}"
    if digest not in diff_ids:
        diff_ids[digest] = _diff_id(store.cas.stream(digest))
    if diff_ids[digest] != diff_id:
        return f"diff_id {diff_id} does not match the layer's content ({diff_ids[digest]})"
    return None


def _manifest_problem(
    store: _Store, record: dict[str, object] | None, good: set[str]
) -> str | None:
    if record is None:
        return "torn, corrupt or misnamed record"
    if not any(key in record for key in MANIFEST_KEYS.values()):
        return "names no manifest"
    for key in MANIFEST_KEYS.values():
        if key not in record:
            continue  # from before OCI manifests (the server adds one), or zstd (OCI only)
        digest = record[key]
        if not isinstance(digest, str) or digest not in good:
            return f"names manifest {digest} which is missing or corrupt"
        data = store.cas.read_bytes(digest, DOCUMENT_LIMIT)
        refs = None if data is None else manifest_refs(data)
        if refs is None:
            return f"blob {digest} is not a manifest"
        for ref in refs:
            if ref.digest not in good or store.cas.size(ref.digest) != ref.size:
                return f"manifest {digest} names blob {ref.digest} which is missing or wrong"
    return None


@dataclass
class GcReport:
    """What a gc run saw and did."""

    size_before: int = 0
    size_after: int = 0
    removed: list[str] = field(default_factory=list)
    records_removed: int = 0
    kept_recent: int = 0


def gc(
    storage: Storage | Path, max_size: int, grace: float = 900, now: float | None = None
) -> GcReport:
    """Remove least recently used blobs until the store holds ``max_size`` bytes."""
    store = _Store(storage)
    report = GcReport()
    with store.cas.lock.held(exclusive=True):
        now = time.time() if now is None else now
        sizes: dict[str, int] = {}
        last_used: dict[str, float] = {}
        for entry in store.cas.blob_entries():
            digest = "sha256:" + entry.name
            sizes[digest] = entry.size
            last_used[digest] = entry.used
        report.size_before = report.size_after = sum(sizes.values())
        if report.size_before <= max_size:
            return report
        # 0 for an index, 1 for a manifest (2 for other blobs).
        manifests: dict[str, int] = {}
        # Indexes first: they pass their time on to their manifests, which
        # pass it on to their blobs.
        documents: list[tuple[bool, str, list[BlobRef]]] = []
        for digest, size in sizes.items():
            if size > DOCUMENT_LIMIT:
                continue
            data = store.cas.read_bytes(digest, DOCUMENT_LIMIT)
            document = None if data is None or not data.startswith(b"{") else parse_document(data)
            if document is not None:
                documents.append((not document.is_index, digest, document.refs))
        for rank, digest, refs in sorted(documents):
            manifests[digest] = rank
            for ref in refs:
                if ref.digest in last_used:
                    last_used[ref.digest] = max(last_used[ref.digest], last_used[digest])
        records = _records_by_digest(store)
        # Oldest first; on a tie, indexes before the manifests they name, and
        # manifests before the blobs they name.
        order = sorted(sizes, key=lambda d: (last_used[d], manifests.get(d, 2), d))
        for digest in order:
            if report.size_after <= max_size:
                break
            if now - last_used[digest] < grace:
                report.kept_recent = sum(1 for d in order if now - last_used[d] < grace)
                break
            if now - store.cas.last_use(digest) < grace:
                # Used by a server since the listing (a replica on a bucket,
                # which no lock keeps from reusing a blob while gc decides).
                report.kept_recent += 1
                continue
            for remove in records.get(digest, []):
                remove()
                report.records_removed += 1
            store.cas.delete(digest)
            report.removed.append(digest)
            report.size_after -= sizes[digest]
    return report


def _records_by_digest(store: _Store) -> dict[str, list[Callable[[], None]]]:
    """What removes each record that names a digest, by digest."""
    by_digest: dict[str, list[Callable[[], None]]] = {}
    index: RecordIndex
    for index in (store.layers.index, store.manifests.index, store.tags.index):
        for name, record in index.scan():
            # A layer record's blob ("digest"), or any document a manifest or
            # tag record names.
            for key in MANIFEST_KEYS.values():
                digest = None if record is None else record.get(key)
                if isinstance(digest, str):
                    by_digest.setdefault(digest, []).append(partial(index.files.remove, name))
    return by_digest


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """``"10G"``, ``"512MiB"``, ``"1.5GB"`` or a number of bytes, as bytes."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number) :].strip()
    if unit not in _UNITS or not number.strip():
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 10GiB or bytes)")
    value = float(number)
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value * _UNITS[unit])
