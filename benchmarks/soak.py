"""Soak: 16 clients pull a mix of cached and uncached images for ten minutes.

Every client verifies everything it pulls: the manifest against its
``Docker-Content-Digest`` and every blob against its digest.  Uncached
images are random combinations of demo packages that this store has not
built yet (each costs a Nix evaluation and usually some new layers); cached
ones come from a small hot set.  The RSS of the server (its parent process
and workers, summed) is sampled throughout: after a minute of warm-up it
must stay flat to the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import trio

from .common import (
    REPO,
    Check,
    Context,
    Section,
    children,
    free_port,
    our_server_argv,
    process,
    rss_bytes,
)

#: The programs this benchmark runs besides ours (see ``common.PACKAGES``).
TOOLS = ("nix-build",)
CLIENTS = 16
FULL_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
WARMUP_SECONDS = 60.0
PACKAGES = [
    "hello", "chain-a", "chain-b", "chain-c", "diamond-base", "diamond-left",
    "diamond-right", "diamond-top", "tools.greet", "camelcase", "1password", "docs",
    "busybox", "coreutils", "nano", "moreutils", "bashinteractive",
]  # fmt: skip
HOT = ["hello", "shell/hello", "chain-a", "diamond-top", "docs", "shell", "arm64/docs", "large"]
COLD_SHARE = 0.3


@dataclass
class Stats:
    pulls: int = 0
    cold_pulls: int = 0
    blobs: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)


async def pull(http: httpx.AsyncClient, base: str, name: str, stats: Stats) -> None:
    response = await http.get(f"{base}/v2/{name}/manifests/latest")
    if response.status_code != 200:
        stats.errors.append(f"{name}: manifest {response.status_code} {response.text[:200]}")
        return
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    if digest != response.headers.get("docker-content-digest"):
        stats.errors.append(f"{name}: manifest digest mismatch")
        return
    manifest = json.loads(response.content)
    for blob in [manifest["config"], *manifest["layers"]]:
        hasher = hashlib.sha256()
        size = 0
        async with http.stream("GET", f"{base}/v2/{name}/blobs/{blob['digest']}") as reply:
            if reply.status_code != 200:
                stats.errors.append(f"{name}: blob {blob['digest']} {reply.status_code}")
                return
            async for chunk in reply.aiter_raw(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        if "sha256:" + hasher.hexdigest() != blob["digest"] or size != blob["size"]:
            stats.errors.append(f"{name}: blob {blob['digest']} does not verify")
            return
        stats.blobs += 1
        stats.bytes += size
    stats.pulls += 1


async def client(seed: int, base: str, deadline: float, stats: Stats) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300) as http:
        while trio.current_time() < deadline:
            if rng.random() < COLD_SHARE:
                name = "/".join(sorted(rng.sample(PACKAGES, rng.randint(2, 5))))
                stats.cold_pulls += 1
            else:
                name = rng.choice(HOT)
            try:
                await pull(http, base, name, stats)
            except httpx.HTTPError as exc:
                stats.errors.append(f"{name}: {type(exc).__name__}: {exc}")


async def sample_rss(pids: list[int], start: float, deadline: float, stats: Stats) -> None:
    while trio.current_time() < deadline:
        stats.rss.append((trio.current_time() - start, rss_bytes(pids)))
        await trio.sleep(5)


async def soak(pids: list[int], base: str, seconds: float) -> Stats:
    stats = Stats()
    start = trio.current_time()
    deadline = start + seconds
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss, pids, start, deadline, stats)
        for seed in range(CLIENTS):
            nursery.start_soon(client, seed, base, deadline, stats)
    stats.rss.append((trio.current_time() - start, rss_bytes(pids)))
    return stats


def run(ctx: Context) -> list[Section]:
    seconds = 10.0 if ctx.quick else FULL_SECONDS
    warmup = min(WARMUP_SECONDS, seconds / 3)
    port = free_port()
    storage = ctx.workdir / "soak-store"
    demo = REPO / "nix" / "demo"
    argv = our_server_argv(port, storage, demo, "--popularity-url", str(demo / "popularity.json"))
    log = ctx.workdir / "soak-server.log"
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NIX_CONFIG": "substituters ="}
    with process(argv, log, f"{base}/v2/", env=env) as server:
        started = time.monotonic()
        stats = trio.run(soak, children(server.pid), base, seconds)
        elapsed = time.monotonic() - started
    nix_builds = sum('"message":"nix.build"' in line for line in log.read_text().splitlines())
    start_rss = stats.rss[0][1]
    warm = [rss for t, rss in stats.rss if t >= warmup] or [stats.rss[-1][1]]
    end_rss, peak = stats.rss[-1][1], max(rss for _, rss in stats.rss)
    mib = 1 << 20
    rows = [
        ["measure", "value"],
        ["duration", f"{elapsed:.0f} s, {CLIENTS} concurrent clients"],
        ["pulls completed", f"{stats.pulls} ({stats.cold_pulls} of uncached names asked)"],
        ["Nix builds", f"{nix_builds}"],
        ["blobs verified by the client", f"{stats.blobs} ({stats.bytes / mib:,.0f} MiB)"],
        ["errors", f"{len(stats.errors)}"],
        ["server RSS at start", f"{start_rss / mib:.1f} MiB"],
        [f"server RSS after {warmup:.0f} s warm-up", f"{warm[0] / mib:.1f} MiB"],
        ["server RSS at the end", f"{end_rss / mib:.1f} MiB"],
        ["server RSS peak", f"{peak / mib:.1f} MiB"],
    ]
    checks = [
        Check("soak: errors", f"{len(stats.errors)}", "0", float(len(stats.errors)), "<=", 0),
        Check(
            "soak: RSS end / after warm-up",
            f"{end_rss / mib:.1f} MiB",
            f"{warm[0] / mib:.1f} MiB",
            end_rss / warm[0],
            "<=",
            1.2,
        ),
    ]
    text = (__doc__ or "").strip()
    if stats.errors:
        text += "\n\nFirst errors:\n\n" + "\n".join(f"- {e}" for e in stats.errors[:10])
    return [Section("Soak: concurrent pulls, cached and uncached", text, rows, checks)]
