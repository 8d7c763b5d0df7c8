"""Real container clients driven by the end-to-end tests.

skopeo, umoci, containerd's ctr, podman and Docker's own daemon (Debian's
docker.io), each with its state under a temporary directory, talking to
127.0.0.1 only: plain HTTP, or HTTPS with a test CA that each client is given
in its own way (tests/e2e/test_tls_auth.py).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .server import stop_process, wait_for


def run(
    argv: Sequence[str], timeout: float = 300, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output if it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def skopeo_registry_options(
    prefix: str, cert_dir: Path | None = None, creds: str | None = None
) -> list[str]:
    """skopeo's options for the registry: plain HTTP, or TLS verified with the
    ``ca.crt`` of ``cert_dir``; and ``user:password`` if given. ``prefix`` is
    ``--src-`` for the source of a copy, ``--`` for inspect."""
    if cert_dir is None:
        tls = [f"{prefix}tls-verify=false"]
    else:
        tls = [f"{prefix}cert-dir", str(cert_dir)]
    return tls if creds is None else [*tls, f"{prefix}creds", creds]


def skopeo_copy(
    host: str,
    ref: str,
    oci_dir: Path,
    tag: str = "image",
    override_arch: str | None = None,
    cert_dir: Path | None = None,
    creds: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Copy ``host/ref`` into an OCI layout, verifying every blob digest (from
    an index, the platform of this machine or of ``override_arch``); over TLS
    with the CA of ``cert_dir`` and as ``creds`` if given."""
    arch = () if override_arch is None else ("--override-arch", override_arch)
    return run(
        [
            "skopeo",
            "--insecure-policy",
            *arch,
            "copy",
            *skopeo_registry_options("--src-", cert_dir, creds),
            f"docker://{host}/{ref}",
            f"oci:{oci_dir}:{tag}",
        ],
        check=check,
    )


def skopeo_inspect(
    host: str,
    ref: str,
    raw: bool = False,
    config: bool = False,
    cert_dir: Path | None = None,
    creds: str | None = None,
) -> dict:
    argv = ["skopeo", "inspect", *skopeo_registry_options("--", cert_dir, creds)]
    if raw:
        argv.append("--raw")
    if config:
        argv.append("--config")
    return json.loads(run([*argv, f"docker://{host}/{ref}"]).stdout)


def umoci_unpack(oci_dir: Path, bundle: Path, tag: str = "image") -> Path:
    """Unpack an OCI image (umoci checks diff_ids and sizes); return the rootfs."""
    run(["umoci", "unpack", "--image", f"{oci_dir}:{tag}", str(bundle)])
    return bundle / "rootfs"


def chroot(rootfs: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return run(
        ["/usr/sbin/chroot", str(rootfs), *argv],
        timeout=60,
        env={"PATH": "/bin:/usr/bin", "HOME": "/"},
    )


@dataclass
class Containerd:
    """A private containerd: own root, state and socket, no CRI plugin."""

    process: subprocess.Popen[bytes]
    address: str
    workdir: Path

    def ctr(
        self, *argv: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["ctr", "--address", self.address, "--namespace", "nixery-test", *argv],
            timeout=timeout,
            check=check,
        )

    def stop(self) -> None:
        stop_process(self.process, grace=20)


def start_containerd(workdir: Path) -> Containerd:
    workdir.mkdir(parents=True, exist_ok=True)
    address = str(workdir / "containerd.sock")
    config = workdir / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{workdir / "root"}"\n'
        f'state = "{workdir / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{address}"\n'
        "[ttrpc]\n"
        f'  address = "{address}.ttrpc"\n'
        "[debug]\n"
        f'  address = "{address}.debug"\n'
        "[metrics]\n"
        '  address = ""\n'
    )
    log = open(workdir / "containerd.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    daemon = Containerd(process, address, workdir)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError((workdir / "containerd.log").read_text())
        return Path(address).exists() and daemon.ctr("version", check=False).returncode == 0

    wait_for(ready, 60, "containerd to start", interval=0.2)
    return daemon


#: ``podman run`` options for this sandbox: no network, and the rlimits runc
#: would set pinned (the sandbox may not raise them).
PODMAN_RUN = ("run", "--rm", "--network", "none",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")  # fmt: skip


def podman(
    workdir: Path,
    *argv: str,
    timeout: float = 300,
    check: bool = True,
    storage_driver: str = "vfs",
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """podman with private storage (vfs unless ``storage_driver`` says otherwise),
    cgroupfs and runc (crun refuses this machine's hybrid cgroups); ``input`` on
    its standard input (``login --password-stdin``)."""
    return run(
        [
            "podman",
            "--root",
            str(workdir / "root"),
            "--runroot",
            str(workdir / "run"),
            "--storage-driver",
            storage_driver,
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "none",
            *argv,
        ],
        timeout=timeout,
        check=check,
        input=input,
    )


@dataclass
class Dockerd:
    """A private Docker daemon: own data and exec roots and socket, no networking
    of its own (no iptables, no bridge); it starts its own containerd."""

    process: subprocess.Popen[bytes]
    socket: str
    workdir: Path

    def docker(
        self, *argv: str, timeout: float = 300, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The client on this daemon; ``input`` on its standard input
        (``login --password-stdin``). Client options such as ``--config DIR``
        may come first in ``argv``."""
        # Debian's own client (a docker elsewhere on PATH may be another version).
        argv = ["/usr/bin/docker", "-H", f"unix://{self.socket}", *argv]
        return run(argv, timeout=timeout, check=check, input=input)

    def stop(self) -> None:
        stop_process(self.process, grace=30)


def start_dockerd(workdir: Path) -> Dockerd:
    workdir.mkdir(parents=True, exist_ok=True)
    sock = str(workdir / "docker.sock")
    log = open(workdir / "dockerd.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        ["dockerd", "--data-root", str(workdir / "root"), "--exec-root", str(workdir / "exec"),
         "--pidfile", str(workdir / "docker.pid"), "-H", f"unix://{sock}",
         "--iptables=false", "--ip6tables=false", "--bridge=none"],
        stdout=log, stderr=log,
    )  # fmt: skip
    daemon = Dockerd(process, sock, workdir)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError((workdir / "dockerd.log").read_text())
        return Path(sock).exists() and daemon.docker("version", check=False).returncode == 0

    wait_for(ready, 60, "dockerd to start", interval=0.2)
    return daemon
