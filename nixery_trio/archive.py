"""Store paths to a gzipped tar layer in the CAS, in one pass.

::

    files ──read 1 MiB──▶ tar stream ──▶ sha256 (diff_id)
                              │
                              ▼ fixed-size blocks
                          deflate (ISA-L) ──▶ sha256 (digest) + byte count
                              │
                              ▼
                       CAS temporary file ──rename──▶ blobs/sha256/<digest>

Every byte of every file is read once and never held whole: the tar stream
is hashed as it is produced, cut into fixed-size blocks for the compressor
(so the gzip bytes do not depend on how reads happened to split the input),
and the compressed bytes are hashed, counted and written straight to a
temporary file in the CAS, renamed to its digest once complete.

The tar is deterministic: store paths in sorted order, entries sorted by
name within each directory, mtime 1 (as in the Nix store), uid and gid 0, no
user or group names; only directories, regular files and symlinks exist in
the store.  Entries of store path layers carry their full
``nix/store/<hash>-<name>/...`` path with the parent directories ``nix/`` and
``nix/store/``.  The symlink forest layer maps the forest's store path to the
image root instead, adds ``/tmp`` (mode 1777) and leaves out Nix's
``manifest.nix``.

The functions here block; the builder runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from isal import isal_zlib

from .cas import CAS
from .manifest import LayerBlob

#: Bytes handed to the compressor at a time; fixed so output is reproducible.
BLOCK_SIZE = 1 << 20
#: Bytes read from a file at a time.
READ_SIZE = 1 << 20
_MTIME = 1
_GZIP_WBITS = 16 + 15


@dataclass(frozen=True)
class Entry:
    """One tar entry: the name inside the layer and the file it comes from."""

    name: str
    source: str | None  # None for synthetic directories
    mode: int  # permission bits
    kind: str  # "dir", "file" or "symlink"


class _LayerSink:
    """Hashes the tar stream, compresses it in fixed blocks, hashes the gzip."""

    def __init__(self, out: object, level: int) -> None:
        self._write_out = out.write  # type: ignore[attr-defined]
        self.diff_id = hashlib.sha256()
        self.digest = hashlib.sha256()
        self.size = 0
        self._compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, _GZIP_WBITS)
        self._pending = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.diff_id.update(data)
        pending = self._pending
        pending += data
        if len(pending) >= BLOCK_SIZE:
            view = memoryview(pending)
            whole = len(pending) - len(pending) % BLOCK_SIZE
            for start in range(0, whole, BLOCK_SIZE):
                self._emit(self._compressor.compress(view[start : start + BLOCK_SIZE]))
            view.release()
            del pending[:whole]

    def _emit(self, compressed: bytes) -> None:
        if compressed:
            self.digest.update(compressed)
            self.size += len(compressed)
            self._write_out(compressed)

    def finish(self) -> None:
        if self._pending:
            self._emit(self._compressor.compress(bytes(self._pending)))
            self._pending.clear()
        self._emit(self._compressor.flush())


def store_path_entries(store_paths: Iterable[str]) -> Iterator[Entry]:
    """Entries for whole store paths at their own ``/nix/store`` location."""
    yield Entry("nix", None, 0o755, "dir")
    yield Entry("nix/store", None, 0o755, "dir")
    for path in sorted(store_paths):
        yield from _walk(path, path.lstrip("/"))


def forest_entries(forest: str) -> Iterator[Entry]:
    """Entries for the symlink forest placed at the image root, plus /tmp."""
    names = {name for name in os.listdir(forest) if name != "manifest.nix"} | {"tmp"}
    for name in sorted(names):
        if name == "tmp":
            yield Entry("tmp", None, 0o1777, "dir")
        else:
            yield from _walk(os.path.join(forest, name), name)


def _walk(source: str, name: str) -> Iterator[Entry]:
    st = os.lstat(source)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        yield Entry(name, source, 0o777, "symlink")
    elif stat.S_ISREG(st.st_mode):
        yield Entry(name, source, mode, "file")
    elif stat.S_ISDIR(st.st_mode):
        yield Entry(name, source, mode, "dir")
        for child in sorted(os.listdir(source)):
            yield from _walk(os.path.join(source, child), f"{name}/{child}")
    else:
        raise ValueError(f"{source}: only files, directories and symlinks can be layered")


def _header(entry: Entry, size: int, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(entry.name + ("/" if entry.kind == "dir" else ""))
    info.mode = entry.mode
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = linkname
    else:
        info.type = tarfile.REGTYPE
        info.size = size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(entries: Iterable[Entry], sink: _LayerSink) -> None:
    """Write a deterministic tar stream of ``entries`` into ``sink``."""
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    for entry in entries:
        if entry.kind == "symlink":
            assert entry.source is not None
            sink.write(_header(entry, 0, os.readlink(entry.source)))
        elif entry.kind == "dir":
            sink.write(_header(entry, 0))
        else:
            assert entry.source is not None
            with open(entry.source, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                sink.write(_header(entry, size))
                remaining = size
                while remaining:
                    n = f.readinto(view[: min(READ_SIZE, remaining)])
                    if not n:
                        raise OSError(f"{entry.source} shrank while being layered")
                    sink.write(view[:n])
                    remaining -= n
            if size % tarfile.BLOCKSIZE:
                sink.write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))
    sink.write(bytes(2 * tarfile.BLOCKSIZE))


def write_layer(cas: CAS, entries: Iterable[Entry], level: int) -> LayerBlob:
    """Stream ``entries`` as a gzipped tar into the CAS; return the blob."""
    with cas.writer() as blob:
        sink = _LayerSink(blob.file, level)
        write_tar(entries, sink)
        sink.finish()
        digest = "sha256:" + sink.digest.hexdigest()
        blob.commit(digest)
    return LayerBlob(digest=digest, diff_id="sha256:" + sink.diff_id.hexdigest(), size=sink.size)
