"""Image names: from the repository name a client pulls to the packages Nix builds.

Nixery's interface is the image name itself: ``docker pull host/shell/git/htop``
asks for an image containing ``git`` and ``htop`` plus a shell.  This module
turns ``(name, tag)`` into an :class:`Image` following these rules, in order:

1. **The name must be a valid OCI repository name.**  It is matched against
   the distribution grammar::

       component := [a-z0-9]+ ((\\.|_|__|-+) [a-z0-9]+)*
       name      := component ( "/" component )*

   and may be at most 255 characters.  This rejects everything that would be
   dangerous or meaningless to hand to Nix: ``..``, empty components (``a//b``),
   leading or trailing ``/``, upper case, quotes, spaces and Nix syntax such as
   ``${`` or ``;``.  Failures raise :class:`~nixery_trio.core.errors.NameInvalid`
   with a message naming the problem.

2. **The tag must be a valid OCI tag**, ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``,
   else :class:`~nixery_trio.core.errors.TagInvalid`.  The tag is kept on the
   image (package sources use it, e.g. as a git revision) but does not change
   the package list.

3. **Each ``/``-separated component is a package name**, passed on to Nix as
   given.  The grammar makes them lower case; Nix looks top-level attributes
   up case-insensitively (``bashinteractive`` finds ``bashInteractive``).

4. **Meta-packages at the front.**  A leading ``arm64`` component selects the
   ``aarch64-linux`` system and is removed: the image is for arm64 alone,
   whatever platforms the registry serves (without it the image is for the
   registry's platforms, ``x86_64-linux`` unless configured otherwise).
   After that, leading ``shell``, ``nonroot`` and ``zstd`` components, in
   any order, are removed: ``shell`` adds ``bashInteractive``,
   ``coreutils``, ``moreutils`` and ``nano``; ``nonroot`` makes the image
   run as an unprivileged user with a home directory (``rootfs.py``);
   ``zstd`` compresses its layers with zstd rather than gzip (served in OCI
   manifests only).  Only that order is recognised: ``shell/arm64/...``
   asks for a package called ``arm64``, and a meta-package named twice is
   a package the second time.

5. **Always-included packages.**  ``cacert`` and ``iana-etc`` are added to
   every image, so TLS and ``/etc/services`` lookups work out of the box.

6. **Duplicates are removed and the list is sorted**, so ``git/htop`` and
   ``htop/git/htop`` build the same image and share cache entries.  Duplicates
   are found case-insensitively (Nix would resolve both spellings to the same
   package); the meta-packages' spelling wins.

7. **A name can be empty of packages.**  ``arm64`` alone is a valid image
   containing only ``cacert`` and ``iana-etc``.

8. **At most ``max_packages`` packages** (counted after rules 4 to 6, so the
   always-included ones count too), else ``NameInvalid``: one request must not
   be able to ask Nix for an unbounded build.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255
"""The distribution spec's limit on a repository name."""

ARM64_META = "arm64"
SHELL_META = "shell"
NONROOT_META = "nonroot"
ZSTD_META = "zstd"
SHELL_PACKAGES: tuple[str, ...] = ("bashInteractive", "coreutils", "moreutils", "nano")
"""What the ``shell`` meta-package expands to, spelled as nixpkgs attributes."""

ALWAYS_INCLUDED: tuple[str, ...] = ("cacert", "iana-etc")
"""Packages added to every image."""

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_COMPONENT_RE = re.compile(_COMPONENT)
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SEPARATOR_RUN_RE = re.compile(r"[._-]+")
_ALLOWED_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")


class Arch(enum.Enum):
    """The CPU architecture an image is built for."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def nix_system(self) -> str:
        """The Nix ``system`` string to build for."""
        return _NIX_SYSTEMS[self]

    @property
    def oci_arch(self) -> str:
        """The ``architecture`` value of the image config."""
        return self.value

    @property
    def oci_variant(self) -> str | None:
        """The platform's ``variant``, as Docker and containerd write it for arm64."""
        return "v8" if self is Arch.ARM64 else None

    @property
    def platform(self) -> str:
        """``os/architecture``, as clients' ``--platform`` options spell it."""
        return f"linux/{self.value}"

    @classmethod
    def from_platform(cls, text: str) -> Arch:
        """The architecture of ``linux/amd64``, ``linux/arm64`` or ``linux/arm64/v8``."""
        os_name, _, rest = text.strip().lower().partition("/")
        arch, _, variant = rest.partition("/")
        arch = _ARCH_ALIASES.get(arch, arch)
        for member in cls:
            if os_name == "linux" and arch == member.value and variant in ("", member.oci_variant):
                return member
        raise ValueError(
            f"unknown platform {text!r}; one of {', '.join(m.platform for m in cls)}"
        )


