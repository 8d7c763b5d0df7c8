"""A content-addressed blob store on the local filesystem.

Layout under the storage root::

    blobs/sha256/<64 hex>   one file per blob, named by its SHA-256
    tmp/<random>.part       blobs being written
    lock                    builds (shared) against gc (exclusive)
    serving                 held (shared) by every server using the store

A blob is written to a temporary file, fsynced, then renamed to its digest
and the directory fsynced, so a blob path either does not exist or holds
exactly the bytes its name promises, whatever moment the machine dies at.
A large blob goes to disk while it is being written: every
:data:`WRITEBACK_BYTES`, a thread of the writer's own runs ``fdatasync`` on
what is there so far, so the fsync before the rename (which alone decides
durability) waits only for the tail rather than for the whole blob.
Temporary files left by a crash are removed at start-up, by a server that
finds no other server using the store (:meth:`CAS.open_store`).  The
methods are blocking; the shell calls them from worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..core.digest import digest_hex, parse_digest, sha256_digest
from ..core.errors import BlobUnknown, RangeNotSatisfiable, StorageError
from .storage import STREAM_CHUNK, BlobEntry, Leftover

T = TypeVar("T")

#: Seconds a starting server waits for the store's other servers to be gone
#: (the workers of a killed server take a moment to die) before it leaves
#: ``tmp/`` alone.
SERVING_WAIT = 3.0
#: Bytes written between two background ``fdatasync`` calls of a blob
#: being written (one at a time; a blob smaller than this never starts one).
WRITEBACK_BYTES = 16 << 20
#: Seconds between two refreshes of a served manifest's modification time,
#: which gc reads as its last use.
TOUCH_INTERVAL = 60


def recreating(directory: Path, action: Callable[[], T]) -> T:
    """``action()``; if it fails for want of ``directory`` (removed by hand, say),
    once more after creating it, so that a store heals instead of failing
    every request until a restart."""
    try:
        return action()
    except FileNotFoundError:
        # Another process may have created it meanwhile: try again either way.
        directory.mkdir(parents=True, exist_ok=True)
        return action()


def replace_file(tmp_dir: Path, target: Path, data: bytes, suffix: str) -> None:
    """Put ``data`` at ``target`` whole or not at all: a new file in ``tmp_dir``
    (named ``*suffix``), renamed over ``target``.  Not fsynced: for records
    that name durable blobs, or say what a process is doing, and are checked
    when read (blobs go through :class:`BlobWriter`)."""
    tmp = tmp_dir / f"{secrets.token_hex(12)}{suffix}"
    try:
        with recreating(tmp_dir, lambda: open(tmp, "xb")) as f:
            f.write(data)
        recreating(target.parent, lambda: os.rename(tmp, target))
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_SYNC_THREADS: tuple[int, ThreadPoolExecutor] | None = None
_SYNC_THREADS_LOCK = threading.Lock()


def _syncing() -> ThreadPoolExecutor:
    """Threads that fsync small blobs at once (see :meth:`CAS.put_many`); made
    anew in a forked worker, which has none of its parent's threads."""
    global _SYNC_THREADS
    with _SYNC_THREADS_LOCK:
        if _SYNC_THREADS is None or _SYNC_THREADS[0] != os.getpid():
            _SYNC_THREADS = (os.getpid(), ThreadPoolExecutor(4, "blob-fsync"))
        return _SYNC_THREADS[1]


