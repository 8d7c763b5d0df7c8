"""TLS and HTTP basic auth as Docker, podman, containerd's ctr and skopeo see
them, and the package allow/deny lists and cold-build limit behind them.

One server for the module: two workers, HTTPS only with a certificate for
127.0.0.1 signed by a CA made here (trustme), an htpasswd file of bcrypt
hashes, an allow and a deny list, and one cold build per minute per user.
Each client is given the CA in its own way, never an insecure flag, and logs
in its own way. The users split the work so that the cold-build limit of one
never gets in the way of another:

- alice pulls with every client; the fixture builds ``hello`` for her first,
  so every later pull of it is warm;
- bob and dave meet the cold-build limit;
- carol asks for denied packages, then for meta-packages (never denied).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
import trustme

from .clients import (
    PODMAN_RUN,
    Containerd,
    Dockerd,
    chroot,
    podman,
    run,
    skopeo_copy,
    umoci_unpack,
)
from .server import Server, start_server

USERS = {name: f"{name}-pw-7Qx" for name in ("alice", "bob", "carol", "dave")}
WRONG = "not-the-password"
ALLOW = "hello,chain-*,diamond-*"
DENY = "diamond-t*"
MANIFESTS = ("application/vnd.oci.image.manifest.v1+json, "
             "application/vnd.docker.distribution.manifest.v2+json")  # fmt: skip
#: What hello's own command prints.
HELLO = "Hello, world!\n"


def htpasswd_line(user: str, password: str) -> str:
    line = f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}"
    # bob's hash has the prefix `htpasswd -B` writes: the same algorithm as $2b$.
    return line.replace(":$2b$", ":$2y$") if user == "bob" else line


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's server; its CA is ``ca.crt``, alone in its directory (a
    certificate directory as skopeo and podman read them)."""
    workdir = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    cert_dir = workdir / "certs"
    cert_dir.mkdir()
    ca.cert_pem.write_to_path(str(cert_dir / "ca.crt"))
    for pem in certificate.cert_chain_pems:
        pem.write_to_path(str(workdir / "server.crt"), append=True)
    certificate.private_key_pem.write_to_path(str(workdir / "server.key"))
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in USERS.items()))
    server = start_server(
        workdir,
        extra=("--workers", "2",
               "--tls-cert", str(workdir / "server.crt"),
               "--tls-key", str(workdir / "server.key"),
               "--htpasswd", str(htpasswd),
               "--allow-packages", ALLOW, "--deny-packages", DENY,
               "--cold-builds-per-minute", "1"),
        ca=cert_dir / "ca.crt",
    )  # fmt: skip
    try:
        # alice's one cold build: every client's pull of hello is warm after it.
        built = get(server, "/v2/hello/manifests/latest", "alice")
        assert built.status_code == 200, built.text
        yield server
    finally:
        server.stop()


def cert_dir(server: Server) -> Path:
    assert server.ca is not None
    return server.ca.parent


def creds(user: str, password: str | None = None) -> str:
    return f"{user}:{USERS[user] if password is None else password}"


def get(
    server: Server, path: str, user: str | None = None, password: str | None = None
) -> httpx.Response:
    """GET over HTTPS, verified with the server's CA, as ``user`` if given;
    manifests of either kind (zstd images have only OCI ones)."""
    auth = None if user is None else (user, USERS[user] if password is None else password)
    return httpx.get(server.url + path, auth=auth, verify=server.verify, timeout=120,
                     headers={"Accept": MANIFESTS})  # fmt: skip


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    """The response is the registry's error ``code``; its message."""
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert [error["code"] for error in errors] == [code], errors
    return str(errors[0]["message"])


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """The client failed, saying one of ``words`` (any case) if any are given."""
    assert result.returncode != 0, result.stdout
    said = result.stderr.lower()
    assert not words or any(word in said for word in words), result.stderr


def built_packages(server: Server) -> list[str]:
    """Every package of every Nix build the server has started."""
    return [package for event in server.events("nix.build") for package in event["packages"]]


