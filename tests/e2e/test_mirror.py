"""A mirror: images prefetched into a store with no client, listed, then served
by a server with Nix (from its cache) or offline, without it."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import httpx

from nixery_trio.ops import maintenance
from nixery_trio.ops.bundle import DOCKER_ANNOTATION, PLATFORMS_ANNOTATION, REF_NAME

from .clients import Containerd, Dockerd, chroot, podman, run, skopeo_copy, umoci_unpack
from .conftest import MULTIARCH, PLATFORMS
from .server import DEMO, REPO, nix_env, start_server

EVERYTHING = (
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def prefetch(storage: Path, *args: str, pkgs: Path = DEMO) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "nixery_trio", "prefetch",
        "--pkgs-path", str(pkgs), "--storage-path", str(storage),
        "--popularity-url", str(DEMO / "popularity.json"), *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=nix_env(),
                          cwd=REPO)  # fmt: skip


def printed_digests(stdout: str) -> dict[str, dict[str, str]]:
    """``NAME:TAG: kind digest, kind digest`` lines, by NAME:TAG."""
    found = {}
    for line in stdout.splitlines():
        ref, sep, rest = line.partition(": ")
        if sep and rest.startswith(("oci ", "docker ")):
            found[ref] = dict(part.rsplit(" ", 1) for part in rest.split(", "))
    return found


def test_prefetched_images_are_served_without_running_nix(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    listing = tmp_path / "images.txt"
    listing.write_text("# the mirror's images\nshell/hello\n\nzstd/hello:latest  # zstd\n")
    done = prefetch(storage, *PLATFORMS, "--from-file", str(listing), "hello")
    assert done.returncode == 0, done.stderr
    digests = printed_digests(done.stdout)
    assert set(digests) == {"hello:latest", "shell/hello:latest", "zstd/hello:latest"}
    assert set(digests["hello:latest"]) == {"oci index", "docker list"}
    assert set(digests["zstd/hello:latest"]) == {"oci index"}  # zstd: OCI only
    assert "done" in done.stdout  # the progress table's last state

    with start_server(tmp_path / "serve", storage=storage, extra=MULTIARCH) as server:
        for ref, kinds in digests.items():
            name = ref.split(":")[0]
            response = httpx.get(f"{server.url}/v2/{name}/manifests/latest", timeout=60,
                                 headers={"Accept": EVERYTHING})  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.headers["docker-content-digest"] == kinds["oci index"]
        assert server.count("nix.build") == 0
        assert server.count("layer.built") == 0

    # Prefetching again finds everything built: nothing to do, same digests.
    again = prefetch(storage, *PLATFORMS, "--from-file", str(listing), "hello")
    assert again.returncode == 0, again.stderr
    assert printed_digests(again.stdout) == digests
    assert "cached" in again.stdout


def test_prefetch_names_what_failed_and_builds_the_rest(tmp_path: Path) -> None:
    done = prefetch(tmp_path / "store", "hello", "hello/no-such-package", "broken")
    assert done.returncode == 1
    assert "hello:latest: oci manifest sha256:" in done.stdout
    assert "failed: hello/no-such-package:latest: " in done.stderr
    assert "no-such-package" in done.stderr
    assert "failed: broken:latest: " in done.stderr


def test_prefetch_refuses_what_is_not_an_image_reference(tmp_path: Path) -> None:
    for ref in ("Hello", "hello@sha256:" + "0" * 64, "../x"):
        refused = prefetch(tmp_path / "store", ref)
        assert refused.returncode != 0
        assert "Error:" in refused.stderr, refused.stderr
    assert prefetch(tmp_path / "store").returncode != 0  # nothing named


def test_an_offline_mirror_serves_what_it_holds_without_nix(tmp_path: Path) -> None:
    storage = tmp_path / "store"
    done = prefetch(storage, *PLATFORMS, "hello", "zstd/hello")
    assert done.returncode == 0, done.stderr
    assert prefetch(storage, "arm64/hello").returncode == 0
    digests = printed_digests(done.stdout)

    listed = subprocess.run(
        [sys.executable, "-m", "nixery_trio", "ls", "--storage-path", str(storage), "--json"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    held = {f"{i['name']}:{i['tag']}": i for i in map(json.loads, listed.splitlines())}
    assert set(held) == {"hello:latest", "zstd/hello:latest", "arm64/hello:latest"}
    assert held["hello:latest"]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert held["hello:latest"]["digest"] == digests["hello:latest"]["oci index"]
    assert held["arm64/hello:latest"]["platforms"] == ["linux/arm64"]
    assert all(i["size"] > 1_000_000 and i["created"] > 0 for i in held.values())

    # No package source, and no Nix: an empty PATH.
    empty = tmp_path / "no-bin"
    empty.mkdir()
    with start_server(tmp_path / "serve", source=(), storage=storage, env={"PATH": str(empty)},
                      extra=("--offline", "1", "--workers", "1")) as mirror:  # fmt: skip
        index = httpx.get(f"{mirror.url}/v2/hello/manifests/latest", timeout=60,
                          headers={"Accept": EVERYTHING})  # fmt: skip
        assert index.headers["docker-content-digest"] == digests["hello:latest"]["oci index"]
        # A client that takes no index gets the first platform's manifest.
        oci_only = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        single = httpx.get(f"{mirror.url}/v2/hello/manifests/latest", headers=oci_only)
        assert single.headers["docker-content-digest"] == index.json()["manifests"][0]["digest"]
        for name in ("zstd/hello", "arm64/hello"):
            response = httpx.get(f"{mirror.url}/v2/{name}/manifests/latest", timeout=60,
                                 headers={"Accept": EVERYTHING})  # fmt: skip
            assert response.status_code == 200, response.text
        missing = httpx.get(f"{mirror.url}/v2/shell/hello/manifests/latest", timeout=60)
        assert missing.status_code == 404
        [error] = missing.json()["errors"]
        assert error["code"] == "MANIFEST_UNKNOWN" and "not held by this mirror" in error["message"]
        catalog = httpx.get(f"{mirror.url}/v2/_catalog", timeout=60).json()
        assert catalog == {"repositories": ["arm64/hello", "hello", "zstd/hello"]}
        tags = httpx.get(f"{mirror.url}/v2/hello/tags/list", timeout=60).json()
        assert tags == {"name": "hello", "tags": ["latest"]}
        unknown = httpx.get(f"{mirror.url}/v2/shell/hello/tags/list", timeout=60)
        assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        # A real client pulls and runs from it.
        skopeo_copy(mirror.host, "hello:latest", tmp_path / "oci")
        rootfs = umoci_unpack(tmp_path / "oci", tmp_path / "bundle")
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"
        assert mirror.count("nix.build") == 0
    assert maintenance.fsck(storage) == []


def test_offline_takes_no_package_source(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "nixery_trio", "serve", "--offline", "1", "--pkgs-path", str(DEMO),
         "--storage-path", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "--offline serves the store only" in refused.stderr


def nixery(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "nixery_trio", *args], capture_output=True,
                            text=True, timeout=600, cwd=REPO)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
    return result


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_export_writes_one_checkable_bundle_that_clients_read(
    tmp_path: Path, containerd: Containerd, dockerd: Dockerd, arm64_emulation: object
) -> None:
    storage = tmp_path / "store"
    assert prefetch(storage, *PLATFORMS, "hello", "zstd/hello").returncode == 0
    assert prefetch(storage, "shell/hello").returncode == 0
    full, again, one = tmp_path / "full.tar", tmp_path / "again.tar", tmp_path / "one.tar"
    nixery("export", "--storage-path", str(storage), "-o", str(full))
    nixery("export", "--storage-path", str(storage), "-o", str(again))
    assert full.read_bytes() == again.read_bytes()  # one store, one bundle
    files = members(full)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    refs = [entry["annotations"][REF_NAME] for entry in index["manifests"]]
    assert refs == ["hello:latest", "shell/hello:latest", "zstd/hello:latest"]
    blobs = {name for name in files if name.startswith("blobs/")}
    for name in blobs:
        assert hashlib.sha256(files[name]).hexdigest() == name.rsplit("/", 1)[1]
    hello = index["manifests"][0]
    assert hello["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert hello["annotations"][PLATFORMS_ANNOTATION] == "linux/amd64,linux/arm64"
    docker_list = hello["annotations"][DOCKER_ANNOTATION]
    assert f"blobs/sha256/{docker_list.split(':')[1]}" in blobs  # both formats travel
    assert DOCKER_ANNOTATION not in index["manifests"][2]["annotations"]  # zstd: OCI only

    # skopeo picks each platform out of it; what it copied runs.
    for arch in ("amd64", "arm64"):
        layout = tmp_path / f"oci-{arch}"
        run(["skopeo", "--insecure-policy", "--override-arch", arch, "copy",
             f"oci-archive:{full}:hello:latest", f"oci:{layout}:image"])  # fmt: skip
        rootfs = umoci_unpack(layout, tmp_path / f"bundle-{arch}")
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"
    # ctr imports every image of it, by its full name.
    containerd.ctr("image", "import", "--all-platforms", str(full))
    listed = containerd.ctr("image", "ls", "-q").stdout.split()
    assert {"hello:latest", "shell/hello:latest", "zstd/hello:latest"} <= set(listed)
    ran = containerd.ctr("run", "--rm", "hello:latest", "bundle-hello", timeout=120)
    assert ran.stdout.strip() == "Hello, world!"
    # podman loads every image of it (from its docker-save index: podman 4.3
    # loads an OCI archive of one image only), and pulls any image of it.
    nixery("export", "--storage-path", str(storage), "-o", str(one), "shell/hello")
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        loaded = podman(Path(workdir), "load", "-i", str(full)).stdout
        for ref in refs:
            assert ref in loaded, loaded
        result = podman(Path(workdir), "run", "--rm", "--network", "none",
                        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                        "zstd/hello:latest", timeout=120)  # fmt: skip
        assert result.stdout == "Hello, world!\n"
    # Docker loads it too, as a docker save archive.
    loaded = dockerd.docker("load", "-i", str(full)).stdout
    assert all(f"Loaded image: {ref}" in loaded for ref in refs), loaded
    ran_docker = dockerd.docker("run", "--rm", "--network", "none", "hello:latest", timeout=120)
    assert ran_docker.stdout == "Hello, world!\n"
    with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
        assert "shell/hello:latest" in podman(Path(workdir), "load", "-i", str(one)).stdout
        podman(Path(workdir), "pull", f"oci-archive:{full}:zstd/hello:latest")
        names = podman(Path(workdir), "images", "--format", "{{.Repository}}").stdout.split()
        assert {"localhost/shell/hello", "localhost/zstd/hello"} <= set(names)

    # A delta after a fourth image carries only what the full bundle did not.
    assert prefetch(storage, "chain-a").returncode == 0
    delta = tmp_path / "delta.tar"
    nixery("export", "--storage-path", str(storage), "-o", str(delta), "--since", str(full))
    delta_files = members(delta)
    delta_blobs = {name for name in delta_files if name.startswith("blobs/")}
    assert delta_blobs and not delta_blobs & blobs
    delta_refs = [e["annotations"][REF_NAME]
                  for e in json.loads(delta_files["index.json"])["manifests"]]  # fmt: skip
    assert delta_refs == ["chain-a:latest", *refs]

    refused = nixery("export", "--storage-path", str(storage), "-o", str(tmp_path / "x.tar"),
                     "no-such-image", check=False)  # fmt: skip
    assert refused.returncode != 0 and "holds no image no-such-image" in refused.stderr
    assert not (tmp_path / "x.tar").exists()


def store_state(storage: Path) -> tuple[list[str], list[str]]:
    """Every file of a store but its locks, and what ls says: to see it unchanged."""
    files = sorted(str(p.relative_to(storage)) for p in storage.rglob("*")
                   if p.is_file() and p.name not in ("lock", "serving"))  # fmt: skip
    return files, nixery("ls", "--storage-path", str(storage), "--json").stdout.splitlines()


def test_a_mirror_filled_from_bundles_serves_every_client_offline(
    tmp_path: Path, containerd: Containerd, dockerd: Dockerd, arm64_emulation: object
) -> None:
    # Instance A: three images (one for two platforms), a bundle, then a
    # fourth image and a delta bundle.
    a = tmp_path / "a"
    assert prefetch(a, *PLATFORMS, "hello").returncode == 0
    assert prefetch(a, "shell/hello", "zstd/hello").returncode == 0
    full, delta = tmp_path / "full.tar", tmp_path / "delta.tar"
    nixery("export", "--storage-path", str(a), "-o", str(full))
    assert prefetch(a, "nonroot/hello").returncode == 0
    nixery("export", "--storage-path", str(a), "-o", str(delta), "--since", str(full))

    # Instance B refuses damaged or incomplete bundles, and stays as it was.
    b = tmp_path / "b"
    nixery("import", "--storage-path", str(b), str(full))
    before = store_state(b)
    data = full.read_bytes()
    flipped, truncated = tmp_path / "flipped.tar", tmp_path / "truncated.tar"
    middle = len(data) // 2
    flipped.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:])
    truncated.write_bytes(data[: len(data) - 3000])
    fresh = tmp_path / "fresh"
    for bad, why in ((flipped, "damaged"), (truncated, "truncated"), (delta, "base")):
        for target in (b, fresh):
            if bad is delta and target is b:
                continue  # b has the base: that one imports
            refused = nixery("import", "--storage-path", str(target), str(bad), check=False)
            assert refused.returncode != 0, bad
            assert "nothing imported" in refused.stderr and why in refused.stderr, refused.stderr
    assert store_state(b) == before
    assert maintenance.fsck(b) == [] and maintenance.fsck(fresh) == []
    assert nixery("ls", "--storage-path", str(fresh), "--json").stdout == ""

    # A base and its delta in one go.
    nixery("import", "--storage-path", str(fresh), str(full), str(delta))

    # Served offline, with no Nix; the delta is imported beside the running
    # server, and what it brings is served at once.
    empty = tmp_path / "no-bin"
    empty.mkdir()
    with start_server(tmp_path / "serve", source=(), storage=b, env={"PATH": str(empty)},
                      extra=("--offline", "1", "--workers", "2")) as mirror:  # fmt: skip
        host = mirror.host
        nonroot_url = f"{mirror.url}/v2/nonroot/hello/manifests/latest"
        before_delta = httpx.get(nonroot_url, timeout=60)
        assert before_delta.status_code == 404
        assert before_delta.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        nixery("import", "--storage-path", str(b), str(delta))
        for _ in range(2):  # no worker remembered the miss
            assert httpx.get(nonroot_url, timeout=60).status_code == 200

        def held(store: Path) -> list[tuple[str, str, str, int]]:
            return [(i["name"], i["tag"], i["digest"], i["size"])
                    for i in map(json.loads, store_state(store)[1])]  # fmt: skip

        assert held(fresh) == held(b)
        refs = [name for name, *_ in held(b)]
        # ls on the mirror tells when instance A first built each tag.
        listed_a = nixery("ls", "--storage-path", str(a), "--json").stdout.splitlines()
        created_a = {i["name"]: i["created"] for i in map(json.loads, listed_a)}
        created_b = {i["name"]: i["created"] for i in map(json.loads, store_state(b)[1])}
        assert created_b == created_a
        assert refs == ["hello", "nonroot/hello", "shell/hello", "zstd/hello"]
        assert maintenance.fsck(b) == []

        # Every client pulls all four, and runs them.
        for name in refs:
            skopeo_copy(host, f"{name}:latest", tmp_path / f"oci-{name.replace('/', '-')}")
        rootfs = umoci_unpack(tmp_path / "oci-hello", tmp_path / "unpacked")
        assert chroot(rootfs, "/bin/hello").stdout == "Hello, world!\n"
        for name in refs:
            containerd.ctr("image", "pull", "--plain-http", f"{host}/{name}:latest")
            dockerd.docker("pull", f"{host}/{name}:latest")
        containerd.ctr("image", "pull", "--plain-http", "--platform", "linux/arm64",
                       f"{host}/hello:latest")  # fmt: skip
        ran = containerd.ctr("run", "--rm", "--platform", "linux/arm64", f"{host}/hello:latest",
                             "mirror-arm64", timeout=120)  # fmt: skip
        assert ran.stdout.strip() == "Hello, world!"
        nonroot = f"{host}/nonroot/hello"
        ran_docker = dockerd.docker("run", "--rm", "--network", "none", nonroot, timeout=120)
        assert ran_docker.stdout == "Hello, world!\n"
        inspected = json.loads(dockerd.docker("image", "inspect", nonroot).stdout)[0]
        assert inspected["Config"]["User"] == "65532:65532"
        with tempfile.TemporaryDirectory(prefix="pm", dir="/tmp") as workdir:
            for name in refs:
                podman(Path(workdir), "pull", "--tls-verify=false", f"{host}/{name}:latest")
            result = podman(Path(workdir), "run", "--rm", "--network", "none",
                            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
                            f"{host}/zstd/hello:latest", timeout=120)  # fmt: skip
            assert result.stdout == "Hello, world!\n"
        assert mirror.count("nix.build") == 0


def nix(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300,
                          env=nix_env()).stdout  # fmt: skip


def test_nix_substitutes_an_image_closure_from_a_file_binary_cache(tmp_path: Path) -> None:
    """The Nix side of an air gap (docs/airgap.md): a closure copied into a
    ``file://`` binary cache, gone from the store, comes back from the cache
    with no builder run (``max-jobs = 0`` forbids local builds)."""
    demo = tmp_path / "demo"
    shutil.copytree(DEMO, demo, symlinks=True)
    (demo / "test-nonce").write_text(secrets.token_hex(8))  # `slow`, new to this store
    built = prefetch(tmp_path / "a", "slow", pkgs=demo)
    assert built.returncode == 0, built.stderr
    slow = nix("nix-build", "--no-out-link", str(demo), "-A", "slow").strip()
    # The package and what prepare-image made of it (forest, closure graph, result).
    paths = nix("nix-store", "--query", "--referrers-closure", slow).split()
    assert len(paths) >= 4
    cache = tmp_path / "cache"
    nix("nix", "--extra-experimental-features", "nix-command", "copy", "--to",
        f"file://{cache}", *paths)  # fmt: skip
    nix("nix-store", "--delete", *paths)
    assert not Path(slow).exists()

    no_builds = "max-jobs = 0\nrequire-sigs = false\n"
    without = {"NIX_CONFIG": "substituters =\n" + no_builds}
    with start_server(tmp_path / "b0", source=("--pkgs-path", str(demo)), env=without,
                      extra=("--workers", "1")) as server:  # fmt: skip
        refused = httpx.get(f"{server.url}/v2/slow/manifests/latest", timeout=120)
        # Nothing to substitute, and building is not allowed: Nix says so.
        assert refused.status_code == 500, refused.text
        assert "unable to start any build" in refused.json()["errors"][0]["message"]
    with_cache = {"NIX_CONFIG": f"substituters = file://{cache}\n" + no_builds}
    with start_server(tmp_path / "b1", source=("--pkgs-path", str(demo)), env=with_cache,
                      extra=("--workers", "1")) as server:  # fmt: skip
        pulled = httpx.get(f"{server.url}/v2/slow/manifests/latest", timeout=120,
                           headers={"Accept": EVERYTHING})  # fmt: skip
        assert pulled.status_code == 200, pulled.text
    assert Path(slow).exists()
    assert pulled.headers["docker-content-digest"] == printed_digests(built.stdout)[
        "slow:latest"
    ]["oci manifest"]
