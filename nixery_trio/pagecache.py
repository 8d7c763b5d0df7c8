"""Is a file range in the page cache, and reading it in if not.

``sendfile(2)`` on a non-blocking socket never waits for the socket, but it
does wait for the disk: file pages that are not in the page cache are read
on the spot, on the calling thread, which for the server is the event loop.
A blob that was just built is in the page cache; one of a large mirror, or
any blob after a reboot, may not be, and while the disk reads it every other
connection of that worker waits.

So before a range goes out with sendfile, :func:`resident` asks the kernel
whether it is cached, and if not, :func:`read_in` reads the range in a
worker thread first, as nginx's ``aio threads`` would.  The question is
asked with one-byte reads that must not wait (``preadv2`` with
``RWF_NOWAIT``) at one byte per MiB and at the range's last byte: cheap
enough for the event loop (about 1 us a probe, where ``mincore(2)`` over
every page of 8 MiB took 120 us here).  Pages leave the cache in runs, not
one by one, but a hole between two probes can still make sendfile wait.
And a probe sometimes finds a cached page unavailable (twice in a 10 s load
test on a cached blob, here): that costs one needless read of the piece in
a worker thread, never a wrong byte.
"""

from __future__ import annotations

import os

#: Bytes between two probes of a range.
PROBE_STEP = 1 << 20
#: Bytes per read when reading a range in.
_READ = 1 << 20


def resident(fd: int, offset: int, count: int) -> bool:
    """Whether ``count`` bytes of ``fd`` from ``offset`` are in the page cache, by probes.

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
