"""Start and stop a real nixery-trio server for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "nix" / "demo"
OFFLINE_NIX = "substituters ="


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = OFFLINE_NIX
    return env


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM by process id, then SIGKILL if it is still there after ``grace``."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log_path: Path
    storage: Path
    host: str
    #: The CA that signed the server's certificate, if it speaks HTTPS.
    ca: Path | None = None

    @property
    def url(self) -> str:
        return f"{'http' if self.ca is None else 'https'}://{self.host}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify=`` for this server: its CA, if it speaks HTTPS."""
        return True if self.ca is None else ssl.create_default_context(cafile=str(self.ca))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The server's JSON log lines so far, optionally of one event."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if name is None or entry.get("message") == name:
                entries.append(entry)
        return entries

    def count(self, name: str) -> int:
        return len(self.events(name))

    def stop(self) -> None:
        stop_process(self.process, grace=10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    workdir: Path,
    source: Sequence[str] = ("--pkgs-path", str(DEMO)),
    extra: Sequence[str] = (),
    storage: Path | None = None,
    wrapper: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ca: Path | None = None,
) -> Server:
    """Start ``nixery-trio serve`` on a free port of 127.0.0.1 (run by ``wrapper``, if
    given; with ``env`` added to its environment). With ``ca``, the server is
    expected to speak HTTPS (``extra`` gives it its certificate) with a
    certificate signed by that CA, and is ready once it has answered over TLS."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = storage or workdir / "store"
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    argv = [
        *wrapper, sys.executable, "-m", "nixery_trio", "serve",
        "--listen", "127.0.0.1:0",
        "--storage-path", str(storage),
        "--popularity-url", str(DEMO / "popularity.json"),
        *source, *extra,
    ]  # fmt: skip
    # Its metric files in the test's own directory, not a temporary one of
    # the server's: a server a test kills with SIGKILL cannot remove that.
    metrics = {"PROMETHEUS_MULTIPROC_DIR": str(workdir / f"metrics-{time.monotonic_ns()}")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log,
                                   env=nix_env() | metrics | (env or {}), cwd=REPO)  # fmt: skip
    server = Server(process, log_path, storage, "", ca)

    def started() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        for entry in server.events("server.started"):
            return str(entry["listen"][0]).partition("://")[2] or str(entry["listen"][0])
        return None

    server.host = wait_for(started, 60, "the server to start")
    if ca is not None:
        # Any HTTP status will do (401 behind basic auth): the handshake is the check.
        try:
            httpx.get(f"{server.url}/v2/", verify=server.verify, timeout=60)
        except httpx.TransportError as error:
            server.stop()
            raise RuntimeError(
                f"no HTTPS answer from {server.url}: {error!r}\n{log_path.read_text()}"
            ) from error
    return server