def handshake(server: Server) -> tuple[str | None, str | None]:
    """A TLS handshake with ``server`` (verified with its CA), offering h2 and
    HTTP/1.1 by ALPN: the protocol the server chose, and the TLS version."""
    context = ssl.create_default_context(cafile=str(server.ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    host, port = server.host.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.selected_alpn_protocol(), tls.version()


def test_basic_auth_challenge_and_tls_only(secured: Server) -> None:
    for path in ("/v2/", "/v2/hello/manifests/latest"):
        for user, password in ((None, None), ("alice", WRONG), ("mallory", USERS["alice"])):
            response = get(secured, path, user, password)
            assert_error(response, 401, "UNAUTHORIZED")
            # RFC 7617's challenge (a charset="UTF-8" parameter may follow).
            challenge = response.headers["www-authenticate"]
            assert challenge.partition(",")[0] == 'Basic realm="nixery-trio"', challenge
    for user in ("alice", "bob"):  # a $2b$ hash and a $2y$ one
        assert get(secured, "/v2/", user).status_code == 200
    # TLS 1.2 or later, HTTP/1.1 by ALPN (h2 offered first).
    alpn, version = handshake(secured)
    assert alpn == "http/1.1" and version in ("TLSv1.2", "TLSv1.3"), (alpn, version)
    # The certificate is our CA's: not trusted without it.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(secured.url + "/v2/", timeout=60)
    # Plain HTTP on the TLS port gets no registry answer.
    try:
        plain = httpx.get(f"http://{secured.host}/v2/", auth=("alice", USERS["alice"]),
                          timeout=60)  # fmt: skip
    except httpx.TransportError:
        pass
    else:
        assert plain.status_code not in (200, 401), plain.text
        assert "docker-distribution-api-version" not in plain.headers


def test_skopeo_pulls_with_the_ca_and_credentials(secured: Server, tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    source = f"docker://{secured.host}/hello:latest"
    # The system's trust store does not know the CA: verification fails.
    unknown = run(["skopeo", "--insecure-policy", "copy", "--src-creds", creds("alice"),
                   source, f"oci:{oci}:image"], check=False)  # fmt: skip
    assert_refused(unknown, "x509")
    for user in (creds("alice", WRONG), None):
        refused = skopeo_copy(secured.host, "hello:latest", oci, cert_dir=cert_dir(secured),
                              creds=user, check=False)  # fmt: skip
        assert_refused(refused, "unauthorized")
    skopeo_copy(secured.host, "hello:latest", oci, cert_dir=cert_dir(secured),
                creds=creds("alice"))  # fmt: skip
    rootfs = umoci_unpack(oci, tmp_path / "bundle")
    assert chroot(rootfs, "/bin/hello").stdout == HELLO


def test_podman_logs_in_pulls_and_runs(secured: Server) -> None:
    ref = f"{secured.host}/hello:latest"
    # podman refuses a run root longer than 50 characters: use a short path.
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        tls = ("--cert-dir", str(cert_dir(secured)), "--authfile", f"{workdir}/auth.json")
        login = ("login", *tls, "--username", "alice", "--password-stdin", secured.host)
        Path(workdir, "auth.json").write_text('{"auths": {}}')
        refused = podman(Path(workdir), *login, input=WRONG + "\n", check=False)
        assert_refused(refused, "invalid username/password")
        anonymous = podman(Path(workdir), "pull", *tls, ref, check=False)
        assert_refused(anonymous, "unauthorized")
        podman(Path(workdir), *login, input=USERS["alice"] + "\n")
        auths = json.loads(Path(workdir, "auth.json").read_text())["auths"]
        assert list(auths) == [secured.host]
        podman(Path(workdir), "pull", *tls, ref)
        assert podman(Path(workdir), *PODMAN_RUN, ref, timeout=120).stdout == HELLO


def test_ctr_pulls_with_its_ca_and_user(
    secured: Server, containerd: Containerd, tmp_path: Path
) -> None:
    ref = f"{secured.host}/hello:latest"
    # ctr (containerd 1.6) speaks plain HTTP to a loopback registry unless a
    # hosts.toml names its HTTPS endpoint (it may name the CA too; here
    # --tlscacert gives it). After that endpoint it still tries plain HTTP,
    # which this server does not answer.
    hosts_toml = tmp_path / "hosts" / secured.host / "hosts.toml"
    hosts_toml.parent.mkdir(parents=True)
    hosts_toml.write_text(f'[host."{secured.url}"]\n  capabilities = ["pull", "resolve"]\n')
    pull = ("image", "pull", "--hosts-dir", str(hosts_toml.parents[1]))
    ca = ("--tlscacert", str(secured.ca))
    alice = ("--user", creds("alice"))
    assert_refused(containerd.ctr(*pull, *alice, ref, check=False), "x509")
    for user in ((), ("--user", creds("alice", WRONG))):
        assert_refused(containerd.ctr(*pull, *ca, *user, ref, check=False), "401 unauthorized")
    containerd.ctr(*pull, *ca, *alice, ref)
    ran = containerd.ctr("run", "--rm", ref, "nixery-tls-hello", timeout=120)
    assert ran.stdout.strip() == HELLO.strip()


def test_docker_logs_in_pulls_and_runs(secured: Server, dockerd: Dockerd, tmp_path: Path) -> None:
    ref = f"{secured.host}/hello:latest"
    config = ("--config", str(tmp_path / "docker-config"))
    anonymous = ("--config", str(tmp_path / "no-login"))
    login = ("login", secured.host, "--username", "alice", "--password-stdin")
    # Docker's own way to trust a registry's CA. Docker counts 127.0.0.0/8 as
    # an insecure registry, though: for loopback it skips verification (and
    # does not even read this directory) and would fall back to plain HTTP.
    # The server speaks HTTPS only, so a pull that works still shows that
    # Docker spoke TLS to it; no insecure-registries setting is added.
    certs_d = Path("/etc/docker/certs.d")
    made_certs_d = not certs_d.exists()
    host_certs = certs_d / secured.host
    host_certs.mkdir(parents=True)
    try:
        assert secured.ca is not None
        shutil.copy(secured.ca, host_certs / "ca.crt")
        refused = dockerd.docker(*config, *login, input=WRONG + "\n", check=False)
        assert_refused(refused, "unauthorized")
        # Docker reports its last try, plain HTTP (loopback): no answer.
        assert_refused(dockerd.docker(*anonymous, "pull", ref, check=False))
        assert "Login Succeeded" in dockerd.docker(*config, *login, input=USERS["alice"]).stdout
        saved = json.loads((tmp_path / "docker-config" / "config.json").read_text())["auths"]
        assert list(saved) == [secured.host]
        dockerd.docker(*config, "pull", ref)
        ran = dockerd.docker("run", "--rm", "--network", "none", ref, timeout=120)
        assert ran.stdout == HELLO
    finally:
        shutil.rmtree(host_certs)
        if made_certs_d:
            certs_d.rmdir()


def test_denied_packages_never_reach_nix(secured: Server, tmp_path: Path) -> None:
    builds = secured.count("nix.build")
    # docs is outside the allow list; diamond-top is in the deny list.
    for name, package in (("docs", "docs"), ("hello/diamond-top", "diamond-top")):
        message = assert_error(get(secured, f"/v2/{name}/manifests/latest", "carol"),
                               403, "DENIED")  # fmt: skip
        assert package in message, message
    refused = skopeo_copy(secured.host, "diamond-top:latest", tmp_path / "oci",
                          cert_dir=cert_dir(secured), creds=creds("carol"),
                          check=False)  # fmt: skip
    assert_refused(refused, "denied")
    assert "diamond-top" in refused.stderr, refused.stderr
    assert secured.count("nix.build") == builds
    # Meta-packages are never denied, nor what shell brings (bashInteractive,
    # coreutils...) and what every image has (cacert, iana-etc): only the
    # packages the name asks for are checked.
    allowed = get(secured, "/v2/shell/nonroot/zstd/hello/manifests/latest", "carol")
    assert allowed.status_code == 200, allowed.text
    assert secured.count("nix.build") == builds + 1
    assert {"docs", "diamond-top"}.isdisjoint(built_packages(secured))


def test_cold_builds_are_limited_per_user(secured: Server) -> None:
    assert get(secured, "/v2/chain-a/manifests/latest", "bob").status_code == 200
    # Again and again, each on a new connection that either worker may take:
    # the limit is the server's, not one worker's.
    for _ in range(4):
        limited = get(secured, "/v2/chain-b/manifests/latest", "bob")
        assert_error(limited, 429, "TOOMANYREQUESTS")
        assert 1 <= int(limited.headers["retry-after"]) <= 60, limited.headers
    assert "chain-b" not in built_packages(secured)
    # A warm image is served all the same; another user has an allowance of
    # their own.
    assert get(secured, "/v2/hello/manifests/latest", "bob").status_code == 200
    assert get(secured, "/v2/chain-b/manifests/latest", "dave").status_code == 200
    assert "chain-b" in built_packages(secured)
