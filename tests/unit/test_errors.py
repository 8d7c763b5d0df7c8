"""Errors as the client sees them: codes from the one table, no host paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.errors import (
    BuildFailed,
    InternalError,
    ManifestUnknown,
    NotFound,
    RegistryError,
    StorageError,
    public_text,
)

PKGS = "/srv/pkgs"


KEPT = [
    "builder for '/nix/store/abc-broken.drv' failed",
    "https://github.com/NixOS/nixpkgs/archive/x.tar.gz",
    "a/b, ./c/d, ~/e, x // y",
]


@pytest.mark.parametrize(
    ("text", "public"),
    [
        ("at /srv/pkgs/default.nix:2:10:", "at default.nix:2:10:"),
        ("import /srv/pkgs", "import ."),
        ("at /srv/pkgs-old/default.nix:1:1", "at <host path>"),
        ("(import /work/main/nix/demo args) // {", "(import <host path> args) // {"),
        ("No such file: '/var/lib/nixery/locks/image-0012'", "No such file: '<host path>'"),
        ("fetching Git repository 'file:///home/me/nixpkgs'",
         "fetching Git repository 'file://<host path>'"),
        *((text, text) for text in KEPT),
    ],
)  # fmt: skip
def test_host_paths_are_left_out(text: str, public: str) -> None:
    assert public_text(text, PKGS) == public


@given(st.text())
def test_public_text_keeps_text_without_a_slash(text: str) -> None:
    assert public_text(text.replace("/", ""), PKGS) == text.replace("/", "")


def test_only_errors_that_quote_the_host_are_rewritten() -> None:
    quoted = {"stderr": ["error: at /srv/pkgs/a.nix:1:1", "/etc/passwd"]}
    for kind in (BuildFailed, StorageError, InternalError):
        entry = kind("failed in /tmp/x", quoted).public_json(PKGS)
        assert entry["message"] == "failed in <host path>"
        assert entry["detail"] == {"stderr": ["error: at a.nix:1:1", "<host path>"]}
        assert kind("failed in /tmp/x").to_json()["message"] == "failed in /tmp/x"  # logs: whole
    # These quote the client's own request, never the host.
    assert NotFound("/v2x/y is not part of the API").public_json(PKGS)["message"].startswith("/v2x")
    missing = ManifestUnknown("packages not found: a/b", {"missing": ["a/b"]})
    assert missing.public_json(PKGS) == missing.to_json()


def test_errors_travel_between_workers_whole() -> None:
    error = RegistryError.from_json(StorageError("disk /data full", {"errno": 28}).to_json())
    assert isinstance(error, StorageError) and error.message == "disk /data full"
