"""Package popularity data, and the store path names it is keyed by.

The layering algorithm (:mod:`nixery_trio.core.layers`) gives popular packages
their own layers, so that images built for different requests share them and
clients download them once.  Popularity comes from a file computed in advance
(Nixery's ``popcount``): a JSON object mapping the *name* of a store path —
the part after the hash, such as ``glibc-2.30`` or ``hello`` — to how many
packages in nixpkgs refer to it::

    {"glibc-2.30": 37611, "zlib-1.2.11": 9144, "hello": 3}

The file is read by the shell; this module only parses the bytes, checking
every entry so that a damaged file is reported once, at start-up, with the
entry that is wrong, instead of skewing layers quietly.
"""

from __future__ import annotations

import json
import re
import string

_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_STORE_BASENAME_RE = re.compile(rf"[{_NIX_BASE32}]{{32}}-(.+)", re.DOTALL)


def parse_popularity(data: bytes) -> dict[str, int]:
    """Parse a popularity file: a JSON object of store path name to a count >= 0.

    Raise :class:`ValueError` naming the first bad entry otherwise.
    """
    try:
        decoded = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"popularity data is not valid JSON: {error}") from error
    if not isinstance(decoded, dict):
        raise ValueError(
            f"popularity data must be a JSON object of name to count, not {type(decoded).__name__}"
        )
    popularity: dict[str, int] = {}
    for name, count in decoded.items():
        if not name:
            raise ValueError("popularity data has an entry with an empty name")
        # bool is an int in Python but `true` is not a count.
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"popularity of {name!r} must be an integer, not {json.dumps(count)}")
        if count < 0:
            raise ValueError(f"popularity of {name!r} must not be negative, got {count}")
        popularity[name] = count
    return popularity


def store_path_name(path: str) -> str:
    """The name part of a store path: ``/nix/store/<hash>-hello-2.10`` -> ``hello-2.10``.

    The hash is 32 characters of Nix's base-32 alphabet.  Only the last path
    component is looked at, so a non-default store directory works too.
    Raise :class:`ValueError` if ``path`` is not a store path.
    """
    basename = path.rstrip("/").rpartition("/")[2]
    match = _STORE_BASENAME_RE.fullmatch(basename)
    if match is None:
        raise ValueError(f"{path!r} is not a Nix store path (<store>/<32-char hash>-<name>)")
    return match.group(1)


def package_name(name: str) -> str:
    """The package name of a store path name without its version, as Nix's ``parseDrvName``.

    The version starts at the first ``-`` that is not followed by a letter:
    ``nss-cacert-3.95`` -> ``nss-cacert``, ``iana-etc-20231227`` -> ``iana-etc``,
    ``hello`` -> ``hello``.
    """
    for index, char in enumerate(name[:-1]):
        if char == "-" and name[index + 1] not in string.ascii_letters:
            return name[:index]
    return name
