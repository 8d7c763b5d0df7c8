"""The registry's URL space, parsed without I/O.

Everything after ``/v2/`` is one of::

    ""                            the API version check
    <name>/tags/list              tags of a repository
    <name>/manifests/<reference>  a manifest by tag or digest
    <name>/blobs/<digest>         a blob

A repository name may hold slashes (its components are package names), so
the *last* ``/manifests/`` or ``/blobs/`` splits name from reference.  The
name and reference are validated here, so the HTTP layer only dispatches:
a bad name is ``NAME_INVALID``, a bad digest ``DIGEST_INVALID`` (including
references holding ``/`` or ``..``), a bad tag ``TAG_INVALID``, anything else
``NOT_FOUND``.  Percent-encoded separators (``%2F``, ``%5C``) and NUL are
refused outright: a decoded path must never differ in structure from what
the client sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .digest import parse_digest
from .errors import DigestInvalid, NameInvalid, NotFound, TagInvalid
from .image import validate_name

_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_MAX_PATH = 4096


class Kind(Enum):
    BASE = "base"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True)
class Route:
    """A parsed ``/v2/`` request path.

    ``name`` is the repository name ("" for BASE); ``reference`` a tag or a
    digest for MANIFEST, a digest for BLOB, "" otherwise; ``by_digest`` says
    which a manifest reference is.
    """

    kind: Kind
    name: str = ""
    reference: str = ""
    by_digest: bool = False


def parse_route(rest: str, raw_path: str = "") -> Route:
    """Parse the path after ``/v2/`` (decoded), given the raw request path too."""
    if _ENCODED_SEPARATOR.search(raw_path) or "\0" in rest:
        raise NameInvalid("encoded '/', '\\' or NUL characters are not allowed in paths")
    if len(rest) > _MAX_PATH:
        raise NameInvalid(f"the path is {len(rest)} characters long, at most {_MAX_PATH}")
    if rest == "":
        return Route(Kind.BASE)
    if rest.endswith("/tags/list"):
        return Route(Kind.TAGS, validate_name(rest.removesuffix("/tags/list")))
    split = max(rest.rfind("/manifests/"), rest.rfind("/blobs/"))
    if split <= 0:
        raise NotFound(f"/v2/{rest[:200]} is not an endpoint of this registry")
    name = rest[:split]
    kind_text, _, reference = rest[split + 1 :].partition("/")
    validate_name(name)
    if kind_text == "blobs":
        return Route(Kind.BLOB, name, parse_digest(_single(reference)))
    if ":" in reference or "/" in reference:
        return Route(Kind.MANIFEST, name, parse_digest(_single(reference)), by_digest=True)
    if _TAG.fullmatch(reference) is None:
        raise TagInvalid(
            f"invalid tag {reference[:200]!r}: a tag is 1 to 128 of [a-zA-Z0-9._-], "
            "not starting with '.' or '-'",
            {"tag": reference[:200]},
        )
    return Route(Kind.MANIFEST, name, reference)


def _single(reference: str) -> str:
    if "/" in reference:
        raise DigestInvalid(f"invalid digest {reference[:200]!r}: a digest holds no '/'")
    return reference