_NIX_SYSTEMS = {Arch.AMD64: "x86_64-linux", Arch.ARM64: "aarch64-linux"}
_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class Image:
    """A parsed image request.

    ``name`` is the repository name as the client requested it (validated);
    ``tag`` the requested tag; ``packages`` the sorted, de-duplicated package
    names to build, meta-packages expanded and ``cacert``/``iana-etc`` added;
    ``arch`` the architecture to build for, and ``pinned`` whether the name
    chose it (``arm64/...``: one image, never an index); ``requested`` the
    packages the name itself asked for (no meta-packages, nothing added),
    sorted; ``nonroot`` whether it runs as an unprivileged user; ``zstd``
    whether its layers are zstd.
    """

    name: str
    tag: str
    packages: tuple[str, ...]
    arch: Arch
    requested: tuple[str, ...] = ()
    nonroot: bool = False
    zstd: bool = False
    pinned: bool = False

    @property
    def variant(self) -> tuple[str, ...]:
        """What the image asked for beyond its packages and system, for cache keys."""
        return (*((NONROOT_META,) if self.nonroot else ()), *((ZSTD_META,) if self.zstd else ()))

    @property
    def compression(self) -> str:
        """How its layers are compressed: ``gzip`` or ``zstd``."""
        return "zstd" if self.zstd else "gzip"

    @property
    def has_bash(self) -> bool:
        """Whether the image contains ``bashInteractive``, so ``bash`` can be its command."""
        return any(p.lower() == "bashinteractive" for p in self.packages)


def parse_image(name: str, tag: str, *, max_packages: int = 64) -> Image:
    """Apply the rules of the module docstring to a requested ``name:tag``.

    Raise :class:`NameInvalid` or :class:`TagInvalid` for bad input.
    """
    validate_name(name)
    if _TAG_RE.fullmatch(tag) is None:
        raise TagInvalid(
            f"invalid tag {tag!r}: a tag is 1 to 128 of [a-zA-Z0-9._-], "
            "not starting with '.' or '-'",
            detail={"tag": tag},
        )

    components = name.split("/")
    arch = Arch.AMD64
    pinned = components[0] == ARM64_META
    if pinned:
        arch = Arch.ARM64
        components = components[1:]
    seen: set[str] = set()
    while components and components[0] in (SHELL_META, NONROOT_META, ZSTD_META):
        if components[0] in seen:
            break  # the same meta-package twice: the second is a package name
        seen.add(components[0])
        components = components[1:]
    meta_packages = SHELL_PACKAGES if SHELL_META in seen else ()

    # Meta-package spellings go in first so that they win the case-insensitive
    # de-duplication below.
    by_folded: dict[str, str] = {}
    for package in (*meta_packages, *ALWAYS_INCLUDED, *components):
        by_folded.setdefault(package.lower(), package)
    packages = tuple(sorted(by_folded.values()))

    if len(packages) > max_packages:
        raise NameInvalid(
            f"image {name!r} asks for {len(packages)} packages (including meta-packages and "
            f"{' and '.join(ALWAYS_INCLUDED)}); at most {max_packages} are allowed",
            detail={"name": name, "packages": len(packages), "max_packages": max_packages},
        )
    first_spelling: dict[str, str] = {}
    for component in components:
        first_spelling.setdefault(component.lower(), component)
    requested = tuple(sorted(first_spelling.values()))
    return Image(name=name, tag=tag, packages=packages, arch=arch, requested=requested,
                 nonroot=NONROOT_META in seen, zstd=ZSTD_META in seen, pinned=pinned)  # fmt: skip


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name; else raise NameInvalid."""
    problem = _name_problem(name)
    if problem is not None:
        raise NameInvalid(
            f"invalid image name {name[:300]!r}: {problem}", detail={"name": name[:300]}
        )
    return name


def _name_problem(name: str) -> str | None:
    """Say what is wrong with ``name`` under the OCI grammar, or ``None`` if it is valid.

    The checks go from coarse to fine so that the message names the first
    thing a person would fix; the final full-match keeps the grammar itself as
    the authority should a check here miss a case.
    """
    if not name:
        return "the name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is {len(name)} characters long, at most {MAX_NAME_LENGTH} are allowed"
    if name.startswith("/"):
        return "the name must not start with '/'"
    if name.endswith("/"):
        return "the name must not end with '/'"
    if "//" in name:
        return "the name has an empty path component ('//')"
    if name != name.lower() and set(name.lower()) <= _ALLOWED_CHARS:
        return "the name must be lower case (Nix finds packages case-insensitively)"
    bad = sorted(set(name) - _ALLOWED_CHARS)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"the name contains characters outside [a-z0-9._-/]: {shown}"
    for component in name.split("/"):
        if _COMPONENT_RE.fullmatch(component) is not None:
            continue
        if component in (".", ".."):
            return f"path component {component!r} is not allowed"
        if not (component[0].isalnum() and component[-1].isalnum()):
            return f"path component {component!r} must start and end with a letter or digit"
        for run in _SEPARATOR_RUN_RE.findall(component):
            if run not in (".", "_", "__") and set(run) != {"-"}:
                return (
                    f"path component {component!r} has the separator {run!r}; "
                    "allowed are '.', '_', '__' or one or more '-'"
                )
    if _NAME_RE.fullmatch(name) is None:  # pragma: no cover - the checks above are complete
        return "the name does not match the OCI repository name grammar"
    return None
