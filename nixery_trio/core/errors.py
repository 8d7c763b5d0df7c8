"""The one error hierarchy of nixery-trio, and its table of registry codes.

Every failure the registry can report is a subclass of :class:`RegistryError`
carrying a registry error code (the OCI distribution spec's names where the
spec has one) and an HTTP status.  The pure core raises these; the HTTP layer
turns any of them into ``{"errors": [{"code", "message", "detail"}]}`` in one
place (``registry.py``).  Nothing else in the code base decides statuses.

An error that quotes the host (Nix's output, the operating system's
messages) reaches the client through :meth:`RegistryError.public_json`,
without host paths (:func:`public_text`); the server's log keeps them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

#: An absolute path in a message: a slash that starts no URL or relative
#: path (or follows ``file://``), up to a space, quote, bracket or comma.
_HOST_PATH = re.compile(r"(?:(?<=file://)|(?<![\w.:/~+@-]))/(?!/)[^\s'\"`,;()\[\]{}<>|]+")
_NIX_STORE = "/nix/store/"


def public_text(text: str, package_set: str | None) -> str:
    """``text`` with host paths left out: a path in ``package_set`` becomes
    relative to it, a Nix store path stays, any other is ``<host path>``."""

    def public(match: re.Match[str]) -> str:
        path = match.group(0)
        if path.startswith(_NIX_STORE):
            return path
        if package_set and (path == package_set or path.startswith(package_set + "/")):
            return path[len(package_set) + 1 :] or "."
        return "<host path>"

    return _HOST_PATH.sub(public, text)


def _public(value: Any, package_set: str | None) -> Any:
    if isinstance(value, str):
        return public_text(value, package_set)
    if isinstance(value, dict):
        return {key: _public(item, package_set) for key, item in value.items()}
    if isinstance(value, list):
        return [_public(item, package_set) for item in value]
    return value


class RegistryError(Exception):
    """A failure that reaches the client as a registry JSON error.

    ``message`` is a sentence for a person; ``detail`` is optional structured
    data (JSON-serialisable) such as the list of missing packages.
    """

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    #: Whether message and detail may quote the host (and its paths).
    from_host: ClassVar[bool] = False

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Response headers the error needs beside its body (a challenge, a retry time)."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """The error as one entry of the registry's ``errors`` list, whole (for logs
        and for the other workers)."""
        return {"code": self.code, "message": self.message, "detail": self.detail}

    def public_json(self, package_set: str | None) -> dict[str, Any]:
        """:meth:`to_json` as a client gets it: without host paths (see :func:`public_text`)."""
        entry = self.to_json()
        return _public(entry, package_set) if self.from_host else entry

    @staticmethod
    def from_json(entry: dict[str, Any]) -> RegistryError:
        """The error :meth:`to_json` described (``InternalError`` if the code is unknown)."""
        for kind in RegistryError.__subclasses__():
            if kind.code == entry.get("code"):
                return kind(str(entry.get("message", "")), entry.get("detail"))
        return InternalError(str(entry.get("message", "")), entry.get("detail"))


class NameInvalid(RegistryError):
    """The repository name is outside the OCI grammar or our limits."""

    code = "NAME_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    """A digest is malformed or uses an algorithm we do not serve."""

    code = "DIGEST_INVALID"
    status = 400


class ManifestUnknown(RegistryError):
    """No such manifest: unknown digest, or packages Nix could not find."""

    code = "MANIFEST_UNKNOWN"
    status = 404


class NameUnknown(RegistryError):
    """No repository of that name here (an offline mirror that holds no tag of it)."""

    code = "NAME_UNKNOWN"
    status = 404


class TagInvalid(ManifestUnknown):
    """The reference is no valid tag, so no manifest has it (404, as any unknown tag)."""


class PaginationInvalid(RegistryError):
    """A list's ``n`` is not a whole number from 0 up."""

    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class BlobUnknown(RegistryError):
    """No blob with this digest is in the store."""

    code = "BLOB_UNKNOWN"
    status = 404


class RangeNotSatisfiable(RegistryError):
    """A ``Range`` header that does not fit the blob."""

    code = "RANGE_INVALID"
    status = 416

    def headers(self) -> dict[str, str]:
        size = self.detail.get("size") if isinstance(self.detail, dict) else None
        return {"Content-Range": f"bytes */{size}"} if isinstance(size, int) else {}


class Unsupported(RegistryError):
    """A method or endpoint this read-only registry does not offer."""

    code = "UNSUPPORTED"
    status = 405

    def headers(self) -> dict[str, str]:
        return {"Allow": "GET, HEAD"}


class Unauthorized(RegistryError):
    """No credentials, or wrong ones, where ``--htpasswd`` asks for them.

    ``detail`` is the realm of the challenge that tells the client to log in.
    """

    code = "UNAUTHORIZED"
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Basic realm="{self.detail}", charset="UTF-8"'}


class Denied(RegistryError):
    """A package the allow and deny lists keep out; Nix never sees it."""

    code = "DENIED"
    status = 403


class TooManyRequests(RegistryError):
    """A client over its cold builds per minute; ``detail["retry_after"]`` says when to retry."""

    code = "TOOMANYREQUESTS"
    status = 429

    def headers(self) -> dict[str, str]:
        retry = self.detail.get("retry_after") if isinstance(self.detail, dict) else None
        return {"Retry-After": str(retry)} if isinstance(retry, int) else {}


class NotFound(RegistryError):
    """A URL outside the registry API."""

    code = "NOT_FOUND"
    status = 404


class BuildFailed(RegistryError):
    """Nix failed to build the image; the message says which derivation."""

    code = "BUILD_FAILED"
    status = 500
    from_host = True


class BuildTimeout(RegistryError):
    """The Nix build ran past ``NIX_TIMEOUT`` and was killed."""

    code = "BUILD_TIMEOUT"
    status = 500
    from_host = True


class StorageError(RegistryError):
    """The content-addressed store could not write or read a blob."""

    code = "STORAGE_ERROR"
    status = 500
    from_host = True


class HeadersTooLarge(RegistryError):
    """The request's headers exceed what a registry client ever sends."""

    code = "HEADERS_TOO_LARGE"
    status = 431


class InternalError(RegistryError):
    """A bug or an unexpected failure; the message names the exception."""

    code = "INTERNAL_ERROR"
    status = 500
    from_host = True


class ConfigError(Exception):
    """Invalid start-up configuration; never reaches an HTTP client."""


class BadRequest(RegistryError):
    """A request the HTTP layer could not accept (too large, malformed)."""

    code = "BAD_REQUEST"
    status = 400
