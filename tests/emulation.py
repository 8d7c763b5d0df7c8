"""Running aarch64 binaries on this x86_64 machine, for tests of arm64 images.

The kernel's binfmt_misc hands an ELF for another machine to the interpreter
registered for its header. Debian's qemu-user-static ships the registration
for aarch64 (``/usr/share/binfmts/qemu-aarch64``: qemu-aarch64-static, with
the F and P flags) and binfmt-support's ``update-binfmts`` writes it to the
kernel. F ("fix binary") makes the kernel open the interpreter when the entry
is registered and keep it open, so arm64 binaries also run where qemu is not
in the file system: in a chroot, the Nix sandbox, a container's root. Without
F they fail there with "No such file or directory", which is why an entry
without it is an error here rather than something to work around.

The entries belong to the kernel, not to a mount: binfmt_misc, wherever it is
mounted, shows the same ones (outside user namespaces). A fresh /proc, as in
``../shared/fresh-test``'s own mount namespace, starts with binfmt_misc not
mounted, so it is mounted here when its ``register`` file is missing; an
entry registered before, by this machine or by an earlier run, works as is
(with F, even if the file system it came from is gone).

Only root can do any of this. ``ensure_arm64_emulation`` is idempotent and
cheap once done; the ``arm64_emulation`` fixture in tests/conftest.py calls
it once per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Where the kernel's binfmt_misc is mounted (by systemd, or by us).
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
#: The name of Debian's aarch64 entry (qemu-user-static, binfmt-support).
ARM64_ENTRY = "qemu-aarch64"
#: The Debian packages that provide emulation (installed by `make test`).
ARM64_PACKAGES = ("qemu-user-static", "binfmt-support")
_QEMU_AARCH64 = Path("/usr/bin/qemu-aarch64-static")
_COMMAND_TIMEOUT_SECONDS = 60


class EmulationError(RuntimeError):
    """This machine cannot be made to run aarch64 binaries; the message says why."""


@dataclass(frozen=True)
class BinfmtEntry:
    """One registered binfmt_misc entry, as the kernel reports it.

    name is the entry's file name (``qemu-aarch64``), enabled whether the
    kernel uses it, interpreter the program it runs binaries with (as
    registered; with F the kernel holds it open), and flags its flag letters
    (``F`` fix binary, ``P`` preserve argv[0], ``O``, ``C``).
    """

    name: str
    enabled: bool
    interpreter: str
    flags: str

    @classmethod
    def parse(cls, name: str, text: str) -> BinfmtEntry:
        """Reads an entry file: ``enabled``, ``interpreter …``, ``flags: …``, …"""
        lines = text.splitlines()
        fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
        return cls(
            name=name,
            enabled=bool(lines) and lines[0] == "enabled",
            interpreter=fields.get("interpreter", ""),
            flags=fields.get("flags:", ""),
        )


def read_binfmt_entry(name: str, binfmt_misc: Path = BINFMT_MISC) -> BinfmtEntry | None:
    """The registered entry called name, or None when there is none."""
    try:
        text = (binfmt_misc / name).read_text()
    except FileNotFoundError:
        return None
    return BinfmtEntry.parse(name, text)


def ensure_arm64_emulation() -> BinfmtEntry:
    """Makes this machine run aarch64 ELF binaries (as root), and returns the entry.

    Mounts binfmt_misc if it is not mounted, registers Debian's qemu-aarch64
    entry if it is missing (``update-binfmts --enable``) and enables it if it
    is disabled. Raises EmulationError when that cannot be done, when
    binfmt_misc as a whole is disabled, or when the entry lacks the F flag
    (arm64 binaries would then fail in chroots and containers).
    """
    if os.geteuid() != 0:
        raise EmulationError("running aarch64 binaries needs binfmt_misc, which only root can set")
    if not (BINFMT_MISC / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)])
    if (BINFMT_MISC / "status").read_text().strip() != "enabled":
        raise EmulationError(
            f"binfmt_misc is disabled as a whole ({BINFMT_MISC}/status); "
            f"`echo 1 > {BINFMT_MISC}/status` enables it"
        )
    entry = read_binfmt_entry(ARM64_ENTRY)
    if entry is None:
        update_binfmts = shutil.which("update-binfmts")
        if update_binfmts is None or not _QEMU_AARCH64.exists():
            raise EmulationError(
                f"no {ARM64_ENTRY} entry in {BINFMT_MISC}, and no Debian "
                f"{' and '.join(ARM64_PACKAGES)} to register it: `make test` installs them"
            )
        _run([update_binfmts, "--enable", ARM64_ENTRY])
        entry = read_binfmt_entry(ARM64_ENTRY)
        if entry is None:
            raise EmulationError(f"update-binfmts --enable {ARM64_ENTRY} registered nothing")
    if not entry.enabled:
        # update-binfmts only registers: for an entry the kernel already has,
        # it says "already enabled" and leaves it disabled. Writing 1 to the
        # entry's file is the kernel's own switch.
        (BINFMT_MISC / ARM64_ENTRY).write_text("1")
        entry = read_binfmt_entry(ARM64_ENTRY)
        if entry is None or not entry.enabled:
            raise EmulationError(f"{BINFMT_MISC}/{ARM64_ENTRY} stays disabled")
    if "F" not in entry.flags:
        raise EmulationError(
            f"{BINFMT_MISC}/{ARM64_ENTRY} (interpreter {entry.interpreter}) lacks the F flag "
            f"(flags: {entry.flags or 'none'}), so arm64 binaries would not run in chroots "
            f"or containers; remove it with `echo -1 > {BINFMT_MISC}/{ARM64_ENTRY}` and "
            f"run again to register Debian's, which has F"
        )
    return entry


def _run(command: list[str]) -> None:
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_SECONDS, check=False
    )
    if completed.returncode != 0:
        raise EmulationError(
            f"{' '.join(command)} failed ({completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()}"
        )
