"""Who may use the registry: HTTP basic authentication against an htpasswd file.

With ``--htpasswd``, every request must carry ``Authorization: Basic`` with
a user and password of the file; any other gets 401 ``UNAUTHORIZED`` with
the ``WWW-Authenticate: Basic`` challenge that makes ``docker login``,
``podman login`` and containerd send their credentials.  The check runs in
front of everything (``registry.FastLane``), so the web page and the
metrics are behind it too.

bcrypt is slow on purpose (tens of milliseconds a check), and a pull sends
its credentials with every request, so a header that checked out is
remembered (by its SHA-256, for :data:`REMEMBER_SECONDS`): a warm pull pays
a hash and a dict lookup.  Checks run in a worker thread, one at a time, so
a client guessing passwords gets one core at most, and no request's event
loop waits on bcrypt.  The file is read again when it changes (looked at
every :data:`RELOAD_SECONDS`), so users are added or removed without a
restart; a file that became invalid is logged and the old users kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import bcrypt
import trio

from .. import logs
from ..core.errors import Unauthorized
from ..core.htpasswd import parse_htpasswd

REALM = "nixery-trio"
#: Seconds a header whose password checked out is trusted without bcrypt.
REMEMBER_SECONDS = 300.0
#: Headers remembered at most (then forgotten all at once).
REMEMBERED = 4096
#: Seconds between two looks at the htpasswd file's size and time.
RELOAD_SECONDS = 2.0


class BasicAuth:
    """The users of an htpasswd file, and the credentials that checked out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._users = parse_htpasswd(path.read_text())
        self._looked = time.monotonic()
        self._good: dict[bytes, tuple[str, float]] = {}
        #: Headers being checked now, and the event that says the check ended.
        self._checking: dict[bytes, trio.Event] = {}
        self._bcrypt = trio.CapacityLimiter(1)

    async def user(self, scope: Any) -> str:
        """The user whose credentials ``scope``'s request carries; else ``UNAUTHORIZED``."""
        header = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        if header is None:
            raise Unauthorized("authentication required: log in with your user name and password",
                               REALM)  # fmt: skip
        now = time.monotonic()
        if now - self._looked >= RELOAD_SECONDS:
            self._looked = now
            self._reload()
        key = hashlib.sha256(header).digest()
        remembered = self._good.get(key)
        if remembered is not None and now < remembered[1]:
            return remembered[0]
        user, password = _credentials(header)
        checking = self._checking.get(key)
        if checking is not None:
            # The same header on another connection (a client opens several
            # at once): one bcrypt check answers them all.
            await checking.wait()
            remembered = self._good.get(key)
            if remembered is None:
                raise Unauthorized("wrong user name or password", REALM)
            return remembered[0]
        self._checking[key] = checked = trio.Event()
        try:
            hashed = self._users.get(user)
            if hashed is None or not await trio.to_thread.run_sync(
                _checkpw, password, hashed, limiter=self._bcrypt
            ):
                logs.info("auth.refused", user=user[:100], client=_client(scope))
                raise Unauthorized("wrong user name or password", REALM)
            if len(self._good) >= REMEMBERED:
                self._good.clear()
            self._good[key] = (user, now + REMEMBER_SECONDS)
            return user
        finally:
            del self._checking[key]
            checked.set()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _reload(self) -> None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            users = parse_htpasswd(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            logs.error("auth.htpasswd_invalid", path=str(self.path), error=str(exc),
                       detail="the users read before stay")  # fmt: skip
            return
        self._users, self._good = users, {}
        logs.info("auth.htpasswd_reloaded", users=len(users))


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # longer than bcrypt's 72 bytes: no such password was ever set
        return False


def _credentials(header: bytes) -> tuple[str, bytes]:
    """User and password of a basic ``Authorization`` header; else ``UNAUTHORIZED``."""
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        raise Unauthorized("only HTTP basic authentication is accepted here", REALM)
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Unauthorized("the Authorization header is not valid base64", REALM) from None
    user, sep, password = decoded.partition(b":")
    if not sep:
        raise Unauthorized("the Authorization header holds no user:password", REALM)
    return user.decode("utf-8", "replace"), password


def _client(scope: Any) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def requester(scope: Any, user: str | None) -> str:
    """Whom ``--cold-builds-per-minute`` counts a request against."""
    return f"user {user}" if user is not None else f"address {_client(scope)}"
