"""contrib/: the systemd unit, its sample config and the nginx example, with real tools.

The unit is loaded by ``systemd-analyze verify`` (which parses it as systemd
would, with no systemd running: a misspelt key or a bad value is a warning
there, and a failure here) and rated by ``systemd-analyze security
--offline``, which names every hardening option it finds in force. systemd
cannot run the unit here (it is not PID 1), so the server runs under the two
rules of the unit that a process can set on itself and that could break it:
NoNewPrivileges= and MemoryDenyWriteExecute= (``PR_SET_MDWE``, on Linux 6.3
and later), which its children, nix-build included, inherit.

nginx runs contrib/nginx.conf with its port, certificate and upstream
changed, terminating TLS with a certificate made here by openssl, in front of
a real server: skopeo pulls through it with TLS verified, gets the digest a
direct pull gets, and the image runs; a client that stops reading a blob
stalls the server behind nginx (proxy_buffering off), where a buffering
nginx would take the whole blob from it.
"""

from __future__ import annotations

import ctypes
import grp
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from nixery_trio.config import SETTINGS, load, make_config
from nixery_trio.http.supervisor import DRAIN_MARGIN

from .clients import chroot, run, skopeo_inspect, umoci_unpack
from .server import REPO, Server, start_server, stop_process, wait_for

CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "nixery-trio.service"
#: Where the unit expects the installed command (replaced by this venv's to verify it).
UNIT_COMMAND = "/opt/nixery-trio/.venv/bin/nixery-trio"

#: Every option ``systemd-analyze security`` must find in force (its JSON
#: field names), on top of each ``CapabilityBoundingSet_*`` and
#: ``RestrictNamespaces_*`` one.
HARDENING = (
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc",
    "PrivateMounts", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    "MemoryDenyWriteExecute", "SystemCallArchitectures", "UserOrDynamicUser",
    "AmbientCapabilities", "RemoveIPC", "RestrictAddressFamilies_AF_PACKET",
    "RestrictAddressFamilies_AF_NETLINK", "RestrictAddressFamilies_OTHER",
    *(f"SystemCallFilter_{group}" for group in (
        "swap", "reboot", "raw_io", "privileged", "resources", "obsolete", "mount", "module",
        "debug", "cpu_emulation", "clock",
    )),
)  # fmt: skip
#: ``systemd-analyze security``'s overall exposure, in tenths, the unit stays at or below.
MAX_EXPOSURE = 15

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_GET_MDWE = 66
#: Sets no_new_privs and, when argv[1] is "1", PR_SET_MDWE (refuse memory that
#: is or becomes writable and executable), then runs argv[2:].
HARDENING_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_NO_NEW_PRIVS}, 1, 0, 0, 0):
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if sys.argv[1] == "1" and libc.prctl({PR_SET_MDWE}, 1, 0, 0, 0):
    raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def kernel_has_mdwe() -> bool:
    return int(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: apt-get install {package} (make test does)")


def unit_service_settings() -> dict[str, list[str]]:
    """The [Service] section of the unit: each key's values, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def seconds(text: str) -> float:
    """A systemd or nginx time span ("45", "45s", "15m") in seconds."""
    match = re.fullmatch(r"(\d+)\s*(s|m|min|h)?", text)
    assert match, f"not a time span I can read: {text!r}"
    return int(match[1]) * {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}[match[2]]


def nginx_directives(text: str) -> dict[str, list[str]]:
    """Each directive of an nginx config and its arguments (comments dropped)."""
    directives: dict[str, list[str]] = {}
    for statement in re.split(r"[;{}]", re.sub(r"#[^\n]*", "", text)):
        words = statement.split(maxsplit=1)
        if words:
            directives.setdefault(words[0], []).append(words[1] if len(words) > 1 else "")
    return directives


# --- the systemd unit ---------------------------------------------------------


def test_the_unit_verifies(tmp_path: Path) -> None:
    require("systemd-analyze", "systemd")
    command = Path(sys.executable).parent / "nixery-trio"
    assert command.exists(), f"{command}: the venv's nixery-trio, to stand in for the unit's"
    text = UNIT.read_text()
    assert text.count(UNIT_COMMAND) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(UNIT_COMMAND, str(command)))
    verified = run(["systemd-analyze", "verify", str(unit)], check=False)
    # A misspelt key or a bad value is a warning on stderr with status 0.
    assert (verified.returncode, verified.stderr, verified.stdout) == (0, "", "")


def test_the_unit_is_hardened() -> None:
    require("systemd-analyze", "systemd")
    rated = run(["systemd-analyze", "security", "--offline=yes", "--json=short", str(UNIT)])
    in_force = {entry["json_field"]: entry["set"] for entry in json.loads(rated.stdout)}
    required = [
        *HARDENING,
        *(field for field in in_force if field.startswith("CapabilityBoundingSet_")),
        *(field for field in in_force if field.startswith("RestrictNamespaces_")),
    ]
    assert len(required) > len(HARDENING) + 20
    assert [field for field in required if in_force.get(field) is not True] == []
    overall = run(["systemd-analyze", "security", "--offline=yes",
                   f"--threshold={MAX_EXPOSURE}", str(UNIT)], check=False)  # fmt: skip
    assert overall.returncode == 0, overall.stdout[-300:]

    service = unit_service_settings()

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, f"{key}= set {service.get(key)}"
        return service[key][0]

    assert one("ExecStart") == f"{UNIT_COMMAND} serve --config /etc/nixery-trio/config.toml"
    assert one("Type") == "simple"  # the server has no sd_notify
    assert one("User") not in ("", "root")
    assert "nix-users" in one("SupplementaryGroups").split()
    assert one("StateDirectory") == "nixery-trio"
    assert "/var/lib/nixery-trio" in one("ReadWritePaths").split()
    assert one("KillSignal") == "SIGTERM"
    assert one("KillMode") == "mixed"
    drain = float(next(s.default for s in SETTINGS if s.flag == "--drain-timeout") or "nan")
    assert seconds(one("TimeoutStopSec")) > drain + DRAIN_MARGIN
    assert one("Restart") == "on-failure"
    assert int(one("LimitNOFILE")) >= 65536
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("UMask") == "0027"
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one("SystemCallArchitectures") == "native"
    assert service["SystemCallFilter"][0] == "@system-service"
    for key in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
        "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
        "LockPersonality", "MemoryDenyWriteExecute",
    ):  # fmt: skip
        assert one(key) == "yes", key


def test_the_sample_config_loads_and_agrees_with_the_unit_and_the_proxy() -> None:
    sample = CONTRIB / "config.toml"
    # Read as `serve --config` reads it, but with this checkout's nix/ (the
    # sample's is under /opt) and no environment.
    loaded = load("serve", {"nix_dir": str(REPO / "nix")}, sample, environ={})
    config = make_config(loaded.values, loaded.origins)
    assert loaded.origins["storage_path"] == f"storage_path in {sample}"
    service = unit_service_settings()
    writable = [Path(path) for path in service["ReadWritePaths"][0].split()]
    assert any(config.storage_path.is_relative_to(path) for path in writable)
    assert config.drain_timeout + DRAIN_MARGIN < seconds(service["TimeoutStopSec"][0])
    proxy = nginx_directives((CONTRIB / "nginx.conf").read_text())
    upstreams = [address for address in proxy["server"] if address]  # not `server {`
    assert upstreams == [f"{config.host}:{config.port}"]
    assert config.nix_timeout < seconds(proxy["proxy_read_timeout"][0])


# --- nginx in front of a server ----------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (ca.crt) and a certificate for 127.0.0.1 that it signed."""
    require("openssl", "openssl")
    directory.mkdir(parents=True)
    ca_key, ca, key, request, cert = (
        directory / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=nixery-trio test CA",
         "-keyout", str(ca_key), "-out", str(ca)])  # fmt: skip
    run(["openssl", "req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key),
         "-out", str(request)])  # fmt: skip
    run(["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
         "-out", str(cert)])  # fmt: skip
    return ca, cert, key


