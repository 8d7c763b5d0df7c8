"""What the page cache really holds of a file, for the tests of ``nixery_trio.http.pagecache``.

``pagecache.resident`` asks with one-byte reads that must not wait, and a
read that fails that way may still start readahead: it changes what it
looks at.  The tests need an observer that does not, and a way to empty a
file's cache that they can rely on:

- :func:`cached_pages` maps the file and asks ``mincore(2)``, which reads
  nothing and starts nothing.  It counts a page that is being read in as
  cached.
- :func:`evict` drops the file's pages with ``POSIX_FADV_DONTNEED`` and
  checks with ``mincore`` that they are gone.  The kernel drops only clean
  pages that nothing holds, and holds some briefly (a per-CPU LRU batch,
  writeback just ending; seen on a fresh, busy machine), so it repeats
  ``fdatasync`` and the advice until no page is left, and skips the test,
  saying how many pages the kernel kept, if that takes past a deadline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time

import pytest

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_pages(fd: int, offset: int = 0, count: int | None = None) -> list[bool]:
    """Whether each page that ``count`` bytes of ``fd`` from ``offset`` touch is cached.

    ``count`` defaults to the rest of the file; pages past its end are not cached.
    """
    if count is None:
        count = os.fstat(fd).st_size - offset
    if count <= 0:
        return []
    start = offset - offset % PAGE  # a mapping starts on a page
    length = offset + count - start
    address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap: {os.strerror(error)}")
    try:
        vector = (ctypes.c_ubyte * (-(-length // PAGE)))()
        if _libc.mincore(address, length, vector) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mincore: {os.strerror(error)}")
        return [bool(byte & 1) for byte in vector]
    finally:
        _libc.munmap(address, length)


def evict(fd: int, offset: int = 0, count: int | None = None, timeout: float = 10.0) -> None:
    """Drop the pages of ``fd`` that ``count`` bytes from ``offset`` touch (default: all).

    Skips the test if the kernel keeps any of them for ``timeout`` seconds.
    """
    if count is None:
        count = os.fstat(fd).st_size - offset
    deadline = time.monotonic() + timeout
    while True:
        os.fdatasync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)
        pages = cached_pages(fd, offset, count)
        kept = sum(pages)
        if not kept:
            return
        if time.monotonic() > deadline:
            pytest.skip(
                f"the kernel kept {kept} of {len(pages)} pages of a file in the page cache "
                f"through {timeout:g} s of fdatasync and POSIX_FADV_DONTNEED"
            )
        time.sleep(0.01)