class BlobWriter:
    """A temporary file that becomes a blob once its digest is known.

    Write with :meth:`write`, which also starts writing the blob back to
    disk as it grows; ``file`` is the open file itself.
    """

    def __init__(self, cas: CAS, file: BinaryIO, path: Path) -> None:
        self._cas = cas
        self.file = file
        self.path = path
        self._unsynced = 0
        self._flusher: ThreadPoolExecutor | None = None
        self._writeback: Future[None] | None = None

    def write(self, data: bytes) -> int:
        """Append all of ``data`` (an unbuffered write may take only part of it)."""
        view = memoryview(data)
        while view:
            view = view[self.file.write(view) :]
        self._unsynced += len(data)
        if self._unsynced >= WRITEBACK_BYTES and (
            self._writeback is None or self._writeback.done()
        ):
            self._start_writeback()
        return len(data)

    def commit(self, digest: str, sync_dir: bool = True, synced: bool = False) -> Path:
        """fsync, close and rename the file to ``digest``; return its path.

        Without ``sync_dir`` the caller fsyncs the blob directory itself
        (once for several blobs) before anything may depend on the name;
        ``synced`` says the caller fsynced the file itself after its last write.
        """
        self.file.flush()
        writeback = self._stop_writeback()
        if writeback is not None:
            # An error it met is reported once, to it, not again to this fsync.
            writeback.result()
        if not synced:
            os.fsync(self.file.fileno())
        self.file.close()
        target = self._cas.path(digest)
        recreating(self._cas.blob_dir, lambda: os.rename(self.path, target))
        if sync_dir:
            self._cas.sync_dir()
        return target

    def close(self) -> None:
        """Stop any writeback and close the file; if not committed, it stays temporary."""
        self._stop_writeback()  # a blob not committed is discarded: its errors do not matter
        self.file.close()

    def _start_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.result()  # fail early
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, "blob-writeback")
        self._writeback = self._flusher.submit(os.fdatasync, self.file.fileno())
        self._unsynced = 0

    def _stop_writeback(self) -> Future[None] | None:
        """Wait for the writeback under way, if any, and end its thread; return it."""
        flusher, writeback = self._flusher, self._writeback
        self._flusher = self._writeback = None
        if flusher is not None:
            flusher.shutdown(wait=True)
        return writeback


