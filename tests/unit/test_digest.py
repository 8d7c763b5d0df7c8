"""Digest computing and validation."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.digest import SHA256, digest_hex, parse_digest, sha256_digest
from nixery_trio.core.errors import DigestInvalid

EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_of_empty_input_is_the_well_known_value() -> None:
    assert sha256_digest(b"") == EMPTY


@given(st.binary())
def test_sha256_digest_matches_hashlib_and_parses(data: bytes) -> None:
    digest = sha256_digest(data)
    assert digest == f"{SHA256}:{hashlib.sha256(data).hexdigest()}"
    assert parse_digest(digest) == digest
    assert digest_hex(digest) == hashlib.sha256(data).hexdigest()


def test_valid_digest_is_returned_unchanged() -> None:
    assert parse_digest(EMPTY) is EMPTY
    assert digest_hex(EMPTY) == EMPTY.removeprefix("sha256:")


@pytest.mark.parametrize(
    ("digest", "complaint"),
    [
        ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "algorithm prefix"),
        ("sha512:" + "a" * 128, "'sha512' is not supported"),
        ("SHA256:" + "a" * 64, "'SHA256' is not supported"),
        (":" + "a" * 64, "'' is not supported"),
        ("sha256:" + "a" * 63, "64 hex digits"),
        ("sha256:" + "a" * 65, "64 hex digits"),
        ("sha256:", "has 0"),
        ("sha256:" + "A" * 64, "lowercase"),
        ("sha256:" + "a" * 63 + "F", "lowercase"),
        ("sha256:" + "g" * 64, "not lowercase hex: 'g'"),
        ("sha256:" + "a" * 63 + "/", "not lowercase hex"),
        ("sha256:" + "a" * 62 + "\n", "not lowercase hex"),
        ("sha256:" + "a" * 64 + "\n", "not lowercase hex"),
        ("sha256:../../etc/passwd", "not lowercase hex"),
    ],
)
def test_invalid_digests_say_what_is_wrong(digest: str, complaint: str) -> None:
    with pytest.raises(DigestInvalid, match=complaint) as info:
        parse_digest(digest)
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400
    with pytest.raises(DigestInvalid):
        digest_hex(digest)


@given(st.text())
def test_parse_digest_accepts_only_the_canonical_form(text: str) -> None:
    canonical = (
        text.startswith("sha256:")
        and len(text) == 71
        and all(c in "0123456789abcdef" for c in text[7:])
    )
    if canonical:
        assert parse_digest(text) == text
    else:
        with pytest.raises(DigestInvalid):
            parse_digest(text)
