"""Package sources: where the Nix package set comes from, and when to cache.

As in Nixery, every source answers two questions: how to describe itself to
``nix/prepare-image.nix`` for a given image tag (``render``), and whether the
result of a build is immutable enough to cache (``cache_key``, or ``None``).

- A **channel** (a nixpkgs branch name or commit) is keyed by its name, as
  Nixery does: channel tarballs are treated as pinned.
- A **git** repository uses the image tag as the git ref: a 40-hex tag is a
  commit (immutable, so cached), ``latest`` is the default branch, anything
  else is a branch or tag name (mutable, never cached).
- A local **path** is keyed by a blake3 hash over its files (beyond Nixery,
  which never caches path builds), so builds are cached until a file changes.

A channel and a path serve one tag, ``latest``; a git repository serves
``latest``, its commits, and its branches and tags that are valid image tags
(``tags``).  Nixery built any tag of a channel or path as ``latest``;
``NIXERY_ANY_TAG`` restores that.
  Hashing skips files whose size, mtime and inode did not change since the
  last look (unless changed in the last two seconds), so a re-check of a
  large tree is one ``stat`` per file.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import blake3

COMMIT = re.compile(r"[0-9a-f]{40}")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
#: The tag every source serves.
LATEST = "latest"
#: Seconds a git repository may take to list its refs.
GIT_TIMEOUT = 30
_RACY_NS = 2_000_000_000


class Source(Protocol):
    """One package source, as Nixery's two-method interface."""

    @property
    def src_type(self) -> str:
        """``channel``, ``git`` or ``path``: the ``srcType`` argument of Nix."""
        ...

    def render(self, tag: str) -> dict[str, Any]:
        """The JSON ``srcArgs`` telling Nix which package set to load."""
        ...

    def cache_key(self, tag: str) -> str | None:
        """A key naming the exact package set, or ``None`` if it may change.

        May do blocking I/O (hashing files): call it from a worker thread.
        """
        ...

    def describe(self) -> str:
        """A short human description for logs."""
        ...

    def facts(self, key: str | None) -> list[tuple[str, str]]:
        """What the web page says of the source, as (what, value) pairs;
        ``key`` is its :meth:`cache_key` for ``latest``."""
        ...

    def tags(self) -> list[str] | None:
        """The image tags this source serves, or ``None`` if it cannot tell now.

        Blocking (a git source asks its repository): call it from a worker thread.
        """
        ...


@dataclass(frozen=True)
class ChannelSource:
    """A nixpkgs channel or commit, fetched as a tarball by Nix."""

    name: str
    src_type: str = "channel"

    def render(self, tag: str) -> dict[str, Any]:
        return {"name": self.name}

    def cache_key(self, tag: str) -> str | None:
        return f"channel:{self.name}"

    def describe(self) -> str:
        return f"nixpkgs channel {self.name}"

    def facts(self, key: str | None) -> list[tuple[str, str]]:
        return [("nixpkgs channel", self.name)]

    def tags(self) -> list[str] | None:
        return [LATEST]


