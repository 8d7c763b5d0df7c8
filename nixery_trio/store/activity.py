"""The activity board: what every process on a store is building, and what it built.

The server runs as several forked workers, and the web page a browser loads
may be served by any of them, so build activity is kept on disk beside the
store rather than in memory::

    run/activity/live/<pid>-<token>-<n>     one record per build in progress
    run/activity/recent/<time_ns>-<pid>-…   one record per build that ended
                                            (finished or failed), newest 100 kept

A record is a small msgpack map (:class:`Activity`), written to ``tmp/`` and
renamed into place, so a reader sees a whole record or none.  Readers never
trust one anyway: a missing, torn or foreign file is skipped.

Builds report progress on the event loop (the builder's progress hooks);
:meth:`ActivityBoard.report` only remembers the latest state, and one task
(:meth:`ActivityBoard.run`) writes what changed in a worker thread, at most
every :data:`WRITE_INTERVAL` seconds.  A fast build is thus two writes, and a
warm pull, which builds nothing, none.

A live record names its process (``pid``, ``host``) and when it was last
written (``updated``); the writer rewrites its live records every
:data:`HEARTBEAT_SECONDS`.  A record whose process is gone (a killed worker),
or that nobody rewrote for :data:`STALE_SECONDS`, is ignored by readers and
removed when a board starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from .. import logs
from ..core.progress import BuildProgress
from .cas import replace_file

#: Seconds between two writes of a process's board (a build's progress in
#: between is coalesced into the next write).
WRITE_INTERVAL = 0.25
#: Seconds between two rewrites of a build in progress that did not move.
HEARTBEAT_SECONDS = 5.0
#: A live record not rewritten for this long belongs to a stopped process.
STALE_SECONDS = 30.0
#: Ended builds kept in ``recent/``.
RECENT_KEPT = 100
#: A record larger than this is not ours; an error message is cut to this.
RECORD_LIMIT = 64 * 1024
MESSAGE_LIMIT = 4096
#: Phases in which a build has ended.
ENDED = ("done", "failed")


@dataclass(frozen=True)
class Activity:
    """One build as the board shows it.

    ``phase`` is the builder's (``queued``, ``nix``, ``layering``,
    ``layers``, ``done`` or ``failed``); ``started`` and ``updated`` are Unix
    times; ``code`` and ``message`` are the registry error a failed build
    gave its clients (without host paths).
    """

    image: str
    tag: str
    platform: str
    phase: str
    layers_total: int
    layers_cached: int
    layers_written: int
    bytes: int
    started: float
    updated: float
    pid: int
    host: str
    code: str = ""
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.phase == "failed"

    def public_json(self) -> dict[str, Any]:
        """The activity as ``/status.json`` shows it (without the host's name)."""
        public = dataclasses.asdict(self)
        del public["host"]
        return public


_FIELDS = {field.name: field.type for field in dataclasses.fields(Activity)}
_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (float, int)}


def decode_activity(raw: bytes) -> Activity | None:
    """The record's activity, or ``None`` for anything but a whole record of ours."""
    try:
        record = msgpack.unpackb(raw, raw=False)
    except Exception:  # torn, or not msgpack at all
        return None
    if not isinstance(record, dict):
        return None
    values: dict[str, Any] = {}
    for name, kind in _FIELDS.items():
        value = record.get(name)
        if not isinstance(value, _TYPES[str(kind)]) or isinstance(value, bool):
            return None
        values[name] = value
    return Activity(**values)


def encode_activity(activity: Activity) -> bytes:
    data: bytes = msgpack.packb(dataclasses.asdict(activity), use_bin_type=True)
    return data


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it is there
        return True
    return True


class Folders:
    """Where a store's board lives."""

    def __init__(self, root: Path) -> None:
        self.root = root / "run" / "activity"
        self.live = self.root / "live"
        self.recent = self.root / "recent"
        self.tmp = root / "tmp"
        self.host = socket.gethostname()

    def stale(self, activity: Activity, now: float) -> bool:
        """Whether a live record belongs to no running build."""
        if now - activity.updated > STALE_SECONDS:
            return True
        return activity.host == self.host and not _alive(activity.pid)


def _read(path: Path) -> Activity | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(RECORD_LIMIT + 1)
    except OSError:  # removed meanwhile, or not a file
        return None
    return None if len(raw) > RECORD_LIMIT else decode_activity(raw)


def _names(directory: Path) -> list[str]:
    try:
        return [name for name in os.listdir(directory) if not name.startswith(".")]
    except OSError:
        return []


@dataclass(frozen=True)
class Snapshot:
    """What the board shows: builds in progress (oldest first), and ended
    builds and failures (newest first)."""

    building: list[Activity]
    built: list[Activity]
    failed: list[Activity]


def read_board(root: Path, shown: int = 20, now: float | None = None) -> Snapshot:
    """The board of the store at ``root``: every live build, and the newest
    ``shown`` finished builds and failures (blocking: call it in a worker thread)."""
    folders = Folders(root)
    now = time.time() if now is None else now
    building = []
    for name in _names(folders.live):
        activity = _read(folders.live / name)
        if activity is not None and not folders.stale(activity, now):
            building.append(activity)
    built: list[Activity] = []
    failed: list[Activity] = []
    for name in sorted(_names(folders.recent), reverse=True):
        if len(built) >= shown and len(failed) >= shown:
            break
        activity = _read(folders.recent / name)
        if activity is None or activity.phase not in ENDED:
            continue
        chosen = failed if activity.failed else built
        if len(chosen) < shown:
            chosen.append(activity)
    building.sort(key=lambda a: (a.started, a.image, a.platform))
    return Snapshot(building, built, failed)


