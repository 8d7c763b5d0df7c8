"""HTTP ``Range`` headers for blob downloads (pure).

Registries serve single byte ranges, which clients use to resume a blob.
We accept one ``bytes=`` range of the forms ``a-b``, ``a-`` and ``-n``; a
range whose end lies past the blob is clamped, as RFC 9110 says.  Anything
else — another unit, several ranges, reversed bounds, garbage, a start past
the end — is answered with 416 rather than silently ignored, so a client
that asked for a part never mistakes the whole blob for it.
"""

from __future__ import annotations

import re

from .errors import RangeNotSatisfiable

_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """The inclusive ``(first, last)`` byte positions ``header`` selects.

    Raises :class:`RangeNotSatisfiable` for any range we do not serve.
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        raise RangeNotSatisfiable(
            f"unsupported Range header {header[:100]!r}: expected one 'bytes=FIRST-LAST' range",
            {"size": size},
        )
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text or int(last_text) == 0:
            raise RangeNotSatisfiable("empty suffix range", {"size": size})
        length = min(int(last_text), size)
        if length == 0:
            raise RangeNotSatisfiable("range of an empty blob", {"size": size})
        return size - length, size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size:
        raise RangeNotSatisfiable(
            f"range starts at {first}, past the blob's {size} bytes", {"size": size}
        )
    if last < first:
        raise RangeNotSatisfiable(f"reversed range {first}-{last}", {"size": size})
    return first, min(last, size - 1)
