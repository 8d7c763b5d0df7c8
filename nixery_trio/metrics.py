"""Prometheus metrics, counted by every worker (``prometheus-client``'s
multi-process mode).

Names follow Prometheus' conventions: the ``nixery_`` prefix, base units in
the name, ``_total`` on counters, and labels with few values (route,
status, phase, outcome), never an image name or a digest.

Workers are forked processes that share no memory, so ``serve`` calls
:func:`enable_multiprocess` before it forks: each process then writes its
counts into small memory-mapped files of one directory, and whichever
worker answers ``/metrics`` adds them all up (:func:`render`).  The metrics
are made anew at that moment (:data:`METRICS` is replaced), since
``prometheus-client`` picks the storage of a value when the value is made;
everything reads them through ``metrics.METRICS``, never a copy.  Without
it (``prefetch``, tests) they count in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core.progress import BuildProgress
from .core.routes import kind_of
from .store.inventory import blob_totals
from .store.storage import Storage

#: Content type of the text format ``render`` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds a build or phase takes: from a warm layer set to a slow Nix build.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Seconds the store's size is reused between scrapes: it stats every blob (in
#: a worker thread; about 1 ms per 1,000 blobs), so a burst of scrapes walks once.
STORE_SCAN_SECONDS = 1.0


class Metrics:
    """Every metric of the registry, in one registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nixery_http_requests", "HTTP requests answered, by route and status.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.response_bytes = Counter(
            "nixery_http_response_bytes", "Body bytes sent, by route (blobs by sendfile too).",
            ["route"], registry=r,
        )  # fmt: skip
        self.builds = Counter(
            "nixery_builds", "Image builds (one per platform) by outcome: started, "
            "succeeded, failed, cancelled.", ["outcome"], registry=r,
        )  # fmt: skip
        self.build_seconds = Histogram(
            "nixery_build_duration_seconds", "Seconds from a build's start (after its queue) "
            "to its manifest.", registry=r, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.phase_seconds = Histogram(
            "nixery_build_phase_duration_seconds", "Seconds each phase of a build took: queued "
            "(for a build slot), nix, layering, layers (writing them), rest.", ["phase"],
            registry=r, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.cache_lookups = Counter(
            "nixery_cache_lookups", "Layer and manifest cache lookups by result (hit, miss).",
            ["cache", "result"], registry=r,
        )  # fmt: skip
        self.builds_in_flight = Gauge(
            "nixery_builds_in_flight", "Builds running (Nix or layers) now, all workers.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.builds_queued = Gauge(
            "nixery_builds_queued", "Builds waiting for a build slot now, all workers.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        # Children made once (a warm request pays a dict lookup, not labels()),
        # and so shown from the start, at zero.
        self.layer_hits, self.layer_misses, self.manifest_hits, self.manifest_misses = (
            self.cache_lookups.labels(cache, result)
            for cache in ("layer", "manifest") for result in ("hit", "miss")
        )  # fmt: skip
        self.outcomes = {o: self.builds.labels(o) for o in OUTCOMES}
        self.phases = {p: self.phase_seconds.labels(p) for p in PHASES}
        self._requests: dict[tuple[str, int], tuple[Any, Any]] = {}

    def request(self, route: str, status: int, sent: int) -> None:
        """Count one answered request of ``route`` and the body bytes it sent."""
        requests, sent_bytes = self._requests.get((route, status)) or self.children(route, status)
        requests.inc()
        if sent:
            sent_bytes.inc(sent)

    def children(self, route: str, status: int) -> tuple[Any, Any]:
        """The request and byte counters of ``route`` and ``status`` (made at zero)."""
        made = (self.requests.labels(route, str(status)), self.response_bytes.labels(route))
        self._requests[route, status] = made
        return made


#: Outcomes of a build that started (ran Nix), and the phases it went through.
OUTCOMES = ("started", "succeeded", "failed", "cancelled")
PHASES = ("queued", "nix", "layering", "layers")
_ENDS = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled"}


class BuildObserver:
    """A builder progress hook: build counts, phase durations and the gauges
    of builds queued and in flight, from each build's phase changes."""

    def __init__(self) -> None:
        #: id of a build's progress -> (its phase, since when, when Nix started or 0)
        self._builds: dict[int, tuple[str, float, float]] = {}

    def __call__(self, progress: BuildProgress) -> None:
        phase, now, key = progress.phase, time.monotonic(), id(progress)
        seen = self._builds.get(key)
        if seen is None:
            self._builds[key] = (phase, now, 0.0)
            if phase == "queued":
                METRICS.builds_queued.inc()
            return
        last, since, started = seen
        if phase == last:
            return  # a layer written: no phase change
        m = METRICS
        if last == "queued":
            m.builds_queued.dec()
        if last in m.phases:
            m.phases[last].observe(now - since)
        if phase == "nix":
            started = now
            m.outcomes["started"].inc()
            m.builds_in_flight.inc()
        if phase not in _ENDS:
            self._builds[key] = (phase, now, started)
            return
        del self._builds[key]
        if started:  # a build dropped from the queue never started
            m.outcomes[_ENDS[phase]].inc()
            m.builds_in_flight.dec()
            if phase == "done":
                m.build_seconds.observe(now - started)


def route_label(path: str) -> str:
    """The ``route`` label of a request path: a few values, never a name."""
    if path.startswith("/v2/"):
        kind = kind_of(path[4:])
        return "other" if kind is None else kind.value
    if path == "/v2":
        return "base"
    if path == "/metrics":
        return "metrics"
    if path in ("/", "/status.json"):
        return "web"
    return "other"


# In memory until ``serve`` calls :func:`enable_multiprocess`: prometheus-client
# picks files at import if PROMETHEUS_MULTIPROC_DIR is set, and the directory
# an operator names may not exist yet (the server makes it).
values.ValueClass = values.MutexValue
#: The metrics everything counts into (replaced by :func:`enable_multiprocess`).
METRICS = Metrics()


def enable_multiprocess(directory: Path) -> None:
    """Count into files of ``directory`` (emptied first), so that forked
    workers add up; call once, before the first fork."""
    global METRICS
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    METRICS = Metrics()


def ready() -> None:
    """Open this process's metric files now, not on its first request.

    A forked process's first update (re)opens the files of every value
    made so far, and a new label set opens its own: a few milliseconds that
    would otherwise land on the first requests a worker answers.  The
    routes and statuses of pulls are made here once.
    """
    METRICS.builds_queued.inc(0)  # the first update after a fork re-reads every value
    for route, status in (("base", 200), ("manifest", 200), ("manifest", 404), ("blob", 200)):
        METRICS.children(route, status)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters still count)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class StoreCollector(Collector):
    """The store's blobs and their bytes, counted at scrape time (at most every
    :data:`STORE_SCAN_SECONDS`), in a registry of its own."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._scanned = (-STORE_SCAN_SECONDS, 0, 0)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        at, blobs, size = self._scanned
        if time.monotonic() - at >= STORE_SCAN_SECONDS:
            blobs, size = blob_totals(self.storage)
            self._scanned = (time.monotonic(), blobs, size)
        yield GaugeMetricFamily("nixery_store_blobs", "Blobs in the store.", value=blobs)
        yield GaugeMetricFamily("nixery_store_bytes", "Bytes of the store's blobs.", value=size)


def render(store: StoreCollector) -> bytes:
    """The text format of every worker's metrics and the store's.  Blocking
    (it reads every worker's file): call from a thread."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = METRICS.registry
    return generate_latest(registry) + generate_latest(store.registry)
