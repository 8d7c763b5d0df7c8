"""The CAS, the caches and the one-pass layer writer on a real filesystem."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from nixery_trio import archive
from nixery_trio.cache import LayerCache, ManifestCache, RecordIndex
from nixery_trio.cas import CAS
from nixery_trio.errors import StorageError
from nixery_trio.manifest import LayerBlob


@pytest.fixture
def cas(tmp_path: Path) -> CAS:
    store = CAS(tmp_path / "store")
    store.open_store()
    return store


@pytest.fixture
def store_paths(tmp_path: Path) -> list[str]:
    """Two fake store paths with files, a symlink, a nested dir and a big file."""
    root = tmp_path / "nix" / "store"
    a = root / "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-alpha"
    b = root / "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-beta"
    (a / "bin").mkdir(parents=True)
    (a / "bin" / "alpha").write_text("#!/bin/sh\necho alpha\n")
    (a / "bin" / "alpha").chmod(0o555)
    (a / "share" / "deep" / ("long-name-" * 12)).mkdir(parents=True)
    (a / "share" / "deep" / ("long-name-" * 12) / "f").write_bytes(os.urandom(3000))
    (b / "lib").mkdir(parents=True)
    (b / "lib" / "big").write_bytes(os.urandom(3 * archive.BLOCK_SIZE + 17))
    (b / "lib" / "link").symlink_to("big")
    (b / "empty").write_bytes(b"")
    return [str(b), str(a)]  # unsorted on purpose


def test_put_bytes_is_content_addressed(cas: CAS) -> None:
    digest = cas.put_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert cas.read_bytes(digest, 100) == b"hello"
    assert cas.read_bytes(digest, 2) is None
    assert cas.put_bytes(b"hello") == digest
    assert list(cas.digests()) == [digest]
    assert list(cas.tmp_dir.iterdir()) == []


def test_leftover_temporary_files_are_removed(cas: CAS) -> None:
    (cas.tmp_dir / "x.part").write_bytes(b"torn")
    assert cas.open_store() == 1
    assert list(cas.tmp_dir.iterdir()) == []


def test_failed_write_leaves_nothing(cas: CAS) -> None:
    with pytest.raises(StorageError), cas.writer() as w:
        w.file.write(b"partial")
        raise OSError(28, "No space left on device")
    assert list(cas.tmp_dir.iterdir()) == []
    assert list(cas.digests()) == []


def _layer_bytes(cas: CAS, blob: LayerBlob) -> bytes:
    return cas.path(blob.digest).read_bytes()


def test_layer_is_valid_deterministic_and_hashed_once(cas: CAS, store_paths: list[str]) -> None:
    blob = archive.write_layer(cas, archive.store_path_entries(store_paths), level=1)
    data = _layer_bytes(cas, blob)
    assert blob.size == len(data)
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    tar_bytes = gzip.decompress(data)
    assert blob.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    subprocess.run(["gzip", "-t"], input=data, check=True)

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    prefix = [p.lstrip("/") for p in sorted(store_paths)]
    assert names[:2] == ["nix", "nix/store"]
    assert names.index(prefix[0]) < names.index(prefix[1])
    assert all(m.mtime == 1 and m.uid == 0 and m.gid == 0 and not m.uname for m in members)
    by_name = {m.name: m for m in members}
    assert by_name[prefix[1] + "/lib/link"].issym()
    assert by_name[prefix[1] + "/lib/link"].linkname == "big"
    assert by_name[prefix[0] + "/bin/alpha"].mode == 0o555
    big = Path(store_paths[0]) / "lib" / "big"
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        extracted = tar.extractfile(prefix[1] + "/lib/big")
        assert extracted is not None
        assert extracted.read() == big.read_bytes()

    again = archive.write_layer(cas, archive.store_path_entries(list(reversed(store_paths))), 1)
    assert again == blob


def test_forest_layer_maps_to_root_with_tmp(cas: CAS, tmp_path: Path) -> None:
    forest = tmp_path / "forest"
    (forest / "bin").mkdir(parents=True)
    (forest / "bin" / "hello").symlink_to("/nix/store/x-hello/bin/hello")
    (forest / "manifest.nix").symlink_to("/nix/store/y-env-manifest.nix")
    (forest / "usr" / "bin").mkdir(parents=True)
    (forest / "usr" / "bin" / "env").symlink_to("/bin/env")
    blob = archive.write_layer(cas, archive.forest_entries(str(forest)), 1)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_layer_bytes(cas, blob)))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "manifest.nix" not in members
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["bin/hello"].linkname == "/nix/store/x-hello/bin/hello"
    assert members["usr/bin/env"].linkname == "/bin/env"


def test_record_index_ignores_torn_and_foreign_records(tmp_path: Path, cas: CAS) -> None:
    index = RecordIndex(tmp_path / "idx", cas.tmp_dir)
    index.open_index()
    index.put("k", {"v": 1})
    assert index.get("k") == {"v": 1, "key": "k"}
    path = index._path("k")
    path.write_bytes(path.read_bytes()[:-3])  # torn
    assert index.get("k") is None
    assert not path.exists()
    index.put("other", {"v": 2})
    os.rename(index._path("other"), path)  # a record under the wrong name
    assert index.get("k") is None


def test_caches_never_point_at_missing_blobs(tmp_path: Path, cas: CAS) -> None:
    layers = LayerCache(tmp_path / "store", cas)
    manifests = ManifestCache(tmp_path / "store", cas)
    layers.index.open_index()
    manifests.index.open_index()
    digest = cas.put_bytes(b"layer")
    blob = LayerBlob(digest=digest, diff_id=digest, size=5)
    layers.put("key", blob)
    manifests.put("image", digest)
    assert layers.get("key") == blob
    assert manifests.get("image") == digest
    layers.put("wrong-size", LayerBlob(digest=digest, diff_id=digest, size=6))
    assert layers.get("wrong-size") is None
    cas.path(digest).unlink()
    assert layers.get("key") is None
    assert manifests.get("image") is None
