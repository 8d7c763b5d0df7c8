"""The /v2/ URL space, parsed without I/O, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_trio.core.errors import RegistryError
from nixery_trio.core.image import parse_image
from nixery_trio.core.routes import MAX_PAGE, Kind, Route, page, parse_route

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("rest", "route"),
    [
        ("", Route(Kind.BASE)),
        ("hello/manifests/latest", Route(Kind.MANIFEST, "hello", "latest")),
        ("shell/git/manifests/v1.0", Route(Kind.MANIFEST, "shell/git", "v1.0")),
        (f"hello/manifests/{DIGEST}", Route(Kind.MANIFEST, "hello", DIGEST, by_digest=True)),
        (f"a/b/blobs/{DIGEST}", Route(Kind.BLOB, "a/b", DIGEST)),
        ("manifests/manifests/latest", Route(Kind.MANIFEST, "manifests", "latest")),
        ("blobs/x/tags/list", Route(Kind.TAGS, "blobs/x")),
        ("_catalog", Route(Kind.CATALOG)),
        (f"a/b/referrers/{DIGEST}", Route(Kind.REFERRERS, "a/b", DIGEST, by_digest=True)),
    ],
)
def test_routes(rest: str, route: Route) -> None:
    assert parse_route(rest) == route


@pytest.mark.parametrize(
    ("rest", "raw", "code"),
    [
        ("../etc/passwd/manifests/latest", "", "NAME_INVALID"),
        ("hello/../x/manifests/latest", "", "NAME_INVALID"),
        ("/etc/passwd/manifests/latest", "", "NAME_INVALID"),
        ("hello/x/manifests/latest", "/v2/hello%2Fx/manifests/latest", "NAME_INVALID"),
        ("hello/x/manifests/latest", "/v2/hello%5cx/manifests/latest", "NAME_INVALID"),
        ("hel\0lo/manifests/latest", "", "NAME_INVALID"),
        ('he"llo/manifests/latest', "", "NAME_INVALID"),
        ("${builtins.exec}/manifests/latest", "", "NAME_INVALID"),
        ("a" * 300 + "/manifests/latest", "", "NAME_INVALID"),
        ("x/" * 3000 + "manifests/latest", "", "NAME_INVALID"),
        ("hello/blobs/sha256:../../etc/passwd", "", "DIGEST_INVALID"),
        ("hello/blobs/" + DIGEST + "/..", "", "DIGEST_INVALID"),
        ("hello/blobs/sha512:" + "0" * 128, "", "DIGEST_INVALID"),
        ("hello/blobs/sha256:" + "0" * 63, "", "DIGEST_INVALID"),
        ("hello/blobs/sha256:" + "A" * 64, "", "DIGEST_INVALID"),
        ("hello/blobs/sha256:" + "g" * 64, "", "DIGEST_INVALID"),
        ("hello/blobs/latest", "", "DIGEST_INVALID"),
        ("hello/manifests/sha256:xyz", "", "DIGEST_INVALID"),
        ("hello/manifests/../x", "", "DIGEST_INVALID"),
        ("hello/manifests/.hidden", "", "MANIFEST_UNKNOWN"),
        ("hello/manifests/" + "t" * 129, "", "MANIFEST_UNKNOWN"),
        ("hello/manifests/", "", "MANIFEST_UNKNOWN"),
        ("hello/referrers/latest", "", "DIGEST_INVALID"),
        ("hello", "", "NOT_FOUND"),
        ("_catalog/x", "", "NOT_FOUND"),
        ("/manifests/latest", "", "NOT_FOUND"),
    ],
)
def test_bad_paths(rest: str, raw: str, code: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_route(rest, raw)
    assert info.value.code == code
    assert 400 <= info.value.status < 500


PATH_PIECES = st.sampled_from(
    ["/", "manifests", "blobs", "tags", "list", "..", ".", "%2e", "%2F", ":", "sha256:",
     "a" * 64, "hello", "shell", "arm64", "-", "_", "__", "\0", "é", "A", " ", "latest"]
)  # fmt: skip


@settings(max_examples=2000)
@given(st.lists(st.one_of(PATH_PIECES, st.text(max_size=8)), max_size=12), st.text(max_size=30))
def test_any_path_routes_or_fails_with_a_client_error(pieces: list[str], raw: str) -> None:
    rest = "".join(pieces)
    try:
        route = parse_route(rest, raw)
    except RegistryError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    if route.kind is Kind.MANIFEST and not route.by_digest:
        try:
            image = parse_image(route.name, route.reference)
        except RegistryError as exc:
            assert 400 <= exc.status < 500
            return
        assert image.packages == tuple(sorted(set(image.packages)))
        assert all(p.replace("-", "").replace(".", "").replace("_", "").isalnum()
                   for p in image.packages)  # fmt: skip


TAGS = ["latest", "main", "v1", "v2", "zeta"]


@pytest.mark.parametrize(
    ("n", "last", "entries", "next_last"),
    [
        (None, None, TAGS, None),
        ("2", None, ["latest", "main"], "main"),
        ("2", "main", ["v1", "v2"], "v2"),
        ("2", "v2", ["zeta"], None),
        ("5", None, TAGS, None),
        ("0", None, [], None),
        (None, "zeta", [], None),
        (None, "m", ["main", "v1", "v2", "zeta"], None),  # after it, whether or not listed
    ],
)
def test_pages(n: str | None, last: str | None, entries: list[str], next_last: str | None) -> None:
    chosen = page(list(reversed(TAGS)), n, last)
    assert (chosen.entries, chosen.next_last) == (entries, next_last)


@pytest.mark.parametrize("n", ["-1", "x", "1.5", ""])
def test_a_page_size_must_be_a_whole_number(n: str) -> None:
    with pytest.raises(RegistryError) as info:
        page(TAGS, n, None)
    assert (info.value.code, info.value.status) == ("PAGINATION_NUMBER_INVALID", 400)


def test_pages_are_capped() -> None:
    many = [f"t{i:05d}" for i in range(MAX_PAGE + 5)]
    first = page(many, "99999", None)
    assert len(first.entries) == MAX_PAGE and first.next_last == many[MAX_PAGE - 1]
    assert page(many, None, first.next_last).entries == many[MAX_PAGE:]
