"""The activity board on a real filesystem: live and recent records, stale
ones, pruning, and files that are not records."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

import msgpack
import pytest
import trio

from nixery_trio.core.errors import BuildFailed, ManifestUnknown
from nixery_trio.core.progress import BuildProgress
from nixery_trio.store import activity
from nixery_trio.store.activity import (
    Activity,
    ActivityBoard,
    Folders,
    encode_activity,
    read_board,
)


async def until(predicate: Callable[[], object], timeout: float = 10) -> None:
    """Wait until ``predicate()`` is true, or fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.fixture
async def board(tmp_path: Path) -> AsyncIterator[ActivityBoard]:
    running = ActivityBoard(tmp_path, package_set="/srv/pkgs")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.run)
        yield running
        nursery.cancel_scope.cancel()


def record(**changes: object) -> Activity:
    fields: dict[str, object] = {
        "image": "hello", "tag": "latest", "platform": "linux/amd64", "phase": "nix",
        "layers_total": 0, "layers_cached": 0, "layers_written": 0, "bytes": 0,
        "started": time.time(), "updated": time.time(), "pid": os.getpid(),
        "host": Folders(Path("/")).host,
    }  # fmt: skip
    return Activity(**(fields | changes))  # type: ignore[arg-type]


def put(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


async def test_a_build_is_live_while_it_runs_then_recent(
    tmp_path: Path, board: ActivityBoard
) -> None:
    progress = BuildProgress("slow/hello", "latest", "linux/amd64")
    board.report(progress)
    await until(lambda: read_board(tmp_path).building)
    progress.phase, progress.layers_total, progress.layers_cached = "layers", 5, 2
    board.report(progress)
    progress.layers_written, progress.bytes = 1, 1000
    board.report(progress)
    await until(lambda: read_board(tmp_path).building[0].layers_written == 1)
    (live,) = read_board(tmp_path).building
    assert (live.image, live.phase, live.layers_total, live.layers_cached, live.bytes) == (
        "slow/hello", "layers", 5, 2, 1000
    )  # fmt: skip
    assert live.pid == os.getpid() and live.started == progress.started
    progress.layers_written, progress.bytes, progress.phase = 3, 3000, "done"
    board.report(progress)
    await until(lambda: read_board(tmp_path).built)
    shown = read_board(tmp_path)
    assert shown.building == [] and shown.failed == []
    (built,) = shown.built
    assert (built.image, built.layers_written, built.layers_cached, built.bytes) == (
        "slow/hello", 3, 2, 3000
    )  # fmt: skip
    assert built.updated >= built.started
    assert os.listdir(board.folders.live) == []


async def test_a_failure_keeps_what_the_client_was_told_without_host_paths(
    tmp_path: Path, board: ActivityBoard
) -> None:
    for name, error in [
        ("broken", BuildFailed("nix-build failed at /srv/pkgs/default.nix:3 in /etc/x")),
        ("nope", ManifestUnknown("packages not found in the package set: nope")),
    ]:
        progress = BuildProgress(name, "latest", "linux/amd64")
        board.report(progress)
        progress.phase, progress.error = "failed", error
        board.report(progress)
    await until(lambda: len(read_board(tmp_path).failed) == 2)
    nope, broken = read_board(tmp_path).failed  # newest first
    assert (broken.code, broken.message) == (
        "BUILD_FAILED", "nix-build failed at default.nix:3 in <host path>"
    )  # fmt: skip
    assert (nope.code, nope.message) == (
        "MANIFEST_UNKNOWN", "packages not found in the package set: nope"
    )  # fmt: skip


async def test_a_cancelled_build_leaves_no_record(tmp_path: Path, board: ActivityBoard) -> None:
    progress = BuildProgress("hang", "latest", "linux/amd64")
    board.report(progress)
    await until(lambda: read_board(tmp_path).building)
    progress.phase = "cancelled"
    board.report(progress)
    await until(lambda: not read_board(tmp_path).building)
    assert read_board(tmp_path).built == [] and read_board(tmp_path).failed == []


async def test_builds_in_progress_are_rewritten_while_they_do_not_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activity, "HEARTBEAT_SECONDS", 0.3)
    board = ActivityBoard(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(board.run)
        board.report(BuildProgress("slow", "latest", "linux/amd64"))
        await until(lambda: read_board(tmp_path).building)
        first = read_board(tmp_path).building[0].updated
        await until(lambda: read_board(tmp_path).building[0].updated > first)
        nursery.cancel_scope.cancel()
    # A board that stops takes its process's live records with it.
    assert os.listdir(board.folders.live) == []


def test_records_of_stopped_processes_are_ignored_then_cleared(tmp_path: Path) -> None:
    live = Folders(tmp_path).live
    now = time.time()
    old = now - activity.STALE_SECONDS - 1
    put(live, "running", encode_activity(record(image="running")))
    put(live, "elsewhere", encode_activity(record(image="elsewhere", host="other", pid=1)))
    put(live, "killed", encode_activity(record(image="killed", pid=dead_pid())))
    put(live, "stopped", encode_activity(record(image="stopped", updated=old)))
    put(live, "gone", encode_activity(record(image="gone", host="other", updated=old)))
    shown = read_board(tmp_path, now=now).building
    assert sorted(a.image for a in shown) == ["elsewhere", "running"]
    # A new board in a process on this store clears the stale records, and
    # those with its own process id, which only an earlier process wrote.
    assert ActivityBoard(tmp_path).clear_stale() == 4
    assert os.listdir(live) == ["elsewhere"]


def test_files_that_are_not_records_are_skipped(tmp_path: Path) -> None:
    folders = Folders(tmp_path)
    good = encode_activity(record(image="good", phase="done"))
    bad = {
        "empty": b"",
        "garbage": b"\xc1\xff not msgpack",
        "torn": good[: len(good) // 2],
        "list": msgpack.packb([1, 2, 3]),
        "wrong-types": msgpack.packb({**asdict(record()), "bytes": "many"}),
        "missing": msgpack.packb({"image": "x"}),
        "boolean": msgpack.packb({**asdict(record()), "pid": True}),
        "huge": encode_activity(record(message="x" * (activity.RECORD_LIMIT + 1))),
    }
    for name, data in bad.items():
        put(folders.live, name, data)
        put(folders.recent, f"1-{name}", data)
    (folders.live / "a-folder").mkdir()
    (folders.recent / "2-a-folder").mkdir()
    put(folders.recent, "3-good", good)
    put(folders.recent, "4-in-progress", encode_activity(record(image="odd")))
    shown = read_board(tmp_path)
    assert shown.building == [] and shown.failed == []
    assert [a.image for a in shown.built] == ["good"]
    assert ActivityBoard(tmp_path).clear_stale() == len(bad)


def test_a_store_without_a_board_shows_nothing(tmp_path: Path) -> None:
    assert read_board(tmp_path / "nowhere") == activity.Snapshot([], [], [])


async def test_recent_builds_are_pruned_to_the_newest(
    tmp_path: Path, board: ActivityBoard
) -> None:
    recent = board.folders.recent
    for index in range(activity.RECENT_KEPT + 20):
        put(recent, f"{index:020d}-1-old", encode_activity(record(image=f"old{index}",
                                                                  phase="done")))  # fmt: skip
    progress = BuildProgress("new", "latest", "linux/amd64")
    board.report(progress)
    progress.phase = "done"
    board.report(progress)
    await until(lambda: len(os.listdir(recent)) == activity.RECENT_KEPT)
    await until(lambda: read_board(tmp_path).built[0].image == "new")
    kept = sorted(os.listdir(recent))
    assert kept[0] == f"{21:020d}-1-old"  # the 21 oldest went
    assert [a.image for a in read_board(tmp_path, shown=3).built] == ["new", "old119", "old118"]


def test_reporting_is_cheap(tmp_path: Path) -> None:
    """A build's progress reports cost microseconds on the event loop: no I/O."""
    board = ActivityBoard(tmp_path)
    builds = [BuildProgress(f"image{i}", "latest", "linux/amd64") for i in range(1000)]
    started = time.perf_counter()
    for progress in builds:
        for phase in ("queued", "nix", "layering", "layers", "done"):
            progress.phase = phase
            board.report(progress)
    per_build = (time.perf_counter() - started) / len(builds)
    assert per_build < 200e-6, f"{per_build * 1e6:.0f} µs per build"
    assert not board.folders.root.exists()  # nothing written without run()