NGINX_MAIN = """
daemon off;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  include {dir}/nixery-trio.conf;
}}
"""


def adapted_proxy_config(port: int, upstream: str, cert: Path, key: Path) -> str:
    """contrib/nginx.conf on 127.0.0.1:``port``, in front of ``upstream``, with ``cert``."""
    text = (CONTRIB / "nginx.conf").read_text()
    for old, new in (
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("server 127.0.0.1:8080;", f"server {upstream};"),
        ("/etc/ssl/certs/registry.example.org.crt", str(cert)),
        ("/etc/ssl/private/registry.example.org.key", str(key)),
    ):
        assert text.count(old) == 1, f"contrib/nginx.conf no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def lowered(headers: Message) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


@dataclass
class Proxy:
    host: str
    ca: Path
    certs: Path  # a directory holding ca.crt, for skopeo's --cert-dir
    error_log: Path

    def open(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
             data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        context = ssl.create_default_context(cafile=self.ca)
        request = urllib.request.Request(f"https://{self.host}{path}", data=data,
                                         headers=headers or {}, method=method)  # fmt: skip
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as response:
                return response.status, lowered(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, lowered(error.headers), error.read()


@pytest.fixture(scope="module")
def hardened_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server under NoNewPrivileges and, where the kernel has it, W^X memory; a
    short send timeout, so that a client stalled behind nginx shows at once."""
    wrapper = (sys.executable, "-c", HARDENING_WRAPPER, "1" if kernel_has_mdwe() else "0")
    running = start_server(tmp_path_factory.mktemp("behind-nginx"), wrapper=wrapper,
                           extra=("--send-timeout", "2"))  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, hardened_server: Server) -> Iterator[Proxy]:
    require("nginx", "nginx-light")
    workdir = tmp_path_factory.mktemp("nginx")
    (workdir / "tmp").mkdir()
    ca, cert, key = make_certificates(workdir / "certs")
    port = free_port()
    (workdir / "nixery-trio.conf").write_text(
        adapted_proxy_config(port, hardened_server.host, cert, key)
    )
    # As root, nginx's workers would run as nobody; run them as this user.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(dir=workdir, user=user))
    certs = workdir / "certs-for-skopeo"
    certs.mkdir()
    shutil.copy(ca, certs / "ca.crt")
    running = Proxy(f"127.0.0.1:{port}", ca, certs, workdir / "error.log")
    with open(workdir / "out.log", "wb") as out:
        process = subprocess.Popen(["nginx", "-e", str(running.error_log), "-c", str(conf)],
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited early:\n{running.error_log.read_text()}")
        try:
            return running.open("/v2/")[0] == 200
        except OSError:
            return False

    try:
        wait_for(answers, 30, "nginx to answer", interval=0.1)
        yield running
    finally:
        stop_process(process, grace=10)


def test_skopeo_pulls_through_nginx_with_tls(
    hardened_server: Server, proxy: Proxy, tmp_path: Path
) -> None:
    direct = skopeo_inspect(hardened_server.host, "shell/hello:latest")["Digest"]
    through = run(["skopeo", "inspect", "--cert-dir", str(proxy.certs),
                   f"docker://{proxy.host}/shell/hello:latest"])  # fmt: skip
    assert json.loads(through.stdout)["Digest"] == direct
    oci = tmp_path / "oci"
    run(["skopeo", "--insecure-policy", "copy", "--src-cert-dir", str(proxy.certs),
         f"docker://{proxy.host}/shell/hello:latest", f"oci:{oci}:image"])  # fmt: skip
    [pulled] = json.loads((oci / "index.json").read_text())["manifests"]
    assert pulled["digest"] == direct
    rootfs = umoci_unpack(oci, tmp_path / "bundle")
    assert chroot(rootfs, "/bin/bash", "-c", "hello").stdout == "Hello, world!\n"


def test_nginx_passes_headers_and_ranges_through(hardened_server: Server, proxy: Proxy) -> None:
    status, headers, _ = proxy.open("/v2/")
    assert (status, headers.get("docker-distribution-api-version")) == (200, "registry/2.0")
    manifest = skopeo_inspect(hardened_server.host, "hello:latest", raw=True)
    layer = manifest["layers"][0]
    status, headers, body = proxy.open(f"/v2/hello/blobs/{layer['digest']}",
                                       headers={"Range": "bytes=0-9"})  # fmt: skip
    expected = (206, f"bytes 0-9/{layer['size']}", 10)
    assert (status, headers.get("content-range"), len(body)) == expected
    with urllib.request.urlopen(urllib.request.Request(
        f"http://{hardened_server.host}/v2/hello/blobs/{layer['digest']}",
        headers={"Range": "bytes=0-9"},
    )) as response:  # fmt: skip
        assert response.read() == body
    # A body larger than client_max_body_size is refused by nginx itself.
    status, _, _ = proxy.open("/v2/hello/blobs/uploads/", "POST", data=b"x" * (64 << 10))
    assert status == 413


def test_a_blob_streams_through_nginx_at_the_clients_pace(
    hardened_server: Server, proxy: Proxy
) -> None:
    """With proxy_buffering off, a client that stops reading stops the server's
    response too (which the server cuts off after its send timeout). A buffering
    nginx would take the whole blob into a temporary file instead."""
    manifest = skopeo_inspect(hardened_server.host, "large:latest", raw=True)
    layer = max(manifest["layers"], key=lambda entry: entry["size"])
    # More than every socket buffer between the server and the client can hold.
    assert layer["size"] > 20 << 20
    stalled_before = hardened_server.count("client.stalled")
    host, port = proxy.host.rsplit(":", 1)
    context = ssl.create_default_context(cafile=proxy.ca)
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(60)
        raw.connect((host, int(port)))
        with context.wrap_socket(raw, server_hostname=host) as client:
            client.sendall(f"GET /v2/large/blobs/{layer['digest']} HTTP/1.1\r\n"
                           f"Host: {proxy.host}\r\n\r\n".encode())  # fmt: skip
            assert client.recv(64).startswith(b"HTTP/1.1 200")
            wait_for(
                lambda: hardened_server.count("client.stalled") > stalled_before,
                60,
                "the server to stall behind nginx, and give up on it",
            )
    assert "buffered to a temporary file" not in proxy.error_log.read_text()