class DirectoryRecords:
    """A record namespace as a directory of files, each replaced by a rename."""

    def __init__(self, directory: Path, tmp_dir: Path) -> None:
        self.directory = directory
        self.tmp_dir = tmp_dir

    def open_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        try:
            replace_file(self.tmp_dir, self.directory / name, data, ".rec")
        except OSError as exc:
            raise StorageError(f"cannot write a record in {self.directory}: {exc}") from exc

    def remove(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def may_have(self, name: str) -> bool:
        return (self.directory / name).exists()

    def names(self) -> Iterator[str]:
        try:
            entries = sorted(entry.name for entry in os.scandir(self.directory))
        except FileNotFoundError:
            return
        yield from entries


class CAS:
    """Blobs on disk, named by their SHA-256 digest: the ``filesystem`` backend
    of :class:`~nixery_trio.store.storage.Storage`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.lock = StoreLock(root / "lock")
        self._serving: int | None = None

    def open_store(self, clean: bool = True) -> int | None:
        """Create the layout; with ``clean``, serve the store and remove crash leftovers.

        Serving means holding the ``serving`` lock shared until the process
        ends (forked workers share their parent's) or this object opens the
        store again.  Leftovers in
        ``tmp/`` are removed only under the lock held exclusively, which
        needs every other server gone: the files of a running server are its
        work in progress.  After :data:`SERVING_WAIT` seconds of trying, the
        leftovers are left alone.  Returns how many were removed, or ``None`` when another
        server holds the store.
        """
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if not clean:
            return 0
        if self._serving is not None:
            os.close(self._serving)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._serving = fd = os.open(self.root / "serving", flags, 0o644)
        deadline = time.monotonic() + SERVING_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    return None
                time.sleep(0.05)
        try:
            removed = 0
            for leftover in self.tmp_dir.iterdir():
                leftover.unlink(missing_ok=True)
                removed += 1
            return removed
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists)."""
        return self.blob_dir / digest_hex(parse_digest(digest))

    def size(self, digest: str) -> int | None:
        """The blob's size, or ``None`` if it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def sync_dir(self) -> None:
        fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        """A temporary blob file; removed unless ``commit`` was called."""
        path = self.tmp_dir / f"{secrets.token_hex(12)}.part"
        try:
            file = recreating(self.tmp_dir, lambda: open(path, "xb", buffering=0))  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"cannot create a blob in {self.tmp_dir}: {exc}") from exc
        blob = BlobWriter(self, file, path)
        try:
            yield blob
        except OSError as exc:
            raise StorageError(f"writing a blob failed: {exc}") from exc
        finally:
            try:
                blob.close()
            finally:
                path.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob (config, manifest); return its digest."""
        return self.put_many([data])[0]

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store small blobs, with one fsync of the directory; their digests.

        The new ones are all written first and then fsynced at once, on
        threads of their own: the file system commits its journal once for
        them all, rather than once per blob (a cold build stores a config
        and two manifests).
        """
        digests = [sha256_digest(data) for data in blobs]
        new: dict[str, bytes] = {}
        for data, digest in zip(blobs, digests, strict=True):
            if self.size(digest) == len(data):
                os.utime(self.path(digest))  # used again: fresh for gc
            else:
                new[digest] = data
        if not new:
            return digests
        with contextlib.ExitStack() as stack:
            writers = {digest: stack.enter_context(self.writer()) for digest in new}
            for digest, writer in writers.items():
                writer.write(new[digest])
            files = [writer.file.fileno() for writer in writers.values()]
            if len(files) > 1:
                list(_syncing().map(os.fsync, files))
            for digest, writer in writers.items():
                writer.commit(digest, sync_dir=False, synced=len(files) > 1)
        self.sync_dir()
        return digests

    def read_bytes(self, digest: str, limit: int) -> bytes | None:
        """A small blob's bytes, or ``None`` if missing or over ``limit``."""
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= limit else None

    def stream(
        self, digest: str, first: int = 0, last: int | None = None
    ) -> Generator[bytes, None, None]:
        try:
            f = open(self.path(digest), "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": digest}) from None
        with f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if last is None:
                last = size - 1
            elif not 0 <= first <= last < size:
                raise RangeNotSatisfiable(f"bytes {first}-{last} are outside {digest}")
            while first <= last and (chunk := os.pread(fd, min(STREAM_CHUNK, last + 1 - first),
                                                       first)):  # fmt: skip
                yield chunk
                first += len(chunk)

    def blob_entries(self) -> Iterator[BlobEntry]:
        for entry in os.scandir(self.blob_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile
                continue
            remove = partial(Path(entry.path).unlink, missing_ok=True)
            yield BlobEntry(entry.name, st.st_size, st.st_mtime, remove)

    def leftovers(self, older_than: float) -> Iterator[Leftover]:
        now = time.time()
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > older_than:
                    yield Leftover(entry.name, partial(Path(entry.path).unlink, missing_ok=True))

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def last_use(self, digest: str) -> float:
        """The blob's modification time (its last mark of use), or 0."""
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def used(self, digest: str) -> None:
        """Refresh the blob's modification time (gc's "last used"), at most
        once every :data:`TOUCH_INTERVAL` seconds."""
        path = self.path(digest)
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > TOUCH_INTERVAL:
                os.utime(path)

    def records(self, kind: str) -> DirectoryRecords:
        """The records of ``kind`` (``index/<kind>/``)."""
        return DirectoryRecords(self.root / "index" / kind, self.tmp_dir)


class StoreLock:
    """An advisory lock between builds (shared) and garbage collection (exclusive).

    A build holds it shared from its first layer-cache lookup until its
    manifest is recorded, and a cache hit holds it while it checks and
    touches the manifest; ``gc`` holds it exclusively while it decides and
    deletes.  So gc never removes a blob a build has just decided to reuse.
    ``flock`` locks belong to the open file, so any thread may release them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def acquire(self, exclusive: bool = False) -> int:
        """Block until held; return the descriptor that releases it on close."""
        fd = recreating(self.path.parent, lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def held(self, exclusive: bool = False) -> Iterator[None]:
        fd = self.acquire(exclusive)
        try:
            yield
        finally:
            os.close(fd)
