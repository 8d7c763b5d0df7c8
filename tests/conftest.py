"""Fixtures shared by every kind of test."""

from __future__ import annotations

import os

import pytest

from .emulation import BinfmtEntry, ensure_arm64_emulation


@pytest.fixture(scope="session")
def arm64_emulation() -> BinfmtEntry:
    """This machine runs aarch64 binaries, in chroots and containers too.

    Returns the kernel's qemu-aarch64 binfmt_misc entry (see tests/emulation.py).
    Skips when not root; fails, saying why, when emulation cannot be set up
    (for example without Debian's qemu-user-static, which `make test` installs).
    """
    if os.geteuid() != 0:
        pytest.skip("running aarch64 binaries needs root (binfmt_misc)")
    return ensure_arm64_emulation()
