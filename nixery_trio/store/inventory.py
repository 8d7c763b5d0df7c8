"""What a store holds: its tags with their sizes and dates (``nixery-trio ls``,
the web page), and its blobs and their bytes (the web page, ``/metrics``).
Blocking: read-only walks of the tag records and a listing of the blobs,
for a worker thread."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.manifest import DOCUMENT_LIMIT, closure
from .cache import TagCache
from .storage import Storage


@dataclass(frozen=True)
class HeldImage:
    """One tag the store holds (``nixery-trio ls``).

    ``digest`` is what a pull by tag gets (OCI's, else Docker's); ``size``
    the bytes of every distinct blob it takes, for every platform and
    format; ``created`` when this tag first gave these digests and
    ``last_pulled`` when one of its manifests was last served (the server
    refreshes that at most once a minute).
    """

    name: str
    tag: str
    platforms: tuple[str, ...]
    digest: str
    size: int
    created: float
    last_pulled: float


def blob_uses(storage: Storage) -> dict[str, tuple[int, float]]:
    """Every blob's size and last use, by digest (one listing of the store)."""
    return {"sha256:" + entry.name: (entry.size, entry.used) for entry in storage.blob_entries()}


def held_images(
    storage: Storage, uses: dict[str, tuple[int, float]] | None = None
) -> list[HeldImage]:
    """The tags the store holds, by name and tag, and what each takes;
    ``uses`` is :func:`blob_uses` if the caller has it already."""
    tags = TagCache(storage)
    records = tags.records()
    if not records:
        return []
    if uses is None:
        uses = blob_uses(storage)
    held = []
    for record in records:
        tops = [str(record[key]) for key in ("oci", "digest") if key in record]
        if not tops:
            continue
        try:
            found = closure(tops, lambda digest: storage.read_bytes(digest, DOCUMENT_LIMIT))
            size = sum(found.blobs.values())
            last_pulled = max(uses[d][1] for d in found.documents)
        except (LookupError, ValueError, OSError):  # damaged: fsck says how
            size, last_pulled = 0, 0.0
        held.append(HeldImage(
            name=str(record.get("name")), tag=str(record.get("tag")),
            platforms=tuple(str(p) for p in record.get("platforms", ())),
            digest=tops[0], size=size,
            created=float(record.get("at", 0.0)), last_pulled=last_pulled,
        ))  # fmt: skip
    return sorted(held, key=lambda image: (image.name, image.tag))


def blob_totals(storage: Storage) -> tuple[int, int]:
    """How many blobs the store holds, and their bytes (one listing)."""
    blobs = total = 0
    try:
        for entry in storage.blob_entries():
            total += entry.size
            blobs += 1
    except FileNotFoundError:  # a filesystem store not made yet
        return 0, 0
    return blobs, total
