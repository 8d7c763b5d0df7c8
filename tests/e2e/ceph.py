"""A real S3 server for end-to-end tests: Ceph's RADOS Gateway, from Debian's packages.

One monitor, one OSD and one ``radosgw``, all on 127.0.0.1, each a child
process in the foreground, stopped by its process id.  The OSD keeps its
objects in memory (memstore), every pool has one copy, the daemons talk
without cephx, and there is no manager (the cluster still says HEALTH_OK).
The gateway serves S3 on a port of its own; one user, with the access and
secret key below, owns every bucket, and an unsigned GET / lists none.
Configuration, data and logs live in the work directory; the admin sockets,
whose paths must be short, in a directory of /tmp that ``stop`` removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .s3test import ACCESS_KEY, SECRET_KEY, answers, new_bucket, port_free
from .server import stop_process, wait_for

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")

CONFIG = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
run dir = {run}
pid file = {work}/$name.pid
crash dir = {work}/crash
log to file = false
mon cluster log to file = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon max pg per osd = 1000

[mon]
mon data = {work}/mon
paxos propose interval = 0.05
paxos min wait = 0.01
mon data avail warn = 1
mon data avail crit = 0
log to stderr = true

[osd]
osd data = {work}/osd
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
log to stderr = true

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {work}/rgw
log to stderr = true
"""


def binaries_missing() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def free_port(taken: tuple[int, ...] = ()) -> int:
    """A port free now on 127.0.0.1, clear of SeaweedFS's 20000-39004 (free now,
    that is: if another process takes it first, the daemon fails and says so)."""
    for _ in range(200):
        port = random.randint(40000, 49999)
        if port not in taken and port_free(port):
            return port
    raise RuntimeError("no free port for Ceph")


@dataclass
class Ceph:
    #: radosgw, the OSD and the monitor, in the order they are stopped.
    processes: list[subprocess.Popen[bytes]]
    port: int
    workdir: Path
    #: The short directory of the admin sockets, removed by ``stop``.
    rundir: Path

    @property
    def config(self) -> Path:
        """The cluster's configuration, for ``ceph -c`` and ``radosgw-admin -c``."""
        return self.workdir / "ceph.conf"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self) -> str:
        """A new, empty bucket; its name."""
        return new_bucket(self.endpoint)

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, grace=10)
        shutil.rmtree(self.rundir, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _osd_state(admin_socket: Path) -> str | None:
    """The OSD's state ("booting", "active", ...) from its admin socket, if it answers."""
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(2)
            conn.connect(str(admin_socket))
            conn.sendall(b'{"prefix": "status"}\0')
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        status = json.loads(reply[4 : 4 + int.from_bytes(reply[:4], "big")])
    except (OSError, ValueError):
        return None
    return str(status.get("state"))


def _run(argv: list[str], workdir: Path, timeout: float = 60) -> None:
    """Run a Ceph tool to the end; its output goes to ``tools.log``."""
    done = subprocess.run(argv, capture_output=True, cwd=workdir, timeout=timeout)
    output = done.stdout + done.stderr
    with open(workdir / "tools.log", "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode() + output)
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}:\n"
            f"{output.decode(errors='replace')[-4000:]}"
        )


def start_ceph(workdir: Path, memstore_bytes: int = 2 << 30) -> Ceph:
    """Start a monitor, an OSD and ``radosgw`` in ``workdir``, add the S3 user and
    wait for S3; the OSD holds up to ``memstore_bytes``, in memory."""
    missing = binaries_missing()
    if missing:
        pytest.skip(f"no Ceph ({', '.join(missing)}): apt-get install ceph-mon ceph-osd radosgw")
    workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="ceph-", dir="/tmp"))
    fsid = str(uuid.uuid4())
    mon_port = free_port()
    rgw_port = free_port((mon_port,))
    config = workdir / "ceph.conf"
    config.write_text(
        CONFIG.format(
            fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, work=workdir, run=rundir,
            memstore_bytes=memstore_bytes,
        )
    )  # fmt: skip
    conf = ["-c", str(config)]
    env = os.environ | {"CEPH_CONF": str(config)}
    ceph = Ceph([], rgw_port, workdir, rundir)

    def daemon(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=workdir)
        ceph.processes.insert(0, process)
        return process

    def check(process: subprocess.Popen[bytes], name: str) -> None:
        if process.poll() is not None:
            log = (workdir / f"{name}.log").read_text(errors="replace")
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log[-4000:]}")

    try:
        osd_uuid = str(uuid.uuid4())
        monmap = workdir / "monmap"
        _run(["monmaptool", *conf, "--create", "--fsid", fsid,
              "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", str(monmap)], workdir)  # fmt: skip
        _run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", str(monmap)], workdir)
        (workdir / "osd").mkdir(exist_ok=True)
        _run(["ceph-osd", *conf, "--mkfs", "-i", "0", "--osd-uuid", osd_uuid,
              "--no-mon-config"], workdir)  # fmt: skip
        mon = daemon("mon", ["ceph-mon", *conf, "-f", "-i", "a"])
        wait_for(lambda: mon.poll() is not None or _listening(mon_port), 30,
                 f"the Ceph monitor on 127.0.0.1:{mon_port}")  # fmt: skip
        check(mon, "mon")
        _run(["ceph", *conf, "--connect-timeout", "30", "osd", "new", osd_uuid, "0"], workdir)
        osd = daemon("osd", ["ceph-osd", *conf, "-f", "-i", "0"])

        def active() -> bool:
            check(mon, "mon")
            check(osd, "osd")
            return _osd_state(rundir / "ceph-osd.0.asok") == "active"

        # Not before: a gateway that made its first pool while the OSD was booting
        # once took 5 s longer to answer (1 s otherwise).
        wait_for(active, 60, f"osd.0 to be up (log: {workdir / 'osd.log'})")
        rgw = daemon("rgw", ["radosgw", *conf, "-f", "-n", "client.rgw"])

        def up() -> bool:
            for process, name in ((mon, "mon"), (osd, "osd"), (rgw, "rgw")):
                check(process, name)
            return answers(ceph.endpoint, 200)  # an unsigned GET / lists no buckets

        wait_for(up, 120, f"the RADOS Gateway at {ceph.endpoint} (logs: {workdir})")
        _run(["radosgw-admin", *conf, "user", "create", "--uid", "nixery",
              "--display-name", "nixery", "--access-key", ACCESS_KEY,
              "--secret-key", SECRET_KEY], workdir)  # fmt: skip
    except BaseException:
        ceph.stop()
        raise
    return ceph


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """Ceph's RADOS Gateway serving S3 on 127.0.0.1 for the whole session."""
    running = start_ceph(tmp_path_factory.mktemp("ceph"))
    yield running
    running.stop()
