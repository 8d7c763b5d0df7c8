"""Which packages this registry builds: the allow and deny lists.

An operator who puts the registry on a network names what it may build
with glob patterns (``fnmatch``, case-sensitive as Nix attribute names
are): with an allow list, a package must match one of its patterns; a
package matching a deny pattern is refused either way.  The check is on the
packages an image name asks for; meta-packages (``shell``, ``nonroot``,
``zstd``, ``arm64``) are not packages and add only what the operator
already knows, so they are never refused.

Pure: the builder asks it before Nix runs, and the answer is a ``DENIED``
error that names the package and the rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase, translate

from .errors import Denied


@dataclass(frozen=True)
class PackagePolicy:
    """Glob patterns of the packages allowed (empty: all) and denied.

    Each list is one regular expression, compiled once: a warm pull asks
    for every package it names.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _allowed: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _denied: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", _any_of(self.allow))
        object.__setattr__(self, "_denied", _any_of(self.deny))

    def refusal(self, packages: tuple[str, ...]) -> Denied | None:
        """The error for the first package of ``packages`` the lists keep out, if
        any (a fresh one each time: a raised error keeps its traceback)."""
        for package in packages:
            if self._denied is not None and self._denied.match(package):
                denied_by = next(p for p in self.deny if fnmatchcase(package, p))
                return Denied(
                    f"package {package!r} is denied on this registry (matches {denied_by!r})",
                    {"package": package, "deny": denied_by},
                )
            if self._allowed is not None and not self._allowed.match(package):
                return Denied(
                    f"package {package!r} is not in this registry's allow list",
                    {"package": package, "allow": list(self.allow)},
                )
        return None


def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One expression matching a whole name that any of the globs matches."""
    return re.compile("|".join(map(translate, patterns))) if patterns else None
