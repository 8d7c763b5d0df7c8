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

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .errors import Denied


@dataclass(frozen=True)
class PackagePolicy:
    """Glob patterns of the packages allowed (empty: all) and denied."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    #: packages -> (package, pattern or None) of the first refused, or None
    _checked: dict[tuple[str, ...], tuple[str, str | None] | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny)

    def refusal(self, packages: tuple[str, ...]) -> Denied | None:
        """The error for the first package of ``packages`` the lists keep out, if any.

        A fresh error each time (a raised error keeps its traceback); the
        verdict is remembered, since warm pulls ask again and again.
        """
        if not self.active:
            return None
        if packages in self._checked:
            verdict = self._checked[packages]
        else:
            verdict = next(filter(None, map(self._verdict, packages)), None)
            if len(self._checked) >= 4096:
                self._checked.clear()
            self._checked[packages] = verdict
        if verdict is None:
            return None
        package, denied_by = verdict
        if denied_by is not None:
            return Denied(
                f"package {package!r} is denied on this registry (matches {denied_by!r})",
                {"package": package, "deny": denied_by},
            )
        return Denied(
            f"package {package!r} is not in this registry's allow list",
            {"package": package, "allow": list(self.allow)},
        )

    def _verdict(self, package: str) -> tuple[str, str | None] | None:
        """``(package, deny pattern)``, ``(package, None)`` if not allowed, or ``None``."""
        denied_by = next((p for p in self.deny if fnmatchcase(package, p)), None)
        if denied_by is not None:
            return package, denied_by
        if self.allow and not any(fnmatchcase(package, p) for p in self.allow):
            return package, None
        return None
