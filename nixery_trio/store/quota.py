"""Cold builds per client per minute, counted by every process on a store.

``--cold-builds-per-minute`` bounds what one client can make the registry
build: warm pulls cost nothing, but each image not in the store costs a Nix
build.  Workers share no memory, so the count lives in the store: one small
file per client under ``run/quota/`` (named by a hash of the client, never
the client itself), holding the times of its builds in the last minute as
msgpack, read and rewritten under ``flock``.  A sliding window, not a
bucket: a client that used its builds waits until the oldest leaves the
window, and is told how long (``Retry-After``).

Bookkeeping never fails a build: a store that cannot write the file (a
full disk) lets the build go and logs why.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from pathlib import Path

import blake3
import msgpack

from .. import logs
from .cas import recreating

_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
#: The window the limit counts builds in.
WINDOW_SECONDS = 60.0
#: Files of clients with no build in the window are removed at most this often.
PRUNE_SECONDS = 300.0


class ColdBuildQuota:
    """At most ``per_minute`` cold builds per client in any 60 s, across processes."""

    def __init__(self, root: Path, per_minute: int) -> None:
        self.dir = root / "run" / "quota"
        self.per_minute = per_minute
        self._pruned = 0.0

    def charge(self, client: str) -> int | None:
        """Count a cold build for ``client``; or, over the limit, count nothing and
        return the seconds until one is allowed.  Blocking: call from a thread."""
        name = blake3.blake3(client.encode()).hexdigest()[:32]
        try:
            fd = recreating(self.dir, lambda: os.open(self.dir / name, _OPEN, 0o600))
        except OSError as exc:
            logs.warning("quota.unavailable", error=str(exc))
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = time.time()
            times = [t for t in _times(os.pread(fd, 1 << 16, 0)) if now - WINDOW_SECONDS < t <= now]
            if len(times) >= self.per_minute:
                return max(1, math.ceil(times[-self.per_minute] + WINDOW_SECONDS - now))
            times.append(now)
            data = msgpack.packb(times[-self.per_minute :])
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            except OSError as exc:
                logs.warning("quota.unrecorded", error=str(exc))
        finally:
            os.close(fd)
        if now - self._pruned > PRUNE_SECONDS:
            self._pruned = now
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        """Remove the files of clients with no build in the window (a file
        removed while another process counts in it only loses that count)."""
        with contextlib.suppress(OSError), os.scandir(self.dir) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > WINDOW_SECONDS:
                        os.unlink(entry.path)


def _times(data: bytes) -> list[float]:
    """The build times a quota file holds; nothing if it is not one."""
    try:
        times = msgpack.unpackb(data) if data else []
    except (ValueError, TypeError):  # msgpack's errors are ValueErrors
        return []
    if not isinstance(times, list):
        return []
    return sorted(t for t in times if isinstance(t, float | int))