class ActivityBoard:
    """One process's builds, kept on the store's board (see the module docstring).

    :meth:`report` is a progress hook of the builder (on the event loop, and
    cheap); :meth:`run` writes, in the nursery that owns the board.
    """

    def __init__(self, root: Path, package_set: str | None = None) -> None:
        self.folders = Folders(root)
        self._package_set = package_set
        self._token = secrets.token_hex(4)
        self._count = 0
        #: Builds in progress: id of their progress object -> record file name.
        self._names: dict[int, str] = {}
        #: Live records to write (an activity) or remove (``None``), by name.
        self._dirty: dict[str, Activity | None] = {}
        #: Live records written and not removed, and when (trio's clock): what
        #: a heartbeat rewrites.
        self._written: dict[str, tuple[Activity, float]] = {}
        #: Ended builds not yet written to ``recent/``.
        self._ended: list[Activity] = []
        self._wake = trio.Event()
        self._warned = False

    def report(self, progress: BuildProgress) -> None:
        """Remember where a build stands, for the next write (a progress hook)."""
        key = id(progress)
        name = self._names.get(key)
        if name is None:
            if progress.phase in ENDED or progress.phase == "cancelled":
                return  # never seen in progress: nothing to end
            self._count += 1
            name = f"{os.getpid()}-{self._token}-{self._count}"
            self._names[key] = name
        if progress.phase in ENDED or progress.phase == "cancelled":
            del self._names[key]
            if name in self._written:
                self._dirty[name] = None
            else:  # ended before its first write: nothing to remove
                self._dirty.pop(name, None)
            if progress.phase != "cancelled" and len(self._ended) < RECENT_KEPT:
                self._ended.append(self._activity(progress))
        else:
            self._dirty[name] = self._activity(progress)
        self._wake.set()

    def _activity(self, progress: BuildProgress) -> Activity:
        code = message = ""
        if progress.error is not None:
            public = progress.error.public_json(self._package_set)
            code, message = str(public["code"]), str(public["message"])[:MESSAGE_LIMIT]
        elif progress.phase == "failed":  # not a registry error: a bug, say
            code, message = "INTERNAL_ERROR", "an unexpected error (the server's log has it)"
        return Activity(
            image=progress.image, tag=progress.tag, platform=progress.platform,
            phase=progress.phase, layers_total=progress.layers_total,
            layers_cached=progress.layers_cached, layers_written=progress.layers_written,
            bytes=progress.bytes, started=progress.started, updated=time.time(),
            pid=os.getpid(), host=self.folders.host, code=code, message=message,
        )  # fmt: skip

    async def run(self) -> None:
        """Clear the records of stopped processes, then write this process's
        changes as they come, and rewrite the records of builds that did not
        move for :data:`HEARTBEAT_SECONDS`, until cancelled; then remove this
        process's live records."""
        await trio.to_thread.run_sync(self.clear_stale)
        try:
            while True:
                with trio.move_on_after(HEARTBEAT_SECONDS):
                    await self._wake.wait()
                self._wake = trio.Event()
                dirty, ended = self._dirty, self._ended
                self._dirty, self._ended = {}, []
                now = trio.current_time()
                for name, (activity, written) in self._written.items():
                    if name not in dirty and now - written >= HEARTBEAT_SECONDS:
                        dirty[name] = dataclasses.replace(activity, updated=time.time())
                for name, changed in dirty.items():
                    if changed is None:
                        self._written.pop(name, None)
                    else:
                        self._written[name] = (changed, now)
                if dirty or ended:
                    await trio.to_thread.run_sync(self._write, dirty, ended)
                await trio.sleep(WRITE_INTERVAL)
        finally:
            for name in self._written:
                with contextlib.suppress(OSError):
                    os.unlink(self.folders.live / name)

    def _write(self, dirty: dict[str, Activity | None], ended: list[Activity]) -> None:
        """Write and remove live records, add ended ones to ``recent/`` and prune it."""
        try:
            for name, activity in dirty.items():
                if activity is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.folders.live / name)
                else:
                    self._put(self.folders.live, name, activity)
            for index, activity in enumerate(ended):
                name = f"{time.time_ns():020d}-{os.getpid()}-{self._token}-{index}"
                self._put(self.folders.recent, name, activity)
            if ended:
                self._prune()
        except OSError as exc:  # a full disk: the board lags, builds go on
            if not self._warned:
                logs.warning("activity.unwritten", error=str(exc))
                self._warned = True

    def _put(self, directory: Path, name: str, activity: Activity) -> None:
        replace_file(self.folders.tmp, directory / name, encode_activity(activity), ".activity")

    def _prune(self) -> None:
        names = sorted(_names(self.folders.recent))
        for name in names[: max(0, len(names) - RECENT_KEPT)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folders.recent / name)

    def clear_stale(self) -> int:
        """Remove the live records of stopped processes (blocking); how many.

        A record with this process's id is a previous process's: this board
        has written none yet when it starts.
        """
        now = time.time()
        removed = 0
        for name in _names(self.folders.live):
            path = self.folders.live / name
            activity = _read(path)
            if (
                activity is None
                or self.folders.stale(activity, now)
                or (activity.pid == os.getpid() and activity.host == self.folders.host
                    and name not in self._written)
            ):  # fmt: skip
                with contextlib.suppress(OSError):  # gone meanwhile, or a folder
                    path.unlink()
                    removed += 1
        return removed
