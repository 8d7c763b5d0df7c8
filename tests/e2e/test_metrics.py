"""``/metrics`` of a real server with two workers, parsed with prometheus-client's
own parser and checked against the requests this test made."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .server import start_server, wait_for
from .test_concurrency import fresh_demo


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_add_up_every_worker(tmp_path: Path) -> None:
    with start_server(tmp_path, extra=("--workers", "2")) as server:
        url = server.url
        before = scrape(url)
        assert value(before, "nixery_builds_total", outcome="started") == 0
        with httpx.Client(timeout=120) as client:
            # New connections, so that both workers answer some of them.
            manifests = [httpx.get(f"{url}/v2/hello/manifests/latest", timeout=120)
                         for _ in range(6)]  # fmt: skip
            assert {m.status_code for m in manifests} == {200}
            missing = client.get(f"{url}/v2/no-such-package/manifests/latest")
            assert missing.status_code == 404
            layer = manifests[0].json()["layers"][0]
            blob = client.get(f"{url}/v2/hello/blobs/{layer['digest']}")
            assert blob.status_code == 200 and len(blob.content) == layer["size"]
            for _ in range(3):
                assert client.get(f"{url}/v2/").status_code == 200
        after = scrape(url)
        # The store's size is taken at most once a second, by the worker scraped.
        blobs = list((server.storage / "blobs" / "sha256").iterdir())
        size = sum(p.stat().st_size for p in blobs)
        wait_for(lambda: (value(scrape(url), "nixery_store_blobs"),
                          value(scrape(url), "nixery_store_bytes")) == (len(blobs), size),
                 10, "the store's size")  # fmt: skip

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("nixery_http_requests_total", route="manifest", status="200") == 6
    assert delta("nixery_http_requests_total", route="manifest", status="404") == 1
    assert delta("nixery_http_requests_total", route="blob", status="200") == 1
    assert delta("nixery_http_requests_total", route="base", status="200") == 3
    # The first scrape is counted once it was answered.
    assert value(after, "nixery_http_requests_total", route="metrics", status="200") == 1
    manifest_bytes = sum(len(m.content) for m in manifests)
    assert delta("nixery_http_response_bytes_total", route="manifest") >= manifest_bytes
    assert delta("nixery_http_response_bytes_total", route="blob") == layer["size"]
    # hello built once (whichever worker), no-such-package failed once.
    assert delta("nixery_builds_total", outcome="started") == 2
    assert delta("nixery_builds_total", outcome="succeeded") == 1
    assert delta("nixery_builds_total", outcome="failed") == 1
    assert delta("nixery_build_duration_seconds_count") == 1
    assert delta("nixery_build_phase_duration_seconds_count", phase="nix") == 2
    assert delta("nixery_build_phase_duration_seconds_count", phase="layers") == 1
    # The five other pulls of hello were cache hits, in memory or in the store.
    assert delta("nixery_cache_lookups_total", cache="manifest", result="hit") == 5
    assert delta("nixery_cache_lookups_total", cache="manifest", result="miss") == 2
    layers = value(after, "nixery_cache_lookups_total", cache="layer", result="miss")
    assert layers == len(manifests[0].json()["layers"])
    assert value(after, "nixery_builds_in_flight") == 0
    assert value(after, "nixery_builds_queued") == 0


def test_gauges_show_a_build_in_flight(tmp_path: Path) -> None:
    demo, _ = fresh_demo(tmp_path)  # `slow` takes 2 s to build, never built before
    with start_server(tmp_path, source=("--pkgs-path", str(demo)),
                      extra=("--workers", "2")) as server:  # fmt: skip
        pulled: list[int] = []
        slow = threading.Thread(target=lambda: pulled.append(
            httpx.get(f"{server.url}/v2/slow/manifests/latest", timeout=120).status_code))
        slow.start()
        wait_for(lambda: value(scrape(server.url), "nixery_builds_in_flight") == 1, 60,
                 "the slow build to show in flight")  # fmt: skip
        slow.join(120)
        assert pulled == [200]
        wait_for(lambda: value(scrape(server.url), "nixery_builds_in_flight") == 0, 30,
                 "the build to end")  # fmt: skip
        assert value(scrape(server.url), "nixery_builds_total", outcome="succeeded") == 1
