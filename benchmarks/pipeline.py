"""The layer pipeline: store paths -> tar -> sha256 -> gzip -> sha256 -> CAS file.

Peers, in the same run on the same store paths:

* the GNU pipeline ``tar -c | tee >(sha256sum) | gzip -6 | sha256sum`` (with
  a ``tee`` that counts the gzip bytes, for the size comparison);
* the limit: the deflate engine compressing the same tar bytes, held in
  memory, in one call on one core, times the cores the writer may use,
  measured in turn with our runs so both see the same load.

Next to the limit, what these cores can do at best: our deflate work alone
(the same 1 MiB blocks, on one thread and on all), that work plus the two
SHA-256 passes spread over the cores, the same plus the kernel's part of
our CPU time (reads, writes, writeback), and our whole CPU time per byte
spread over the cores with none idle.  And our own pipeline once more with
its gzip bytes thrown away instead of written and fsynced: what storing
the blob costs.

"MB/s" is megabytes of *input* per second: the size of our tar stream
divided by the wall time, for every row, so all rows divide the same bytes.

The deflate engine runs only on threads of its own here, as in the layer
writer: ISA-L leaves a thread's vector registers in a state that makes
SHA-256 a quarter slower on that thread, and on the threads it starts,
from then on (see ``nixery_trio.build.archive._Blocks``).  The timed layer
writes start from the main thread, which never runs it, as the server's
worker threads do not.

Run as ``python -m benchmarks.pipeline rss STORE PATH...`` it writes one
layer and prints its own peak resident memory (the kernel's VmHWM), so
nothing of the benchmark itself is counted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from isal import igzip, isal_zlib

from nixery_trio.build import archive
from nixery_trio.store.cas import CAS

from .common import NIX_ENV, REPO, Check, Context, Section, mb, rate

#: The programs this benchmark runs (see ``common.PACKAGES``).
TOOLS = ("nix-instantiate", "bash", "tar", "gzip", "sha256sum")
CORES = os.cpu_count() or 1
DEFAULT = archive.Deflate(threads=CORES)
#: The engine/level grid of the sweep.
SWEEP = [
    ("isal", 0),
    ("isal", 1),
    ("isal", 2),
    ("isal", 3),
    ("zlib", 1),
    ("zlib", 6),
    ("zlib-ng", 1),
    ("zlib-ng", 6),
]
SAMPLE_BYTES = 96 << 20

_P = ParamSpec("_P")
_T = TypeVar("_T")


def on_own_thread(function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``function(*args, **kwargs)`` on a thread of its own, which ends with it.

    For everything that runs the deflate engine outside a layer write, so
    that the main thread, where the timed writes start, never does.
    """
    with ThreadPoolExecutor(1, "engine") as pool:
        return pool.submit(function, *args, **kwargs).result()


