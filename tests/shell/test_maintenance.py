"""fsck and gc on real stores built with the real writer and caches."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixery_trio.build import archive
from nixery_trio.core.digest import sha256_digest
from nixery_trio.core.image import Arch
from nixery_trio.core.manifest import Format, LayerBlob, build_config, build_manifest
from nixery_trio.ops.maintenance import fsck, gc, parse_size
from nixery_trio.store.cache import LayerCache, ManifestCache, TagCache
from nixery_trio.store.cas import CAS
from nixery_trio.store.inventory import held_images


@dataclass
class Image:
    manifest: str
    oci: str
    config: str
    layers: list[LayerBlob]

    @property
    def recorded(self) -> dict[Format, str]:
        return {Format.DOCKER: self.manifest, Format.OCI: self.oci}


class Store:
    def __init__(self, root: Path, files: Path) -> None:
        self.root = root
        self.files = files
        self.cas = CAS(root)
        self.cas.open_store()
        self.layers = LayerCache(self.cas)
        self.manifests = ManifestCache(self.cas)
        self.layers.index.open_index()
        self.manifests.index.open_index()

    def layer(self, name: str, size: int, compression: str = "gzip") -> LayerBlob:
        path = self.files / "nix" / "store" / (name[0] * 32 + "-" + name)
        path.mkdir(parents=True, exist_ok=True)
        (path / "data").write_bytes(os.urandom(size))
        entries = archive.store_path_entries([str(path)])
        blob = archive.write_layer(self.cas, entries, 1, compression=compression)
        self.layers.put(name, blob)
        return blob

    def image(self, key: str, layers: list[LayerBlob]) -> Image:
        config = build_config(arch=Arch.AMD64, layers=layers)
        config_digest = self.cas.put_bytes(config)
        docker, oci = (
            self.cas.put_bytes(
                build_manifest(
                    config_digest=config_digest, config_size=len(config), layers=layers, fmt=fmt
                )
            )
            for fmt in (Format.DOCKER, Format.OCI)
        )
        image = Image(docker, oci, config_digest, layers)
        self.manifests.put(key, image.recorded)
        return image

    def age(self, digest: str, seconds_ago: float) -> None:
        when = 1_000_000 - seconds_ago
        os.utime(self.cas.path(digest), (when, when))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", tmp_path / "files")


def test_a_healthy_store_is_clean(store: Store) -> None:
    shared = store.layer("shared", 5000)
    store.image("one", [shared, store.layer("one", 3000)])
    assert fsck(store.root) == []


def test_fsck_finds_and_repairs_every_kind_of_damage(store: Store) -> None:
    shared = store.layer("shared", 5000)
    own = store.layer("own", 3000)
    image = store.image("img", [shared, own])
    other = store.image("other", [shared])
    # A corrupt layer blob: the layer record and the manifest naming it go too.
    own_path = store.cas.path(own.digest)
    damaged = bytearray(own_path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    own_path.write_bytes(bytes(damaged))
    # A torn record.
    torn = store.root / "index" / "layers" / store.layers.index.name("shared")
    torn.write_bytes(torn.read_bytes()[:-2])
    # A stale temporary file and a foreign file among the blobs.
    stale = store.cas.tmp_dir / "old.part"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    (store.cas.blob_dir / "not-a-digest").write_bytes(b"?")

    findings = fsck(store.root)
    kinds = sorted((f.kind, f.name) for f in findings)
    assert ("blob", own.digest) in kinds
    assert ("tmp", "old.part") in kinds
    assert ("blob", "not-a-digest") in kinds
    assert sum(f.kind == "layer-record" for f in findings) == 2  # torn + corrupt blob
    assert sum(f.kind == "manifest-record" for f in findings) == 1  # "img" only
    assert not any(f.repaired for f in findings)
    assert own_path.exists()  # without --repair nothing changes

    repaired = fsck(store.root, repair=True)
    assert [str(f) for f in repaired] == [str(f).replace("(found)", "(removed)") for f in findings]
    assert not own_path.exists() and not stale.exists()
    assert fsck(store.root) == []
    assert store.manifests.get("img") is None
    assert store.manifests.get("other") == other.recorded
    assert image.manifest  # the blob stays; only its record was untrustworthy


def test_fsck_checks_diff_ids(store: Store) -> None:
    blob = store.layer("layer", 1000)
    store.layers.put("layer", LayerBlob(blob.digest, "sha256:" + "0" * 64, blob.size))
    (finding,) = fsck(store.root)
    assert finding.kind == "layer-record" and "diff_id" in finding.problem


def test_fsck_checks_zstd_layers_too(store: Store) -> None:
    blob = store.layer("zstd", 3 * archive.BLOCK_SIZE, compression="zstd")
    assert fsck(store.root) == []
    path = store.cas.path(blob.digest)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    store.layers.put("zstd", LayerBlob(sha256_digest(path.read_bytes()), blob.diff_id,
                                       path.stat().st_size))  # fmt: skip
    path.rename(store.cas.path(sha256_digest(path.read_bytes())))
    (finding,) = fsck(store.root)
    assert "diff_id" in finding.problem and "(None)" in finding.problem


def test_fsck_and_gc_look_after_tag_records(store: Store) -> None:
    image = store.image("img", [store.layer("one", 3000)])
    tags = TagCache(store.cas)
    tags.index.open_index()
    tags.put("hello", "latest", image.recorded, index=False, platforms=["linux/amd64"])
    tags.put("gone", "latest", {Format.OCI: "sha256:" + "a" * 64}, index=False, platforms=[])
    (finding,) = fsck(store.root)
    assert finding.kind == "tag-record" and "missing" in finding.problem
    assert [(h.name, h.tag) for h in held_images(store.cas)] == [
        ("gone", "latest"), ("hello", "latest")
    ]  # fmt: skip
    fsck(store.root, repair=True)
    assert fsck(store.root) == []
    # gc of the image's blobs drops the tag record naming its manifest too.
    layers = [layer.digest for layer in image.layers]
    for digest in (image.manifest, image.oci, image.config, *layers):
        store.age(digest, 10_000)
    report = gc(store.root, max_size=0, grace=60, now=1_000_000)
    assert report.records_removed >= 2 and tags.get("hello", "latest") is None
    assert fsck(store.root) == [] and held_images(store.cas) == []


def test_gc_removes_least_recently_used_images_first(store: Store) -> None:
    shared = store.layer("shared", 20_000)
    old = store.image("old", [shared, store.layer("old", 20_000)])
    new = store.image("new", [shared, store.layer("new", 20_000)])
    for digest in (old.manifest, old.oci, old.config, *(layer.digest for layer in old.layers)):
        store.age(digest, 7200)
    for digest in (new.manifest, new.oci, new.config, new.layers[1].digest):
        store.age(digest, 3600)
    total = sum(f.stat().st_size for f in store.cas.blob_dir.iterdir())
    old_only = [old.manifest, old.oci, old.config, old.layers[1].digest]
    limit = total - sum(store.cas.path(d).stat().st_size for d in old_only)

    report = gc(store.root, limit, grace=60, now=1_000_000)
    removed = set(report.removed)
    assert removed == set(old_only)
    # The old image goes (manifests first), but not the layer the newer one shares.
    assert set(report.removed[:2]) == {old.manifest, old.oci}
    assert old.layers[1].digest in removed
    assert shared.digest not in removed
    assert store.manifests.get("old") is None and store.layers.get("old") is None
    assert store.manifests.get("new") == new.recorded
    assert fsck(store.root) == []
    assert report.size_after == limit


def test_gc_keeps_what_was_used_within_the_grace_period(store: Store) -> None:
    image = store.image("img", [store.layer("a", 10_000)])
    report = gc(store.root, 0, grace=3600)
    assert report.removed == []
    assert report.kept_recent == 4
    assert store.manifests.get("img") == image.recorded


def test_gc_below_the_limit_does_nothing(store: Store) -> None:
    store.image("img", [store.layer("a", 10_000)])
    report = gc(store.root, 10**9, grace=0)
    assert report.removed == [] and report.size_after == report.size_before


@pytest.mark.parametrize(
    ("text", "size"),
    [("123", 123), ("10K", 10_000), ("1.5GB", 1_500_000_000), ("512MiB", 512 << 20),
     ("2 gib", 2 << 30)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10X", "-1G", "1..2M"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_cli_exit_codes(store: Store) -> None:
    blob = store.layer("x", 100)
    store.cas.path(blob.digest).write_bytes(b"corrupt")
    cli = [sys.executable, "-m", "nixery_trio"]
    check = subprocess.run([*cli, "fsck", "--storage-path", str(store.root)],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 1 and blob.digest in check.stdout
    repair = subprocess.run([*cli, "fsck", "--repair", "--storage-path", str(store.root)],
                            capture_output=True, text=True)  # fmt: skip
    assert repair.returncode == 0 and "removed" in repair.stdout
    bad = subprocess.run([*cli, "gc", "--storage-path", str(store.root), "--max-size", "lots"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "not a size" in bad.stderr
    hasty = subprocess.run([*cli, "gc", "--storage-path", str(store.root), "--max-size", "0",
                            "--grace", "5"], capture_output=True, text=True)  # fmt: skip
    assert hasty.returncode == 2 and "--grace" in hasty.stderr


def test_store_commands_read_the_same_settings_as_serve(store: Store, tmp_path: Path) -> None:
    """--config and STORAGE_PATH mean the same to fsck, gc and ls as to serve."""
    blob = store.layer("x", 100)
    store.cas.path(blob.digest).write_bytes(b"corrupt")
    toml = tmp_path / "config.toml"
    # A serve setting in the file is fine for fsck; it reads only the store's path.
    toml.write_text(f'storage_path = "{store.root}"\npkgs_path = "/srv/pkgs"\nworkers = 4\n')
    cli = [sys.executable, "-m", "nixery_trio"]
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_PATH", "NIXERY_CONFIG")}
    check = subprocess.run([*cli, "fsck", "--config", str(toml)], capture_output=True,
                           text=True, env=env)  # fmt: skip
    assert check.returncode == 1 and blob.digest in check.stdout
    via_env = subprocess.run([*cli, "fsck"], capture_output=True, text=True,
                             env={**env, "NIXERY_CONFIG": str(toml)})  # fmt: skip
    assert via_env.returncode == 1 and blob.digest in via_env.stdout
    # The environment wins over the file, a flag over both.
    empty = tmp_path / "empty"
    empty.mkdir()
    over = subprocess.run([*cli, "fsck", "--config", str(toml)], capture_output=True, text=True,
                          env={**env, "STORAGE_PATH": str(empty)})  # fmt: skip
    assert over.returncode == 0 and "0 problem(s)" in over.stdout
    flag = subprocess.run([*cli, "ls", "--config", str(toml), "--storage-path", str(empty),
                           "--json"], capture_output=True, text=True, env=env)  # fmt: skip
    assert flag.returncode == 0 and flag.stdout == ""
    toml.write_text('storage_path = "/x"\nstorage = "/y"\n')
    typo = subprocess.run([*cli, "gc", "--config", str(toml), "--max-size", "1G"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert typo.returncode == 1 and "unknown setting 'storage'" in typo.stderr
    unset = subprocess.run([*cli, "ls"], capture_output=True, text=True, env=env)
    assert unset.returncode == 1 and "STORAGE_PATH must be set" in unset.stderr


def test_settings_command_says_where_each_value_came_from(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('storage_path = "/s"\nnix_timeout = 5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIX_", "NIXERY_"))}
    shown = subprocess.run(
        [sys.executable, "-m", "nixery_trio", "settings", "--config", str(toml), "--workers", "3"],
        capture_output=True, text=True, env={**env, "NIXERY_OCI": "0"}, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert f'nix_timeout = "5"  # nix_timeout in {toml}' in shown
    assert 'workers = "3"  # --workers' in shown
    assert 'oci = "0"  # NIXERY_OCI' in shown
    assert 'drain_timeout = "30"  # default' in shown


def test_settings_command_never_prints_the_bucket_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NIX_", "NIXERY_", "AWS_"))}
    secret = "wJalrXUtnFEMI-not-for-your-eyes"
    shown = subprocess.run(
        [sys.executable, "-m", "nixery_trio", "settings", "--storage-backend", "s3"],
        capture_output=True, text=True, check=True,
        env={**env, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": secret},
    ).stdout  # fmt: skip
    assert 's3_access_key_id = "AKIDEXAMPLE"  # AWS_ACCESS_KEY_ID' in shown
    assert 's3_secret_access_key = "(hidden)"  # AWS_SECRET_ACCESS_KEY' in shown
    assert secret not in shown
