"""The /v2/ URL space, parsed without I/O, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixery_trio.errors import RegistryError
from nixery_trio.image import parse_image
from nixery_trio.routes import Kind, Route, parse_route

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
        ("hello/manifests/.hidden", "", "TAG_INVALID"),
        ("hello/manifests/" + "t" * 129, "", "TAG_INVALID"),
        ("hello/manifests/", "", "TAG_INVALID"),
        ("hello", "", "NOT_FOUND"),
        ("_catalog", "", "NOT_FOUND"),
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
