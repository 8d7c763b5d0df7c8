"""Content digests: computing them and validating the ones clients send.

Every blob the registry serves is named by ``sha256:<64 lowercase hex>``.
That is the only form we accept from a client: the OCI spec allows other
algorithms and we store nothing under them, and a digest is a *name* in our
content-addressed store, so upper-case hex or a short prefix must not be
accepted as an alias for the same blob (one blob, one name).

Validation explains what is wrong (algorithm, length, case, characters),
because "DIGEST_INVALID" alone does not tell a person which of them they got
wrong.  It raises :class:`~nixery_trio.core.errors.DigestInvalid`, which the HTTP
layer maps to a 400 response.
"""

from __future__ import annotations

import hashlib
import string

from .errors import DigestInvalid

SHA256 = "sha256"
"""The one digest algorithm the registry computes and serves."""

_HEX_LENGTH = 64
_LOWER_HEX = frozenset(string.digits + "abcdef")
_UPPER_HEX = frozenset("ABCDEF")


def parse_digest(s: str) -> str:
    """Return ``s`` unchanged if it is ``sha256:`` followed by 64 lowercase hex digits.

    Raise :class:`DigestInvalid` naming the problem otherwise.
    """
    algorithm, colon, encoded = s.partition(":")
    if not colon:
        raise DigestInvalid(f"digest {s!r} has no algorithm prefix; expected 'sha256:<hex>'")
    if algorithm != SHA256:
        raise DigestInvalid(
            f"digest algorithm {algorithm!r} is not supported; only {SHA256!r} is served",
            detail={"algorithm": algorithm},
        )
    if any(c in _UPPER_HEX for c in encoded) and all(
        c in _LOWER_HEX or c in _UPPER_HEX for c in encoded
    ):
        raise DigestInvalid(f"digest {s!r} must use lowercase hex digits")
    bad = sorted({c for c in encoded if c not in _LOWER_HEX})
    if bad:
        raise DigestInvalid(
            f"digest {s!r} contains characters that are not lowercase hex: {''.join(bad)!r}"
        )
    if len(encoded) != _HEX_LENGTH:
        raise DigestInvalid(
            f"sha256 digest must have {_HEX_LENGTH} hex digits, {s!r} has {len(encoded)}",
            detail={"length": len(encoded)},
        )
    return s


def digest_hex(d: str) -> str:
    """The 64 hex digits of a valid digest (e.g. for a file name in the store)."""
    return parse_digest(d).partition(":")[2]


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return f"{SHA256}:{hashlib.sha256(data).hexdigest()}"
