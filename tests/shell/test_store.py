"""The CAS, the caches and the one-pass layer writer on a real filesystem."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import random
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.build import archive
from nixery_trio.config import make_config
from nixery_trio.core.errors import ConfigError, StorageError
from nixery_trio.core.manifest import Format, LayerBlob
from nixery_trio.store import cas as cas_module
from nixery_trio.store.cache import LayerCache, ManifestCache, RecordIndex
from nixery_trio.store.cas import CAS, DirectoryRecords


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


def stored(cas: CAS) -> list[str]:
    """The digests of every blob in the store."""
    return ["sha256:" + entry.name for entry in cas.blob_entries()]


def test_put_bytes_is_content_addressed(cas: CAS) -> None:
    digest = cas.put_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert cas.read_bytes(digest, 100) == b"hello"
    assert cas.read_bytes(digest, 2) is None
    assert cas.put_bytes(b"hello") == digest
    assert list(stored(cas)) == [digest]
    assert list(cas.tmp_dir.iterdir()) == []


def test_put_many_stores_each_blob_once_synced(
    cas: CAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    blobs = [b"config", b"manifest", b"config", b"index"]
    digests = cas.put_many(blobs)
    assert digests == ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    assert sorted(stored(cas)) == sorted(set(digests))
    assert [cas.read_bytes(d, 100) for d in digests] == blobs
    assert len(synced) == 3 + 1  # each new blob once, then the directory
    assert list(cas.tmp_dir.iterdir()) == []
    synced.clear()
    assert cas.put_many(blobs) == digests  # all there: nothing written or synced
    assert synced == []


def test_put_many_that_fails_leaves_nothing(cas: CAS, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError):
        cas.put_many([b"a", b"b"])
    assert list(cas.tmp_dir.iterdir()) == []
    assert list(stored(cas)) == []


def test_leftover_temporary_files_are_removed(cas: CAS) -> None:
    (cas.tmp_dir / "x.part").write_bytes(b"torn")
    assert cas.open_store() == 1
    assert list(cas.tmp_dir.iterdir()) == []


def test_failed_write_leaves_nothing(cas: CAS) -> None:
    with pytest.raises(StorageError), cas.writer() as w:
        w.file.write(b"partial")
        raise OSError(28, "No space left on device")
    assert list(cas.tmp_dir.iterdir()) == []
    assert list(stored(cas)) == []


class _ShortWrites:
    """A file whose writes take at most a few bytes, as an unbuffered write may."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        return self._file.write(data[:7])

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def test_blob_writes_are_whole_even_when_the_file_takes_part(cas: CAS) -> None:
    data = os.urandom(1000)
    with cas.writer() as w:
        w.file = _ShortWrites(w.file)  # type: ignore[assignment]
        assert w.write(data) == len(data)
        path = w.commit("sha256:" + hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data


def test_large_blobs_go_to_disk_while_they_are_written(
    cas: CAS, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    fdatasync = os.fdatasync
    monkeypatch.setattr(cas_module, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), fdatasync(fd))[1])
    data = os.urandom(5000)
    with cas.writer() as w:
        for start in range(0, len(data), 600):
            w.write(data[start : start + 600])
        path = w.commit("sha256:" + hashlib.sha256(data).hexdigest())
    assert synced
    assert path.read_bytes() == data
    assert list(cas.tmp_dir.iterdir()) == []


def test_a_failed_writeback_fails_the_blob(cas: CAS, monkeypatch: pytest.MonkeyPatch) -> None:
    # The error is reported once per open file: to the background fdatasync,
    # not again to the fsync of the commit, which must still fail.
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cas_module, "WRITEBACK_BYTES", 10)
    monkeypatch.setattr(os, "fdatasync", fail)
    data = b"x" * 100
    with pytest.raises(StorageError, match="Input/output error"), cas.writer() as w:
        w.write(data)
        w.commit("sha256:" + hashlib.sha256(data).hexdigest())
    assert list(cas.tmp_dir.iterdir()) == []
    assert list(stored(cas)) == []


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


def test_a_layer_is_announced_once_its_digest_is_known_and_before_it_is_stored(
    cas: CAS, store_paths: list[str]
) -> None:
    announced: list[tuple[LayerBlob, bool]] = []

    def ready(blob: LayerBlob) -> None:
        announced.append((blob, cas.size(blob.digest) is not None))

    blob = archive.write_layer(cas, archive.store_path_entries(store_paths), 1, ready=ready)
    assert announced == [(blob, False)]
    assert cas.size(blob.digest) == blob.size


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
    # Every root gets root and nobody, and root's home; nothing of nonroot's.
    passwd = tar_text(cas, blob, "etc/passwd")
    assert passwd.splitlines()[:2] == [
        "root:x:0:0:root:/root:/bin/sh",
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false",
    ]
    assert "nonroot" not in passwd and "home" not in members
    assert members["root"].isdir() and members["root"].mode == 0o700
    # Entries come in the order of a walk that sorts each directory.
    names = [m.name for m in tar_members(cas, blob)]
    assert names == sorted(names, key=lambda name: name.split("/"))


