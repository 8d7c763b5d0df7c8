from pathlib import Path

import pytest

from nixery_trio.build.sources import ChannelSource, GitSource, PathSource
from nixery_trio.config import make_config
from nixery_trio.core.errors import ConfigError
from nixery_trio.core.image import Arch


def raw(**values: str) -> dict[str, str | None]:
    base: dict[str, str | None] = {"storage_path": "/tmp/nixery-test-store"}
    base.update(values)
    return base


def test_path_source_and_defaults(tmp_path: Path) -> None:
    config = make_config(raw(pkgs_path=str(tmp_path)))
    assert isinstance(config.source, PathSource)
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.nix_timeout == 60
    assert config.layer_budget == 94
    assert config.max_packages == 64
    assert config.blob_sendfile is True
    assert make_config(raw(pkgs_path=str(tmp_path), blob_sendfile="0")).blob_sendfile is False
    assert config.send_timeout == 60
    assert make_config(raw(pkgs_path=str(tmp_path), send_timeout="2.5")).send_timeout == 2.5


def test_port_alone_means_all_interfaces() -> None:
    config = make_config(raw(channel="nixos-unstable", port="9000"))
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert isinstance(config.source, ChannelSource)


def test_listen_wins_over_port() -> None:
    config = make_config(raw(pkgs_repo="file:///x", port="9000", listen="127.0.0.2:7000"))
    assert (config.host, config.port) == ("127.0.0.2", 7000)
    assert isinstance(config.source, GitSource)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "got none"),
        ({"channel": "a", "pkgs_repo": "b"}, "NIXERY_CHANNEL, NIXERY_PKGS_REPO"),
        ({"channel": "a", "storage_backend": "gcs"}, "not supported"),
        ({"channel": "a", "nix_timeout": "soon"}, "NIX_TIMEOUT"),
        ({"channel": "a", "nix_timeout": "-1"}, "positive"),
        ({"channel": "a", "listen": "8080"}, "HOST:PORT"),
        ({"channel": "a", "port": "99999"}, "between"),
        ({"pkgs_path": "/does/not/exist"}, "not a directory"),
        ({"channel": "a", "layer_budget": "0"}, "NIXERY_LAYER_BUDGET"),
        ({"channel": "a", "blob_sendfile": "yes"}, "NIXERY_BLOB_SENDFILE"),
        ({"channel": "a", "send_timeout": "0"}, "NIXERY_SEND_TIMEOUT must be a positive"),
        ({"channel": "a", "send_timeout": "inf"}, "NIXERY_SEND_TIMEOUT must be a positive"),
        ({"channel": "a", "send_timeout": "nan"}, "NIXERY_SEND_TIMEOUT must be a positive"),
        ({"channel": "a", "send_timeout": "1m"}, "NIXERY_SEND_TIMEOUT must be a number"),
        ({"channel": "a", "platforms": "linux/s390x"}, "NIXERY_PLATFORMS: unknown platform"),
        ({"channel": "a", "platforms": "linux/arm64,linux/aarch64"}, "linux/arm64 twice"),
    ],
)
def test_bad_configuration_is_a_clear_error(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(raw(**values))


def test_storage_path_is_required() -> None:
    with pytest.raises(ConfigError, match="STORAGE_PATH"):
        make_config({"channel": "nixos-unstable"})


def test_git_source_uses_the_tag_as_ref() -> None:
    source = GitSource("file:///repo")
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert source.render("latest") == {"url": "file:///repo", "ref": None, "rev": None}
    assert source.render("v1.0") == {"url": "file:///repo", "ref": "v1.0", "rev": None}
    assert source.render(commit) == {"url": "file:///repo", "ref": None, "rev": commit}
    assert source.cache_key("latest") is None
    assert source.cache_key("main") is None
    assert source.cache_key(commit) == f"git:file:///repo@{commit}"


def test_path_source_key_follows_file_contents(tmp_path: Path) -> None:
    (tmp_path / "default.nix").write_text("{ }")
    source = PathSource(tmp_path)
    first = source.cache_key("latest")
    assert first == source.cache_key("other-tag")  # the tag does not matter
    (tmp_path / "pkg.nix").write_text("1")
    second = source.cache_key("latest")
    assert second != first
    (tmp_path / "pkg.nix").write_text("2")
    assert source.cache_key("latest") not in (first, second)
    (tmp_path / "pkg.nix").unlink()
    assert source.cache_key("latest") == first


def test_platforms_in_order() -> None:
    assert make_config(raw(channel="a")).platforms == (Arch.AMD64,)
    config = make_config(raw(channel="a", platforms="linux/arm64, linux/amd64"))
    assert config.platforms == (Arch.ARM64, Arch.AMD64)
