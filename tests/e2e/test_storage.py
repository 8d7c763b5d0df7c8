"""The storage conformance suite: what every backend of ``store/storage.py`` must do.

Each test runs once per backend: the filesystem CAS, and an S3 bucket on
each of two real S3 servers started by the tests, SeaweedFS and Ceph's
RADOS Gateway.  As CNCF distribution does for its storage drivers, a new
backend is done when it passes these.  (What the two S3 servers do
differently from AWS, and what that means for the registry, is in
tests/e2e/test_s3_bucket.py and docs/storage.md.)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nixery_trio.build import archive
from nixery_trio.core.digest import sha256_digest
from nixery_trio.core.errors import BlobUnknown, RangeNotSatisfiable
from nixery_trio.core.manifest import Format, LayerBlob
from nixery_trio.store.cache import LayerCache, ManifestCache, RecordIndex, TagCache
from nixery_trio.store.cas import CAS
from nixery_trio.store.storage import RECORD_KINDS, Storage

from .ceph import Ceph
from .s3test import ACCESS_KEY, REGION, SECRET_KEY
from .seaweed import Seaweed

MiB = 1 << 20


@pytest.fixture(params=["filesystem", "seaweedfs", "ceph"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """An empty, opened store of each backend (the s3 one on each S3 server)."""
    if request.param == "filesystem":
        store: Storage = CAS(tmp_path / "store")
    else:
        from nixery_trio.store.s3 import S3Bucket
        from nixery_trio.store.s3store import S3Store

        server: Seaweed | Ceph = request.getfixturevalue(
            "seaweed" if request.param == "seaweedfs" else "ceph"
        )
        bucket = S3Bucket(server.endpoint, server.create_bucket(), ACCESS_KEY, SECRET_KEY,
                          REGION)  # fmt: skip
        store = S3Store(bucket, tmp_path / "local")
    store.open_store(clean=True)
    for kind in RECORD_KINDS:
        store.records(kind).open_files()
    yield store


def leftovers(store: Storage) -> list[str]:
    """What a store holds besides its blobs and records: temporary files, or
    objects and multipart uploads outside ``blobs/`` and ``index/``."""
    if isinstance(store, CAS):
        return sorted(os.listdir(store.tmp_dir))
    from nixery_trio.store.s3store import S3Store

    assert isinstance(store, S3Store)
    bucket = store.bucket
    keys = [key for key in bucket.list("") if not key.startswith(("blobs/", "index/", "used/"))]
    uploads = bucket._client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads", [])
    return keys + [f"upload of {upload['Key']}" for upload in uploads]


def stored(store: Storage) -> list[str]:
    """The digests of every blob in the store."""
    return ["sha256:" + entry.name for entry in store.blob_entries()]


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ from block to block (so no compression or
    deduplication makes a mistake look right)."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def stream(store: Storage, data: bytes, piece: int = 3 * MiB + 17) -> str:
    """Write ``data`` through a blob writer in pieces; commit it; its digest."""
    digest = sha256_digest(data)
    with store.writer() as blob:
        for start in range(0, len(data), piece):
            blob.write(data[start : start + piece])
        blob.commit(digest)
    return digest


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 20 * MiB + 5])
def test_a_streamed_blob_reads_back_whole(storage: Storage, size: int) -> None:
    """Sizes: empty, tiny, under one S3 part, and three parts (a copy to its name)."""
    data = pattern(size, seed=size)
    digest = stream(storage, data)
    assert storage.size(digest) == size
    assert storage.read_bytes(digest, size) == data
    assert list(stored(storage)) == [digest]
    assert leftovers(storage) == []


def test_a_blob_is_invisible_until_committed(storage: Storage) -> None:
    data = pattern(20 * MiB, seed=1)
    digest = sha256_digest(data)
    with storage.writer() as blob:
        blob.write(data)
        assert storage.size(digest) is None
        assert list(stored(storage)) == []
        blob.commit(digest)
    assert storage.size(digest) == len(data)


@pytest.mark.parametrize("size", [1000, 20 * MiB])
def test_a_writer_left_without_commit_leaves_nothing(storage: Storage, size: int) -> None:
    with pytest.raises(RuntimeError), storage.writer() as blob:
        blob.write(pattern(size))
        raise RuntimeError("the layer writer failed")
    with storage.writer() as blob:
        blob.write(pattern(size))  # and one simply not committed
    assert list(stored(storage)) == []
    assert leftovers(storage) == []


def test_small_blobs(storage: Storage) -> None:
    documents = [b'{"config": 1}', b'{"manifest": 2}', b'{"manifest": 2}']
    digests = storage.put_many(documents)
    assert digests == [sha256_digest(d) for d in documents]
    assert storage.put_bytes(b'{"config": 1}') == digests[0]
    assert sorted(stored(storage)) == sorted(set(digests))
    assert storage.read_bytes(digests[1], limit=100) == b'{"manifest": 2}'
    assert storage.read_bytes(digests[1], limit=5) is None  # over the limit
    missing = sha256_digest(b"never stored")
    assert storage.read_bytes(missing, limit=100) is None
    assert storage.size(missing) is None


def test_ranges(storage: Storage) -> None:
    data = pattern(9 * MiB, seed=2)
    digest = stream(storage, data)
    for first, last in [(0, 0), (0, len(data) - 1), (5, 5000), (8 * MiB - 3, 8 * MiB + 3),
                        (len(data) - 1, len(data) - 1)]:  # fmt: skip
        assert b"".join(storage.stream(digest, first, last)) == data[first : last + 1]
    with pytest.raises(RangeNotSatisfiable):
        b"".join(storage.stream(digest, len(data), len(data) + 10))
    with pytest.raises(BlobUnknown):
        b"".join(storage.stream(sha256_digest(b"never stored"), 0, 1))
    with pytest.raises(BlobUnknown):
        b"".join(storage.stream(sha256_digest(b"never stored")))


def test_delete(storage: Storage) -> None:
    keep, drop = storage.put_many([b"keep", b"drop"])
    storage.delete(drop)
    storage.delete(drop)  # gone already: no error
    assert storage.size(drop) is None
    assert storage.read_bytes(drop, 100) is None
    assert list(stored(storage)) == [keep]
    # Stored again after a delete, it is there again.
    storage.put_bytes(b"drop")
    assert storage.size(drop) == 4


def test_racing_writers_of_one_blob_agree(storage: Storage) -> None:
    data = pattern(12 * MiB, seed=3)
    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(lambda _: stream(storage, data), range(4)))
    assert set(digests) == {sha256_digest(data)}
    assert storage.read_bytes(digests[0], len(data)) == data
    assert leftovers(storage) == []


def test_the_one_pass_layer_writer_streams_into_the_store(
    storage: Storage, tmp_path: Path
) -> None:
    """A real layer (tar, gzip, two hashes in one pass) of about 24 MiB: on S3,
    several parts, then a copy to its digest's name."""
    package = tmp_path / "nix" / "store" / ("a" * 32 + "-package")
    package.mkdir(parents=True)
    for index in range(3):
        (package / f"file{index}").write_bytes(os.urandom(8 * MiB))  # incompressible
    layer = archive.write_layer(storage, archive.store_path_entries([str(package)]), level=1)
    data = storage.read_bytes(layer.digest, 64 * MiB)
    assert data is not None and len(data) == layer.size > 24 * MiB
    assert sha256_digest(data) == layer.digest
    assert leftovers(storage) == []


