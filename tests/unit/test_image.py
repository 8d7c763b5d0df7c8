"""Image name parsing: Nixery's rules, and the OCI name grammar as a gate."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nixery_trio.core.errors import NameInvalid, TagInvalid
from nixery_trio.core.image import Arch, Image, parse_image

OCI_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")
SHELL = ("bashInteractive", "coreutils", "moreutils", "nano")


def test_plain_packages_get_cacert_and_iana_etc_and_are_sorted() -> None:
    image = parse_image("htop/git", "latest")
    assert image == Image(
        name="htop/git",
        tag="latest",
        packages=("cacert", "git", "htop", "iana-etc"),
        arch=Arch.AMD64,
        requested=("git", "htop"),
    )
    assert not image.has_bash and not image.nonroot and image.variant == ()


def test_shell_meta_package_expands_to_exact_attribute_names() -> None:
    image = parse_image("shell/htop", "latest")
    assert image.packages == tuple(sorted((*SHELL, "cacert", "htop", "iana-etc")))
    assert image.has_bash


def test_arm64_then_shell() -> None:
    image = parse_image("arm64/shell/hello", "v1")
    assert image.arch is Arch.ARM64
    assert image.packages == tuple(sorted((*SHELL, "cacert", "hello", "iana-etc")))
    assert image.tag == "v1"


def test_meta_packages_are_only_recognised_at_the_front_in_order() -> None:
    assert parse_image("hello/shell", "latest").packages == (
        "cacert",
        "hello",
        "iana-etc",
        "shell",
    )
    late_arch = parse_image("shell/arm64", "latest")
    assert late_arch.arch is Arch.AMD64
    assert "arm64" in late_arch.packages
    assert parse_image("hello/arm64", "latest").arch is Arch.AMD64


def test_a_name_without_packages_is_valid() -> None:
    image = parse_image("arm64", "latest")
    assert image.arch is Arch.ARM64
    assert image.packages == ("cacert", "iana-etc")


def test_shell_alone() -> None:
    assert parse_image("shell", "latest").packages == tuple(sorted((*SHELL, "cacert", "iana-etc")))


def test_duplicates_are_removed_including_case_insensitive_and_always_included() -> None:
    image = parse_image("shell/bashinteractive/git/git/cacert/nano", "latest")
    assert image.packages == tuple(sorted((*SHELL, "cacert", "git", "iana-etc")))


def test_order_does_not_change_packages() -> None:
    assert parse_image("a/b/c", "latest").packages == parse_image("c/a/b", "latest").packages


def test_name_is_kept_as_requested() -> None:
    assert parse_image("shell/htop/git", "latest").name == "shell/htop/git"


def test_has_bash_is_case_insensitive() -> None:
    assert parse_image("bashinteractive", "latest").has_bash
    assert not parse_image("bash", "latest").has_bash


def test_arch_properties() -> None:
    assert Arch.AMD64.nix_system == "x86_64-linux"
    assert Arch.ARM64.nix_system == "aarch64-linux"
    assert Arch.AMD64.oci_arch == "amd64"
    assert Arch.ARM64.oci_arch == "arm64"


def test_image_is_frozen() -> None:
    image = parse_image("hello", "latest")
    with pytest.raises(AttributeError):
        image.tag = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "complaint"),
    [
        ("", "empty"),
        ("a" * 256, "256 characters"),
        ("/hello", "start with '/'"),
        ("hello/", "end with '/'"),
        ("hello//git", "empty path component"),
        ("Hello", "lower case"),
        ("shell/bashInteractive", "lower case"),
        ("hello world", "' '"),
        ('he"llo', "'\"'"),
        ("hello'", '"\'"'),
        ("${builtins.abort}", "'\\$', '\\{', '\\}'"),
        ("a;b", "';'"),
        ("héllo", "'é'"),
        ("hello\n", "'\\\\n'"),
        ("..", "'\\.\\.' is not allowed"),
        ("hello/../etc", "'\\.\\.' is not allowed"),
        ("./hello", "'\\.' is not allowed"),
        (".hidden", "start and end with a letter or digit"),
        ("hello-", "start and end with a letter or digit"),
        ("_a", "start and end"),
        ("a..b", "separator '\\.\\.'"),
        ("a___b", "separator '___'"),
        ("a._b", "separator '\\._'"),
        ("a-.b", "separator '-\\.'"),
    ],
)
def test_invalid_names_say_what_is_wrong(name: str, complaint: str) -> None:
    with pytest.raises(NameInvalid, match=complaint) as info:
        parse_image(name, "latest")
    assert info.value.code == "NAME_INVALID"
    assert info.value.status == 400


@pytest.mark.parametrize(
    "name", ["a" * 255, "a__b", "a_b", "a.b", "a---b", "python3.11-requests", "0/9", "g"]
)
def test_valid_edge_names(name: str) -> None:
    assert parse_image(name, "latest").name == name


@pytest.mark.parametrize("tag", ["latest", "_x", "A.b-c_d", "0" * 128, "a" * 40])
def test_valid_tags(tag: str) -> None:
    assert parse_image("hello", tag).tag == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "latest\n", "sha256:ab"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        parse_image("hello", tag)
    assert (info.value.code, info.value.status) == ("MANIFEST_UNKNOWN", 404)


def test_package_limit_counts_after_expansion() -> None:
    # shell (4) + cacert + iana-etc + 2 = 8 packages
    assert len(parse_image("shell/a/b", "latest", max_packages=8).packages) == 8
    with pytest.raises(NameInvalid, match=r"9 packages.*at most 8"):
        parse_image("shell/a/b/c", "latest", max_packages=8)


def test_package_limit_counts_distinct_packages() -> None:
    assert parse_image("a/a/a/a/a/a", "latest", max_packages=3).packages == (
        "a",
        "cacert",
        "iana-etc",
    )


def test_default_package_limit() -> None:
    names = "/".join(f"p{i}" for i in range(62))
    assert len(parse_image(names, "latest").packages) == 64
    with pytest.raises(NameInvalid):
        parse_image(names + "/p62", "latest")


@given(st.text(alphabet="ab.-_/A:$ ", max_size=12))
def test_validation_agrees_with_the_oci_grammar(name: str) -> None:
    if OCI_NAME.fullmatch(name):
        assert parse_image(name, "latest").name == name
    else:
        with pytest.raises(NameInvalid):
            parse_image(name, "latest")


@given(st.text(max_size=300))
def test_arbitrary_text_is_either_valid_or_name_invalid(name: str) -> None:
    valid = OCI_NAME.fullmatch(name) is not None and len(name) <= 255
    try:
        image = parse_image(name, "latest", max_packages=1000)
    except NameInvalid:
        assert not valid
    else:
        assert valid
        assert {"cacert", "iana-etc"} <= set(image.packages)
        assert list(image.packages) == sorted(set(image.packages))


@given(st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=10))
def test_packages_independent_of_order(components: list[str]) -> None:
    forward = parse_image("/".join(components), "latest", max_packages=100)
    backward = parse_image("/".join(reversed(components)), "latest", max_packages=100)
    # Meta-packages only count at the front, so compare when none is present.
    if not {"arm64", "shell"} & {components[0], components[-1]}:
        assert forward.packages == backward.packages


@pytest.mark.parametrize(
    ("name", "nonroot", "shell", "requested"),
    [
        ("nonroot/hello", True, False, ("hello",)),
        ("shell/nonroot/hello", True, True, ("hello",)),
        ("nonroot/shell/hello", True, True, ("hello",)),
        ("arm64/nonroot/hello", True, False, ("hello",)),
        ("nonroot", True, False, ()),
        ("hello/nonroot", False, False, ("hello", "nonroot")),  # not at the front: a package
        ("nonroot/nonroot", True, False, ("nonroot",)),  # twice: the second is a package
        ("nonroot/arm64", True, False, ("arm64",)),
    ],
)
def test_the_nonroot_meta_package(
    name: str, nonroot: bool, shell: bool, requested: tuple[str, ...]
) -> None:
    image = parse_image(name, "latest")
    assert (image.nonroot, image.has_bash, image.requested) == (nonroot, shell, requested)
    assert image.variant == (("nonroot",) if nonroot else ())
    assert image.pinned == name.startswith("arm64/")
    assert "nonroot" not in image.packages or "nonroot" in requested


@pytest.mark.parametrize(
    ("name", "zstd", "nonroot", "requested"),
    [
        ("zstd/hello", True, False, ("hello",)),
        ("shell/zstd/nonroot/hello", True, True, ("hello",)),
        ("arm64/zstd/hello", True, False, ("hello",)),
        ("zstd/zstd", True, False, ("zstd",)),  # twice: the second is a package
        ("hello/zstd", False, False, ("hello", "zstd")),
        ("zstd/arm64", True, False, ("arm64",)),
    ],
)
def test_the_zstd_meta_package(
    name: str, zstd: bool, nonroot: bool, requested: tuple[str, ...]
) -> None:
    image = parse_image(name, "latest")
    assert (image.zstd, image.nonroot, image.requested) == (zstd, nonroot, requested)
    assert image.compression == ("zstd" if zstd else "gzip")
    assert image.variant == (*(("nonroot",) if nonroot else ()), *(("zstd",) if zstd else ()))


def test_only_a_leading_arm64_pins_the_platform() -> None:
    assert parse_image("arm64/hello", "latest").pinned
    assert not parse_image("hello", "latest").pinned
    assert not parse_image("zstd/arm64", "latest").pinned


@pytest.mark.parametrize(
    ("text", "arch"),
    [
        ("linux/amd64", Arch.AMD64),
        ("linux/x86_64", Arch.AMD64),
        (" Linux/AMD64 ", Arch.AMD64),
        ("linux/arm64", Arch.ARM64),
        ("linux/arm64/v8", Arch.ARM64),
        ("linux/aarch64", Arch.ARM64),
    ],
)
def test_platforms_by_name(text: str, arch: Arch) -> None:
    assert Arch.from_platform(text) is arch
    assert Arch.from_platform(arch.platform) is arch


@pytest.mark.parametrize("text", ["linux/riscv64", "windows/amd64", "amd64", "linux/amd64/v8", ""])
def test_unknown_platforms_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown platform"):
        Arch.from_platform(text)
