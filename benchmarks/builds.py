"""Cold builds: where the time of a first manifest request goes; layering at scale.

A cold request for an image whose store paths already exist runs
nix-build (which only evaluates and finds everything built), groups the
closure into layers, writes the layers, and stores config and manifests.
The server logs the first three durations in its ``image.built`` event;
"rest" here is the client's wall time minus those three, so it holds
what of the config and manifests was not written while the last layers
were made durable, the cache records (together the server's own
``rest_seconds``, shown as "of which after the layers") and all the
request handling around the build.  The client connects and checks the
API version first, then times the manifest request on that connection,
as registry clients do.  Each image is built cold on a fresh store and a
freshly started server seven times; the table shows the run with the
median rest share.
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from nixery_trio.core.layers import StorePathInfo, group_layers

from .common import (
    DOCKER_V2,
    NIX_ENV,
    REPO,
    Check,
    Context,
    Section,
    children,
    free_port,
    our_server_argv,
    peak_rss,
    process,
)
from .pipeline import bench_store_paths

#: Cold builds per image on fresh stores (the median run is reported).
#: The programs this benchmark runs besides ours (see ``common.PACKAGES``).
TOOLS = ("nix-build", "nix-instantiate")
COLD_RUNS = 7


def cold_build(
    ctx: Context, pkgs: Path, image: str, label: str, extra: Sequence[str] = (),
    env: dict[str, str] | None = None, peak: dict[str, int] | None = None,
) -> dict[str, float]:  # fmt: skip
    """One cold manifest request on a fresh store (a server started with
    ``extra`` flags and ``env`` added); the split of its time.  With
    ``peak``, its ``"rss"`` is set to the server's peak resident memory."""
    storage = ctx.workdir / f"cold-{label}"
    port = free_port()
    log = ctx.workdir / f"cold-{label}.log"
    argv = our_server_argv(port, storage, pkgs, *extra)
    with process(argv, log, f"http://127.0.0.1:{port}/v2/", env=NIX_ENV | (env or {})) as server:
        # As a registry client does: connect, check the API version, then ask
        # for the manifest on the same connection.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request("GET", "/v2/")
            connection.getresponse().read()
            started = time.perf_counter()
            connection.request(
                "GET", f"/v2/{image}/manifests/latest", headers={"Accept": DOCKER_V2}
            )
            response = connection.getresponse()
            response.read()
            total = time.perf_counter() - started
        finally:
            connection.close()
        if peak is not None:
            peak["rss"] = peak_rss(children(server.pid))
        if response.status != 200:
            raise RuntimeError(f"cold build of {image}: HTTP {response.status}")
    built = [
        event
        for event in map(_json, log.read_text().splitlines())
        if event.get("event") == "image.built" or event.get("message") == "image.built"
    ]
    if not built:
        raise RuntimeError(f"no image.built event in {log}")
    event = built[-1]
    split = {
        "nix-build": float(event["nix_seconds"]),
        "layering": float(event["layering_seconds"]),
        "layer writing": float(event["layer_seconds"]),
    }
    split["rest"] = max(0.0, total - sum(split.values()))
    split["server rest"] = float(event["rest_seconds"])
    split["total"] = total
    split["layers"] = float(event.get("layers", 0))
    return split


def _json(line: str) -> dict[str, object]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def synthetic_closure(paths: int, seed: int = 5) -> tuple[list[StorePathInfo], list[str]]:
    """A closure shaped like nixpkgs': a few roots over a wide, shared dependency DAG."""
    rng = random.Random(seed)
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base-32
    names = [
        "/nix/store/" + "".join(rng.choices(alphabet, k=32)) + f"-pkg-{i}" for i in range(paths)
    ]
    refs: list[tuple[str, ...]] = []
    for i in range(paths):
        # Later paths depend on earlier ones: a DAG, mostly on nearby and popular paths.
        count = min(i, rng.randint(0, 8))
        deps = {names[rng.randrange(max(0, i - 200), i)] for _ in range(count // 2)}
        deps |= {names[int(rng.random() ** 3 * i)] for _ in range(count - count // 2)}
        refs.append(tuple(sorted(deps)))
    sizes = [rng.randint(1_000, 50_000_000) for _ in range(paths)]
    graph = [
        StorePathInfo(names[i], refs[i] + (names[i],), sizes[i], sizes[i]) for i in range(paths)
    ]
    roots = names[-10:]
    return graph, roots


def run(ctx: Context) -> list[Section]:
    rows = [
        [
            "image",
            "layers",
            "nix-build s",
            "layering s",
            "layer writing s",
            "rest s",
            "of which after the layers",
            "total s",
            "rest share",
        ]
    ]
    checks = []
    images = [("hello", REPO / "nix" / "demo", "demo")]
    if not ctx.quick:
        bench_store_paths()  # the host imports are in the store before the timed request
        images = [
            ("shell/hello", REPO / "nix" / "demo", "demo"),
            ("usr-bin", REPO / "nix" / "bench", "bench"),
        ]
    runs = 1 if ctx.quick else COLD_RUNS
    for image, pkgs, label in images:
        # One cold request lasts 0.1 s for the demo image: a single run is
        # at the mercy of one slow fsync, so each image is built cold on
        # fresh stores several times and the median run (by rest share) shown.
        splits = [cold_build(ctx, pkgs, image, f"{label}-{n}") for n in range(runs)]
        splits.sort(key=lambda split: split["rest"] / split["total"])
        split = splits[len(splits) // 2]
        share = split["rest"] / split["total"]
        shares = ", ".join(f"{s['rest'] / s['total']:.1%}" for s in splits)
        rows.append(
            [
                f"{image} ({label} set)",
                f"{split['layers']:.0f}",
                *(
                    f"{split[k]:.3f}"
                    for k in (
                        "nix-build",
                        "layering",
                        "layer writing",
                        "rest",
                        "server rest",
                        "total",
                    )
                ),
                f"{share:.1%}",
            ]
        )
        checks.append(
            Check(
                f"cold build of {image}: rest of the time (share)",
                f"{split['rest']:.3f} s",
                f"{split['total']:.3f} s total",
                share,
                "<",
                0.05,
                f"median of {runs} runs ({shares}); {split['server rest']:.3f} s of it after the "
                "last layer (manifest record, what was left of config and manifests)",
            )
        )
    graph, roots = synthetic_closure(5000)
    popularity = {f"pkg-{i}": i % 97 for i in range(5000)}
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        layers = group_layers(graph, roots, popularity, budget=94)
        timings.append(time.perf_counter() - started)
    best = min(timings)
    rows_layering = [
        ["closure", "layers", "seconds (best of 3)"],
        [
            f"{len(graph):,} store paths, {sum(len(g.references) for g in graph):,} references",
            str(len(layers)),
            f"{best:.3f}",
        ],
    ]
    checks.append(
        Check("layering a 5,000-path closure (seconds)", f"{best:.3f} s", "", best, "<", 1.0)
    )
    return [
        Section(
            "Cold builds", __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), rows, checks[:-1]
        ),
        Section(
            "Layering",
            "A synthetic closure (a DAG of 5,000 paths with shared "
            "dependencies, 10 roots) through `nixery_trio.core.layers.group_layers`, "
            "budget 94.",
            rows_layering,
            checks[-1:],
        ),
    ]
