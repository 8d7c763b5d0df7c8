"""Store paths to a gzipped (or zstd) tar layer in the CAS, in one pass.

::

    files ──readinto──▶ tar stream, cut into fixed 1 MiB blocks ──▶ sha256 (diff_id)
                              │ block i, with the last 32 KiB of block i-1 as dictionary
                              ▼
                 deflate in worker threads (ISA-L by default), one block each
                              │ back in block order, on the writer thread
                              ▼
              gzip header + blocks + final block + CRC-32/size trailer
                              │
                              ▼ sha256 (digest) + byte count
                       CAS temporary file ──rename──▶ blobs/sha256/<digest>

Every byte of every file is read once, straight into the block it belongs
to, and never held whole: a layer of any size needs a few blocks of memory.

**The tar** is deterministic: store paths in sorted order, entries sorted by
name within each directory, mtime 1 (as in the Nix store), uid and gid 0
(but for a home the server adds), no user or group names; only directories,
regular files and symlinks exist in the store.  Headers are POSIX ustar,
with a pax extended header for a path or link target that does not fit
(over 100 bytes, or not ASCII) and for sizes of 8 GiB or more; they are
built here, byte for byte what Python's
``tarfile`` writes in ``PAX_FORMAT``, so the bytes do not drift with the
Python version.  Entries of store path layers carry their full
``nix/store/<hash>-<name>/...`` path with the parent directories ``nix/``
and ``nix/store/``.  The symlink forest layer maps the forest's store path
to the image root instead, adds what every root gets (``rootfs.py``: ``/tmp``,
``/etc/passwd`` and ``/etc/group``, homes) and leaves out Nix's
``manifest.nix``.

**The gzip** is one standard gzip member made the way pigz makes one: the
tar stream is cut into blocks of exactly :data:`BLOCK_SIZE` bytes (the last
one shorter), and each block is deflated on its own, primed with the last
32 KiB of the block before it as the preset dictionary (so matches reach
back across block boundaries as they would in one stream) and ended with a
sync flush (an empty stored block, which byte-aligns it), so the blocks'
outputs concatenate into one deflate stream.  A final empty block ends it,
and the trailer's CRC-32 is the blocks' CRCs combined.  Each block's output
is a pure function of (engine, level, block, dictionary): it does not
depend on how many threads there are, which thread got the block, when it
finished, or how reads happened to split the input.  So the layer's bytes,
and its digest, are the same on every run and whatever the thread count;
one thread and eight give identical blobs.  (Across machines they are the
same as long as the deflate engine is: ISA-L picks CPU-specific kernels.)

**zstd** (for images that ask for it, ``zstd/...``) cuts the same tar
blocks and compresses each one as a zstd frame of its own, at
:data:`ZSTD_LEVEL`, with its content size and checksum in the frame; the
frames, concatenated, are the layer (zstd's format allows any number of
frames, and every decoder reads them as one stream).  A frame cannot look
back into the one before, so the layer is a little bigger than one stream
would be, but each frame is again a pure function of its block: the same
bytes whatever the thread count.

The calling thread reads the files into blocks and hashes them (the
diff_id); up to ``threads`` deflate threads compress the blocks; one writer
thread takes their outputs in block order, hashes them (the digest) and
writes them.  The threads live as long as the layer's write, and at most
:data:`BLOCKS_PER_THREAD` blocks per deflate thread are in flight, so a
layer of any size needs a few MiB.  With the two serial stages (tar and
diff_id, digest and write) on threads of their own, each waits for the
other stages only when the blocks in flight run out, and the cores stay
busy with whichever work is ready.  The deflate engine runs on the deflate
threads only (see :class:`_GzipBlocks` for why that matters to SHA-256).

The functions here block; the builder runs them in worker threads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import stat
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard
from isal import isal_zlib

from ..core.manifest import LayerBlob
from ..core.rootfs import root_entries
from ..store.storage import Storage

#: Bytes of tar stream per deflate block.  Part of the output format: the
#: gzip bytes (and so every layer digest) depend on it.
BLOCK_SIZE = 1 << 20
#: Default largest read from a file, in bytes (reads also stop at block ends).
READ_SIZE = 1 << 20
#: Deflate's window: each block is primed with this much of the one before.
WINDOW_SIZE = 32 << 10
#: Deflate engines by name, with their compression levels: ISA-L's igzip,
#: the standard library's zlib, and zlib-ng (when the ``zlib-ng`` package is
#: installed, as the ``bench`` extra does).
ENGINE_LEVELS: dict[str, range] = {
    "isal": range(0, 4),
    "zlib": range(1, 10),
    "zlib-ng": range(1, 10),
}
#: Each engine's default level: ISA-L's 2 writes output 1-2% smaller than its
#: level 1 at the same layer-writing speed (docs/benchmarks.md); zlib's usual 6.
DEFAULT_LEVELS = {"isal": 2, "zlib": 6, "zlib-ng": 6}
#: zlib-ng's zlib-compatible module (optional: the ``bench`` extra installs it).
_ZLIB_NG = "zlib_ng.zlib_ng"
#: The deflate engine used unless configured otherwise.
DEFAULT_ENGINE = "isal"
#: Layer compressions: gzip for every client, zstd for OCI clients that take it.
COMPRESSIONS = ("gzip", "zstd")
#: zstd's level for layers (its default): part of the output format.
ZSTD_LEVEL = 3
#: Blocks in flight per deflate thread (read, being deflated, or waiting to
#: be written): enough that neither the deflate threads nor the calling
#: thread wait for the other when the scheduler gives one of them a little
#: less time, and a bound on the memory in use (a block and its output each).
BLOCKS_PER_THREAD = 4

_MTIME = 1
_TAR_BLOCK = 512
#: gzip member header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: A final, empty fixed-Huffman deflate block: ends the stream.
_FINAL_BLOCK = b"\x03\x00"


@dataclass(frozen=True)
class Entry:
    """One tar entry: the name inside the layer and the file it comes from.

    A synthetic entry has no ``source``: a directory, a file whose bytes
    are ``data``, or a symlink to ``link``; only synthetic entries may be
    owned by someone else than root.
    """

    name: str
    source: str | None  # None for synthetic entries
    mode: int  # permission bits
    kind: str  # "dir", "file" or "symlink"
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    link: str = ""


@dataclass(frozen=True)
class Deflate:
    """How layers are compressed.

    ``engine`` names a deflate implementation (a key of
    :data:`ENGINE_LEVELS`), ``level`` its compression level, ``threads``
    how many blocks may be compressed at once, and ``read_size`` the
    largest read from a file.  Engine and level decide the bytes;
    ``threads`` and ``read_size`` only the speed.
    """

    engine: str = DEFAULT_ENGINE
    level: int = 2
    threads: int = 1
    read_size: int = READ_SIZE

    def __post_init__(self) -> None:
        levels = ENGINE_LEVELS.get(self.engine)
        if levels is None:
            raise ValueError(
                f"unknown deflate engine {self.engine!r}; one of {', '.join(ENGINE_LEVELS)}"
            )
        if self.level not in levels:
            raise ValueError(
                f"{self.engine} levels are {min(levels)} to {max(levels)}, got {self.level}"
            )
        if self.threads < 1:
            raise ValueError(f"deflate threads must be at least 1, got {self.threads}")
        if self.read_size < _TAR_BLOCK:
            raise ValueError(f"the read size must be at least {_TAR_BLOCK}, got {self.read_size}")


# ---------------------------------------------------------------------------
# Deflate engines: (block, dictionary) -> (raw deflate ending in a sync flush, crc32)

BlockCompressor = Callable[[memoryview, bytes], tuple[bytes, int]]


class Writable(Protocol):
    """Where a layer's gzip bytes go: a file, or a :class:`~nixery_trio.store.cas.BlobWriter`."""

    def write(self, data: bytes, /) -> object: ...