def test_records(storage: Storage) -> None:
    files = storage.records("layers")
    assert files.read("ab") is None
    files.write("ab", b"one")
    files.write("cd", b"two")
    files.write("ab", b"three")  # replaced whole
    assert files.read("ab") == b"three"
    assert files.may_have("ab")
    assert list(files.names()) == ["ab", "cd"]
    files.remove("ab")
    files.remove("ab")
    assert files.read("ab") is None
    assert list(files.names()) == ["cd"]
    # Namespaces are apart.
    assert list(storage.records("manifests").names()) == []


def test_record_index_drops_torn_and_foreign_records(storage: Storage) -> None:
    index = RecordIndex(storage.records("tags"))
    index.put("k", {"v": 1})
    assert index.get("k") == {"v": 1, "key": "k"}
    raw = index.files.read(index.name("k"))
    assert raw is not None
    index.files.write(index.name("k"), raw[:-3])  # torn
    assert index.get("k") is None
    assert index.files.read(index.name("k")) is None
    index.put("other", {"v": 2})
    other = index.files.read(index.name("other"))
    assert other is not None
    index.files.write(index.name("k"), other)  # a record under the wrong name
    assert index.get("k") is None
    assert [(name, record) for name, record in index.scan()] == [
        (index.name("other"), {"v": 2, "key": "other"})
    ]


