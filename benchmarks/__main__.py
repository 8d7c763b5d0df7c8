"""``python -m benchmarks [--quick] [--out DIR] [--only NAME...]``."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nixery_trio import archive, blobs

from . import builds, pipeline, report, serving
from .common import REPO, Context, Section, machine, tool_version

BENCHMARKS = {"pipeline": pipeline.run, "serving": serving.run, "builds": builds.run}


def defaults_text(sections: list[Section]) -> str:
    """Which defaults the tables above support, worked out from them."""
    d = pipeline.DEFAULT
    lines = [
        f"- Deflate: `{d.engine}` level {d.level} (`NIXERY_DEFLATE_ENGINE`, `NIXERY_GZIP_LEVEL`).",
        f"- Deflate threads: the number of cores, {d.threads} here (`NIXERY_DEFLATE_THREADS`).",
        f"- Read size: {d.read_size >> 10} KiB (`NIXERY_READ_SIZE`).",
        f"- Blob reads: {blobs.BLOB_READ_SIZE >> 20} MiB (`nixery_trio.blobs.BLOB_READ_SIZE`).",
    ]
    sweep = [p for s in sections for p in s.chart.get("sweep", [])]
    fitting = [p for p in sweep if p[2] <= 1.15]
    if fitting:
        best = max(fitting, key=lambda p: p[1])
        chosen = f"{d.engine} {d.level}"
        verdict = "the default" if best[0] == chosen else f"not the default ({chosen})"
        lines.append(
            f"\nIn this run's sweep the fastest engine and level whose output stays within "
            f"1.15x of `gzip -6` was {best[0]} ({best[1]:,.0f} MB/s, {best[2]:.3f}x): {verdict}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small inputs, short runs")
    parser.add_argument("--out", type=Path, help="where benchmarks.md goes (default docs/)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    out = args.out or (REPO / "docs")
    if args.quick and args.out is None:
        parser.error("--quick needs --out (it must not overwrite docs/benchmarks.md)")
    facts = machine()
    peers = {
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "docker-registry": tool_version(["docker-registry", "--version"]),
        "gzip": tool_version(["gzip", "--version"]),
        "tar": tool_version(["tar", "--version"]),
        "deflate engines": ", ".join(
            e for e in archive.ENGINE_LEVELS if archive.engine_available(e)
        ),
    }
    sections: list[Section] = []
    workdir = Path(tempfile.mkdtemp(prefix="nixery-bench-"))
    workdir.chmod(0o755)  # nginx's workers do not run as root
    try:
        ctx = Context(workdir=workdir, quick=args.quick)
        for name, run in BENCHMARKS.items():
            if args.only and name not in args.only:
                continue
            started = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            found = run(ctx)
            sections += found
            for section in found:
                for check in section.checks:
                    verdict = "met" if check.met else "NOT met"
                    print(
                        f"  {check.name}: {check.ratio:.3g} (target {check.target}) {verdict}",
                        file=sys.stderr,
                    )
            print(f"bench: {name} took {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = report.write(out, sections, facts, peers, defaults_text(sections))
    print(path)


if __name__ == "__main__":
    main()