def block_compressor(engine: str, level: int) -> BlockCompressor:
    """The function that deflates one block for ``engine`` at ``level``.

    It is safe to call from many threads at once; each call starts from a
    fresh deflate state primed with ``dictionary``, and every engine
    releases the GIL while it compresses.
    """
    Deflate(engine, level)  # validates
    if engine == "isal":
        return _isal_compressor(level)
    if engine == "zlib":
        return _zlib_compressor(zlib, level)
    return _zlib_compressor(importlib.import_module(_ZLIB_NG), level)


def engine_available(engine: str) -> bool:
    """Whether ``engine`` can be used on this installation."""
    if engine != "zlib-ng":
        return engine in ENGINE_LEVELS
    return importlib.util.find_spec("zlib_ng") is not None


def _isal_compressor(level: int) -> BlockCompressor:
    # python-isal's helper for its own threaded gzip writer: one call that
    # resets the stream, sets the dictionary, deflates with a sync flush and
    # computes the CRC, all without the GIL.  Level 0 codes everything with
    # one fixed table, so random data can grow by a fifth: the buffer is
    # sized for deflate's worst case.
    local = threading.local()

    def compress(block: memoryview, dictionary: bytes) -> tuple[bytes, int]:
        compressor = getattr(local, "compressor", None)
        if compressor is None:
            compressor = isal_zlib._ParallelCompress(buffersize=2 * BLOCK_SIZE + 1024, level=level)
            local.compressor = compressor
        compressed, crc = compressor.compress_and_crc(block, dictionary)
        return compressed, crc

    return compress


