"""What every image's root holds beside its packages' symlink forest.  Pure, no I/O.

- ``/tmp``, world-writable with the sticky bit: programs expect one;
- ``/etc/passwd`` and ``/etc/group`` naming ``root`` and ``nobody``: ``id``,
  ``ls -l``, ``whoami`` and many servers look users up and fail without them;
- ``/root``, root's home;
- with the ``nonroot`` meta-package, the user ``nonroot`` (uid and gid
  65532, as in distroless images) with a home, ``/home/nonroot``, that it
  owns; the image config then runs as that user (:func:`user`).

A package that provides one of these paths itself keeps its own: the
symlink forest wins (``archive.forest_entries`` merges the two).
"""

from __future__ import annotations

from dataclasses import dataclass

NONROOT_UID = 65532
NOBODY_UID = 65534


@dataclass(frozen=True)
class RootEntry:
    """A path the server adds to an image's root: a directory, or a file with ``data``."""

    name: str
    kind: str  # "dir" or "file"
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0


def root_entries(nonroot: bool) -> list[RootEntry]:
    """The paths every image's root gets, and the ``nonroot`` user's if asked for."""
    passwd = [
        "root:x:0:0:root:/root:/bin/sh",
        f"nobody:x:{NOBODY_UID}:{NOBODY_UID}:nobody:/nonexistent:/bin/false",
    ]
    group = ["root:x:0:", f"nogroup:x:{NOBODY_UID}:"]
    entries = [
        RootEntry("etc", "dir", 0o755),
        RootEntry("root", "dir", 0o700),
        RootEntry("tmp", "dir", 0o1777),
    ]
    if nonroot:
        passwd.append(f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/bin/sh")
        group.append(f"nonroot:x:{NONROOT_UID}:")
        entries += [
            RootEntry("home", "dir", 0o755),
            RootEntry("home/nonroot", "dir", 0o700, uid=NONROOT_UID, gid=NONROOT_UID),
        ]
    entries += [
        RootEntry("etc/group", "file", 0o644, ("\n".join(group) + "\n").encode()),
        RootEntry("etc/passwd", "file", 0o644, ("\n".join(passwd) + "\n").encode()),
    ]
    return entries


def user(nonroot: bool) -> str | None:
    """The image config's ``User``: numeric, so that a runtime can tell it is not root."""
    return f"{NONROOT_UID}:{NONROOT_UID}" if nonroot else None
