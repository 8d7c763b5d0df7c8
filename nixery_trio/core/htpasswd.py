"""htpasswd files of bcrypt hashes, as Apache's ``htpasswd -B`` writes them.

One ``user:hash`` per line; blank lines and ``#`` comments are skipped.
Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``) is taken, as CNCF distribution
does: the older htpasswd hashes (MD5-crypt, SHA-1, crypt, plain text) are
fast to guess, and a file that holds one is refused with its line number,
not half-used.
"""

from __future__ import annotations

import re

_BCRYPT = re.compile(rb"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


def parse_htpasswd(text: str) -> dict[str, bytes]:
    """User names to bcrypt hashes; ``ValueError`` names the first bad line."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"line {number} is not user:hash")
        if not _BCRYPT.match(hashed.encode()):
            raise ValueError(
                f"line {number} ({user}): not a bcrypt hash; make it with htpasswd -B"
            )
        users[user] = hashed.encode()
    if not users:
        raise ValueError("holds no user")
    return users