def test_forest_layer_for_nonroot_and_a_linked_etc(cas: CAS, tmp_path: Path) -> None:
    """A lone package's etc/ is a link in the forest: it becomes a directory of links,
    so that /etc/passwd goes in no linked directory; the user's home is theirs."""
    package_etc = tmp_path / "pkg" / "etc"
    (package_etc / "ssl").mkdir(parents=True)
    (package_etc / "group").write_text("wheel:x:10:\n")  # the package's own wins
    forest = tmp_path / "forest"
    forest.mkdir()
    (forest / "etc").symlink_to(package_etc)
    blob = archive.write_layer(cas, archive.forest_entries(str(forest), nonroot=True), 1)
    members = {m.name: m for m in tar_members(cas, blob)}
    assert members["etc"].isdir()
    assert members["etc/ssl"].linkname == str(package_etc / "ssl")
    assert members["etc/group"].linkname == str(package_etc / "group")
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh" in tar_text(
        cas, blob, "etc/passwd"
    )
    home = members["home/nonroot"]
    assert home.isdir() and (home.uid, home.gid, home.mode) == (65532, 65532, 0o700)
    again = archive.write_layer(cas, archive.forest_entries(str(forest), nonroot=True), 1)
    assert again == blob


def tar_members(cas: CAS, blob: LayerBlob) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_layer_bytes(cas, blob)))) as tar:
        return tar.getmembers()


def tar_text(cas: CAS, blob: LayerBlob, name: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_layer_bytes(cas, blob)))) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read().decode()


def test_record_index_ignores_torn_and_foreign_records(tmp_path: Path, cas: CAS) -> None:
    index = RecordIndex(DirectoryRecords(tmp_path / "idx", cas.tmp_dir))
    index.open_index()
    index.put("k", {"v": 1})
    assert index.get("k") == {"v": 1, "key": "k"}
    path = tmp_path / "idx" / index.name("k")
    path.write_bytes(path.read_bytes()[:-3])  # torn
    assert index.get("k") is None
    assert not path.exists()
    index.put("other", {"v": 2})
    os.rename(tmp_path / "idx" / index.name("other"), path)  # a record under the wrong name
    assert index.get("k") is None


def test_caches_never_point_at_missing_blobs(tmp_path: Path, cas: CAS) -> None:
    layers = LayerCache(cas)
    manifests = ManifestCache(cas)
    layers.index.open_index()
    manifests.index.open_index()
    digest = cas.put_bytes(b"layer")
    blob = LayerBlob(digest=digest, diff_id=digest, size=5)
    layers.put("key", blob)
    manifests.put("image", {Format.DOCKER: digest})
    assert layers.get("key") == blob
    assert manifests.get("image") == {Format.DOCKER: digest}
    layers.put("wrong-size", LayerBlob(digest=digest, diff_id=digest, size=6))
    assert layers.get("wrong-size") is None
    cas.path(digest).unlink()
    assert layers.get("key") is None
    assert manifests.get("image") is None


# --- the threaded deflate: the same bytes whatever the threads and their timing


@pytest.fixture
def multi_block_paths(tmp_path: Path) -> list[str]:
    """A store path spanning several deflate blocks: text, random data, many small files."""
    root = tmp_path / "nix" / "store" / "cccccccccccccccccccccccccccccccc-multi"
    (root / "small").mkdir(parents=True)
    rng = random.Random(7)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(500)]
    (root / "text").write_bytes(b" ".join(rng.choices(words, k=600_000)))
    (root / "noise").write_bytes(rng.randbytes(archive.BLOCK_SIZE + 4321))
    for i in range(300):
        (root / "small" / f"f{i:03}").write_bytes(rng.choice(words) * rng.randint(1, 400))
    return [str(root)]


def _layer(paths: list[str], deflate: archive.Deflate) -> tuple[bytes, LayerBlob]:
    out = io.BytesIO()
    blob = archive.write_layer_to(out, archive.store_path_entries(paths), deflate)
    return out.getvalue(), blob


