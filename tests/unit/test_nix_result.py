import json

import pytest

from nixery_trio.build.nix import failure_message, parse_result
from nixery_trio.core.errors import ManifestUnknown

HELLO = "/nix/store/" + "a" * 32 + "-hello"
BUSYBOX = "/nix/store/" + "b" * 32 + "-busybox"


def test_parse_success() -> None:
    doc = {
        "graph": [
            {
                "path": HELLO,
                "references": [BUSYBOX, HELLO],
                "narSize": 10,
                "closureSize": 30,
                "narHash": "sha256:x",
            },
            {"path": BUSYBOX, "references": [], "narSize": 20, "closureSize": 20},
        ],
        "roots": {"hello": HELLO},
        "forest": "/nix/store/" + "c" * 32 + "-forest",
    }
    result = parse_result(json.dumps(doc).encode())
    assert result.roots == (HELLO,)
    assert result.graph[0].references == (BUSYBOX, HELLO)
    assert result.graph[1].nar_size == 20
    assert result.forest.endswith("-forest")


def test_parse_missing_names_them_all() -> None:
    with pytest.raises(ManifestUnknown) as info:
        parse_result(b'{"error": "not_found", "pkgs": ["nope", "gone"]}')
    assert "nope, gone" in info.value.message
    assert info.value.detail == {"missing": ["nope", "gone"]}


def test_failure_message_names_the_derivation() -> None:
    stderr = (
        "building '/nix/store/xyz-broken.drv'...\n"
        "this package is broken on purpose\n"
        "error: builder for '/nix/store/xyz-broken.drv' failed with exit code 1;\n"
        "       last 1 log lines:\n"
    )
    assert failure_message(stderr) == (
        "nix-build failed: builder for '/nix/store/xyz-broken.drv' failed with exit code 1"
    )


def test_failure_message_falls_back_to_the_last_error() -> None:
    stderr = "warning: x\nerror: attribute 'x' missing\n"
    assert failure_message(stderr) == "nix-build failed: attribute 'x' missing"
    assert failure_message("") == "nix-build failed: no output"