def test_caches_never_point_at_missing_blobs(storage: Storage) -> None:
    layers, manifests, tags = LayerCache(storage), ManifestCache(storage), TagCache(storage)
    digest = storage.put_bytes(b"layer")
    blob = LayerBlob(digest=digest, diff_id=digest, size=5)
    layers.put("key", blob)
    manifests.put("image", {Format.DOCKER: digest}, name="hello")
    tags.put("hello", "latest", {Format.DOCKER: digest}, index=False, platforms=["linux/amd64"])
    assert layers.get("key") == blob
    assert manifests.get("image") == {Format.DOCKER: digest}
    assert manifests.names() == {"hello"}
    assert [r["name"] for r in tags.records()] == ["hello"]
    layers.put("wrong-size", LayerBlob(digest=digest, diff_id=digest, size=6))
    assert layers.get("wrong-size") is None
    storage.delete(digest)
    assert layers.get("key") is None
    assert manifests.get("image") is None
    assert tags.get("hello", "latest") is None


def test_listing_and_streaming_blobs(storage: Storage) -> None:
    small = storage.put_bytes(b"small")
    large = stream(storage, pattern(3 * MiB + 5, seed=4))
    empty = storage.put_bytes(b"")
    entries = {entry.name: entry for entry in storage.blob_entries()}
    assert {name: entry.size for name, entry in entries.items()} == {
        small[7:]: 5, large[7:]: 3 * MiB + 5, empty[7:]: 0
    }
    assert b"".join(storage.stream(large)) == pattern(3 * MiB + 5, seed=4)
    assert b"".join(storage.stream(empty)) == b""
    entries[small[7:]].remove()
    assert storage.size(small) is None
    assert sorted(stored(storage)) == sorted([large, empty])


def test_use_marks_move_last_use_forward(storage: Storage) -> None:
    digest = storage.put_bytes(b"manifest")
    if isinstance(storage, CAS):
        os.utime(storage.path(digest), (1_000_000, 1_000_000))  # long unused
    else:
        from nixery_trio.store.s3store import S3Store

        assert isinstance(storage, S3Store) and storage.last_use(digest) == 0
    before = time.time() - 2  # S3 keeps times to the second
    storage.used(digest)
    (entry,) = storage.blob_entries()
    assert entry.used >= before


def test_leftovers_of_a_crash_are_found_and_removed(storage: Storage) -> None:
    if isinstance(storage, CAS):
        (storage.tmp_dir / "dead.part").write_bytes(b"half a layer")
    else:
        from nixery_trio.store.s3store import S3Store

        assert isinstance(storage, S3Store)
        bucket = storage.bucket
        # A layer upload whose writer died: parts sent, never completed.
        bucket._client.create_multipart_upload(Bucket=bucket.bucket, Key="uploads/dead")
        bucket.put("uploads/copied-never", b"x")  # died between complete and copy
        bucket.put("leases/old", b"{}")  # a lease nobody renews
    assert list(storage.leftovers(older_than=3600)) == []  # young: maybe in progress
    time.sleep(1.1)
    found = list(storage.leftovers(older_than=1))
    assert found
    for leftover in found:
        leftover.remove()
    assert list(storage.leftovers(older_than=0)) == []
    assert leftovers(storage) == []


