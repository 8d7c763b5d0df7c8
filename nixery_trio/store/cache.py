"""Layer and manifest caches: msgpack records in the store that point at its blobs.

Each cache is a namespace of small records in the store (a directory on
the filesystem, a key prefix in a bucket), one per key, named by a blake3
of the key::

    index/layers/<blake3(layer key)>       {digest, diff_id, size}
    index/manifests/<blake3(image key)>    {digest, oci, name}
    index/tags/<blake3(name:tag)>          {digest, oci, name, tag, index, platforms, at}

A record is ``blake3(payload) || payload`` with ``payload`` a msgpack map
that repeats its own key.  The store replaces a record whole (a file
renamed into place, an object put), so a reader sees a whole record or
none; a record whose checksum or key does
not match (a torn or foreign write) is ignored and removed.  A record is
only trusted while the blobs it names are in the CAS with the right size, so
a cache never hands out a blob that is not there.

Records are not fsynced (blobs are): a record is only written once the blobs
it names are durable, and a record that a power cut kept from the disk,
whole or in part, is a cache miss, never a wrong answer.  That saves an
fsync in every cold build.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import blake3
import msgpack

from ..core.manifest import Format, LayerBlob
from .storage import RecordFiles, Storage

_CHECKSUM = 32


class RecordIndex:
    """Checksummed msgpack records in one namespace of a store, keyed by strings."""

    def __init__(self, files: RecordFiles) -> None:
        self.files = files

    def open_index(self) -> None:
        self.files.open_files()

    @staticmethod
    def name(key: str) -> str:
        """The record name of ``key``: the blake3 of it, in hex."""
        return blake3.blake3(key.encode()).hexdigest()

    def may_have(self, key: str) -> bool:
        """Whether a record for ``key`` may exist (a ``stat`` on disk; ``get`` checks it)."""
        return self.files.may_have(self.name(key))

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.files.read(self.name(key))
        if raw is None:
            return None
        record = decode_record(raw)
        if record is None or record.get("key") != key:
            self.files.remove(self.name(key))
            return None
        return record

    def put(self, key: str, value: dict[str, Any]) -> None:
        payload = msgpack.packb({**value, "key": key}, use_bin_type=True)
        self.files.write(self.name(key), blake3.blake3(payload).digest() + payload)

    def delete(self, key: str) -> None:
        self.files.remove(self.name(key))

    def scan(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Every record's name with its map, or ``None`` if torn or misnamed."""
        for name in self.files.names():
            raw = self.files.read(name)
            if raw is None:  # removed meanwhile
                continue
            record = decode_record(raw)
            key = None if record is None else record.get("key")
            if not isinstance(key, str) or name != self.name(key):
                record = None
            yield name, record


def decode_record(raw: bytes) -> dict[str, Any] | None:
    """The record's map, or ``None`` if the bytes are torn or not ours."""
    checksum, payload = raw[:_CHECKSUM], raw[_CHECKSUM:]
    if len(checksum) != _CHECKSUM or blake3.blake3(payload).digest() != checksum:
        return None
    try:
        record = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    return record if isinstance(record, dict) else None


class LayerCache:
    """Layer key (blake3 of its store paths) to the layer's blob."""

    def __init__(self, cas: Storage) -> None:
        self.index = RecordIndex(cas.records("layers"))
        self.cas = cas

    def get(self, layer_key: str) -> LayerBlob | None:
        record = self.index.get(layer_key)
        if record is None:
            return None
        try:
            blob = LayerBlob(
                digest=str(record["digest"]),
                diff_id=str(record["diff_id"]),
                size=int(record["size"]),
            )
            present = self.cas.size(blob.digest) == blob.size
        except Exception:  # malformed record or digest: not trusted
            present = False
        if not present:
            self.index.delete(layer_key)
            return None
        return blob

    def put(self, layer_key: str, blob: LayerBlob) -> None:
        self.index.put(
            layer_key, {"digest": blob.digest, "diff_id": blob.diff_id, "size": blob.size}
        )


#: The keys of a manifest record, by format: ``digest`` (Docker's, the first
#: there was) and ``oci``.
MANIFEST_KEYS = {Format.DOCKER: "digest", Format.OCI: "oci"}


class ManifestCache:
    """Image key (source cache key, arch, packages) to its manifests' digests, by format.

    A record written before OCI manifests existed names the Docker one only;
    a zstd image's names its OCI one only.
    """

    def __init__(self, cas: Storage) -> None:
        self.index = RecordIndex(cas.records("manifests"))
        self.cas = cas

    def get(self, image_key: str) -> dict[Format, str] | None:
        """The stored manifests' digests, or ``None`` (the record is dropped) if any is gone."""
        record = self.index.get(image_key)
        if record is None:
            return None
        digests = {fmt: record.get(key) for fmt, key in MANIFEST_KEYS.items() if key in record}
        try:
            present = bool(digests) and all(
                isinstance(digest, str) and self.cas.size(digest) is not None
                for digest in digests.values()
            )
        except Exception:
            present = False
        if not present:
            self.index.delete(image_key)
            return None
        return {fmt: str(digest) for fmt, digest in digests.items()}

    def put(self, image_key: str, digests: dict[Format, str], name: str | None = None) -> None:
        """Record an image's manifests, and the repository name it was built as."""
        record = {MANIFEST_KEYS[fmt]: digest for fmt, digest in digests.items()}
        self.index.put(image_key, record if name is None else {**record, "name": name})

    def names(self) -> set[str]:
        """The repository names of the recorded images (blocking: reads every record)."""
        return {
            record["name"]
            for _, record in self.index.scan()
            if record is not None and isinstance(record.get("name"), str)
        }


class TagCache:
    """Repository name and tag to what a pull of them got last: its manifest
    (or, for several platforms, its index) digests by format, and platforms.

    A mirror's list of what it holds: ``serve --offline`` answers tags from
    it, ``ls`` lists it.  ``at`` is when these digests were first recorded
    for the tag (a rebuild with the same result keeps it).
    """

    def __init__(self, cas: Storage) -> None:
        self.index = RecordIndex(cas.records("tags"))
        self.cas = cas

    @staticmethod
    def _key(name: str, tag: str) -> str:
        return f"{name}:{tag}"

    def get(self, name: str, tag: str) -> dict[str, Any] | None:
        """The record of ``name:tag`` if every document it names is stored, else ``None``."""
        record = self.index.get(self._key(name, tag))
        if record is None:
            return None
        digests = [record.get(key) for key in MANIFEST_KEYS.values() if key in record]
        try:
            present = bool(digests) and all(self.cas.size(str(d)) is not None for d in digests)
        except Exception:  # a malformed digest: not trusted
            present = False
        return record if present else None

    def put(
        self, name: str, tag: str, digests: dict[Format, str], index: bool, platforms: list[str],
        at: float | None = None,
    ) -> None:
        """Record what ``name:tag`` gave, unless the record already says so;
        ``at`` when it first did (default: now)."""
        key = self._key(name, tag)
        record: dict[str, Any] = {MANIFEST_KEYS[fmt]: digest for fmt, digest in digests.items()}
        record |= {"name": name, "tag": tag, "index": index, "platforms": platforms}
        known = self.index.get(key)
        if known is not None and all(known.get(k) == v for k, v in record.items()):
            return
        self.index.put(key, {**record, "at": time.time() if at is None else at})

    def records(self) -> list[dict[str, Any]]:
        """Every whole record (blocking: reads them all)."""
        return [record for _, record in self.index.scan() if record is not None]
