"""The metrics' bookkeeping in memory (``/metrics`` of a real server with two
workers is tests/e2e/test_metrics.py)."""

from __future__ import annotations

import pytest

from nixery_trio import metrics
from nixery_trio.core.progress import BuildProgress


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> metrics.Metrics:
    made = metrics.Metrics()
    monkeypatch.setattr(metrics, "METRICS", made)
    return made


def sample(name: str, **labels: str) -> float | None:
    return metrics.METRICS.registry.get_sample_value(name, labels)


def queued() -> BuildProgress:
    return BuildProgress("hello", "latest", "linux/amd64")


def test_a_build_is_counted_through_its_phases() -> None:
    observe = metrics.BuildObserver()
    build = queued()
    observe(build)
    assert sample("nixery_builds_queued") == 1
    for phase in ("nix", "layering", "layers", "layers", "done"):
        build.phase = phase
        observe(build)
        if phase == "nix":
            assert sample("nixery_builds_queued") == 0
            assert sample("nixery_builds_in_flight") == 1
    assert sample("nixery_builds_in_flight") == 0
    assert sample("nixery_builds_total", outcome="started") == 1
    assert sample("nixery_builds_total", outcome="succeeded") == 1
    assert sample("nixery_build_duration_seconds_count") == 1
    for phase in metrics.PHASES:
        assert sample("nixery_build_phase_duration_seconds_count", phase=phase) == 1


def test_a_build_dropped_from_the_queue_never_started() -> None:
    observe = metrics.BuildObserver()
    build = queued()
    observe(build)
    build.phase = "cancelled"
    observe(build)
    assert sample("nixery_builds_queued") == 0
    assert sample("nixery_builds_total", outcome="started") == 0
    assert sample("nixery_builds_total", outcome="cancelled") == 0
    failed = queued()
    observe(failed)
    for phase in ("nix", "failed"):
        failed.phase = phase
        observe(failed)
    assert sample("nixery_builds_total", outcome="failed") == 1
    assert sample("nixery_builds_in_flight") == 0


def test_ready_makes_the_counters_of_pulls_and_counts_nothing() -> None:
    metrics.ready()
    assert sample("nixery_http_requests_total", route="manifest", status="200") == 0
    assert sample("nixery_http_requests_total", route="blob", status="200") == 0
    metrics.METRICS.request("blob", 200, 1000)
    metrics.METRICS.request("blob", 206, 10)
    assert sample("nixery_http_requests_total", route="blob", status="200") == 1
    assert sample("nixery_http_requests_total", route="blob", status="206") == 1
    assert sample("nixery_http_response_bytes_total", route="blob") == 1010


@pytest.mark.parametrize(
    ("path", "route"),
    [("/v2/", "base"), ("/v2", "base"), ("/v2/a/b/manifests/latest", "manifest"),
     ("/v2/x/blobs/sha256:00", "blob"), ("/v2/x/tags/list", "tags"), ("/v2/_catalog", "catalog"),
     ("/v2/x/referrers/sha256:00", "referrers"), ("/", "web"), ("/status.json", "web"),
     ("/metrics", "metrics"), ("/v2/x/unknown", "other"), ("/favicon.ico", "other")],
)  # fmt: skip
def test_route_labels_are_few(path: str, route: str) -> None:
    assert metrics.route_label(path) == route
