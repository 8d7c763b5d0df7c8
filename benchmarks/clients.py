"""Clients: what zstd layers gain containerd and podman pulling `large`.

One server serves the demo package set.  Before anything is timed it builds
`large` (gzip layers) and `zstd/large` (the same tars as zstd, in an OCI
manifest), and their blobs are read once, so a timed pull holds neither a
build nor a disk read on the server's side: only the client's work and the
transfer over 127.0.0.1.  Each round times, for each client, a pull of the
gzip image and then of the zstd one, each into an empty store:

* `ctr image pull --plain-http` on a private containerd (own root, state and
  socket, CRI disabled, as the end-to-end tests run it): it fetches the
  layers and unpacks them into the overlayfs snapshotter before it returns.
  After each pull `ctr image rm --sync` garbage-collects the image's content
  and snapshots; both must be empty before the next pull.
* `podman pull --tls-verify=false` with a fresh storage root (overlay) per
  pull, set up before the clock starts; podman unpacks each layer as it
  arrives.  Both images hold the same diff_ids, so a second pull into the
  same store would reuse the first one's layers and fetch nothing.

Every pull must end with all its layers unpacked (in containerd, every
layer blob in the content store and a committed snapshot per layer; in
podman's store, a layer unpacked from each layer blob), and the bytes the
server wrote while it ran (sendfile included, from /proc/PID/io) must cover
the layers: each round downloads them again.  The time is the client
command's wall time, from start to exit.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.clients import Containerd, podman, start_containerd

from .common import (
    NIX_ENV,
    REPO,
    Check,
    Context,
    Section,
    children,
    free_port,
    mb,
    our_server_argv,
    process,
    written_bytes,
)

#: The programs this benchmark runs besides ours (see ``common.PACKAGES``).
TOOLS = ("containerd", "ctr", "podman", "nix-build")
#: Rounds of gzip-then-zstd pulls per client in the full run (medians are
#: reported): single pulls on two shared cores vary by a third.
ROUNDS = 5
IMAGE = "large"
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
#: podman's storage driver here: overlay is what it uses for root by default;
#: vfs (the end-to-end tests') copies the whole parent layer for every layer,
#: the same work for gzip and zstd that would only dilute the difference.
PODMAN_DRIVER = "overlay"


@dataclass(frozen=True)
class Image:
    """One image as the server lists it: its name and its layers' digests and sizes."""

    compression: str  # "gzip" or "zstd"
    name: str
    layers: tuple[tuple[str, int], ...]

    @property
    def layer_bytes(self) -> int:
        return sum(size for _, size in self.layers)


@dataclass(frozen=True)
class Pull:
    """One timed pull into an empty store."""

    seconds: float
    sent: int  # bytes the server wrote meanwhile
    unpacked: int | None = None  # bytes of the layers' tars, where the client's store says


