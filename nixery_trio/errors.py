"""The one error hierarchy of nixery-trio, and its table of registry codes.

Every failure the registry can report is a subclass of :class:`RegistryError`
carrying a registry error code (the OCI distribution spec's names where the
spec has one) and an HTTP status.  The pure core raises these; the HTTP layer
turns any of them into ``{"errors": [{"code", "message", "detail"}]}`` in one
place (``registry.py``).  Nothing else in the code base decides statuses.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    """A failure that reaches the client as a registry JSON error.

    ``message`` is a sentence for a person; ``detail`` is optional structured
    data (JSON-serialisable) such as the list of missing packages.
    """

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        """The error as one entry of the registry's ``errors`` list."""
        return {"code": self.code, "message": self.message, "detail": self.detail}

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


class TagInvalid(RegistryError):
    """The manifest reference is neither a valid tag nor a valid digest."""

    code = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    """A digest is malformed or uses an algorithm we do not serve."""

    code = "DIGEST_INVALID"
    status = 400


class ManifestUnknown(RegistryError):
    """No such manifest: unknown digest, or packages Nix could not find."""

    code = "MANIFEST_UNKNOWN"
    status = 404


class BlobUnknown(RegistryError):
    """No blob with this digest is in the store."""

    code = "BLOB_UNKNOWN"
    status = 404


class RangeNotSatisfiable(RegistryError):
    """A ``Range`` header that does not fit the blob."""

    code = "RANGE_INVALID"
    status = 416


class Unsupported(RegistryError):
    """A method or endpoint this read-only registry does not offer."""

    code = "UNSUPPORTED"
    status = 405


class NotFound(RegistryError):
    """A URL outside the registry API."""

    code = "NOT_FOUND"
    status = 404


class BuildFailed(RegistryError):
    """Nix failed to build the image; the message says which derivation."""

    code = "BUILD_FAILED"
    status = 500


class BuildTimeout(RegistryError):
    """The Nix build ran past ``NIX_TIMEOUT`` and was killed."""

    code = "BUILD_TIMEOUT"
    status = 500


class StorageError(RegistryError):
    """The content-addressed store could not write or read a blob."""

    code = "STORAGE_ERROR"
    status = 500


class HeadersTooLarge(RegistryError):
    """The request's headers exceed what a registry client ever sends."""

    code = "HEADERS_TOO_LARGE"
    status = 431


class InternalError(RegistryError):
    """A bug or an unexpected failure; the message names the exception."""

    code = "INTERNAL_ERROR"
    status = 500


class ConfigError(Exception):
    """Invalid start-up configuration; never reaches an HTTP client."""


class BadRequest(RegistryError):
    """A request the HTTP layer could not accept (too large, malformed)."""

    code = "BAD_REQUEST"
    status = 400