def _out_of_order(compress: archive.BlockCompressor, blocks: int) -> archive.BlockCompressor:
    """Make every even-numbered block finish only after the block after it has."""
    lock = threading.Lock()
    calls = 0
    done: dict[int, threading.Event] = {}

    def held(block: memoryview, dictionary: bytes) -> tuple[bytes, int]:
        nonlocal calls
        with lock:
            index, calls = calls, calls + 1
            pair = done.setdefault(index // 2, threading.Event())
        result = compress(block, dictionary)
        if index % 2 == 0:
            if index + 1 < blocks:
                assert pair.wait(timeout=10)
        else:
            pair.set()
        return result

    return held


@pytest.mark.parametrize("engine", ["isal", "zlib"])
def test_threaded_deflate_is_byte_identical(
    multi_block_paths: list[str], engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    level = 1
    reference, blob = _layer(multi_block_paths, archive.Deflate(engine, level, threads=1))
    tar_bytes = gzip.decompress(reference)
    assert len(tar_bytes) > 3 * archive.BLOCK_SIZE
    assert blob.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert blob.digest == "sha256:" + hashlib.sha256(reference).hexdigest()
    subprocess.run(["gzip", "-t"], input=reference, check=True)
    listing = subprocess.run(["tar", "-tzf", "-"], input=reference, capture_output=True, check=True)
    assert listing.stdout.count(b"\n") == 2 + 2 + 300 + 2  # nix/store, 2 dirs, 302 files
    for threads, read_size in [(2, 4096), (3, archive.READ_SIZE), (8, 100_000)]:
        data, again = _layer(multi_block_paths, archive.Deflate(engine, level, threads, read_size))
        assert (data, again) == (reference, blob), (threads, read_size)

    # Blocks that finish out of order still come out in order.
    real = archive.block_compressor
    blocks = -(-len(tar_bytes) // archive.BLOCK_SIZE)
    monkeypatch.setattr(
        archive, "block_compressor", lambda e, lv: _out_of_order(real(e, lv), blocks)
    )
    data, again = _layer(multi_block_paths, archive.Deflate(engine, level, threads=2))
    assert (data, again) == (reference, blob)


def test_zstd_layers_are_the_same_tar_and_byte_identical_whatever_the_threads(
    multi_block_paths: list[str],
) -> None:
    gzipped, gzip_blob = _layer(multi_block_paths, archive.Deflate(threads=2))
    tar_bytes = gzip.decompress(gzipped)

    def zstd_layer(deflate: archive.Deflate) -> tuple[bytes, LayerBlob]:
        out = io.BytesIO()
        entries = archive.store_path_entries(multi_block_paths)
        blob = archive.write_layer_to(out, entries, deflate, "zstd")
        return out.getvalue(), blob

    reference, blob = zstd_layer(archive.Deflate(threads=1))
    assert reference[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert blob.digest == "sha256:" + hashlib.sha256(reference).hexdigest()
    assert blob.size == len(reference) < len(tar_bytes) // 2
    # The uncompressed tar is the gzip layer's, so the diff_id is shared.
    assert blob.diff_id == gzip_blob.diff_id
    unpacked = subprocess.run(["zstd", "-dc"], input=reference, capture_output=True, check=True)
    assert unpacked.stdout == tar_bytes
    # One frame per block, each saying its size: as many as the tar has blocks.
    sizes = []
    rest = reference
    while rest:
        sizes.append(zstandard.get_frame_parameters(rest).content_size)
        reader = zstandard.ZstdDecompressor().decompressobj()
        reader.decompress(rest)
        rest = reader.unused_data
    whole, last = divmod(len(tar_bytes), archive.BLOCK_SIZE)
    assert sizes == [archive.BLOCK_SIZE] * whole + ([last] if last else [])
    assert len(sizes) > 3
    for threads, read_size in [(2, 4096), (3, archive.READ_SIZE), (8, 100_000)]:
        again = zstd_layer(archive.Deflate(threads=threads, read_size=read_size))
        assert again == (reference, blob), (threads, read_size)
    with pytest.raises(ValueError, match="unknown compression"):
        archive.write_layer_to(io.BytesIO(), [], archive.Deflate(), "lz4")


def test_deflate_never_runs_on_the_calling_thread(
    multi_block_paths: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ISA-L would slow the caller's SHA-256 from then on (see archive._Blocks).
    one_block = tmp_path / "nix" / "store" / ("d" * 32 + "-tiny")
    one_block.mkdir(parents=True)
    (one_block / "f").write_bytes(b"tiny")
    deflating: set[int] = set()
    real = archive.block_compressor

    def recording(engine: str, level: int) -> archive.BlockCompressor:
        compress = real(engine, level)

        def deflate(block: memoryview, dictionary: bytes) -> tuple[bytes, int]:
            deflating.add(threading.get_ident())
            return compress(block, dictionary)

        return deflate

    monkeypatch.setattr(archive, "block_compressor", recording)
    threads = threading.active_count()
    for paths in (multi_block_paths, [str(one_block)]):
        for deflate in (archive.Deflate(threads=1), archive.Deflate(threads=2)):
            _layer(paths, deflate)
    assert deflating
    assert threading.get_ident() not in deflating
    assert threading.active_count() == threads


def test_a_failed_block_fails_the_layer_and_stops_its_threads(
    multi_block_paths: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(engine: str, level: int) -> archive.BlockCompressor:
        def deflate(block: memoryview, dictionary: bytes) -> tuple[bytes, int]:
            raise RuntimeError("deflate failed")

        return deflate

    threads = threading.active_count()
    with monkeypatch.context() as patch:
        patch.setattr(archive, "block_compressor", failing)
        with pytest.raises(RuntimeError, match="deflate failed"):
            _layer(multi_block_paths, archive.Deflate(threads=2))
    assert threading.active_count() == threads

    class Full:
        writes = 0

        def write(self, data: bytes) -> int:
            self.writes += 1
            if self.writes > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

    entries = archive.store_path_entries(multi_block_paths)
    with pytest.raises(OSError, match="No space left"):
        archive.write_layer_to(Full(), entries, archive.Deflate(threads=2))
    assert threading.active_count() == threads


def test_every_level_makes_a_valid_stream(multi_block_paths: list[str]) -> None:
    tar_bytes = None
    for level in archive.ENGINE_LEVELS["isal"]:
        data, _ = _layer(multi_block_paths, archive.Deflate("isal", level, threads=2))
        subprocess.run(["gzip", "-t"], input=data, check=True)
        tar_bytes = tar_bytes or gzip.decompress(data)
        assert gzip.decompress(data) == tar_bytes


def test_deflate_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown deflate engine"):
        archive.Deflate("lz4")
    with pytest.raises(ValueError, match="isal levels are 0 to 3"):
        archive.Deflate("isal", 6)
    with pytest.raises(ValueError, match="threads"):
        archive.Deflate(threads=0)


def test_deflate_knobs_come_from_the_configuration(tmp_path: Path) -> None:
    config = make_config(
        {
            "storage_path": str(tmp_path),
            "pkgs_path": str(tmp_path),
            "deflate_engine": "zlib",
            "gzip_level": "6",
            "deflate_threads": "3",
            "read_size": "65536",
        }
    )
    assert config.deflate == archive.Deflate("zlib", 6, 3, 65536)
    default = make_config({"storage_path": str(tmp_path), "pkgs_path": str(tmp_path)})
    assert default.deflate == archive.Deflate("isal", 2, os.cpu_count() or 1, archive.READ_SIZE)
    zlib_default = make_config(
        {"storage_path": str(tmp_path), "pkgs_path": str(tmp_path), "deflate_engine": "zlib"}
    )
    assert (zlib_default.deflate.engine, zlib_default.deflate.level) == ("zlib", 6)
    with pytest.raises(ConfigError, match="NIXERY_GZIP_LEVEL: must be between 0 and 3"):
        make_config({"storage_path": "/x", "pkgs_path": str(tmp_path), "gzip_level": "6"})
    with pytest.raises(ConfigError, match="NIXERY_DEFLATE_ENGINE"):
        make_config({"storage_path": "/x", "pkgs_path": str(tmp_path), "deflate_engine": "lz4"})


# --- tar headers: byte for byte what the standard library writes

_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/")
    | st.sampled_from(["\udcff", "é", "a"]),
    min_size=1,
    max_size=40,
)


@given(
    parts=st.lists(_names, min_size=1, max_size=6),
    kind=st.sampled_from(["dir", "file", "symlink"]),
    mode=st.integers(0, 0o7777),
    size=st.sampled_from([0, 1, 511, 512, 8**11 - 1, 8**11, 10**12]),
    link=_names | st.text(min_size=90, max_size=120),
)
def test_tar_headers_match_tarfile(
    parts: list[str], kind: str, mode: int, size: int, link: str
) -> None:
    name = "/".join(parts)
    info = tarfile.TarInfo(name + ("/" if kind == "dir" else ""))
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, 1, 0, 0, "", ""
    info.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}[kind]
    info.size = size if kind == "file" else 0
    info.linkname = link if kind == "symlink" else ""
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert archive.tar_header(name, kind, mode, info.size, info.linkname) == expected
