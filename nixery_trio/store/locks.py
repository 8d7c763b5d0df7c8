"""Locks that every process serving a store shares: one flight per key, and
a bounded number of Nix builds at once.

Both are ``flock(2)`` locks on files under ``STORAGE_PATH/locks/``, so they
hold across a server's worker processes and across servers on one store,
and a process that dies releases its locks with its descriptors.  Taking one
polls without blocking, so a waiter stays cancellable and holds no thread.

:class:`KeyLocks`: a flight key hashes onto one of :data:`LOCK_STRIPES`
files (so the files do not pile up; two keys seldom share one, and then
only wait for each other: two of an image's ten layers share one in about
one build of twenty).  A holder refreshes its file's modification time
every :data:`HEARTBEAT_SECONDS` (:meth:`KeyLocks.refresh_forever`).  A
holder that is alive but stuck (stopped with SIGSTOP, or hung) refreshes
nothing, and a waiter that has seen no refresh for :data:`STALE_SECONDS`
goes on without the lock and says so in the log: everything a flight
writes is content-addressed and renamed into place, so two processes doing
the same work at once cost time, never correctness, while waiting for a
stuck one would cost every client of the image its pull.

:class:`BuildSlots`: at most ``count`` Nix builds run at once, each holding
one of ``count`` slot files.  Builds wait their turn in the order they asked
within a process (a FIFO semaphore in front of the slots); between
processes, a freed slot goes to the first one to look (each looks every
:data:`SLOT_POLL_SECONDS`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import trio

from .. import logs
from ..core.errors import ManifestUnknown, RegistryError
from .cas import recreating

#: Lock files per kind of flight (keys hash onto them).
LOCK_STRIPES = 1024
#: The longest pause between two tries of a key lock another process holds.
LOCK_POLL_SECONDS = 0.05
#: How often a holder refreshes its lock file, and how long without a
#: refresh makes a waiter go on without the lock.
HEARTBEAT_SECONDS = 2.0
STALE_SECONDS = 15.0
#: Pause between two looks for a free build slot.
SLOT_POLL_SECONDS = 0.05


def _open(path: Path) -> int:
    """Open (creating) a lock file; recreate its directory if it was removed."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    return recreating(path.parent, lambda: os.open(path, flags, 0o644))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class KeyLocks:
    """Exclusive locks on flight keys, shared by every process on the store."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.directory = directory
        self.kind = kind
        self._held: set[int] = set()

    async def refresh_forever(self) -> None:
        """Refresh the files of the locks this process holds (run it in a nursery)."""
        while True:
            for fd in self._held:
                os.utime(fd)
            await trio.sleep(HEARTBEAT_SECONDS)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[HeldKey]:
        """Hold ``key``'s lock (or go on without it from a stuck holder) for the block."""
        stripe = int.from_bytes(blake3.blake3(key.encode()).digest()[:4]) % LOCK_STRIPES
        path = self.directory / f"{self.kind}-{stripe:04d}"
        asked = time.time()
        fd = _open(path)
        try:
            if await self._wait(fd, key, asked):
                self._held.add(fd)
            yield HeldKey(fd, key, asked)
        finally:
            self._held.discard(fd)
            os.close(fd)

    async def _wait(self, fd: int, key: str, asked: float) -> bool:
        """Take the lock; False if its holder went stale first."""
        pause = 0.002
        while not _try_lock(fd):
            refreshed = max(os.fstat(fd).st_mtime, asked)
            if time.time() - refreshed > STALE_SECONDS:
                logs.warning("lock.stale", kind=self.kind, key=key[:200],
                             waited_seconds=round(time.time() - asked, 1),
                             detail="its holder is stuck: going on without it")  # fmt: skip
                return False
            await trio.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_SECONDS)
        os.utime(fd)
        return True


@dataclass(frozen=True)
class HeldKey:
    """A held :class:`KeyLocks` lock; its file keeps the last failure.

    Waiters in one process share a flight's error (``SingleFlight``); a
    process that waited on the lock reads it here instead, so a build that
    failed or timed out is not run again at once by every worker.
    """

    fd: int
    key: str
    asked: float

    def recent_failure(self, miss_seconds: float) -> RegistryError | None:
        """The error of a flight for this key that ended since we asked, or of
        a name lookup that failed in the last ``miss_seconds``."""
        try:
            entry = json.loads(os.pread(self.fd, 1 << 16, 0) or b"null")
            if not entry or entry["key"] != self.key:
                return None
            error = RegistryError.from_json(entry["error"])
            if entry["at"] >= self.asked:
                return error
            if isinstance(error, ManifestUnknown) and time.time() - entry["at"] < miss_seconds:
                return error
        except (ValueError, KeyError, TypeError):
            pass
        return None

    def record_failure(self, error: RegistryError) -> None:
        """Leave ``error`` for the processes waiting; a write that fails
        (a full disk) only costs them a build of their own."""
        data = json.dumps({"key": self.key, "at": time.time(), "error": error.to_json()})
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data.encode()[: 1 << 16], 0)
        except OSError as exc:
            logs.warning("lock.record_failed", key=self.key[:200], error=str(exc))


class BuildSlot:
    """A held build slot; :meth:`release` gives it back."""

    def __init__(self, slots: BuildSlots, fd: int) -> None:
        self._slots = slots
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._slots.running -= 1
            self._slots.local.release()


class BuildSlots:
    """At most ``count`` Nix builds at once across every process on the store."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        #: The order of this process's builds: FIFO, as trio's semaphores are.
        self.local = trio.Semaphore(count)
        self.waiting = 0
        self.running = 0

    async def acquire(self, image: str) -> BuildSlot:
        """Wait for a free slot (cancellable), logging the queue when there is one."""
        asked = trio.current_time()
        fd = self._take() if self.local.value > 0 and self.waiting == 0 else None
        if fd is not None:
            self.local.acquire_nowait()
        else:
            self.waiting += 1
            logs.info("build.queued", image=image, waiting=self.waiting,
                      running_here=self.running, max_builds=self.count)  # fmt: skip
            try:
                await self.local.acquire()
                try:
                    while (fd := self._take()) is None:
                        await trio.sleep(SLOT_POLL_SECONDS)
                except BaseException:
                    self.local.release()
                    raise
            finally:
                self.waiting -= 1
            logs.info("build.dequeued", image=image,
                      waited_seconds=round(trio.current_time() - asked, 3))  # fmt: skip
        self.running += 1
        return BuildSlot(self, fd)

    def _take(self) -> int | None:
        """A descriptor holding a free slot's lock, or None if all are taken."""
        for index in range(self.count):
            fd = _open(self.directory / f"build-slot-{index:03d}")
            if _try_lock(fd):
                return fd
            os.close(fd)
        return None