def bench_store_paths() -> dict[str, str]:
    """nix/bench's host imports, copied into the store (first time) by evaluating them."""
    expr = (
        "let p = import ./nix/bench {}; "
        "in { usr-bin = p.usr-bin.outPath; usr-lib = p.usr-lib.outPath; }"
    )
    done = subprocess.run(
        ["nix-instantiate", "--read-write-mode", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=NIX_ENV,
    )
    paths: dict[str, str] = json.loads(done.stdout)
    return paths


def quick_store_path(workdir: Path, limit: int = 24 << 20) -> str:
    """A stand-in store path of real binaries (the first few MB of /usr/bin)."""
    root = workdir / "nix" / "store" / ("q" * 32 + "-quick-usr-bin") / "bin"
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for entry in sorted(os.scandir("/usr/bin"), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False) and total < limit:
            shutil.copyfile(entry.path, root / entry.name)
            total += entry.stat().st_size
    return str(root.parent)


def _cas(workdir: Path) -> CAS:
    cas = CAS(workdir / "pipeline-cas")
    cas.open_store()
    return cas


def time_ours(cas: CAS, paths: list[str], deflate: archive.Deflate) -> tuple[float, int, str]:
    """Seconds to write the layer into the CAS (commit included); its size and digest."""
    seconds, _, size, digest = time_ours_cpu(cas, paths, deflate)
    return seconds, size, digest


def time_ours_cpu(
    cas: CAS, paths: list[str], deflate: archive.Deflate
) -> tuple[float, os.times_result, int, str]:
    """:func:`time_ours`, with the CPU time the process used (all its threads) second."""
    before, started = os.times(), time.perf_counter()
    blob = archive.write_layer(cas, archive.store_path_entries(paths), deflate=deflate)
    seconds, after = time.perf_counter() - started, os.times()
    cas.path(blob.digest).unlink()
    cpu = os.times_result(tuple(a - b for a, b in zip(after, before, strict=True)))
    return seconds, cpu, blob.size, blob.digest


class _Discard:
    """A layer destination that keeps nothing: no file, no page cache, no fsync."""

    def write(self, data: bytes) -> int:
        return len(data)


def time_discarded(paths: list[str], deflate: archive.Deflate) -> tuple[float, str]:
    """Seconds to make the layer with its gzip bytes thrown away; its digest."""
    started = time.perf_counter()
    blob = archive.write_layer_to(_Discard(), archive.store_path_entries(paths), deflate)
    return time.perf_counter() - started, blob.digest


def tar_bytes(cas: CAS, paths: list[str]) -> bytes:
    """Our tar stream of ``paths``, exactly (via a layer, decompressed)."""
    blob = archive.write_layer(cas, archive.store_path_entries(paths), deflate=DEFAULT)
    data = isal_zlib.decompress(cas.path(blob.digest).read_bytes(), wbits=31)
    cas.path(blob.digest).unlink()
    return data


def time_gnu(paths: list[str], workdir: Path) -> tuple[float, int]:
    """Seconds for GNU tar | tee >(sha256sum) | gzip -6 | sha256sum, and the gzip size."""
    size_file = workdir / "gnu-size"
    names = " ".join(p.lstrip("/") for p in sorted(paths))
    script = (
        f"set -o pipefail; tar -c -C / {names} | tee >(sha256sum >/dev/null) | gzip -6 "
        f"| tee >(wc -c > {size_file}) | sha256sum >/dev/null"
    )
    started = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    seconds = time.perf_counter() - started
    return seconds, int(size_file.read_text().split()[0])


def raw_speed(engine: str, level: int, data: bytes) -> float:
    """Bytes per second of the engine deflating ``data`` in one call, one thread."""
    module = {"isal": isal_zlib, "zlib": zlib}.get(engine) or importlib.import_module(
        "zlib_ng.zlib_ng"
    )
    started = time.perf_counter()
    module.compress(data, level, -15)
    return len(data) / (time.perf_counter() - started)


def sha256_speed(data: bytes) -> float:
    """Bytes per second of SHA-256 on this thread, the best of three."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - started)
    return len(data) / best


def block_speed(deflate: archive.Deflate, data: bytes) -> float:
    """Bytes per second of the layer writer's own deflate work alone on ``data``.

    The same 1 MiB blocks, each primed with the 32 KiB before it, on
    ``deflate.threads`` threads: no tar, no hashing, no I/O.
    """
    compress = archive.block_compressor(deflate.engine, deflate.level)
    view = memoryview(data)

    def block(start: int) -> tuple[bytes, int]:
        dictionary = bytes(view[max(0, start - archive.WINDOW_SIZE) : start])
        return compress(view[start : start + archive.BLOCK_SIZE], dictionary)

    with ThreadPoolExecutor(deflate.threads, "deflate") as pool:
        started = time.perf_counter()
        for _ in pool.map(block, range(0, len(data), archive.BLOCK_SIZE)):
            pass
        return len(data) / (time.perf_counter() - started)


def sample_paths(paths: list[str], workdir: Path, limit: int) -> list[str]:
    """Copies of files making up the first ``limit`` bytes: a smaller input of the same kind."""
    root = workdir / "nix" / "store" / ("s" * 32 + "-sample")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    total = 0
    for entry in archive.store_path_entries(paths):
        if entry.kind != "file" or total >= limit:
            continue
        assert entry.source is not None
        target = root / entry.name.replace("/", "_")
        shutil.copyfile(entry.source, target)
        total += os.path.getsize(target)
    return [str(root)]


def peak_rss(paths: list[str], workdir: Path) -> tuple[int, int]:
    """Peak RSS (bytes) of a fresh process writing one layer of ``paths``; the tar size."""
    argv = [sys.executable, "-m", "benchmarks.pipeline", "rss", str(workdir / "rss-cas"), *paths]
    done = subprocess.run(argv, capture_output=True, check=True, cwd=REPO)
    result = json.loads(done.stdout)
    return int(result["peak_rss"]), int(result["tar_size"])


def _rss_main(store: str, paths: list[str]) -> None:
    cas = CAS(Path(store))
    cas.open_store()
    blob = archive.write_layer(cas, archive.store_path_entries(paths), deflate=DEFAULT)
    # The kernel's high-water mark of this process's resident memory (VmHWM).
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:", 1)[1].split()[0]) * 1024
    data_size = 0
    with igzip.open(cas.path(blob.digest), "rb") as f:
        while chunk := f.read(1 << 20):
            data_size += len(chunk)
    cas.path(blob.digest).unlink()
    print(json.dumps({"tar_size": data_size, "peak_rss": peak, "digest": blob.digest}))


def run(ctx: Context) -> list[Section]:
    workdir = ctx.workdir
    cas = _cas(workdir)
    if ctx.quick:
        paths = [quick_store_path(workdir, 8 << 20)]
        big = paths
        source = "the first 8 MB of /usr/bin (quick mode)"
    else:
        store = bench_store_paths()
        paths = [store["usr-bin"]]
        big = [store["usr-bin"], store["usr-lib"]]
        source = f"`{paths[0]}` (nix/bench `usr-bin`: the host's /usr/bin)"

    data = on_own_thread(tar_bytes, cas, paths)  # also warms the page cache for both sides
    size = len(data)
    cores = min(DEFAULT.threads, CORES)
    gnu_seconds, gnu_size = time_gnu(paths, workdir)
    # Ours and the limit in turn, so that load from elsewhere shifts both.
    runs = 1 if ctx.quick else 3
    raws, ours_runs, discarded_runs = [], [], []
    for _ in range(runs):
        raws.append(on_own_thread(raw_speed, DEFAULT.engine, DEFAULT.level, data))
        ours_runs.append(time_ours_cpu(cas, paths, DEFAULT))
        discarded_runs.append(time_discarded(paths, DEFAULT))
    if len({run[3] for run in ours_runs} | {run[1] for run in discarded_runs}) != 1:
        raise AssertionError(f"{DEFAULT} gave different digests from run to run")
    raw = statistics.median(raws)
    ours_seconds = statistics.median(run[0] for run in ours_runs)
    ours_cpu = statistics.median(run[1].user + run[1].system for run in ours_runs)
    ours_kernel = statistics.median(run[1].system for run in ours_runs)
    ours_size = ours_runs[0][2]
    ours = size / ours_seconds
    discarded = size / statistics.median(run[0] for run in discarded_runs)
    gnu = size / gnu_seconds
    limit = raw * cores
    # What the cores can do at best: the layer writer's deflate work alone,
    # on one thread and on all of them; with both hashes added (SHA-256 on
    # this thread, which has never run the engine); and with all the CPU
    # time our writes take (tar, copies, hashes, deflate, threads) spread
    # over the cores with none left idle.
    blocks_one = on_own_thread(block_speed, archive.Deflate(threads=1), data)
    blocks_all = block_speed(archive.Deflate(DEFAULT.engine, DEFAULT.level, cores), data)
    sha = sha256_speed(data)
    attainable = cores / (1 / blocks_one + (1 + ours_size / size) / sha)
    # The kernel's part of our CPU time (reading the files, writing the
    # blob, writing it back) is work any writer of the same blob does too.
    attainable_io = cores / (cores / attainable + ours_kernel / size)
    ours_cap = size / (ours_cpu / cores)
    del data

    rows = [
        ["pipeline", "input MB/s", "output", "size vs gzip -6", "note"],
        [
            "GNU tar \\| tee >(sha256sum) \\| gzip -6 \\| sha256sum",
            rate(gnu),
            mb(gnu_size),
            "1.00",
            "gzip -6 on one core",
        ],
        [
            f"ours: {DEFAULT.engine} level {DEFAULT.level}, {DEFAULT.threads} threads (default)",
            rate(ours),
            mb(ours_size),
            f"{ours_size / gnu_size:.3f}",
            f"median of {runs}, into the CAS, fsync included; {ours_cpu / ours_seconds:.2f} "
            f"of {cores} cores busy; {ours_cpu / size * 1e9:.2f} CPU s per GB, "
            f"{ours_kernel / size * 1e9:.2f} of it in the kernel (reads, writes, writeback)",
        ],
        [
            "ours, the gzip bytes thrown away",
            rate(discarded),
            "",
            "",
            f"the same layer, written nowhere (no file, no fsync): {discarded / limit:.0%} "
            f"of the limit; median of {runs}, in turn with the rows above and below",
        ],
        [
            f"limit: {DEFAULT.engine} {DEFAULT.level} raw, 1 core x {cores}",
            rate(limit),
            "",
            "",
            f"one call on the tar bytes in memory: {rate(raw)} per core (median of {runs}, "
            "in turn with ours)",
        ],
        [
            f"deflate alone, in our 1 MiB blocks, {cores} threads",
            rate(blocks_all),
            "",
            "",
            f"no tar, hashing or I/O: {blocks_all / limit:.0%} of the limit; "
            f"on one thread {rate(blocks_one)}",
        ],
        [
            "attainable: deflate + both SHA-256 passes",
            rate(attainable),
            "",
            "",
            f"blocks on one thread, sha256 {rate(sha)} per core; {attainable / limit:.0%} "
            "of the limit",
        ],
        [
            "attainable: the same + our kernel time",
            rate(attainable_io),
            "",
            "",
            f"reading the files, writing and syncing the blob: {attainable_io / limit:.0%} "
            "of the limit",
        ],
        [
            f"ours with all {cores} cores busy",
            rate(ours_cap),
            "",
            "",
            f"our CPU time per byte: {ours_cap / limit:.0%} of the limit",
        ],
    ]
    checks = [
        Check(
            "layer pipeline vs the GNU tar, gzip -6 pipeline (input MB/s)",
            rate(ours),
            rate(gnu),
            ours / gnu,
            ">=",
            15,
        ),
        Check(
            "layer pipeline vs the limit (deflate x cores)",
            rate(ours),
            rate(limit),
            ours / limit,
            ">=",
            0.70,
            f"deflate + both SHA-256 passes leave {attainable / limit:.0%}, "
            f"{attainable_io / limit:.0%} with the kernel's reads and writes; our CPU time "
            f"allows {ours_cap / limit:.0%}; with the blob thrown away, not written, "
            f"{discarded / limit:.0%}; {cores} threads deflating alone reach "
            f"{blocks_all / limit:.0%}",
        ),
        Check(
            "gzip size vs gzip -6", mb(ours_size), mb(gnu_size), ours_size / gnu_size, "<=", 1.15
        ),
    ]
    sections = [
        Section(
            "Layer pipeline",
            f"Input: {source}, a {mb(size)} tar stream. Both sides read the same files "
            "from a warm page cache. Ours writes the layer into a CAS temporary file, "
            "fsyncs and renames it; the GNU pipeline writes nothing.",
            rows,
            checks,
        )
    ]
    sections += sweeps(ctx, cas, paths, size, gnu_size, workdir)
    rss, big_size = peak_rss(big, workdir)
    sections.append(
        Section(
            "Memory",
            f"Peak RSS of a fresh Python process writing one layer of {mb(big_size)} "
            f"({' + '.join(Path(p).name for p in big)}) with the default settings, "
            "the kernel's VmHWM (interpreter and imports included).",
            [["layer", "peak RSS"], [mb(big_size), mb(rss)]],
            [
                Check(
                    f"peak RSS writing a {big_size / 1e9:.1f} GB layer (MB)",
                    mb(rss),
                    "",
                    rss / 1e6,
                    "<",
                    150,
                )
            ],
        )
    )
    return sections


def alternating(
    cas: CAS, paths: list[str], settings: list[archive.Deflate], rounds: int
) -> list[tuple[float, int, str]]:
    """Median seconds, size and digest of each setting, the settings run in turn each round.

    Raises if a setting's layer digest differs from one round to the next.
    """
    runs: list[list[tuple[float, int, str]]] = [[] for _ in settings]
    for _ in range(rounds):
        for index, deflate in enumerate(settings):
            runs[index].append(time_ours(cas, paths, deflate))
    for deflate, found in zip(settings, runs, strict=True):
        if len({r[2] for r in found}) != 1:
            raise AssertionError(f"{deflate} gave different digests from run to run")
    return [(statistics.median(r[0] for r in found), found[0][1], found[0][2]) for found in runs]


def sweeps(
    ctx: Context, cas: CAS, paths: list[str], size: int, gnu_size: int, workdir: Path
) -> list[Section]:
    """Engine x level on a sample; threads and read size on the full input."""
    rounds = 1 if ctx.quick else 3
    sample = sample_paths(paths, workdir, (2 << 20) if ctx.quick else SAMPLE_BYTES)
    sample_data = on_own_thread(tar_bytes, cas, sample)
    gzip6 = len(
        subprocess.run(
            ["gzip", "-6", "-c"], input=sample_data, capture_output=True, check=True
        ).stdout
    )
    engine_rows = [["engine", "level", "input MB/s", "% of its limit", "size vs gzip -6"]]
    chart = []
    grid = [(e, lv) for e, lv in SWEEP if archive.engine_available(e)]
    engine_rows += [[e, str(lv), "not installed", "", ""] for e, lv in SWEEP if (e, lv) not in grid]
    found = alternating(cas, sample, [archive.Deflate(e, lv, CORES) for e, lv in grid], rounds)
    for (engine, level), (seconds, out_size, _) in zip(grid, found, strict=True):
        speed = len(sample_data) / seconds
        limit = on_own_thread(raw_speed, engine, level, sample_data) * CORES
        ratio = out_size / gzip6
        default = " (default)" if (engine, level) == (DEFAULT.engine, DEFAULT.level) else ""
        engine_rows.append(
            [engine + default, str(level), rate(speed), f"{speed / limit:.0%}", f"{ratio:.3f}"]
        )
        chart.append((f"{engine} {level}", speed / 1e6, ratio))
    del sample_data

    digests = set()
    thread_counts = [1, 2] if ctx.quick else [1, 2, 3, 4]
    settings = [archive.Deflate(DEFAULT.engine, DEFAULT.level, t) for t in thread_counts]
    thread_rows = [["threads", "input MB/s", "digest"]]
    thread_chart = []
    for threads, (seconds, _, digest) in zip(
        thread_counts, alternating(cas, paths, settings, max(1, rounds - 1)), strict=True
    ):
        digests.add(digest)
        mark = " (default)" if threads == DEFAULT.threads else ""
        thread_rows.append([f"{threads}{mark}", rate(size / seconds), digest[:19] + "…"])
        thread_chart.append((str(threads), size / seconds / 1e6, 0.0))
    read_sizes = [64 << 10, 1 << 20] if ctx.quick else [16 << 10, 64 << 10, 256 << 10, 1 << 20]
    settings = [
        archive.Deflate(DEFAULT.engine, DEFAULT.level, DEFAULT.threads, r) for r in read_sizes
    ]
    read_rows = [["read size", "input MB/s"]]
    for read_size, (seconds, _, digest) in zip(
        read_sizes, alternating(cas, paths, settings, max(1, rounds - 1)), strict=True
    ):
        digests.add(digest)
        mark = " (default)" if read_size == DEFAULT.read_size else ""
        read_rows.append([f"{read_size >> 10} KiB{mark}", rate(size / seconds)])
    same = "identical" if len(digests) == 1 else f"DIFFERENT ({len(digests)} digests)"
    runs = f"median of {rounds} alternating rounds" if rounds > 1 else "one run each"
    runs_full = (
        f"median of {max(1, rounds - 1)} alternating rounds" if rounds > 2 else "one run each"
    )
    return [
        Section(
            "Deflate engine and level",
            f"On a sample of the same files (the first {2 if ctx.quick else 96} MiB of "
            f"file data), {CORES} threads, {runs}. "
            "Each engine's limit is its own one-call speed on the sample's tar bytes "
            f"times {CORES} cores; sizes are against `gzip -6` of the same tar bytes.",
            engine_rows,
            chart={"sweep": chart},
        ),
        Section(
            "Deflate threads",
            f"Full input, {DEFAULT.engine} level {DEFAULT.level}, {runs_full}. The layer "
            f"digest is {same} across every thread count and read size.",
            thread_rows,
            chart={"threads": thread_chart},
        ),
        Section(
            "Read size",
            f"Full input, {DEFAULT.engine} level {DEFAULT.level}, {DEFAULT.threads} threads, "
            f"{runs_full}: the largest read from a file (reads also stop at 1 MiB block "
            "ends).",
            read_rows,
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "rss":
        _rss_main(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: python -m benchmarks.pipeline rss STORE PATH...")