@dataclass(frozen=True)
class GitSource:
    """A git repository; the image tag picks the ref."""

    url: str
    src_type: str = "git"

    def render(self, tag: str) -> dict[str, Any]:
        if COMMIT.fullmatch(tag):
            return {"url": self.url, "ref": None, "rev": tag}
        if tag == "latest":
            return {"url": self.url, "ref": None, "rev": None}
        return {"url": self.url, "ref": tag, "rev": None}

    def cache_key(self, tag: str) -> str | None:
        if COMMIT.fullmatch(tag):
            return f"git:{self.url}@{tag}"
        return None

    def describe(self) -> str:
        return f"git repository {self.url}"

    def facts(self, key: str | None) -> list[tuple[str, str]]:
        return [
            ("git repository", self.url),
            ("ref", "the image tag: latest is the default branch; "
                    "otherwise a commit, branch or tag"),
        ]  # fmt: skip

    def tags(self) -> list[str] | None:
        """``latest`` and the repository's branches and tags that are valid image tags."""
        try:
            listed = subprocess.run(
                ["git", "ls-remote", "--heads", "--tags", "--", self.url],
                capture_output=True, text=True, timeout=GIT_TIMEOUT, check=True,
                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        refs = set()
        for line in listed.splitlines():
            _, _, ref = line.partition("\t")
            name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
            if name != ref and not name.endswith("^{}") and _TAG.fullmatch(name):
                refs.add(name)
        return sorted(refs | {LATEST})


@dataclass
class PathSource:
    """A package set in a local directory, keyed by a hash of its files."""

    path: Path
    src_type: str = "path"
    _memo: dict[str, tuple[tuple[int, int, int], bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def render(self, tag: str) -> dict[str, Any]:
        return {"path": str(self.path)}

    def cache_key(self, tag: str) -> str | None:
        with self._lock:
            return "path:" + self._tree_hash()

    def describe(self) -> str:
        return f"local package set {self.path}"

    def facts(self, key: str | None) -> list[tuple[str, str]]:
        content = "(not hashed yet)" if key is None else key.removeprefix("path:")
        return [("local package set", str(self.path)), ("content hash (blake3)", content)]

    def tags(self) -> list[str] | None:
        return [LATEST]

    def _tree_hash(self) -> str:
        tree = blake3.blake3()
        seen: dict[str, tuple[tuple[int, int, int], bytes]] = {}
        # A file changed within the clock's granularity of now may change
        # again with the same size and mtime: never trust its memo (as git
        # does with "racily clean" entries).
        racy_before = time.time_ns() - _RACY_NS
        for rel, entry in _tree_files(str(self.path), ""):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                digest = b"L" + os.readlink(entry.path).encode()
            elif stat.S_ISREG(st.st_mode):
                identity = (st.st_size, st.st_mtime_ns, st.st_ino)
                memo = self._memo.get(rel)
                if memo is not None and memo[0] == identity:
                    digest = memo[1]
                else:
                    digest = _file_hash(entry.path)
                if st.st_mtime_ns < racy_before:
                    seen[rel] = (identity, digest)
                digest = (b"X" if st.st_mode & 0o111 else b"F") + digest
            else:
                continue
            tree.update(rel.encode() + b"\0" + digest + b"\0")
        self._memo = seen
        return tree.hexdigest()


def _tree_files(directory: str, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """The files under ``directory`` (named from it, after ``prefix``), in the
    order the tree is hashed: a directory's files by name, then its
    subdirectories by name.  As ``os.walk`` does, symbolic links to directories
    count as neither, ``.git`` directories are skipped and unreadable
    directories are left out; it is cheaper here, with one ``lstat`` a file
    and no path arithmetic (a build asks for the key every time)."""
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    subdirectories = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            yield prefix + entry.name, entry
        elif entry.name != ".git" and not entry.is_symlink():
            subdirectories.append(entry)
    for entry in subdirectories:
        yield from _tree_files(entry.path, f"{prefix}{entry.name}/")


def _file_hash(path: str) -> bytes:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.digest()


@dataclass(frozen=True)
class OfflineSource:
    """No package source: a mirror serving what its store holds (``--offline``).

    Nothing is ever built, so nothing asks it for a package set; the tags it
    serves are those the store's tag records hold, per image.
    """

    src_type: str = "offline"

    def render(self, tag: str) -> dict[str, Any]:
        raise RuntimeError("an offline mirror builds nothing")

    def cache_key(self, tag: str) -> str | None:
        return None

    def describe(self) -> str:
        return "none: an offline mirror of its store"

    def facts(self, key: str | None) -> list[tuple[str, str]]:
        return [("none", "an offline mirror: it serves what its store holds and builds nothing")]

    def tags(self) -> list[str] | None:
        return None
