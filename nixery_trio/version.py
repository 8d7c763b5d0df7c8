"""The running code's version: a blake3 over the package's own source files.

A release number says little when the registry is run from a checkout; a
hash of the Python and Nix sources names exactly the code that built an
image, and changes whenever that code does.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import blake3

_PACKAGE = Path(__file__).resolve().parent


@cache
def source_version(nix_dir: Path | None = None) -> str:
    """The first 16 hex digits of blake3 over ``nixery_trio/*.py`` and ``nix/*.nix``."""
    files = sorted(_PACKAGE.glob("*.py"))
    if nix_dir is not None:
        files += sorted(nix_dir.glob("*.nix"))
    hasher = blake3.blake3()
    for path in files:
        hasher.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return hasher.hexdigest()[:16]
