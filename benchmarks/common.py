"""What every benchmark needs: the result rows, the machine, processes and wrk."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The manifest type the benchmarks ask for.
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
#: Nix offline: an unreachable binary cache costs seconds per build.
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters ="}


@dataclass(frozen=True)
class Check:
    """One target: our number, the peer's, their ratio and whether it meets the target.

    ``ratio`` is ours over the peer's (or over the bound, for absolute
    targets); ``target`` is how it is judged, e.g. ``>= 15`` or ``<= 1.15``.
    """

    name: str
    ours: str
    peer: str
    ratio: float
    op: str  # ">=", "<=" or "<"
    bound: float
    note: str = ""

    @property
    def met(self) -> bool:
        if self.op == ">=":
            return self.ratio >= self.bound
        if self.op == "<=":
            return self.ratio <= self.bound
        return self.ratio < self.bound

    @property
    def target(self) -> str:
        return f"{self.op} {self.bound:g}"


#: Student's t at 95% one-sided (90% two-sided), by degrees of freedom.
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
        9: 1.833, 10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753}  # fmt: skip


@dataclass(frozen=True)
class RatioInterval:
    """Paired runs' ratios summed up: their geometric mean, and the one-sided
    95% bounds on the true ratio (Student's t on the logarithms)."""

    ratios: tuple[float, ...]
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, ratios: Sequence[float]) -> RatioInterval:
        logs = [math.log(ratio) for ratio in ratios]
        mean = statistics.fmean(logs)
        if len(logs) < 2:
            return cls(tuple(ratios), math.exp(mean), 0.0, math.inf)
        half = _T95[min(len(logs) - 1, max(_T95))] * statistics.stdev(logs) / len(logs) ** 0.5
        return cls(tuple(ratios), math.exp(mean), math.exp(mean - half), math.exp(mean + half))


@dataclass
class Section:
    """A benchmark's findings: a table (first row is the header) and prose."""

    title: str
    text: str
    rows: list[list[str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    chart: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """Where a run works and how big it is."""

    workdir: Path
    quick: bool

    def seconds(self, full: float) -> float:
        """Duration of a timed load run: ``full`` seconds, or one in quick mode."""
        return 1.0 if self.quick else full


def file_system(path: str) -> str:
    """The type of the file system ``path`` is on (``/proc/mounts``' longest match)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def machine() -> dict[str, str]:
    """CPU model, cores, memory, kernel and the date, for the report."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / (1 << 20):.0f} GiB"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version, or 'missing'."""
    if shutil.which(argv[0]) is None:
        return "missing"
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time used so far by ``pids`` (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _status_bytes(pids: Sequence[int], field: str) -> int:
    """A ``/proc/PID/status`` size (``VmRSS``, ``VmHWM``) summed over ``pids``."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) << 10
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    """The summed resident memory of ``pids`` (a server's parent and workers)."""
    return _status_bytes(pids, "VmRSS")


def peak_rss(pids: Sequence[int]) -> int:
    """The summed peak resident memory (``VmHWM``) of ``pids`` so far."""
    return _status_bytes(pids, "VmHWM")


def written_bytes(pids: Sequence[int]) -> int:
    """Bytes ``pids`` have written so far, to files and sockets, sendfile included
    (the ``wchar`` of /proc/PID/io; plain ``send`` calls on a socket do not count)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    """``pid`` and its child processes (nginx's workers, for example)."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(child) for child in text.split()]
    return found


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, ConnectionError):
        return False


@contextlib.contextmanager
def process(
    argv: Sequence[str],
    log: Path,
    ready_url: str,
    *,
    env: dict[str, str] | None = None,
    ready_headers: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends; wait until ``ready_url`` answers
    (given ``ready_headers``)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_until(lambda: proc.poll() is None and http_ok(ready_url, ready_headers), 60,
                   f"{argv[0]} to serve")  # fmt: skip
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def our_server_argv(port: int, storage: Path, pkgs: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nixery_trio",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--storage-path",
        str(storage),
        "--pkgs-path",
        str(pkgs),
        *extra,
    ]


# --- wrk

_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkResult:
    """What wrk measured, plus the CPU the server used meanwhile."""

    requests_per_second: float
    bytes_per_second: float
    latency: dict[str, float]  # "50%", "99%", ... -> seconds
    errors: int
    server_cpu: float  # CPU seconds of the server's processes during the run
    seconds: float

    @property
    def cpu_per_gb(self) -> float:
        """Server CPU seconds per GB (1e9 bytes) moved."""
        moved = self.bytes_per_second * self.seconds
        return self.server_cpu / (moved / 1e9) if moved else float("nan")


def wrk(
    url: str,
    connections: int,
    seconds: float,
    server_pids: Sequence[int],
    headers: Sequence[str] = (),
) -> WrkResult:
    """Run wrk against ``url``; fail on errors or non-2xx answers."""
    threads = min(connections, os.cpu_count() or 1)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "60s",
        "--latency",
    ]
    for header in headers:
        argv += ["-H", header]
    before = cpu_seconds(server_pids)
    started = time.monotonic()
    done = subprocess.run([*argv, url], capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    used = cpu_seconds(server_pids) - before
    out = done.stdout
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: .*?(\d+) timeout"):
        match = re.search(pattern, out)
        errors += int(match.group(1)) if match else 0
    requests = float(_search(r"Requests/sec:\s+([\d.]+)", out))
    transfer = _search(r"Transfer/sec:\s+([\d.]+)(\w*)", out, 2)
    latency = {
        m.group(1): float(m.group(2)) * _TIME_UNITS[m.group(3)]
        for m in re.finditer(r"^\s+(\d+%)\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    }
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors against {url}:\n{out}")
    return WrkResult(
        requests_per_second=requests,
        bytes_per_second=float(transfer[0]) * _UNITS[transfer[1]],
        latency=latency,
        errors=errors,
        server_cpu=used,
        seconds=elapsed,
    )


def _search(pattern: str, text: str, groups: int = 1) -> tuple[str, ...] | str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk output without {pattern!r}:\n{text}")
    return match.groups() if groups > 1 else match.group(1)


#: The Debian package of every program a benchmark runs (``make bench`` and
#: ``make test`` install them all).
PACKAGES = {
    "bash": "bash",
    "containerd": "containerd",
    "ctr": "containerd",
    "docker-registry": "docker-registry",
    "gzip": "gzip",
    "nginx": "nginx-light",
    "nix-build": "nix-bin",
    "nix-instantiate": "nix-bin",
    "podman": "podman",
    "sha256sum": "coreutils",
    "skopeo": "skopeo",
    "tar": "tar",
    "wrk": "wrk",
}


def missing_tools(tools: Sequence[str]) -> str | None:
    """What to install for the programs of ``tools`` not on PATH, or None when all are."""
    missing = sorted({tool for tool in tools if shutil.which(tool) is None})
    if not missing:
        return None
    packages = " ".join(sorted({PACKAGES[tool] for tool in missing}))
    return (
        f"not installed: {', '.join(missing)}; install the Debian packages {packages} "
        f"(`make bench` does: apt-get install {packages})"
    )


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e7 else f"{n / 1e6:,.1f} MB"


def rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.2f} GB/s"
    return f"{bytes_per_second / 1e6:,.0f} MB/s"