def _image(storage: Storage, name: str, layers: list[bytes]) -> tuple[str, list[str]]:
    """A small stored image (config, layers, manifest) recorded in the caches;
    its manifest digest and its blobs."""
    from nixery_trio.core.image import Arch
    from nixery_trio.core.manifest import build_config, build_manifest

    blobs = []
    for data in layers:
        compressed = gzip.compress(data, mtime=0)
        digest = storage.put_bytes(compressed)
        blob = LayerBlob(digest=digest, diff_id=sha256_digest(data), size=len(compressed))
        LayerCache(storage).put(f"layer {digest}", blob)
        blobs.append(blob)
    config = build_config(arch=Arch.AMD64, layers=blobs, cmd=None, user=None, history=[])
    config_digest = storage.put_bytes(config)
    manifest = build_manifest(config_digest=config_digest, config_size=len(config), layers=blobs,
                              fmt=Format.OCI, compression="gzip")  # fmt: skip
    manifest_digest = storage.put_bytes(manifest)
    ManifestCache(storage).put(f"image {name}", {Format.OCI: manifest_digest}, name=name)
    return manifest_digest, [manifest_digest, config_digest, *(b.digest for b in blobs)]


def test_fsck_on_every_backend(storage: Storage) -> None:
    from nixery_trio.ops import maintenance

    _, healthy = _image(storage, "healthy", [b"one", b"two"])
    _, damaged = _image(storage, "damaged", [b"three"])
    assert maintenance.fsck(storage) == []
    # A layer blob whose bytes are not its digest's.
    layer = damaged[-1]
    storage.delete(layer)
    if isinstance(storage, CAS):
        storage.path(layer).write_bytes(b"not the layer")
    else:
        from nixery_trio.store.s3store import S3Store, blob_key

        assert isinstance(storage, S3Store)
        storage.bucket.put(blob_key(layer), b"not the layer")
    findings = maintenance.fsck(storage)
    assert {(f.kind, f.repaired) for f in findings} == {
        ("blob", False), ("layer-record", False), ("manifest-record", False)
    }
    repaired = maintenance.fsck(storage, repair=True)
    assert all(f.repaired for f in repaired) and len(repaired) == 3
    assert maintenance.fsck(storage) == []
    assert storage.size(layer) is None
    assert all(storage.size(digest) is not None for digest in healthy)


def test_gc_on_every_backend(storage: Storage) -> None:
    from nixery_trio.ops import maintenance

    _, old = _image(storage, "old", [b"old layer" * 1000])
    _, recent = _image(storage, "recent", [b"recent layer" * 1000])
    # Everything was used just now: gc keeps it all, whatever the limit.
    report = maintenance.gc(storage, max_size=0, grace=120)
    assert report.removed == [] and report.kept_recent > 0
    # Later, only the recent image is served (its manifest is marked used).
    if isinstance(storage, CAS):
        for digest in old + recent:
            os.utime(storage.path(digest), (time.time() - 7200,) * 2)
    else:
        time.sleep(2.1)  # a bucket keeps object times to the second
    storage.used(recent[0])
    total = sum(storage.size(d) or 0 for d in recent)
    report = maintenance.gc(storage, max_size=total, grace=1.5)
    assert sorted(report.removed) == sorted(old)
    assert all(storage.size(d) is not None for d in recent)
    assert ManifestCache(storage).get("image old") is None
    assert maintenance.fsck(storage) == []
