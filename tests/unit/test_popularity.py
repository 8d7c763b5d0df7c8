"""Popularity data parsing and store path names."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.popularity import package_name, parse_popularity, store_path_name

HASH = "0c0yrzlnrl2mz7f9d1n3jyhgmbf6q4gn"


def test_parses_nixery_format() -> None:
    data = b'{"glibc-2.30": 37611, "zlib-1.2.11": 9144, "hello": 3, "zero": 0}'
    assert parse_popularity(data) == {
        "glibc-2.30": 37611,
        "zlib-1.2.11": 9144,
        "hello": 3,
        "zero": 0,
    }


def test_empty_object_is_valid() -> None:
    assert parse_popularity(b"{}") == {}


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object.*not list"),
        (b"3", "not int"),
        (b'{"hello": "3"}', "'hello' must be an integer, not \"3\""),
        (b'{"hello": 1.5}', "integer, not 1.5"),
        (b'{"hello": true}', "integer, not true"),
        (b'{"hello": null}', "integer, not null"),
        (b'{"hello": -1}', "must not be negative"),
        (b'{"": 1}', "empty name"),
    ],
)
def test_bad_data_is_rejected_with_a_reason(data: bytes, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_popularity(data)


@given(st.dictionaries(st.text(min_size=1), st.integers(min_value=0)))
def test_round_trip(popularity: dict[str, int]) -> None:
    assert parse_popularity(json.dumps(popularity).encode()) == popularity


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (f"/nix/store/{HASH}-hello-2.10", "hello-2.10"),
        (f"/nix/store/{HASH}-hello", "hello"),
        (f"/nix/store/{HASH}-nss-cacert-3.95", "nss-cacert-3.95"),
        (f"/gnu/store/{HASH}-glibc-2.38-27/", "glibc-2.38-27"),
        (f"{HASH}-bare", "bare"),
    ],
)
def test_store_path_name(path: str, name: str) -> None:
    assert store_path_name(path) == name


@pytest.mark.parametrize(
    "path",
    [
        "/nix/store/hello-2.10",
        f"/nix/store/{HASH[:31]}-hello",
        f"/nix/store/{HASH}hello",
        f"/nix/store/{HASH}-",
        "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-hello",  # 'e' is not in Nix base-32
        "",
    ],
)
def test_store_path_name_rejects_non_store_paths(path: str) -> None:
    with pytest.raises(ValueError, match="not a Nix store path"):
        store_path_name(path)


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("nss-cacert-3.95", "nss-cacert"),
        ("nss-cacert-3.95-unbundled", "nss-cacert"),
        ("cacert-3.95", "cacert"),
        ("cacert", "cacert"),
        ("iana-etc-20231227", "iana-etc"),
        ("hello", "hello"),
        ("python3-3.11.6-env", "python3"),
        ("glibc-2.38-27-bin", "glibc"),
        ("foo-", "foo-"),
    ],
)
def test_package_name(name: str, package: str) -> None:
    assert package_name(name) == package
