from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .ceph import ceph  # noqa: F401  (the session fixture)
from .clients import Containerd, Dockerd, start_containerd, start_dockerd
from .seaweed import seaweed  # noqa: F401  (the session fixture)
from .server import Server, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One registry serving the demo package set for the whole session."""
    running = start_server(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


#: Settings of a registry serving every image for two platforms.
PLATFORMS = ("--platforms", "linux/amd64,linux/arm64")
MULTIARCH = (*PLATFORMS, "--workers", "1")


@pytest.fixture(scope="session")
def multiarch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A registry serving linux/amd64 and linux/arm64 (a tag gives an index)."""
    running = start_server(tmp_path_factory.mktemp("multiarch"), extra=MULTIARCH)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    # A short path: the socket path must fit in sun_path (108 bytes).
    workdir = Path(tmp_path_factory.mktemp("ctrd"))
    daemon = start_containerd(workdir)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    daemon = start_dockerd(Path(tmp_path_factory.mktemp("dk")))
    yield daemon
    daemon.stop()