@dataclass
class Pulls:
    """One client's timed pulls of one image."""

    pulls: list[Pull] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [pull.seconds for pull in self.pulls]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _image(base: str, compression: str, name: str) -> Image:
    """Fetch ``name``'s manifest (building it), check its layers' compression, and
    read every layer once so that the timed pulls find them in the page cache."""
    request = urllib.request.Request(
        f"{base}/v2/{name}/manifests/latest", headers={"Accept": ACCEPT}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        manifest = json.load(response)
    layers = tuple((layer["digest"], int(layer["size"])) for layer in manifest["layers"])
    types = {layer["mediaType"] for layer in manifest["layers"]}
    if not all(t.endswith(compression) for t in types):
        raise RuntimeError(f"{name}: layers of types {sorted(types)}, not all {compression}")
    for digest, size in layers:
        with urllib.request.urlopen(f"{base}/v2/{name}/blobs/{digest}", timeout=600) as blob:
            read = 0
            while chunk := blob.read(1 << 20):
                read += len(chunk)
        if read != size:
            raise RuntimeError(f"{name}: blob {digest} has {read} bytes, the manifest says {size}")
    return Image(compression, name, layers)


def _timed(server_pid: int, image: Image, pull: Callable[[], object]) -> tuple[float, int]:
    """Run ``pull``; its wall time and the bytes the server wrote meanwhile, which
    must cover the image's layers (or the client did not download them)."""
    before = written_bytes(children(server_pid))
    started = time.perf_counter()
    pull()
    seconds = time.perf_counter() - started
    sent = written_bytes(children(server_pid)) - before
    if sent < image.layer_bytes:
        raise RuntimeError(
            f"the server wrote {sent:,} bytes during a pull of {image.name}, less than its "
            f"{image.layer_bytes:,} bytes of layers: the client did not download them all"
        )
    return seconds, sent


def _containerd_pull(daemon: Containerd, server_pid: int, ref: str, image: Image) -> Pull:
    """One pull of ``ref`` into containerd's empty content store and snapshotter."""
    content = daemon.ctr("content", "ls", "-q").stdout.split()
    snapshots = daemon.ctr("snapshots", "ls").stdout.splitlines()[1:]
    if content or snapshots:
        raise RuntimeError(f"containerd is not empty before a pull: {content} {snapshots}")
    seconds, sent = _timed(
        server_pid, image, lambda: daemon.ctr("image", "pull", "--plain-http", ref, timeout=600)
    )
    fetched = set(daemon.ctr("content", "ls", "-q").stdout.split())
    committed = [s for s in daemon.ctr("snapshots", "ls").stdout.splitlines() if "Committed" in s]
    missing = {digest for digest, _ in image.layers} - fetched
    if missing or len(committed) != len(image.layers):
        raise RuntimeError(
            f"ctr pulled {ref} into {len(committed)} snapshots, not {len(image.layers)}, "
            f"without the layers {sorted(missing)}"
        )
    daemon.ctr("image", "rm", "--sync", ref)  # its content and snapshots go with it
    return Pull(seconds, sent)


def _podman_pull(workdir: Path, server_pid: int, ref: str, image: Image) -> Pull:
    """One pull of ``ref`` into a fresh podman store."""
    shutil.rmtree(workdir, ignore_errors=True)

    def pm(*argv: str) -> str:
        return podman(workdir, *argv, timeout=600, storage_driver=PODMAN_DRIVER).stdout

    if pm("images", "-q").split():  # also sets up the store, before the clock starts
        raise RuntimeError(f"podman's fresh store {workdir} is not empty")
    seconds, sent = _timed(
        server_pid, image, lambda: pm("pull", "--quiet", "--tls-verify=false", ref)
    )
    # containers/storage's list of layers: each one unpacked, from which blob, how big.
    listed = workdir / "root" / f"{PODMAN_DRIVER}-layers" / "layers.json"
    layers = json.loads(listed.read_text())
    blobs = sorted(layer.get("compressed-diff-digest", "") for layer in layers)
    if blobs != sorted(digest for digest, _ in image.layers):
        raise RuntimeError(f"podman unpacked {ref} from the blobs {blobs}, not its layers")
    pm("rmi", "--all", "--force")
    shutil.rmtree(workdir, ignore_errors=True)
    return Pull(seconds, sent, sum(int(layer["diff-size"]) for layer in layers))


def _spread(pulls: Pulls) -> str:
    return ", ".join(f"{s:.2f}" for s in pulls.seconds)


def run(ctx: Context) -> list[Section]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    host = f"127.0.0.1:{port}"
    popularity = ("--popularity-url", str(REPO / "nix" / "demo" / "popularity.json"))
    argv = our_server_argv(port, ctx.workdir / "clients-store", REPO / "nix" / "demo", *popularity)
    # The check that every pull downloads its layers counts the server's
    # sendfile bytes; large reads go out through send(), which /proc does not count.
    env = {**NIX_ENV, "NIXERY_BLOB_SENDFILE": "1"}
    rounds = 1 if ctx.quick else ROUNDS
    clients = ("containerd", "podman")
    results = {(c, z): Pulls() for c in clients for z in ("gzip", "zstd")}
    with process(argv, ctx.workdir / "clients-server.log", f"{base}/v2/", env=env) as server:
        images = (_image(base, "gzip", IMAGE), _image(base, "zstd", f"zstd/{IMAGE}"))
        daemon = start_containerd(ctx.workdir / "ctrd")
        try:
            for _ in range(rounds):
                for image in images:  # gzip, zstd, gzip, zstd, ... for each client
                    ref = f"{host}/{image.name}:latest"
                    pulled = {
                        "containerd": _containerd_pull(daemon, server.pid, ref, image),
                        "podman": _podman_pull(ctx.workdir / "pm", server.pid, ref, image),
                    }
                    for client, pull in pulled.items():
                        results[client, image.compression].pulls.append(pull)
        finally:
            daemon.stop()
    return [_section(images, results, rounds)]


def _section(
    images: tuple[Image, Image], results: dict[tuple[str, str], Pulls], rounds: int
) -> Section:
    rows = [
        [
            "client",
            "layers",
            "layer bytes (manifest)",
            "server wrote per pull (median bytes)",
            "seconds (median)",
            "rounds, s",
            "zstd / gzip time",
        ]
    ]
    checks = []
    for client in ("containerd", "podman"):
        gzip, zstd = results[client, "gzip"], results[client, "zstd"]
        ratio = zstd.median / gzip.median
        for image, pulls in zip(images, (gzip, zstd), strict=True):
            rows.append(
                [
                    client,
                    f"{len(image.layers)} {image.compression}",
                    f"{image.layer_bytes:,} ({mb(image.layer_bytes)})",
                    f"{statistics.median(pull.sent for pull in pulls.pulls):,.0f}",
                    f"{pulls.median:.2f}",
                    _spread(pulls),
                    f"{ratio:.2f}" if image.compression == "zstd" else "",
                ]
            )
        note = f"median of {rounds} pull{'s' if rounds > 1 else ''} each; gzip {_spread(gzip)} s"
        if ratio > 1:
            overlap = min(zstd.seconds) <= max(gzip.seconds)
            note += (
                "; zstd slower in this run, within the spread of the rounds (they overlap)"
                if overlap
                else "; zstd slower in this run, beyond the spread of the rounds"
            )
        checks.append(
            Check(
                f"{client}: pull and unpack `{IMAGE}`, zstd vs gzip layers (time ratio)",
                f"{zstd.median:.2f} s zstd",
                f"{gzip.median:.2f} s gzip",
                ratio,
                "<=",
                1.0,
                note,
            )
        )
    text = __doc__.split("\n\n", 1)[1].strip()
    gunzip = (
        "unpigz is installed, and containerd inflates gzip layers with it"
        if shutil.which("unpigz")
        else "unpigz is not installed, so containerd inflates gzip layers with Go's "
        "compress/gzip (it would use unpigz if it found one)"
    )
    unpacked = {
        pull.unpacked for pulls in results.values() for pull in pulls.pulls if pull.unpacked
    }
    text += (
        f"\n\nThe layers hold the same tars either way ({', '.join(map(mb, sorted(unpacked)))} "
        "in all, as podman's store lists them) and the zstd layers are "
        f"{1 - images[1].layer_bytes / images[0].layer_bytes:.1%} smaller, so what "
        f"the clients gain is mostly decompression time.  Here {gunzip}; both clients "
        "read zstd with klauspost/compress, and podman reads gzip with klauspost/pgzip."
    )
    return Section("Clients: gzip against zstd layers", text, rows, checks)
