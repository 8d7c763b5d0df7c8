"""Build leases: one replica builds an image while the others on the bucket wait.

Within one server, a flight's lock file (``locks.py``) keeps its workers
from building an image twice.  Replicas on one bucket share no disk, so
they take a **lease**, an object ``leases/<blake3(flight key)>`` in the
bucket, with S3's conditional writes and no lock server:

* **take**: ``PutObject`` with ``If-None-Match: *``; of replicas racing,
  exactly one creates it;
* **renew**: the holder rewrites it every third of :attr:`BuildLeases.seconds`
  with ``If-Match`` on its last ETag, so every renewal changes the ETag;
* **wait**: the others look at the lease (and at whether the image is built
  yet, ``built()``) every :data:`POLL_SECONDS`;
* **take over**: a waiter that has seen the same ETag for ``seconds`` of
  its own clock (the holder stopped renewing: killed, stopped, cut off)
  replaces it with ``If-Match`` on that ETag; of several waiters, one wins.
  Expiry is measured by each waiter's monotonic clock, never by comparing
  clocks between machines;
* **release**: the holder deletes it when its build ends, successful or not.

Everything a build writes is content-addressed and whole or absent, so a
replica that lost its lease (it stalled past ``seconds`` and was taken
over) and goes on building costs time, never correctness: both write the
same blobs and records.  The lease only saves the duplicate Nix build.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import blake3
import trio

from .. import logs
from ..core.errors import StorageError

if TYPE_CHECKING:  # boto3 is imported only by a server that uses a bucket
    from .s3 import S3Bucket

T = TypeVar("T")

PREFIX = "leases/"
#: Seconds between two looks of a waiter at a lease held by another replica.
POLL_SECONDS = 0.25


def owner_name() -> str:
    """Who holds a lease, for the log: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class BuildLeases:
    """Leases on flight keys in one bucket, each lasting ``seconds`` unless renewed."""

    def __init__(self, bucket: S3Bucket, seconds: float, owner: str | None = None) -> None:
        self.bucket = bucket
        self.seconds = seconds
        self.owner = owner or owner_name()

    def _key(self, flight_key: str) -> str:
        return PREFIX + blake3.blake3(flight_key.encode()).hexdigest()

    def _body(self, flight_key: str) -> bytes:
        # A new body at every write: the ETag changes, which is what waiters watch.
        return json.dumps({"owner": self.owner, "key": flight_key[:500], "at": time.time(),
                           "nonce": secrets.token_hex(8)}).encode()  # fmt: skip

    @contextlib.asynccontextmanager
    async def hold(
        self, flight_key: str, built: Callable[[], Awaitable[T | None]]
    ) -> AsyncIterator[T | None]:
        """Hold ``flight_key``'s lease for the block, which yields ``None``;
        or, if another replica built it meanwhile, yield what ``built()``
        found, without the lease."""
        key = self._key(flight_key)
        etag, found = await self._take(key, flight_key, built)
        if etag is None:
            yield found
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew, key, flight_key, etag)
            try:
                yield None
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._release, key)

    async def _take(
        self, key: str, flight_key: str, built: Callable[[], Awaitable[T | None]]
    ) -> tuple[str | None, T | None]:
        """Our ETag once we hold the lease; or ``(None, result)`` when ``built()``
        found the image first."""
        seen: tuple[str, float] | None = None  # the holder's ETag, and since when
        waited = False
        while True:
            etag = await trio.to_thread.run_sync(
                self.bucket.put_if_absent, key, self._body(flight_key)
            )
            if etag is not None:
                # A lease released by a holder that finished: its image is
                # recorded, unless its build failed.
                found = await built() if waited else None
                if found is not None:
                    await trio.to_thread.run_sync(self._release, key)
                    return None, found
                return etag, None
            waited = True
            current = await trio.to_thread.run_sync(self.bucket.get_tagged, key)
            if current is None:
                continue  # released just now: take it
            now = trio.current_time()
            if seen is None or seen[0] != current[1]:
                seen = (current[1], now)  # new, or renewed since the last look
                logs.info("lease.waiting", key=flight_key[:200], holder=_holder(current[0]))
            elif now - seen[1] >= self.seconds:
                etag = await trio.to_thread.run_sync(
                    self.bucket.put_if_match, key, self._body(flight_key), current[1]
                )
                if etag is not None:
                    logs.warning("lease.taken_over", key=flight_key[:200],
                                 holder=_holder(current[0]),
                                 silent_seconds=round(now - seen[1], 1))  # fmt: skip
                    return etag, None
                # Another waiter took it over first: watch the new holder.
            found = await built()
            if found is not None:
                return None, found
            await trio.sleep(POLL_SECONDS)

    async def _renew(self, key: str, flight_key: str, etag: str) -> None:
        while True:
            await trio.sleep(self.seconds / 3)
            try:
                renewed = await trio.to_thread.run_sync(
                    self.bucket.put_if_match, key, self._body(flight_key), etag
                )
            except StorageError as exc:  # the bucket did not answer: try again
                logs.warning("lease.renew_failed", key=flight_key[:200], error=str(exc))
                continue
            if renewed is None:
                logs.warning("lease.lost", key=flight_key[:200],
                             detail="another replica took it over; this build goes on")  # fmt: skip
                return
            etag = renewed

    def _release(self, key: str) -> None:
        """Delete the lease if it is still ours (a lost one is another's now);
        one the bucket would not delete expires."""
        try:
            current = self.bucket.get_tagged(key)
            if current is not None and _holder(current[0]) == self.owner:
                self.bucket.delete(key)
        except StorageError as exc:
            logs.warning("lease.release_failed", key=key, error=str(exc))


def _holder(body: bytes) -> str:
    try:
        return str(json.loads(body)["owner"])
    except (ValueError, KeyError, TypeError):
        return "?"