def _zlib_compressor(module: object, level: int) -> BlockCompressor:
    compressobj = module.compressobj  # type: ignore[attr-defined]
    deflated, sync_flush = module.DEFLATED, module.Z_SYNC_FLUSH  # type: ignore[attr-defined]

    def compress(block: memoryview, dictionary: bytes) -> tuple[bytes, int]:
        if dictionary:
            stream = compressobj(level, deflated, -15, zdict=dictionary)
        else:
            stream = compressobj(level, deflated, -15)
        compressed = stream.compress(block) + stream.flush(sync_flush)
        return compressed, isal_zlib.crc32(block)

    return compress


# ---------------------------------------------------------------------------
# The gzip side: blocks in, one gzip member out, hashed and counted.


class _Blocks:
    """Compresses tar blocks in worker threads and writes their outputs in block order.

    Three kinds of thread share the work: the calling thread builds the tar
    and hashes it, ``threads`` compression threads compress blocks, and one
    writer thread takes each block's output in block order, hashes it and
    writes it (the calling thread writes the header before the first block
    is submitted and the trailer after the last is collected).  Subclasses
    say how a block is compressed and what frames the blocks.

    The compression engine never runs on the calling or the writer thread:
    ISA-L's AVX-512 code returns with the upper halves of the vector
    registers dirty (no ``vzeroupper``), and from then on, in that thread
    and in every thread it starts, the SHA-NI code of SHA-256 (legacy SSE
    instructions) runs a quarter slower: 1.34 instead of 1.80 GB/s, measured
    on the AMD EPYC of docs/benchmarks.md.
    """

    def __init__(self, out: Writable, threads: int) -> None:
        self._write_out = out.write
        self._max_in_flight = threads * BLOCKS_PER_THREAD
        # Neither starts a thread before its first block.
        self._compressors = ThreadPoolExecutor(threads, "compress")
        self._writer = ThreadPoolExecutor(1, "layer-writer")
        # Each block's write, with the block it keeps busy until then.
        self._in_flight: deque[tuple[Future[None], bytearray]] = deque()
        self.spare: list[bytearray] = []
        self.digest = hashlib.sha256()
        self.size = 0

    def _compress(self, block: memoryview, dictionary: bytes) -> object:
        """Compress one block (on a compression thread); what :meth:`_output` takes."""
        raise NotImplementedError

    def _output(self, compressed: object, length: int) -> bytes:
        """A compressed block's bytes in the layer (on the writer thread, in block order)."""
        raise NotImplementedError

    def _trailer(self) -> bytes:
        return b""

    def submit(self, block: bytearray, length: int, dictionary: bytes) -> None:
        """Compress ``block[:length]``; ``block`` is lent until it comes back in ``spare``."""
        while len(self._in_flight) >= self._max_in_flight:
            self._collect_oldest()
        compressed = self._compressors.submit(
            self._compress, memoryview(block)[:length], dictionary
        )
        # One writer thread runs the writes in submission order: block order.
        written = self._writer.submit(self._write_block, compressed, length)
        self._in_flight.append((written, block))

    def finish(self) -> None:
        """Wait for every block, then end the layer."""
        while self._in_flight:
            self._collect_oldest()
        self._emit(self._trailer())

    def close(self) -> None:
        """Stop the threads (after an error, without waiting for queued blocks)."""
        self._compressors.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)

    def _collect_oldest(self) -> None:
        written, block = self._in_flight.popleft()
        written.result()  # raises the block's compression or write error
        self.spare.append(block)

    def _write_block(self, compressed: Future[object], length: int) -> None:
        self._emit(self._output(compressed.result(), length))

    def _emit(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self._write_out(data)


class _GzipBlocks(_Blocks):
    """One gzip member: header, the blocks' deflate streams, a final block, CRC and size."""

    def __init__(self, out: Writable, deflate: Deflate) -> None:
        super().__init__(out, deflate.threads)
        self._deflate = block_compressor(deflate.engine, deflate.level)
        self._crc = 0
        self._tar_size = 0
        self._emit(_GZIP_HEADER)

    def _compress(self, block: memoryview, dictionary: bytes) -> object:
        return self._deflate(block, dictionary)

    def _output(self, compressed: object, length: int) -> bytes:
        data: bytes
        crc: int
        data, crc = compressed  # type: ignore[misc]
        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
        self._tar_size += length
        return data

    def _trailer(self) -> bytes:
        return _FINAL_BLOCK + struct.pack("<II", self._crc, self._tar_size & 0xFFFFFFFF)


class _ZstdBlocks(_Blocks):
    """One zstd frame per block (independent: the dictionary is not used)."""

    def __init__(self, out: Writable, deflate: Deflate) -> None:
        super().__init__(out, deflate.threads)
        self._local = threading.local()

    def _compress(self, block: memoryview, dictionary: bytes) -> object:
        # A compressor is not thread safe; each thread keeps its own.  It
        # releases the GIL while it compresses.
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_checksum=True, write_content_size=True
            )
            self._local.compressor = compressor
        return compressor.compress(block)

    def _output(self, compressed: object, length: int) -> bytes:
        return compressed  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The tar side: entries in, fixed-size blocks out.


