"""The one orchestrator: from an image name to a stored manifest.

For a manifest request by tag the builder

1. parses the name into an :class:`~nixery_trio.core.image.Image`,
2. asks the source for a cache key and, if there is one, looks up the
   manifest cache (a hit serves with no Nix and no layer work),
3. otherwise runs one Nix build (``nix.py``), groups the closure into
   layers (``layers.py``), looks each layer up in the layer cache and writes
   the missing ones at once (``archive.py``, in worker threads bounded by a
   :class:`trio.CapacityLimiter`), then stores config and manifest in the
   CAS and records the manifest in the cache.

Builds run in a nursery owned by the server, not by the request: a client
that disconnects does not cancel a build others wait for, and the result is
cached either way.  Identical work is done once: within a process
(:class:`SingleFlight`) concurrent requests for one image share one Nix
build, and concurrent images sharing a layer write it once; across the
server's worker processes (``locks.KeyLocks``) a flight first takes a lock
file for its key and looks in the cache again, so a second process waits for
the first one's result instead of repeating its work.

A registry serving several platforms (``NIXERY_PLATFORMS``) answers a tag
with an index: each platform's image is built as above, with its own single
flight and cache entry, all in one nursery, and the index naming them is
stored beside them (it is a pure function of their manifests).

Nix runs at most ``NIXERY_MAX_BUILDS`` times at once across the workers
(``locks.BuildSlots``); a build waiting for its turn is dropped when every
client that wanted it has left.  Packages that Nix could not find are
remembered for ``NIXERY_NOT_FOUND_TTL`` seconds, so a storm of requests for
a misspelt name runs Nix once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

import trio

from .. import logs, metrics
from ..config import Config
from ..core.digest import sha256_digest
from ..core.errors import ManifestUnknown, RegistryError, TooManyRequests
from ..core.image import Arch, Image, parse_image
from ..core.layers import Layer, group_layers
from ..core.manifest import (
    DOCUMENT_LIMIT,
    OCI_MANIFEST,
    Format,
    LayerBlob,
    build_config,
    build_index,
    build_manifest,
    command,
    convert_manifest,
    index_formats,
    manifest_refs,
    negotiate,
    parse_document,
)
from ..core.progress import BuildProgress, ProgressHook
from ..core.rootfs import user
from ..store.cache import MANIFEST_KEYS, LayerCache, ManifestCache, RecordIndex, TagCache
from ..store.leases import BuildLeases
from ..store.locks import BuildSlots, KeyLocks
from ..store.quota import ColdBuildQuota
from ..store.s3store import S3Store
from ..store.storage import Storage
from . import archive, nix
from .sources import COMMIT, LATEST, GitSource, PathSource

T = TypeVar("T")
V = TypeVar("V")
#: Who asks, for ``--cold-builds-per-minute``: the user or address the HTTP
#: layer set for the request (``http/access.py``); a flight started for a
#: request inherits it, as every Trio task inherits its spawner's context.
#: ``None`` (prefetch) is never limited.
REQUESTER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nixery_trio_requester", default=None
)

#: A deferred walk of a layer's files (run in the worker thread).
Entries = Callable[[], Iterable[archive.Entry]]

#: The version of what the server adds to an image (its root's files, its
#: config), part of every image key: a server that adds something new builds
#: anew rather than serve images made without it.
IMAGE_LAYOUT = 2
#: Seconds a checked manifest is served from memory, and how many are kept.
RECENT_SECONDS = 30
RECENT_ENTRIES = 1024
#: Seconds a git source's branches and tags, and the catalog, are reused;
#: and how long a listing that did not have a tag is trusted about it.
TAGS_SECONDS = 30.0
CATALOG_SECONDS = 10.0
TAGS_RETRY_SECONDS = 2.0
#: Seconds a source's cache key is reused before it is asked again.
SOURCE_KEY_SECONDS = 1.0
#: A source whose last key took less than this is asked on the event loop:
#: a worker-thread hop costs more than that, and it happens at most once a
#: second per tag.  (A path source then only stats its files; one whose files
#: changed hashes them, and the time that took sends the next key to a thread.)
INLINE_KEY_SECONDS = 0.001
#: Seconds a tag record waits before it is written: the response that served
#: the tag goes out first, and tags served meanwhile share one thread hop.
TAG_RECORD_DELAY = 0.02


class Flight(Generic[T]):
    """One run of a :class:`SingleFlight` task, and the callers waiting for it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.waiters = 0
        self.scope = trio.CancelScope()
        self._droppable = False

    @contextlib.contextmanager
    def droppable(self) -> Iterator[None]:
        """While in this block (a build waiting in the queue), the flight is
        dropped when its last waiter leaves: nobody wants its result yet."""
        self._droppable = True
        try:
            if self.waiters == 0:
                self.scope.cancel()
            yield
        finally:
            self._droppable = False

    def leave(self) -> bool:
        """One waiter left; whether that dropped the flight."""
        self.waiters -= 1
        if self.waiters == 0 and self._droppable and not self.done.is_set():
            self.scope.cancel()
            return True
        return False


