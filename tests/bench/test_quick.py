"""The benchmarks' quick mode runs end to end.

A smoke test: it proves that ``make bench`` still works (inputs, peers,
parsing, the report), on small inputs for about twenty seconds.  It asserts
nothing about speed.  A peer that is not installed fails it: the benchmarks
refuse to run without one rather than leave its section out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmarks_write_a_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets: " in report
    for title in ("Layer pipeline", "Deflate engine and level", "Memory", "Blob serving",
                  "Warm manifests", "Cold builds", "Layering", "Hostile connections", "Defaults",
                  "Clients: gzip against zstd layers",
                  "Storage backends: S3 (SeaweedFS) vs the filesystem",
                  "Soak: concurrent pulls, cached and uncached"):  # fmt: skip
        assert f"\n## {title}\n" in report, title
    assert "| layer pipeline vs the GNU tar, gzip -6 pipeline (input MB/s) |" in report
    for client in ("containerd", "podman"):
        target = f"| {client}: pull and unpack `large`, zstd vs gzip layers (time ratio) |"
        assert target in report, client
