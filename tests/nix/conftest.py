"""Helpers for testing the Nix expressions under nix/ with the real Nix.

Every build runs offline: no substituters (an unreachable binary cache costs
seconds per build) and a sandbox, so the demo packages prove that they need
nothing from the host at build time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

NIX_DIR = Path(__file__).resolve().parents[2] / "nix"
DEMO_DIR = NIX_DIR / "demo"
PREPARE_IMAGE = NIX_DIR / "prepare-image.nix"
OFFLINE_NIX_CONFIG = "substituters =\nsandbox = true"
NIX_TIMEOUT_SECONDS = 300


def nix_env() -> dict[str, str]:
    """The environment for Nix commands: this one, made offline."""
    return {**os.environ, "NIX_CONFIG": OFFLINE_NIX_CONFIG}


def run_nix(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs a Nix command offline and returns it, whatever its exit code."""
    return subprocess.run(
        args,
        env=nix_env(),
        capture_output=True,
        text=True,
        timeout=NIX_TIMEOUT_SECONDS,
        check=False,
    )


def nix_eval_json(expression: str) -> Any:
    """Evaluates a Nix expression strictly and returns its value as JSON data."""
    completed = run_nix(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression])
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@dataclass(frozen=True)
class Prepared:
    """One run of nix/prepare-image.nix.

    returncode and stderr are nix-build's; out_path is the result's store path
    and data its parsed JSON, both None when nix-build failed.
    """

    returncode: int
    stderr: str
    out_path: str | None
    data: dict[str, Any] | None

    @property
    def ok(self) -> dict[str, Any]:
        """The JSON of a run that must have succeeded and found every package."""
        assert self.returncode == 0, self.stderr
        assert self.data is not None
        assert "error" not in self.data, self.data
        return self.data


def prepare_image(
    src_type: str,
    src_args: dict[str, Any],
    packages: list[str],
    system: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> Prepared:
    """Runs nix-build on prepare-image.nix exactly as the server does.

    system defaults to the machine's own. extra_args go to nix-build (for
    example "--check").
    """
    completed = run_nix(
        [
            "nix-build",
            "--no-out-link",
            *extra_args,
            str(PREPARE_IMAGE),
            "--argstr", "srcType", src_type,
            "--argstr", "srcArgs", json.dumps(src_args),
            "--argstr", "system", system or host_system(),
            "--argstr", "packages", json.dumps(packages),
        ]
    )  # fmt: skip
    if completed.returncode != 0:
        return Prepared(completed.returncode, completed.stderr, None, None)
    out_path = completed.stdout.strip()
    data = json.loads(Path(out_path).read_text())
    return Prepared(completed.returncode, completed.stderr, out_path, data)


def prepare_demo_image(packages: list[str], system: str | None = None) -> Prepared:
    """prepare_image from the demo package set in this checkout."""
    return prepare_image("path", {"path": str(DEMO_DIR)}, packages, system)


_host_system: str | None = None


def host_system() -> str:
    """Nix's name for this machine's system, such as x86_64-linux."""
    global _host_system
    if _host_system is None:
        _host_system = str(nix_eval_json("builtins.currentSystem"))
    return _host_system


def store_name(store_path: str) -> str:
    """The name of a store path without its hash: /nix/store/abc-hello -> hello."""
    return Path(store_path).name.split("-", 1)[1]


class NixHelpers:
    """The helpers above, handed to tests by the `nix` fixture."""

    Prepared = Prepared
    demo_dir = DEMO_DIR
    nix_dir = NIX_DIR
    prepare_image = staticmethod(prepare_image)
    prepare_demo_image = staticmethod(prepare_demo_image)
    nix_eval_json = staticmethod(nix_eval_json)
    run_nix = staticmethod(run_nix)
    host_system = staticmethod(host_system)
    store_name = staticmethod(store_name)


@pytest.fixture(scope="session")
def nix() -> NixHelpers:
    """Helpers that run the real Nix offline; skips when Nix is not installed."""
    if shutil.which("nix-build") is None:
        pytest.skip("nix-build is not installed")
    return NixHelpers()
