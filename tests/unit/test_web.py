"""The web page without a server: the address it shows, what it says of the
source, its rows, and autoescaping of everything that comes from outside."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from nixery_trio.build.sources import ChannelSource, GitSource, OfflineSource, PathSource
from nixery_trio.http.web import Store, pull_host, render_page, status_document
from nixery_trio.store.activity import Activity, Snapshot
from nixery_trio.store.inventory import HeldImage

NOW = 1_700_000_000.0
HOSTILE = "<script>alert(1)</script>"


def activity(image: str = "hello", phase: str = "done", **changes: object) -> Activity:
    fields: dict[str, object] = {
        "image": image, "tag": "latest", "platform": "linux/amd64", "phase": phase,
        "layers_total": 7, "layers_cached": 2, "layers_written": 3, "bytes": 2_500_000,
        "started": NOW - 12, "updated": NOW - 2, "pid": 1, "host": "h",
    }  # fmt: skip
    return Activity(**(fields | changes))  # type: ignore[arg-type]


NOT_FOUND = "packages not found in the package set: nope"
BOARD = Snapshot(
    building=[activity("slow/hello", "layers")],
    built=[activity("shell/hello")],
    failed=[activity("nope", "failed", code="MANIFEST_UNKNOWN", message=NOT_FOUND)],
)
STORE = Store([HeldImage("shell/hello", "latest", ("linux/amd64",), "sha256:" + "a" * 64,
                         3_000_000, NOW - 100, NOW - 50)], 4_200_000)  # fmt: skip


def status(board: Snapshot = BOARD, host: str = "registry.example:8080") -> dict[str, Any]:
    return status_document(host, PathSource(Path("/srv/pkgs")), "path:" + "b" * 64,
                           board, STORE, NOW)  # fmt: skip


def page(board: Snapshot = BOARD, host: str = "registry.example:8080") -> str:
    return render_page(status(board, host), nonce="n0nce")


def test_the_status_is_json_with_the_rows_the_page_shows() -> None:
    document = json.loads(json.dumps(status()))
    assert [a["image"] for a in document["building"]] == ["slow/hello"]
    assert document["failed"][0]["message"] == NOT_FOUND
    assert all("host" not in a for a in document["building"] + document["built"])
    assert document["store"]["size"] == 4_200_000
    assert document["rows"]["failed"][0][-1] == NOT_FOUND


@pytest.mark.parametrize(
    "host",
    ["registry.example", "registry.example:8080", "127.0.0.1:5000", "[::1]:8080", "[fe80::1]",
     "localhost", "a-b.c-d.example.", "REGISTRY.Example"],
)  # fmt: skip
def test_a_plain_host_header_is_the_address_shown(host: str) -> None:
    assert pull_host(host, ("127.0.0.1", 9000)) == host.lower()


@pytest.mark.parametrize(
    "host",
    [None, "", HOSTILE, "a b", 'x"y', "host:", "host:99999", "host:8080:1", "-bad.example",
     "a..b", "user@host", "host/path", "[::1", "x" * 300, "a\r\nSet-Cookie: x=1", "é.example"],
)  # fmt: skip
def test_any_other_host_header_gives_the_bound_address(host: str | None) -> None:
    assert pull_host(host, ("127.0.0.1", 9000)) == "127.0.0.1:9000"
    assert pull_host(host, ("::1", 9000, 0, 0)) == "[::1]:9000"  # type: ignore[arg-type]
    assert pull_host(host, None) == "localhost"


def test_each_source_says_what_it_builds_from() -> None:
    assert ChannelSource("nixos-24.05").facts(None) == [
        ("nixpkgs channel", "nixos-24.05")
    ]  # fmt: skip
    git = dict(GitSource("https://example.com/pkgs.git").facts(None))
    assert git["git repository"] == "https://example.com/pkgs.git" and "image tag" in git["ref"]
    path = dict(PathSource(Path("/srv/pkgs")).facts("path:" + "c" * 64))
    assert path == {"local package set": "/srv/pkgs", "content hash (blake3)": "c" * 64}
    assert "offline" in OfflineSource().facts(None)[0][1]


def cells(document: str, section: str) -> list[list[str]]:
    """The text of each row of a section's table body."""
    body = re.search(rf'<section id="{section}".*?<tbody>(.*?)</tbody>', document, re.S)
    assert body is not None
    return [
        [html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    ]


def test_the_page_shows_builds_errors_and_the_store() -> None:
    document = page()
    assert "docker pull registry.example:8080/shell/hello" in document
    assert "/srv/pkgs" in document and "b" * 64 in document
    assert cells(document, "building") == [
        ["slow/hello:latest", "linux/amd64", "layers", "5 of 7 (2 cached)", "2.5 MB", "12 s"]
    ]
    assert cells(document, "built") == [
        ["shell/hello:latest", "linux/amd64", "2023-11-14 22:13:18 UTC", "3", "2", "2.5 MB",
         "10.0 s"]
    ]  # fmt: skip
    assert cells(document, "failed") == [
        ["nope:latest", "linux/amd64", "2023-11-14 22:13:18 UTC", "MANIFEST_UNKNOWN", NOT_FOUND]
    ]  # fmt: skip
    assert cells(document, "store")[0][:3] == ["shell/hello:latest", "linux/amd64", "3.0 MB"]
    assert "1 image, 4.2 MB of blobs" in document
    for section in ("building", "built", "failed", "store"):
        assert f'<section id="{section}" data-empty="no">' in document


def test_an_idle_registry_says_so_without_javascript() -> None:
    document = page(Snapshot([], [], []))
    assert '<section id="building" data-empty="yes">' in document
    assert "Nothing is being built." in document


def test_names_messages_and_the_host_are_text_never_markup() -> None:
    board = Snapshot(
        building=[activity(HOSTILE, "nix", tag="<b>")],
        built=[activity('"><img src=x onerror=alert(2)>')],
        failed=[activity("x", "failed", code="BUILD_FAILED", message=f"nix said {HOSTILE} & <i>")],
    )
    document = page(board, host='"><script>alert(3)</script>')
    # The only script is the page's own, with its nonce; the rest is text.
    assert re.findall(r"<script[^>]*>", document) == ['<script nonce="n0nce">']
    assert "<img" not in document and "<i>" not in document and "<b>" not in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in document
    assert cells(document, "failed")[0][4] == f"nix said {HOSTILE} & <i>"
    assert cells(document, "building")[0][0] == f"{HOSTILE}:<b>"