class _TarBlocks:
    """Builds the tar stream straight into fixed-size blocks and hashes it."""

    def __init__(self, blocks: _Blocks, read_size: int) -> None:
        self._blocks = blocks
        self._read_size = read_size
        self.diff_id = hashlib.sha256()
        self._block = bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._fill = 0
        self._dictionary = b""

    def write(self, data: bytes) -> None:
        """Append ``data`` (headers, padding) to the stream."""
        start = 0
        while start < len(data):
            n = min(len(data) - start, BLOCK_SIZE - self._fill)
            self._view[self._fill : self._fill + n] = data[start : start + n]
            self._fill += n
            start += n
            if self._fill == BLOCK_SIZE:
                self._ship()

    def write_file(self, file: io.FileIO, size: int, source: str) -> None:
        """Append ``size`` bytes of ``file``, read directly into the blocks."""
        remaining = size
        while remaining:
            want = min(remaining, self._read_size, BLOCK_SIZE - self._fill)
            n = file.readinto(self._view[self._fill : self._fill + want])
            if not n:
                raise OSError(f"{source} shrank while being layered")
            self._fill += n
            remaining -= n
            if self._fill == BLOCK_SIZE:
                self._ship()

    def finish(self) -> None:
        if self._fill:
            self._ship()
        self._view.release()

    def _ship(self) -> None:
        block, length = self._block, self._fill
        self.diff_id.update(self._view[:length])
        dictionary = bytes(self._view[max(0, length - WINDOW_SIZE) : length])
        self._view.release()
        self._blocks.submit(block, length, self._dictionary)
        self._dictionary = dictionary
        self._block = self._blocks.spare.pop() if self._blocks.spare else bytearray(BLOCK_SIZE)
        self._view = memoryview(self._block)
        self._fill = 0


