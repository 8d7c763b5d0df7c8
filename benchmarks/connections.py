"""Hostile connections: 1,000 idle and 200 slow-header ones while a normal client pulls.

The idle connections each made one request and stay open, kept alive; the
slow ones send a request head one header line a second and never finish it
(a slowloris), and connect again whenever the server cuts them off (after
``NIXERY_HEADER_TIMEOUT``, set to 3 s here so that they do, and often).
Meanwhile wrk, a normal client on 4 connections, asks for a warm manifest.
Its latency is measured first against the same server with no hostile
connections, then with them: the target is the issue's, a p99 under 50 ms
with them.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from types import TracebackType

from .common import (
    DOCKER_V2,
    NIX_ENV,
    REPO,
    Check,
    Context,
    Section,
    WrkResult,
    children,
    free_port,
    http_ok,
    our_server_argv,
    process,
    rss_bytes,
    wait_until,
    wrk,
)

#: The programs this benchmark runs besides ours (see ``common.PACKAGES``).
TOOLS = ("wrk", "nix-build")
IDLE = 1000
SLOW = 200
NORMAL_CONNECTIONS = 4
TARGET_P99 = 0.050
#: The server's header timeout for this run: the slow connections are cut off and come back.
HEADER_TIMEOUT = 3


class Hostile:
    """Idle and slow-header connections to ``port``, kept up by a thread until closed."""

    def __init__(self, port: int, idle: int, slow: int) -> None:
        self.address = ("127.0.0.1", port)
        self.idle: list[socket.socket] = []
        self.slow: list[socket.socket] = []
        self.idle_count, self.slow_count = idle, slow
        self.reconnects = 0
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile")

    def __enter__(self) -> Hostile:
        self._thread.start()
        if not self.ready.wait(120):
            raise TimeoutError("the hostile connections did not all open")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.idle + self.slow:
            sock.close()

    def idle_open(self) -> int:
        """How many idle connections the server has not closed."""
        with selectors.DefaultSelector() as selector:
            for sock in self.idle:
                selector.register(sock, selectors.EVENT_READ)
            closed = sum(1 for _ in selector.select(timeout=0))
        return len(self.idle) - closed

    def _run(self) -> None:
        for _ in range(self.idle_count):
            sock = socket.create_connection(self.address, timeout=30)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while not response.endswith(b"{}"):
                response += sock.recv(4096)
            self.idle.append(sock)
        self.slow = [self._slow() for _ in range(self.slow_count)]
        self.ready.set()
        while not self._stop.wait(1.0):
            for index, sock in enumerate(self.slow):
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:  # cut off by the header timeout: come back
                    sock.close()
                    self.slow[index] = self._slow()
                    self.reconnects += 1

    def _slow(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=30)
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        return sock


def _row(label: str, result: WrkResult) -> list[str]:
    return [
        label,
        f"{result.requests_per_second:,.0f}",
        f"{result.latency.get('50%', float('nan')) * 1e3:.2f}",
        f"{result.latency.get('99%', float('nan')) * 1e3:.2f}",
    ]


def run(ctx: Context) -> list[Section]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,200 sockets and wrk's
    port = free_port()
    demo = REPO / "nix" / "demo"
    argv = our_server_argv(
        port, ctx.workdir / "connections-store", demo,
        "--popularity-url", str(demo / "popularity.json"),
        "--header-timeout", str(HEADER_TIMEOUT),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v2/hello/manifests/latest"
    accept = [f"Accept: {DOCKER_V2}"]
    seconds = ctx.seconds(10)
    log = ctx.workdir / "connections-server.log"
    with process(argv, log, f"{base}/v2/", env=NIX_ENV) as server:
        pids = children(server.pid)
        wait_until(lambda: http_ok(url, {"Accept": DOCKER_V2}), 300, "hello to build")
        calm = wrk(url, NORMAL_CONNECTIONS, seconds, pids, accept)
        rss_calm = rss_bytes(pids)
        started = time.monotonic()
        with Hostile(port, IDLE, SLOW) as hostile:
            opened = time.monotonic() - started
            loaded = wrk(url, NORMAL_CONNECTIONS, seconds, pids, accept)
            rss_loaded = rss_bytes(pids)
            idle_open = hostile.idle_open()
            reconnects = hostile.reconnects
    p99 = loaded.latency.get("99%", float("nan"))
    mib = 1 << 20
    rows = [
        ["normal client (wrk, 4 connections)", "requests/s", "p50 ms", "p99 ms"],
        _row("alone", calm),
        _row(f"with {IDLE:,} idle and {SLOW} slow-header connections", loaded),
    ]
    text = (
        f"{(__doc__ or '').strip()}\n\nThe {IDLE + SLOW:,} hostile connections opened in "
        f"{opened:.1f} s; at the end {idle_open:,} of the {IDLE:,} idle ones were still open "
        f"(the run is shorter than the keep-alive timeout), and slow-header connections had "
        f"been cut off and come back {reconnects} times. Server RSS: {rss_calm / mib:.0f} MiB "
        f"before them, {rss_loaded / mib:.0f} MiB with them."
    )
    checks = [
        Check(
            f"normal client p99 with {IDLE:,} idle and {SLOW} slow-header connections",
            f"{p99 * 1e3:.1f} ms",
            f"{TARGET_P99 * 1e3:.0f} ms",
            p99 / TARGET_P99,
            "<=",
            1.0,
            f"alone: p99 {calm.latency.get('99%', float('nan')) * 1e3:.1f} ms",
        )
    ]
    return [Section("Hostile connections", text, rows, checks)]
