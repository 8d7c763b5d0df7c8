"""Is a file range in the page cache, and reading it in if not.

``sendfile(2)`` on a non-blocking socket never waits for the socket, but it
does wait for the disk: file pages that are not in the page cache are read
on the spot, on the calling thread, which for the server is the event loop.
A blob that was just built is in the page cache; one of a large mirror, or
any blob after a reboot, may not be, and while the disk reads it every other
connection of that worker waits.

So before a range goes out with sendfile, :func:`resident` asks the kernel
whether it is cached, and if not, :func:`read_in` reads the range in a
worker thread first, as nginx's ``aio threads`` would.  Two ways to ask:

- ``cachestat(2)`` (Linux 6.5 and later): one call counts the range's cached
  pages exactly, reads nothing and starts nothing; about 2 us for 8 MiB here.
  A page that is being read in counts as cached.
- otherwise, one-byte reads that must not wait (``preadv2`` with
  ``RWF_NOWAIT``) at one byte per MiB and at the range's last byte, about
  1.5 us a probe.  They are not exact: a hole between two probes can still
  make sendfile wait, and a probe that finds its page missing starts
  readahead, which on a fast disk may finish before the probe looks again,
  so the probe then answers that the page is cached (it is, by then).  A probe
  also sometimes finds a cached page unavailable (twice in a 10 s load test
  on a cached blob, here): that costs one needless read of the piece in a
  worker thread, never a wrong byte.

:func:`cached` and :func:`probed` are the two ways; :func:`resident` takes
the first where the kernel has it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

#: Bytes between two probes of a range.
PROBE_STEP = 1 << 20
#: Bytes per read when reading a range in.
_READ = 1 << 20
#: ``cachestat``'s number, the same on every architecture but alpha (it came
#: after the syscall tables were unified).
_SYS_CACHESTAT = 451


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
#: Whether to try ``cachestat``: cleared for good when the kernel lacks it
#: or a seccomp filter refuses it.
_use_cachestat = True


def resident(fd: int, offset: int, count: int) -> bool:
    """Whether ``count`` bytes of ``fd`` from ``offset`` are in the page cache.

    Exact where the kernel has ``cachestat``; by :func:`probed` elsewhere.
    """
    found = cached(fd, offset, count) if _use_cachestat else None
    return probed(fd, offset, count) if found is None else found


def cached(fd: int, offset: int, count: int) -> bool | None:
    """Whether every page the range touches is cached, by ``cachestat``; None if unavailable.

    A page past the end of the file is never cached (blob ranges end inside it).
    """
    global _use_cachestat
    if count <= 0:
        return True
    first, last = offset // mmap.PAGESIZE, (offset + count - 1) // mmap.PAGESIZE
    stat = _Stat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(offset, count)), ctypes.byref(stat), 0):
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _use_cachestat = False
        return None
    return bool(stat.nr_cache >= last - first + 1)


def probed(fd: int, offset: int, count: int) -> bool:
    """Whether the range's probed bytes can be read without waiting (see the module's text).

    True when the kernel cannot tell (a filesystem without ``RWF_NOWAIT``):
    send as before.
    """
    if count <= 0:
        return True
    probe = bytearray(1)
    end = offset + count
    for at in [*range(offset, end, PROBE_STEP), end - 1]:
        try:
            os.preadv(fd, [probe], at, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
    return True


def read_in(fd: int, offset: int, count: int) -> None:
    """Read ``count`` bytes of ``fd`` from ``offset`` into the page cache (blocks)."""
    os.posix_fadvise(fd, offset, count, os.POSIX_FADV_WILLNEED)
    buffer = bytearray(min(count, _READ))
    end = offset + count
    while offset < end:
        view = memoryview(buffer)[: min(len(buffer), end - offset)]
        n = os.preadv(fd, [view], offset)
        if n == 0:
            return  # the file is shorter: sendfile will say so
        offset += n
