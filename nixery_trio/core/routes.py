"""The registry's URL space, parsed without I/O.

Everything after ``/v2/`` is one of::

    ""                            the API version check
    _catalog                      the repositories in the store
    <name>/tags/list              tags of a repository
    <name>/manifests/<reference>  a manifest by tag or digest
    <name>/blobs/<digest>         a blob
    <name>/referrers/<digest>     the manifests that refer to a digest

A repository name may hold slashes (its components are package names), so
the *last* ``/manifests/``, ``/blobs/`` or ``/referrers/`` splits name from
reference.  The name and reference are validated here, so the HTTP layer
only dispatches: a bad name is ``NAME_INVALID``, a bad digest
``DIGEST_INVALID`` (including references holding ``/`` or ``..``), a bad tag
``MANIFEST_UNKNOWN`` (no manifest has it), anything else ``NOT_FOUND``.
Percent-encoded separators (``%2F``, ``%5C``) and NUL are refused outright:
a decoded path must never differ in structure from what the client sent.
Lists (tags, the catalog) come in pages: :func:`page`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .digest import parse_digest
from .errors import DigestInvalid, NameInvalid, NotFound, PaginationInvalid, TagInvalid
from .image import validate_name

_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_MAX_PATH = 4096


class Kind(Enum):
    BASE = "base"
    CATALOG = "catalog"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"
    REFERRERS = "referrers"


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


#: The endpoints under a repository name, as a path spells them.
_ENDPOINTS = {"/manifests/": Kind.MANIFEST, "/blobs/": Kind.BLOB, "/referrers/": Kind.REFERRERS}


def _endpoint(rest: str) -> tuple[int, Kind | None]:
    """Where the last endpoint of ``rest`` starts, and which one (``-1, None``: none)."""
    return max(((rest.rfind(marker), kind) for marker, kind in _ENDPOINTS.items()),
               key=lambda found: found[0], default=(-1, None))  # fmt: skip


def kind_of(rest: str) -> Kind | None:
    """The kind of endpoint the path after ``/v2/`` asks for, without checking
    its name or reference (``None``: none), e.g. for a metrics label."""
    if rest == "":
        return Kind.BASE
    if rest == "_catalog":
        return Kind.CATALOG
    if rest.endswith("/tags/list"):
        return Kind.TAGS
    split, kind = _endpoint(rest)
    return kind if split > 0 else None


def parse_route(rest: str, raw_path: str = "") -> Route:
    """Parse the path after ``/v2/`` (decoded), given the raw request path too."""
    if _ENCODED_SEPARATOR.search(raw_path) or "\0" in rest:
        raise NameInvalid("encoded '/', '\\' or NUL characters are not allowed in paths")
    if len(rest) > _MAX_PATH:
        raise NameInvalid(f"the path is {len(rest)} characters long, at most {_MAX_PATH}")
    if rest == "":
        return Route(Kind.BASE)
    if rest == "_catalog":
        return Route(Kind.CATALOG)
    if rest.endswith("/tags/list"):
        return Route(Kind.TAGS, validate_name(rest.removesuffix("/tags/list")))
    split, _ = _endpoint(rest)
    if split <= 0:
        raise NotFound(f"/v2/{rest[:200]} is not an endpoint of this registry")
    name = rest[:split]
    kind_text, _, reference = rest[split + 1 :].partition("/")
    validate_name(name)
    if kind_text == "blobs":
        return Route(Kind.BLOB, name, parse_digest(_single(reference)))
    if kind_text == "referrers":
        return Route(Kind.REFERRERS, name, parse_digest(_single(reference)), by_digest=True)
    if ":" in reference or "/" in reference:
        return Route(Kind.MANIFEST, name, parse_digest(_single(reference)), by_digest=True)
    if _TAG.fullmatch(reference) is None:
        raise TagInvalid(
            f"invalid tag {reference[:200]!r}: a tag is 1 to 128 of [a-zA-Z0-9._-], "
            "not starting with '.' or '-'",
            {"tag": reference[:200]},
        )
    return Route(Kind.MANIFEST, name, reference)


#: The most entries of a list one response holds, whatever ``n`` asks.
MAX_PAGE = 1000


@dataclass(frozen=True)
class Page:
    """One page of a sorted list; ``next_last`` is where the next one starts, if any."""

    entries: list[str]
    next_last: str | None
    n: int


def page(entries: list[str], n: str | None, last: str | None) -> Page:
    """The entries (sorted) after ``last``, at most ``n`` of them (all, up to
    :data:`MAX_PAGE`, without ``n``), as the distribution spec's ``n`` and ``last``."""
    if n is None:
        count = MAX_PAGE
    else:
        if not n.isdigit():
            raise PaginationInvalid(f"n must be a whole number from 0 up, got {n[:50]!r}")
        count = min(int(n), MAX_PAGE)
    after = sorted(entry for entry in entries if last is None or entry > last)
    chosen = after[:count]
    more = len(after) > count and count > 0
    return Page(chosen, chosen[-1] if more else None, count)


def _single(reference: str) -> str:
    if "/" in reference:
        raise DigestInvalid(f"invalid digest {reference[:200]!r}: a digest holds no '/'")
    return reference
