"""What a store holds: its tags with their sizes and dates (``nixery-trio ls``,
the web page), and its blobs and their bytes (the web page, ``/metrics``).
Blocking: read-only walks of the tag records and the blob folder, for a
worker thread."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.manifest import DOCUMENT_LIMIT, closure
from .cache import TagCache
from .cas import CAS


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


def held_images(root: Path) -> list[HeldImage]:
    """The tags the store holds, by name and tag, and what each takes."""
    cas = CAS(root)
    tags = TagCache(cas)
    held = []
    for record in tags.records():
        tops = [str(record[key]) for key in ("oci", "digest") if key in record]
        if not tops:
            continue
        try:
            found = closure(tops, lambda digest: cas.read_bytes(digest, DOCUMENT_LIMIT))
            size = sum(found.blobs.values())
            last_pulled = max(cas.path(d).stat().st_mtime for d in found.documents)
        except (LookupError, ValueError, OSError):  # damaged: fsck says how
            size, last_pulled = 0, 0.0
        held.append(HeldImage(
            name=str(record.get("name")), tag=str(record.get("tag")),
            platforms=tuple(str(p) for p in record.get("platforms", ())),
            digest=tops[0], size=size,
            created=float(record.get("at", 0.0)), last_pulled=last_pulled,
        ))  # fmt: skip
    return sorted(held, key=lambda image: (image.name, image.tag))


def blob_totals(root: Path) -> tuple[int, int]:
    """How many blobs the store holds, and their bytes (one ``stat`` each)."""
    blobs = total = 0
    try:
        entries = os.scandir(CAS(root).blob_dir)
    except FileNotFoundError:
        return 0, 0
    with entries:
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_size
                blobs += 1
            except FileNotFoundError:  # removed by gc meanwhile
                continue
    return blobs, total