# ---------------------------------------------------------------------------
# Tar headers, built by hand (see the module docstring).


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _field(text: bytes, width: int) -> bytes:
    return text[:width].ljust(width, b"\0")


def _ustar(
    name: bytes, mode: int, size: int, mtime: int, kind: bytes, link: bytes, uid: int, gid: int
) -> bytes:
    header = b"".join(
        (
            _field(name, 100),
            _octal(mode & 0o7777, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b"        ",  # checksum, counted as spaces
            kind,
            _field(link, 100),
            b"ustar\x0000",
            bytes(32 + 32 + 8 + 8 + 155),  # uname, gname, devmajor, devminor, prefix
        )
    ).ljust(_TAR_BLOCK, b"\0")
    checksum = b"%06o\0" % sum(header)
    return header[:148] + checksum + header[155:]


def _pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    """Pax records, ``"<length> <key>=<value>\\n"`` with the length counting itself."""
    out = []
    for key, value in records:
        body = len(key) + len(value) + 3  # " ", "=", "\n"
        length = body
        while length != body + len(str(length)):
            length = body + len(str(length))
        out.append(b"%d %s=%s\n" % (length, key, value))
    return b"".join(out)


def tar_header(
    name: str, kind: str, mode: int, size: int = 0, link: str = "", uid: int = 0, gid: int = 0
) -> bytes:
    """The header block(s) of one entry, as ``tarfile`` writes them in pax format.

    ``kind`` is ``"dir"`` (``name`` gets a trailing ``/``), ``"file"`` or
    ``"symlink"``.  Names are ``str`` as ``os.listdir`` returns them:
    bytes that are not UTF-8 come back unchanged (surrogate escapes).
    """
    if kind == "dir":
        name += "/"
    type_flag = {"dir": b"5", "file": b"0", "symlink": b"2"}[kind]
    pax: list[tuple[str, str]] = []
    if not name.isascii() or len(name) > 100:
        pax.append(("path", name))
    if not link.isascii() or len(link) > 100:
        pax.append(("linkpath", link))
    ustar_size = size
    if size >= 8**11:
        pax.append(("size", str(size)))
        ustar_size = 0
    name_field = name.encode("ascii", "replace")
    link_field = link.encode("ascii", "replace")
    entry = _ustar(name_field, mode, ustar_size, _MTIME, type_flag, link_field, uid, gid)
    if not pax:
        return entry
    binary = not all(_utf8_ok(value) for _, value in pax)
    records = [(b"hdrcharset", b"BINARY")] if binary else []
    records += [
        (key.encode(), value.encode("utf-8", "surrogateescape" if binary else "strict"))
        for key, value in pax
    ]
    payload = _pax_records(records)
    padding = bytes(-len(payload) % _TAR_BLOCK)
    extended = _ustar(b"././@PaxHeader", 0, len(payload), 0, b"x", b"", 0, 0)
    return extended + payload + padding + entry


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Entries


def store_path_entries(store_paths: Iterable[str]) -> Iterator[Entry]:
    """Entries for whole store paths at their own ``/nix/store`` location."""
    yield Entry("nix", None, 0o755, "dir")
    yield Entry("nix/store", None, 0o755, "dir")
    for path in sorted(store_paths):
        yield from _walk(path, path.lstrip("/"))


def forest_entries(forest: str, nonroot: bool = False) -> Iterator[Entry]:
    """Entries for the symlink forest placed at the image root, plus what
    ``rootfs.root_entries`` adds to every root (where the forest has no such path).

    A top-level link of the forest that a path added goes under (``etc``,
    when one package alone provides it) becomes a directory of links to
    what its target holds, so nothing is added through a symlink.
    """
    found: dict[str, Entry] = {}
    for name in os.listdir(forest):
        if name != "manifest.nix":
            found.update((e.name, e) for e in _walk(os.path.join(forest, name), name))
    for extra in root_entries(nonroot):
        top = extra.name.split("/")[0]
        linked = found.get(top)
        if linked is not None and linked.kind == "symlink" and "/" in extra.name:
            assert linked.source is not None
            found[top] = Entry(top, None, 0o755, "dir")
            target = os.readlink(linked.source)
            for child in os.listdir(linked.source):
                name = f"{top}/{child}"
                found[name] = Entry(name, None, 0o777, "symlink", link=os.path.join(target, child))
        if extra.name not in found:
            found[extra.name] = Entry(extra.name, None, extra.mode, extra.kind, extra.data,
                                      extra.uid, extra.gid)  # fmt: skip
    # Sorted by path components: the order of a walk that sorts each directory.
    for name in sorted(found, key=lambda name: name.split("/")):
        yield found[name]


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


def _write_tar(entries: Iterable[Entry], tar: _TarBlocks) -> None:
    for entry in entries:
        if entry.kind == "file" and entry.source is None:
            size = len(entry.data)
            tar.write(tar_header(entry.name, "file", entry.mode, size, uid=entry.uid,
                                 gid=entry.gid) + entry.data)  # fmt: skip
            if size % _TAR_BLOCK:
                tar.write(bytes(_TAR_BLOCK - size % _TAR_BLOCK))
        elif entry.kind == "file":
            assert entry.source is not None
            with open(entry.source, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                tar.write(tar_header(entry.name, "file", entry.mode, size))
                tar.write_file(f, size, entry.source)
            if size % _TAR_BLOCK:
                tar.write(bytes(_TAR_BLOCK - size % _TAR_BLOCK))
        elif entry.kind == "symlink":
            target = entry.link or os.readlink(entry.source or "")
            tar.write(tar_header(entry.name, "symlink", entry.mode, 0, target))
        else:
            tar.write(tar_header(entry.name, "dir", entry.mode, uid=entry.uid, gid=entry.gid))
    tar.write(bytes(2 * _TAR_BLOCK))


def write_layer_to(
    out: Writable, entries: Iterable[Entry], deflate: Deflate, compression: str = "gzip"
) -> LayerBlob:
    """Write ``entries`` as a compressed tar to ``out``; return its digest, diff_id and size.

    ``compression`` is one of :data:`COMPRESSIONS`; ``deflate`` gives the
    threads and read size (and, for gzip, the engine and level).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; one of {', '.join(COMPRESSIONS)}")
    blocks: _Blocks = (_GzipBlocks if compression == "gzip" else _ZstdBlocks)(out, deflate)
    try:
        tar = _TarBlocks(blocks, deflate.read_size)
        _write_tar(entries, tar)
        tar.finish()
        blocks.finish()
    finally:
        blocks.close()
    return LayerBlob(
        digest="sha256:" + blocks.digest.hexdigest(),
        diff_id="sha256:" + tar.diff_id.hexdigest(),
        size=blocks.size,
    )


def write_layer(
    cas: Storage,
    entries: Iterable[Entry],
    level: int | None = None,
    *,
    deflate: Deflate | None = None,
    compression: str = "gzip",
    ready: Callable[[LayerBlob], object] | None = None,
) -> LayerBlob:
    """Stream ``entries`` as a compressed tar into the store; return the blob.

    ``deflate`` says how to compress; ``level`` alone means the default
    engine at that level, on one thread.  ``compression`` is ``gzip`` or
    ``zstd``.  ``ready`` is told the blob as soon as its digest is known,
    before it is made durable and named in the store (which, for a large
    layer or a bucket, takes a while): the builder writes the image's config
    and manifests meanwhile.
    """
    if deflate is None:
        deflate = Deflate() if level is None else Deflate(level=level)
    elif level is not None and level != deflate.level:
        raise ValueError("give the level in deflate, not both")
    with cas.writer() as blob:
        layer = write_layer_to(blob, entries, deflate, compression)
        if ready is not None:
            ready(layer)
        blob.commit(layer.digest)
    return layer
