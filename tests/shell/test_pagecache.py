"""``pagecache``: residency as the kernel reports it, on a real file on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery_trio.pagecache import read_in, resident

SIZE = 4 << 20
PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[int]:
    """A descriptor of a 4 MiB file whose pages were all dropped from the page cache."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped, dirty ones cannot
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        yield fd
    finally:
        os.close(fd)


def test_a_dropped_file_is_not_resident_until_read_in(cold: int) -> None:
    assert not resident(cold, 0, SIZE)
    read_in(cold, 0, SIZE)
    assert resident(cold, 0, SIZE)


def test_residency_is_per_range_and_counts_partly_covered_pages(cold: int) -> None:
    offset, count = 3 * PAGE + 100, PAGE  # ends inside the next page
    read_in(cold, offset, count)
    assert resident(cold, offset, count)
    assert resident(cold, 3 * PAGE, 2 * PAGE)
    assert not resident(cold, 2 * PAGE, PAGE)
    assert not resident(cold, offset, 2 * PAGE)
    assert not resident(cold, 0, SIZE)


def test_empty_and_short_ranges(cold: int) -> None:
    assert resident(cold, 10, 0)
    read_in(cold, SIZE - 10, 1000)  # past the end: reads what there is
    assert resident(cold, SIZE - 10, 10)
