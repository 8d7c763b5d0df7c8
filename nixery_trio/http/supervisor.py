"""The parent of the worker processes: it forks them, replaces the ones that die,
and drains them all on SIGTERM.

Python runs one thread of Python at a time, so ``serve`` forks one worker
process per core, each a whole server on the same listening sockets.  The
parent does nothing else; it waits for signals with ``sigwaitinfo`` (SIGCHLD,
SIGTERM and SIGINT blocked and taken synchronously, so no handler can run in
the middle of a fork), which keeps it single-threaded and free of Trio, and
so always safe to fork again:

- a worker that dies (killed by the kernel's OOM killer, say) is logged and
  replaced at once, up to :data:`MAX_RESTARTS` times in
  :data:`RESTART_WINDOW` seconds; one more death in that window means
  something is wrong that a restart does not mend, and the server stops
  and exits 1 for its service manager to see;
- SIGTERM or SIGINT drains: the parent closes its copies of the listening
  sockets and sends SIGTERM to every worker, each of which stops accepting,
  finishes the responses in flight for up to the drain timeout and exits;
  after the drain timeout and :data:`DRAIN_MARGIN` more, what is left is
  killed, and the parent exits 0.  A second signal kills the workers at once.

Workers die with the parent, even when it is killed with SIGKILL
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

from .. import logs, metrics

#: Replacements allowed within :data:`RESTART_WINDOW` seconds.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds the parent waits beyond the workers' own drain timeout.
DRAIN_MARGIN = 5.0
#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
_STOPS = {signal.SIGTERM, signal.SIGINT}
_WATCHED = {signal.SIGCHLD, *_STOPS}


class _GivingUp(Exception):
    """Workers died too often."""


def supervise(
    worker: Callable[[], int],
    count: int,
    sockets: list[socket.socket],
    drain_timeout: float,
    started: Callable[[list[int]], None],
) -> int:
    """Run ``count`` forked processes of ``worker`` (which returns an exit
    status) until a signal stops them; the exit status for the server.

    ``started`` is called with the workers' process ids once they are forked.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    workers = {_fork(worker) for _ in range(count)}
    started(sorted(workers))
    status = 0
    try:
        _watch(worker, workers)
    except _GivingUp:
        status = 1
    finally:
        for sock in sockets:
            sock.close()  # the workers' copies close as they stop accepting
        _stop(workers, drain_timeout + DRAIN_MARGIN)
    return status


def _fork(worker: Callable[[], int]) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    status = 1
    try:
        parent = os.getppid()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == parent:  # else the parent died before prctl took effect
            # SIGTERM drains the worker (its server watches for it); SIGINT,
            # which a terminal sends to the whole group, is the parent's.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            status = worker()
    finally:
        os._exit(status)


def _watch(worker: Callable[[], int], workers: set[int]) -> None:
    """Replace workers that die until a stop signal arrives."""
    deaths: deque[float] = deque()
    while True:
        received = signal.sigwaitinfo(_WATCHED)
        if received.si_signo in _STOPS:
            logs.info("server.draining", signal=signal.Signals(received.si_signo).name,
                      workers=sorted(workers))  # fmt: skip
            return
        for pid, status in _reap(workers):
            logs.error("worker.exited", worker=pid, status=status)
            metrics.worker_exited(pid)
            now = time.monotonic()
            while deaths and now - deaths[0] > RESTART_WINDOW:
                deaths.popleft()
            if len(deaths) >= MAX_RESTARTS:
                logs.error(
                    "server.failing",
                    detail=f"{len(deaths) + 1} workers died within {RESTART_WINDOW:g} s; "
                    "stopping the server",
                )
                raise _GivingUp
            deaths.append(now)
            replacement = _fork(worker)
            workers.add(replacement)
            logs.warning("worker.replaced", worker=replacement, replaces=pid)


def _stop(workers: set[int], timeout: float) -> None:
    """SIGTERM every worker; SIGKILL those still there after ``timeout`` or a second signal."""
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        for pid, status in _reap(workers):
            logs.info("worker.stopped", worker=pid, status=status)
        left = deadline - time.monotonic()
        if not workers:
            return
        received = signal.sigtimedwait(_WATCHED, left) if left > 0 else None
        if received is None or received.si_signo in _STOPS:
            break
    logs.warning("server.killing_workers", workers=sorted(workers))
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _reap(workers: set[int]) -> Iterator[tuple[int, int]]:
    """The workers that ended, with their exit statuses (without waiting)."""
    while workers:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        workers.discard(pid)
        yield pid, os.waitstatus_to_exitcode(code)