class SingleFlight(Generic[T]):
    """Run one task per key at a time; every caller gets its outcome.

    The task runs in ``nursery`` (long-lived), so cancelling a caller only
    stops that caller's wait; only a task that marked itself droppable
    (:meth:`Flight.droppable`) stops when every caller has gone.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._flights: dict[str, Flight[T]] = {}

    async def do(self, key: str, work: Callable[[Flight[T]], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = Flight()
            self._flights[key] = flight
            self._nursery.start_soon(self._run, key, flight, work)
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            if flight.leave() and self._flights.get(key) is flight:
                logs.info("flight.dropped", key=key[:200], detail="every client left the queue")
                del self._flights[key]  # a new caller starts afresh
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]

    async def _run(
        self, key: str, flight: Flight[T], work: Callable[[Flight[T]], Awaitable[T]]
    ) -> None:
        try:
            with flight.scope:
                flight.result = await work(flight)
        except Exception as exc:  # handed to every waiter, never lost
            flight.error = exc
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()


def _layer_key(image: Image, layer: Layer) -> str:
    """A layer's cache key: its paths' key, for zstd with a prefix (another blob)."""
    return layer.key if image.compression == "gzip" else f"{image.compression}:{layer.key}"


def _forest_key(image: Image, forest: str) -> str:
    return f"forest:{IMAGE_LAYOUT}:{':'.join(image.variant)}:{forest}"


#: Told a new layer's blob from the thread writing it, once its digest is known.
LayerReady = Callable[[LayerBlob], object]
#: A tag record to write: name, tag, its manifests' digests, whether they are
#: indexes, and the platforms.
_PendingTag = tuple[str, str, dict[Format, str], bool, list[str]]


def _tag_key(name: str, tag: str) -> str:
    """The memory key of what an offline mirror holds for ``name:tag``."""
    return f"tag {name}:{tag}"


def _index_key(found: list[ImageManifests]) -> str:
    """The memory key of the indexes over these platform manifests (in order)."""
    return "index " + " ".join(
        manifests.by_format[fmt].digest
        for manifests in found
        for fmt in Format
        if fmt in manifests.by_format
    )


async def _recorded(index: RecordIndex, look_up: Callable[[str], T | None], key: str) -> T | None:
    """``look_up(key)`` in a worker thread, unless ``index`` has no record for it.

    A miss is then one ``stat``, done on the event loop: a worker-thread hop
    costs more, and a cold build misses each cache twice (before and after
    taking a flight's lock).
    """
    if not index.may_have(key):
        return None
    return await trio.to_thread.run_sync(look_up, key)


def first_registry_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report for a nursery's failures: its first RegistryError.

    Parallel layer writes that fail together (a full disk fails them all)
    should reach the client as the one registry error they share, not as a
    Python exception group.
    """
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, RegistryError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
    return group


@dataclass(frozen=True)
class Manifest:
    """A manifest (or index) as served: its bytes, digest and media type."""

    data: bytes
    digest: str
    media_type: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ImageSettings:
    """What the config says beside the layers: the command, and what each layer holds."""

    cmd: list[str] | None
    history: list[str]


@dataclass(frozen=True)
class ImageManifests:
    """An image's manifests, one per format it has (a zstd image has no Docker
    one); for a multi-platform image its indexes, with ``single`` the first
    platform's manifests, for clients that take no index."""

    by_format: dict[Format, Manifest]
    single: ImageManifests | None = None

    def pick(self, accept: str | None, oci: bool = True) -> Manifest:
        """What a request for the tag gets (see ``manifest``'s rules); ``oci``
        off answers with Docker's formats only.  ManifestUnknown when the
        client takes none of the formats the image has."""
        if self.single is not None:
            for fmt in index_formats(accept):
                if fmt in self.by_format and (oci or fmt is Format.DOCKER):
                    return self.by_format[fmt]
            return self.single.pick(accept, oci)
        manifest = self.by_format.get(negotiate(accept) if oci else Format.DOCKER)
        if manifest is None:
            raise ManifestUnknown(
                "this image's layers are compressed with zstd, which only OCI manifests can "
                "hold, and this request "
                + ("takes only Docker's schema 2 manifests (its Accept header)" if oci
                   else "gets Docker's schema 2 only (NIXERY_OCI=0)")
                + "; pull it without zstd/ for gzip layers",
                {"accept": accept or ""},
            )  # fmt: skip
        return manifest


class RecentManifests(Generic[V]):
    """Manifests checked against the store in the last few seconds.

    A warm pull asks for the same manifest again and again; each check reads
    the manifest, stats its blobs and takes the store lock in a worker thread.
    Within ``seconds`` of a check the answer is served from memory.  That is
    safe against gc because a check refreshes the manifest's "last used"
    time, and gc keeps what was used within its grace period, which the CLI
    requires to be well above ``seconds`` plus the refresh interval.
    """

    def __init__(self, entries: int, seconds: float) -> None:
        self._entries = entries
        self._seconds = seconds
        self._memo: OrderedDict[str, tuple[V, float]] = OrderedDict()

    def get(self, key: str) -> V | None:
        memo = self._memo.get(key)
        if memo is None or trio.current_time() - memo[1] > self._seconds:
            return None
        self._memo.move_to_end(key)
        return memo[0]

    def put(self, key: str, manifest: V) -> None:
        self._memo[key] = (manifest, trio.current_time())
        self._memo.move_to_end(key)
        while len(self._memo) > self._entries:
            self._memo.popitem(last=False)


class Builder:
    """Turns image names into manifests whose blobs are all in the store."""

    def __init__(
        self,
        config: Config,
        store: Storage,
        popularity: dict[str, int],
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.store = store
        self.layer_cache = LayerCache(store)
        self.manifest_cache = ManifestCache(store)
        self.tag_cache = TagCache(store)
        self.popularity = popularity
        self._nursery = nursery
        #: What this process last recorded per name:tag (see _record_tag).
        self._recorded_tags: dict[str, dict[Format, str]] = {}
        #: Tag records not yet written, and whether a task is writing them.
        self._pending_tags: dict[str, _PendingTag] = {}
        self._writing_tags = False
        self._images: SingleFlight[ImageManifests] = SingleFlight(nursery)
        self._layers: SingleFlight[LayerBlob] = SingleFlight(nursery)
        self._lock_dir = config.storage_path / "locks"
        self._image_locks = KeyLocks(self._lock_dir, "image")
        self._layer_locks = KeyLocks(self._lock_dir, "layer")
        nursery.start_soon(self._image_locks.refresh_forever)
        nursery.start_soon(self._layer_locks.refresh_forever)
        self._slots = BuildSlots(self._lock_dir, config.max_builds)
        self._quota = (
            ColdBuildQuota(config.storage_path, config.cold_builds_per_minute)
            if config.cold_builds_per_minute
            else None
        )
        #: Name lookups that failed (MANIFEST_UNKNOWN), by flight key, and when.
        self._misses: dict[str, tuple[ManifestUnknown, float]] = {}
        self._threads = trio.CapacityLimiter(config.build_threads)
        #: Build leases between replicas on one bucket (the s3 backend).
        self._leases = (
            BuildLeases(store.bucket, config.s3.build_lease_seconds)
            if isinstance(store, S3Store) and config.s3 is not None
            else None
        )
        self._recent_images: RecentManifests[ImageManifests] = RecentManifests(
            RECENT_ENTRIES, RECENT_SECONDS
        )
        self._recent_digests: RecentManifests[Manifest] = RecentManifests(
            RECENT_ENTRIES, RECENT_SECONDS
        )
        self._source_keys: dict[str, tuple[str | None, float]] = {}
        #: How long the source took to answer last (see INLINE_KEY_SECONDS).
        self._key_seconds = float("inf")
        self._refreshing_keys: set[str] = set()
        #: The source's tags and the store's repository names, and when they were read.
        self._tags: tuple[list[str], float] | None = None
        self._listing_tags = trio.Lock()
        #: Tags asked for that a listing did not have, and when it was made.
        self._absent_tags: dict[str, float] = {}
        self._catalog: tuple[list[str], float] | None = None
        #: Told of every build's progress (``prefetch`` shows it).
        self.progress_hooks: list[ProgressHook] = []

    def _report(self, progress: BuildProgress, **changes: int | str | RegistryError) -> None:
        for name, value in changes.items():
            setattr(progress, name, value)
        for hook in self.progress_hooks:
            hook(progress)

    def open(self, clean: bool = True) -> int | None:
        """Create the store's layout and, if ``clean``, serve it and clear crash
        leftovers (blocking); return what ``CAS.open_store`` did.  Workers pass
        False: their parent did both before it forked them.
        """
        removed = self.store.open_store(clean=clean)
        self.layer_cache.index.open_index()
        self.manifest_cache.index.open_index()
        self.tag_cache.index.open_index()
        self._lock_dir.mkdir(exist_ok=True)
        if isinstance(self.config.source, PathSource) and not self.config.offline:
            # Hash the package set's files now, not in the first request:
            # later keys only re-hash files whose stat changed.  The second
            # walk, which only stats them, times what asking will cost.
            self._timed_source_key("latest")
            self._timed_source_key("latest")
        return removed

    def parse(self, name: str, tag: str) -> Image:
        """The image ``name:tag`` asks for; ``DENIED`` for a package the
        allow and deny lists keep out (before anything is looked up or built)."""
        image = parse_image(name, tag, max_packages=self.config.max_packages)
        refusal = self.config.packages.refusal(image.requested)
        if refusal is not None:
            raise refusal
        return image

    def recent_manifest(self, name: str, tag: str) -> ImageManifests | None:
        """The manifest of ``name:tag`` if memory alone can answer, else ``None``.

        Never blocks and never builds: the fast path for warm pulls, which
        falls back to :meth:`manifest_for_tag` on ``None``.
        """
        try:
            image = self.parse(name, tag)
        except RegistryError:
            return None
        if self.config.offline:
            return self._recent_images.get(_tag_key(name, tag))
        memo = self._source_keys.get(tag)
        if memo is None or trio.current_time() - memo[1] >= SOURCE_KEY_SECONDS:
            return None
        if self._tag_served(tag) is not True:
            return None
        found = []
        for platform_image in self.platform_images(image):
            image_key = self._image_key(platform_image, memo[0])
            manifests = None if image_key is None else self._recent_images.get(image_key)
            if manifests is None:
                return None
            found.append(manifests)
        if len(found) > 1:
            manifests = self._recent_images.get(_index_key(found))
        if manifests is not None:
            metrics.METRICS.manifest_hits.inc()
            logs.info("manifest.cached", image=name, tag=tag)
        return manifests

    def platform_images(self, image: Image) -> list[Image]:
        """The image once per platform it is served for: the registry's
        platforms, or the one its name chose (``arm64/...``)."""
        platforms = self.config.platforms
        if image.pinned or platforms == (image.arch,):
            return [image]
        return [dataclasses.replace(image, arch=arch) for arch in platforms]

    async def manifest_for_tag(self, name: str, tag: str) -> ImageManifests:
        """The manifests of ``name:tag`` (or its indexes), building what is needed."""
        image = self.parse(name, tag)
        if self.config.offline:
            return await self._held(name, tag)
        await self._check_tag(name, tag)
        images = self.platform_images(image)
        if len(images) == 1:
            manifests = await self._image_manifests(images[0])
            self._record_tag(image, manifests, [images[0].arch.platform])
            return manifests
        found: list[ImageManifests | None] = [None] * len(images)

        async def build(index: int, platform_image: Image) -> None:
            found[index] = await self._image_manifests(platform_image)

        try:
            async with trio.open_nursery() as nursery:
                for index, platform_image in enumerate(images):
                    nursery.start_soon(build, index, platform_image)
        except BaseExceptionGroup as group:
            raise first_registry_error(group) from group
        built = [manifests for manifests in found if manifests is not None]
        indexes = await self._index(image, built, [i.arch for i in images])
        self._record_tag(image, indexes, [i.arch.platform for i in images])
        return indexes

    def _record_tag(self, image: Image, manifests: ImageManifests, platforms: list[str]) -> None:
        """Remember what ``image.name:image.tag`` gave (a mirror's list of what it
        holds), in the background: the client does not wait for it."""
        key = _tag_key(image.name, image.tag)
        digests = {fmt: manifest.digest for fmt, manifest in manifests.by_format.items()}
        if self._recorded_tags.get(key) == digests:
            return
        if len(self._recorded_tags) >= RECENT_ENTRIES:
            self._recorded_tags.clear()
        self._recorded_tags[key] = digests
        index = manifests.single is not None
        self._pending_tags[key] = (image.name, image.tag, digests, index, platforms)
        if not self._writing_tags:
            self._writing_tags = True
            self._nursery.start_soon(self._write_tags)

    async def _write_tags(self) -> None:
        """Write the pending tag records after :data:`TAG_RECORD_DELAY`: once the
        response that asked for them is out, and in one worker-thread hop for
        every tag served meanwhile.  A shutdown writes them at once."""
        try:
            await trio.sleep(TAG_RECORD_DELAY)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    while self._pending_tags:
                        pending, self._pending_tags = self._pending_tags, {}
                        failed = await trio.to_thread.run_sync(self._put_tags, pending)
                        for key in failed:  # a full disk: the next pull tries again
                            self._recorded_tags.pop(key, None)
                finally:
                    self._writing_tags = False

    def _put_tags(self, pending: dict[str, _PendingTag]) -> list[str]:
        """Write tag records (blocking); the keys of those that failed."""
        failed = []
        for key, (name, tag, digests, index, platforms) in pending.items():
            try:
                self.tag_cache.put(name, tag, digests, index, platforms)
            except RegistryError as exc:
                failed.append(key)
                logs.warning("tag.unrecorded", image=name, tag=tag, error=str(exc))
        return failed

    async def tags_recorded(self) -> None:
        """Wait until every tag record asked for so far is written (``prefetch`` ends so)."""
        while self._writing_tags or self._pending_tags:
            await trio.sleep(0.01)

    async def _held(self, name: str, tag: str) -> ImageManifests:
        """What the store holds for ``name:tag`` (``--offline``), or ManifestUnknown."""
        key = _tag_key(name, tag)
        held = self._recent_images.get(key)
        if held is None:
            held = await trio.to_thread.run_sync(self._load_tag, name, tag)
            if held is None:
                raise ManifestUnknown(
                    f"{name}:{tag} is not held by this mirror, which serves its store only "
                    "(--offline) and builds nothing; /v2/_catalog lists the images it holds",
                    {"name": name, "tag": tag},
                )
            self._recent_images.put(key, held)
        return held

    def _load_tag(self, name: str, tag: str) -> ImageManifests | None:
        """The documents the tag record names, checked as a cached manifest is."""
        with self.store.lock.held():
            record = self.tag_cache.get(name, tag)
            if record is None:
                return None
            loaded = {}
            for fmt, key in MANIFEST_KEYS.items():
                if key in record:
                    document = self._load_manifest(str(record[key]))
                    if document is None:
                        return None
                    loaded[fmt] = document
            if not record.get("index"):
                return ImageManifests(loaded)
            # The first platform's manifests, for clients that take no index.
            first = {}
            for fmt, index in loaded.items():
                refs = manifest_refs(index.data) or []
                document = self._load_manifest(refs[0].digest) if refs else None
                if document is None:
                    return None
                first[fmt] = document
            return ImageManifests(loaded, single=ImageManifests(first))

    async def tags_of(self, name: str) -> list[str] | None:
        """The tags ``name`` is served with: the source's, or offline, the store's."""
        if not self.config.offline:
            return await self.tags()
        records = await trio.to_thread.run_sync(self.tag_cache.records)
        return sorted(str(r["tag"]) for r in records if r.get("name") == name)

    async def _index(
        self, image: Image, found: list[ImageManifests], arches: list[Arch]
    ) -> ImageManifests:
        """The indexes naming each platform's manifests, stored in the CAS."""
        key = _index_key(found)
        cached = self._recent_images.get(key)
        if cached is not None:
            return cached
        documents = {
            fmt: build_index(fmt, [(m.by_format[fmt], arch) for m, arch in zip(found, arches,
                                                                              strict=True)])
            for fmt in Format
            if all(fmt in manifests.by_format for manifests in found)
        }  # fmt: skip
        digests = await trio.to_thread.run_sync(self._store_documents, list(documents.values()))
        indexes = ImageManifests(
            {fmt: Manifest(data, digest, fmt.index_type)
             for (fmt, data), digest in zip(documents.items(), digests, strict=True)},
            single=found[0],
        )  # fmt: skip
        stored = {fmt.name.lower(): m.digest for fmt, m in indexes.by_format.items()}
        logs.info("index.stored", image=image.name, tag=image.tag, digests=stored)
        self._recent_images.put(key, indexes)
        return indexes

    def _store_documents(self, documents: list[bytes]) -> list[str]:
        with self.store.lock.held():
            return self.store.put_many(documents)

    async def _image_manifests(self, image: Image) -> ImageManifests:
        """The manifests of one platform's image, building it when needed."""
        name, tag = image.name, image.tag
        asked_at = trio.current_time()
        image_key = self._image_key(image, await self._source_key(tag))
        cached = await self._cached(image_key, image.name)
        if cached is None and image_key is not None and not self._asked_since(tag, asked_at):
            # A miss builds and records under the key: it must be current,
            # not one remembered from before an edit of the package set
            # (a key asked for this very request is current).
            current = self._image_key(image, await self._source_key(tag, fresh=True))
            if current != image_key:
                image_key = current
                cached = await self._cached(image_key, image.name)
        if cached is not None:
            metrics.METRICS.manifest_hits.inc()
            logs.info("manifest.cached", image=name, tag=tag)
            return cached
        flight_key = image_key or json.dumps(
            [self.config.source.render(tag), image.arch.nix_system, list(image.packages),
             IMAGE_LAYOUT, *image.variant]
        )  # fmt: skip
        miss = self._recent_miss(flight_key)
        if miss is not None:
            raise miss
        return await self._images.do(
            flight_key, partial(self._build_once, flight_key, image, image_key)
        )

    def _recent_miss(self, flight_key: str) -> ManifestUnknown | None:
        """A failed name lookup of this image within ``config.not_found_ttl``."""
        miss = self._misses.get(flight_key)
        if miss is None:
            return None
        if trio.current_time() - miss[1] < self.config.not_found_ttl:
            return miss[0]
        del self._misses[flight_key]
        return None

    def _remember(self, flight_key: str, error: RegistryError) -> None:
        if isinstance(error, ManifestUnknown):
            if len(self._misses) >= RECENT_ENTRIES:
                self._misses.clear()
            self._misses[flight_key] = (error, trio.current_time())

    def _tag_served(self, tag: str) -> bool | None:
        """Whether this registry serves ``tag``; ``None``: the git repository's refs tell."""
        if self.config.any_tag or tag == LATEST:
            return True
        if not isinstance(self.config.source, GitSource):
            return False
        return True if COMMIT.fullmatch(tag) else None

    async def _check_tag(self, name: str, tag: str) -> None:
        """Raise ``MANIFEST_UNKNOWN`` for a tag this registry does not serve."""
        served = self._tag_served(tag)
        if served is None:
            tags = await self.tags(missing=tag)
            served = tags is None or tag in tags
        if not served:
            tags = await self.tags() or [LATEST]
            raise ManifestUnknown(
                f"{name}:{tag} is not served: this registry serves "
                f"{', '.join(tags[:20])}{' and more' if len(tags) > 20 else ''} "
                f"(see /v2/{name}/tags/list)",
                {"tag": tag, "tags": tags[:100]},
            )

    async def tags(self, missing: str | None = None) -> list[str] | None:
        """The tags every image is served with; ``None`` if the source cannot tell now.

        A git repository's branches and tags are listed every
        :data:`TAGS_SECONDS`, and again at once for a tag asked for
        (``missing``) that is not among them (it may be new), unless a listing
        of the last :data:`TAGS_RETRY_SECONDS` already found it absent.  One
        listing runs at a time.
        """
        listed = self._tags
        stale = listed is None or trio.current_time() - listed[1] >= TAGS_SECONDS
        if not stale and missing is not None and listed is not None and missing not in listed[0]:
            confirmed = self._absent_tags.get(missing, -math.inf)
            stale = trio.current_time() - confirmed >= TAGS_RETRY_SECONDS
        if stale:
            async with self._listing_tags:
                if self._tags is listed:  # else another task just listed them
                    asked = trio.current_time()
                    fresh = await trio.to_thread.run_sync(self.config.source.tags)
                    if fresh is None:
                        logs.warning("source.tags_unknown", source=self.config.source.src_type)
                    else:
                        self._tags = (fresh, asked)
            listed = self._tags
        if listed is None:
            return None
        if missing is not None and missing not in listed[0]:
            if len(self._absent_tags) >= RECENT_ENTRIES:
                self._absent_tags.clear()
            self._absent_tags[missing] = listed[1]
        return listed[0]

    async def catalog(self) -> list[str]:
        """The repository names of the images in the store, read at most every
        :data:`CATALOG_SECONDS` (on a worker thread: it reads every record)."""
        now = trio.current_time()
        if self._catalog is None or now - self._catalog[1] >= CATALOG_SECONDS:
            names = await trio.to_thread.run_sync(self._names)
            self._catalog = (sorted(names), now)
        return self._catalog[0]

    def _names(self) -> set[str]:
        tagged = {str(record["name"]) for record in self.tag_cache.records() if "name" in record}
        return tagged | self.manifest_cache.names()

    def recent_by_digest(self, digest: str) -> Manifest | None:
        """The manifest ``digest`` if memory alone can answer, else ``None`` (never blocks)."""
        return self._recent_digests.get(digest)

    async def manifest_for_digest(self, digest: str) -> Manifest:
        """A stored manifest by digest, or ManifestUnknown."""
        manifest = self.recent_by_digest(digest)
        if manifest is None:
            manifest = await trio.to_thread.run_sync(self._locked_manifest, digest)
            if manifest is None:
                raise ManifestUnknown(f"manifest {digest} is not known to this registry")
            self._recent_digests.put(digest, manifest)
        return manifest

    @staticmethod
    def _image_key(image: Image, source_key: str | None) -> str | None:
        if source_key is None:
            return None
        return json.dumps(
            [source_key, image.arch.nix_system, list(image.packages), IMAGE_LAYOUT, *image.variant]
        )

    async def _cached(self, image_key: str | None, name: str) -> ImageManifests | None:
        if image_key is None:
            return None
        cached = self._recent_images.get(image_key)
        if cached is None:
            cached = await self._stored_manifest(image_key, name)
            if cached is not None:
                self._recent_images.put(image_key, cached)
        return cached

    async def _stored_manifest(self, image_key: str, name: str) -> ImageManifests | None:
        """The cached manifests of an image, checked against the store."""
        look_up = partial(self._cached_manifest, name=name)
        return await _recorded(self.manifest_cache.index, look_up, image_key)

    def _asked_since(self, tag: str, moment: float) -> bool:
        """Whether the source's key for ``tag`` was asked at or after ``moment``."""
        memo = self._source_keys.get(tag)
        return memo is not None and memo[1] >= moment

    async def _source_key(self, tag: str, fresh: bool = False) -> str | None:
        """The source's cache key for ``tag``, asked at most once a second
        for lookups (``fresh`` asks now, as a build must).

        A path source hashes its files to answer; serving a cached image from
        a key up to a second old is the price of not walking the tree on
        every request.
        """
        now = trio.current_time()
        memo = self._source_keys.get(tag)
        # One caller refreshes a stale key; the others go on with it.
        if (
            not fresh
            and memo is not None
            and (now - memo[1] < SOURCE_KEY_SECONDS or tag in self._refreshing_keys)
        ):
            return memo[0]
        self._refreshing_keys.add(tag)
        try:
            if self._key_seconds < INLINE_KEY_SECONDS:
                key = self._timed_source_key(tag)
            else:
                key = await trio.to_thread.run_sync(self._timed_source_key, tag)
        finally:
            self._refreshing_keys.discard(tag)
        if len(self._source_keys) >= RECENT_ENTRIES:
            self._source_keys.clear()
        self._source_keys[tag] = (key, now)
        return key

    def _timed_source_key(self, tag: str) -> str | None:
        started = time.perf_counter()
        key = self.config.source.cache_key(tag)
        self._key_seconds = time.perf_counter() - started
        return key

    def _cached_manifest(self, image_key: str, name: str) -> ImageManifests | None:
        """The cached manifests of an image, if they and all their blobs are stored.

        A record from before OCI manifests, or one whose OCI manifest gc
        removed, gets it again from the Docker one (the same blobs).  A zstd
        image's record names its OCI manifest only.
        """
        with self.store.lock.held():
            digests = self.manifest_cache.get(image_key)
            if digests is None:
                return None
            loaded = {fmt: self._load_manifest(digest) for fmt, digest in digests.items()}
            docker, oci = loaded.get(Format.DOCKER), loaded.get(Format.OCI)
            if Format.DOCKER not in digests:
                return None if oci is None else ImageManifests({Format.OCI: oci})
            if docker is None:
                return None
            if oci is None:
                data = convert_manifest(docker.data, Format.OCI)
                if data is None:
                    return None
                oci = Manifest(data, self.store.put_bytes(data), OCI_MANIFEST)
                digests = {Format.DOCKER: docker.digest, Format.OCI: oci.digest}
                self.manifest_cache.put(image_key, digests, name)
            return ImageManifests({Format.DOCKER: docker, Format.OCI: oci})

    def _locked_manifest(self, digest: str) -> Manifest | None:
        with self.store.lock.held():
            return self._load_manifest(digest)

    def _load_manifest(self, digest: str) -> Manifest | None:
        """Read a manifest, check its blobs are all stored, and mark it used.

        The mark (``Storage.used``: the file's mtime, or a bucket's ``used/``
        object, refreshed at most once a minute) is what ``gc`` reads as "last
        used": it never removes a manifest, or a blob one names, that was used
        within its grace period.
        """
        data = self.store.read_bytes(digest, DOCUMENT_LIMIT)
        document = None if data is None else parse_document(data)
        if data is None or document is None:
            return None
        if any(self.store.size(r.digest) != r.size for r in document.refs):
            return None
        self.store.used(digest)
        return Manifest(data=data, digest=digest, media_type=document.media_type)

    async def _charge_cold_build(self, image: Image) -> None:
        """Count a cold build against its requester's ``--cold-builds-per-minute``,
        or refuse it with ``TOOMANYREQUESTS``."""
        requester = REQUESTER.get()
        if self._quota is None or requester is None:
            return
        retry_after = await trio.to_thread.run_sync(self._quota.charge, requester)
        if retry_after is not None:
            logs.warning("build.refused", image=image.name, tag=image.tag, client=requester,
                         retry_after=retry_after)  # fmt: skip
            raise TooManyRequests(
                f"too many new images: {self.config.cold_builds_per_minute} builds a minute "
                f"per client; images already built are still served. Retry in {retry_after} s",
                {"retry_after": retry_after},
            )

    async def _build_once(
        self,
        flight_key: str,
        image: Image,
        image_key: str | None,
        flight: Flight[ImageManifests],
    ) -> ImageManifests:
        """Build the image, unless another process built it (or failed to)
        while we waited for its lock, or found no such packages a moment ago."""
        async with self._image_locks.hold(flight_key) as held:
            failure = held.recent_failure(self.config.not_found_ttl)
            if failure is not None:
                self._remember(flight_key, failure)
                raise failure
            if image_key is not None:
                cached = await self._stored_manifest(image_key, image.name)
                if cached is not None:
                    metrics.METRICS.manifest_hits.inc()
                    logs.info("manifest.cached", image=image.name, tag=image.tag)
                    return cached
            async with self._leased(flight_key, image, image_key) as built:
                if built is not None:  # by another replica, while we waited
                    metrics.METRICS.manifest_hits.inc()
                    logs.info("manifest.cached", image=image.name, tag=image.tag,
                              detail="built by another replica")  # fmt: skip
                    return built
                metrics.METRICS.manifest_misses.inc()
                await self._charge_cold_build(image)  # a refusal is no build: never recorded
                try:
                    return await self._build_image(image, image_key, flight)
                except RegistryError as exc:
                    held.record_failure(exc)
                    self._remember(flight_key, exc)
                    raise

    def _leased(
        self, flight_key: str, image: Image, image_key: str | None
    ) -> contextlib.AbstractAsyncContextManager[ImageManifests | None]:
        """The bucket's build lease on the image (``leases.py``), or, if another
        replica built it while we waited, its manifests; on the filesystem,
        where the flight's lock file already covers every process, nothing."""
        if self._leases is None:
            return contextlib.nullcontext()

        async def built() -> ImageManifests | None:
            if image_key is None:
                return None
            return await self._stored_manifest(image_key, image.name)

        return self._leases.hold(flight_key, built)

    async def _build_image(
        self, image: Image, image_key: str | None, flight: Flight[ImageManifests]
    ) -> ImageManifests:
        progress = BuildProgress(image.name, image.tag, image.arch.platform)
        self._report(progress)
        try:
            return await self._build_reported(image, image_key, flight, progress)
        except RegistryError as exc:
            self._report(progress, phase="failed", error=exc)
            raise
        except Exception:
            self._report(progress, phase="failed")
            raise
        except BaseException:
            self._report(progress, phase="cancelled")
            raise

    async def _build_reported(
        self,
        image: Image,
        image_key: str | None,
        flight: Flight[ImageManifests],
        progress: BuildProgress,
    ) -> ImageManifests:
        with flight.droppable():
            slot = await self._slots.acquire(image.name)
        self._report(progress, phase="nix")
        started = time.monotonic()
        try:
            result = await nix.prepare_image(
                nix_dir=self.config.nix_dir,
                source=self.config.source,
                image=image,
                timeout=self.config.nix_timeout,
            )
        finally:
            slot.release()
        nix_done = time.monotonic()
        self._report(progress, phase="layering")
        # Grouping is pure but CPU-bound for big closures, and the lookups
        # block: one worker-thread hop does both.  The store lock is held
        # shared from the layer lookups until the manifest is recorded: gc
        # (exclusive) cannot remove a cached layer in between.
        layers, layered, lock, blobs = await trio.to_thread.run_sync(
            self._plan_layers, image, result
        )
        # A zstd layer is another blob of the same paths: its own cache key.
        jobs: list[tuple[str, Entries]] = [
            (_layer_key(image, layer), partial(archive.store_path_entries, layer.contents))
            for layer in layers
        ]
        forest = partial(archive.forest_entries, result.forest, image.nonroot)
        jobs.append((_forest_key(image, result.forest), forest))
        history = [f"nix store paths: {' '.join(layer.contents)}" for layer in layers]
        history.append(f"image root: links from {result.forest}, /etc/passwd, /etc/group, /tmp")
        programs = {
            name: program
            for name, program in result.main_programs.items()
            if os.path.lexists(os.path.join(result.forest, "bin", program))
        }
        settings = ImageSettings(command(image.requested, programs, image.has_bash), history)
        try:
            # The config and manifests need only the layers' digests: they are
            # stored as soon as every digest is known, while the last layers
            # are still being made durable, and recorded once all are.
            known = list(blobs)
            all_known = trio.Event()
            written = layered  # when the last layer was stored
            stored: list[ImageManifests] = []

            def learned(index: int, blob: LayerBlob) -> None:
                known[index] = blob
                if all(blob is not None for blob in known):
                    all_known.set()

            token = trio.lowlevel.current_trio_token()

            async def write(index: int, key: str, entries: Entries) -> None:
                def ready(blob: LayerBlob) -> None:
                    token.run_sync_soon(learned, index, blob)

                blob = await self._layers.do(
                    key, lambda _: self._write_layer(image, key, entries, ready)
                )
                nonlocal written
                written = time.monotonic()
                blobs[index] = blob
                learned(index, blob)
                self._report(progress, layers_written=progress.layers_written + 1,
                             bytes=progress.bytes + blob.size)  # fmt: skip

            async def store_documents() -> None:
                await all_known.wait()
                layer_blobs = [blob for blob in known if blob is not None]
                stored.append(await trio.to_thread.run_sync(
                    self._store_image_documents, image, layer_blobs, settings
                ))  # fmt: skip

            cached = sum(blob is not None for blob in blobs)
            self._report(progress, phase="layers", layers_total=len(jobs), layers_cached=cached)
            if cached == len(blobs):
                all_known.set()

            try:
                async with trio.open_nursery() as nursery:
                    for index, (key, entries) in enumerate(jobs):
                        if blobs[index] is None:
                            nursery.start_soon(write, index, key, entries)
                    nursery.start_soon(store_documents)
            except BaseExceptionGroup as group:
                raise first_registry_error(group) from group
            [manifests] = stored
            if image_key is not None:
                digests = {fmt: manifest.digest for fmt, manifest in manifests.by_format.items()}
                await trio.to_thread.run_sync(
                    self.manifest_cache.put, image_key, digests, image.name
                )
        finally:
            os.close(lock)
        done = time.monotonic()
        self._report(progress, phase="done")
        logs.info(
            "image.built",
            image=image.name,
            tag=image.tag,
            digests={fmt.name.lower(): m.digest for fmt, m in manifests.by_format.items()},
            layers=len(blobs),
            nix_seconds=round(nix_done - started, 4),
            layering_seconds=round(layered - nix_done, 4),
            layer_seconds=round(written - layered, 4),
            rest_seconds=round(done - written, 4),
        )
        return manifests

    def _plan_layers(
        self, image: Image, result: nix.NixResult
    ) -> tuple[list[Layer], float, int, list[LayerBlob | None]]:
        """Group the closure into layers (and when that was done), then take
        the store lock (shared) and look every layer up (blocking)."""
        layers = group_layers(result.graph, result.roots, self.popularity,
                              budget=self.config.layer_budget)  # fmt: skip
        layered = time.monotonic()
        keys = [_layer_key(image, layer) for layer in layers]
        keys.append(_forest_key(image, result.forest))
        lock = self.store.lock.acquire()
        try:
            found = [self.layer_cache.get(key) for key in keys]
            for blob in found:
                if blob is not None:  # reused: fresh for gc (a bucket's gc takes no lock)
                    self.store.used(blob.digest)
        except BaseException:
            os.close(lock)
            raise
        hits = sum(blob is not None for blob in found)
        metrics.METRICS.layer_hits.inc(hits)
        metrics.METRICS.layer_misses.inc(len(found) - hits)
        return layers, layered, lock, found

    def _store_image_documents(
        self, image: Image, layers: list[LayerBlob], settings: ImageSettings
    ) -> ImageManifests:
        """Store the config and a manifest per format (blocking)."""
        config = build_config(
            arch=image.arch,
            layers=layers,
            cmd=settings.cmd,
            user=user(image.nonroot),
            history=settings.history,
        )
        config_digest = sha256_digest(config)
        documents = {
            fmt: build_manifest(config_digest=config_digest, config_size=len(config),
                                layers=layers, fmt=fmt, compression=image.compression)
            for fmt in Format
            if fmt.holds(image.compression)
        }  # fmt: skip
        _, *stored = self.store.put_many([config, *documents.values()])
        manifests = {
            fmt: Manifest(data, digest, fmt.manifest_type)
            for (fmt, data), digest in zip(documents.items(), stored, strict=True)
        }
        return ImageManifests(manifests)

    async def _write_layer(
        self, image: Image, key: str, entries: Entries, ready: LayerReady | None = None
    ) -> LayerBlob:
        """The layer's blob, written unless cached; ``ready`` (called from the
        writing thread) is told a new blob as soon as its digest is known."""
        async with self._layer_locks.hold(key):
            # The layer may have been cached since the caller's lookup: by a
            # flight for the same key that just ended, or by another process.
            cached = await _recorded(self.layer_cache.index, self.layer_cache.get, key)
            if cached is not None:
                return cached
            return await self._write_new_layer(image, key, entries, ready)

    async def _write_new_layer(
        self, image: Image, key: str, entries: Entries, ready: LayerReady | None = None
    ) -> LayerBlob:
        started = time.monotonic()
        blob = await trio.to_thread.run_sync(
            partial(archive.write_layer, self.store, entries(), deflate=self.config.deflate,
                    compression=image.compression, ready=ready),
            limiter=self._threads,
        )
        await trio.to_thread.run_sync(self.layer_cache.put, key, blob)
        logs.info(
            "layer.built",
            image=image.name,
            layer=key,
            digest=blob.digest,
            size=blob.size,
            seconds=round(time.monotonic() - started, 3),
        )
        return blob
