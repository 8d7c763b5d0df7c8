"""``pagecache``: residency as the kernel reports it, on a real file on disk.

Both ways of asking run: ``cachestat`` (exact) and the non-waiting probes
(the fallback for kernels before 6.5).  Each test empties the file's cache
first and checks that it is empty with ``mincore`` (``tests/pagecache_truth.py``),
which, unlike a probe, reads nothing; and each case asks its question of a
freshly emptied file, since a probe that fails may start readahead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixery_trio.http.pagecache import PROBE_STEP, cached, probed, read_in, resident

from ..pagecache_truth import PAGE, cached_pages, evict

SIZE = 4 << 20


@dataclass(frozen=True)
class Way:
    """One way of asking whether a range is cached."""

    ask: Callable[[int, int, int], bool | None]
    exact: bool

    def check(self, fd: int, offset: int, count: int, expected: bool, page: int = 0) -> None:
        """Assert the answer for a range; ``page`` is a missing page when it is False.

        A probe that finds its page missing starts readahead, which on a fast
        disk can end in time for the probe to find the page after all: the
        probes may answer True for a missing page only by having read it in.
        """
        answer = self.ask(fd, offset, count)
        if not self.exact and answer and not expected:
            assert cached_pages(fd, page * PAGE, 1) == [True], "a probe skipped a missing page"
        else:
            assert answer is expected


@pytest.fixture(params=["cachestat", "probes"])
def way(request: pytest.FixtureRequest, tmp_path: Path) -> Way:
    if request.param == "probes":
        return Way(probed, exact=False)
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        if cached(fd, 0, 1) is None:
            pytest.skip("this kernel has no cachestat(2) (Linux 6.5 and later)")
    finally:
        os.close(fd)
    return Way(cached, exact=True)


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[int]:
    """A descriptor of a 4 MiB file on disk with none of its pages in the page cache."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        evict(fd)
        yield fd
    finally:
        os.close(fd)


def test_a_dropped_file_is_not_resident_until_read_in(way: Way, cold: int) -> None:
    way.check(cold, 0, SIZE, False)
    read_in(cold, 0, SIZE)
    assert all(cached_pages(cold))
    way.check(cold, 0, SIZE, True)


def test_a_page_missing_at_any_probe_makes_the_range_not_resident(way: Way, cold: int) -> None:
    for hole in [*range(0, SIZE, PROBE_STEP), SIZE - PAGE]:
        read_in(cold, 0, SIZE)
        evict(cold, hole, PAGE)
        assert sum(cached_pages(cold)) == SIZE // PAGE - 1, hole
        way.check(cold, 0, SIZE, False, hole // PAGE)


def test_a_hole_between_two_probes(way: Way, cold: int) -> None:
    """cachestat sees every page; the probes see only the pages they read."""
    read_in(cold, 0, SIZE)
    evict(cold, PAGE, PAGE)
    assert way.ask(cold, 0, SIZE) is (not way.exact)


# A read of PAGE bytes from 100 bytes into page 3 needs pages 3 and 4.
READ = (3 * PAGE + 100, PAGE)


@pytest.mark.parametrize(
    ("probe", "expected", "missing_page"),
    [
        pytest.param(READ, True, None, id="the-range-read"),
        pytest.param((3 * PAGE, 2 * PAGE), True, None, id="its-whole-pages"),
        pytest.param((2 * PAGE, PAGE), False, 2, id="the-page-before"),
        pytest.param((READ[0], 2 * PAGE), False, 5, id="ending-inside-the-page-after"),
        pytest.param((0, SIZE), False, 0, id="the-whole-file"),
    ],
)
def test_residency_is_per_range_and_counts_partly_covered_pages(
    way: Way, cold: int, probe: tuple[int, int], expected: bool, missing_page: int | None
) -> None:
    read_in(cold, *READ)
    assert cached_pages(cold, *READ) == [True, True]
    if missing_page is not None and cached_pages(cold, missing_page * PAGE, 1) == [True]:
        pytest.skip(
            f"the kernel read page {missing_page} around a read of pages 3 and 4; "
            "this case needs it out of the cache"
        )
    way.check(cold, *probe, expected, missing_page or 0)


def test_empty_and_short_ranges(way: Way, cold: int) -> None:
    way.check(cold, 10, 0, True)
    read_in(cold, SIZE - 10, 1000)  # past the end: reads what there is
    assert cached_pages(cold, SIZE - 10, 10) == [True]
    way.check(cold, SIZE - 10, 10, True)


def test_resident_asks_cachestat_where_the_kernel_has_it(cold: int) -> None:
    read_in(cold, 0, SIZE)
    evict(cold, PAGE, PAGE)  # between two probes: only cachestat sees it
    assert resident(cold, 0, SIZE) is (cached(cold, 0, SIZE) is None)
