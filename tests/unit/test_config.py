from pathlib import Path

import blake3
import pytest

from nixery_trio import config as settings
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
        ({"channel": "a", "storage_backend": "gcs"}, "must be filesystem or s3, got 'gcs'"),
        ({"channel": "a", "storage_backend": "s3"}, "S3_BUCKET: must be set"),
        ({"channel": "a", "storage_backend": "s3", "s3_bucket": "b", "s3_endpoint": "host:9000"},
         "AWS_ENDPOINT_URL: must be an http"),
        ({"channel": "a", "storage_backend": "s3", "s3_bucket": "b", "s3_access_key_id": "k"},
         "AWS_SECRET_ACCESS_KEY: is needed too"),
        ({"channel": "a", "nix_timeout": "soon"}, "NIX_TIMEOUT"),
        ({"channel": "a", "nix_timeout": "-1"}, "positive"),
        ({"channel": "a", "listen": "8080"}, "HOST:PORT"),
        ({"channel": "a", "port": "99999"}, "between"),
        ({"pkgs_path": "/does/not/exist"}, "not a directory"),
        ({"channel": "a", "layer_budget": "0"}, "NIXERY_LAYER_BUDGET"),
        ({"channel": "a", "blob_sendfile": "yes"}, "NIXERY_BLOB_SENDFILE"),
        ({"channel": "a", "send_timeout": "0"}, "NIXERY_SEND_TIMEOUT: must be a positive"),
        ({"channel": "a", "send_timeout": "inf"}, "NIXERY_SEND_TIMEOUT: must be a positive"),
        ({"channel": "a", "send_timeout": "nan"}, "NIXERY_SEND_TIMEOUT: must be a positive"),
        ({"channel": "a", "send_timeout": "1m"}, "NIXERY_SEND_TIMEOUT: must be a number"),
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


def test_path_source_key_covers_the_tree_as_it_always_did(tmp_path: Path) -> None:
    """Nested files count, in a fixed order; ``.git`` and links to directories
    do not; a link counts by its target's name.  The key is the one the
    earlier ``os.walk`` code computed, so an upgrade keeps every cached image."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c").mkdir()
    (tmp_path / "b" / "c" / "deep.nix").write_text("deep")
    (tmp_path / "b" / "z.nix").write_text("z")
    (tmp_path / "a.nix").write_text("a")
    (tmp_path / "run.sh").write_text("#!/bin/sh")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "linked-dir").symlink_to(tmp_path / "b")
    (tmp_path / "link.nix").symlink_to("a.nix")
    tree = blake3.blake3()
    for rel, digest in [
        ("a.nix", b"F" + blake3.blake3(b"a").digest()),
        ("link.nix", b"La.nix"),
        ("run.sh", b"X" + blake3.blake3(b"#!/bin/sh").digest()),
        ("b/z.nix", b"F" + blake3.blake3(b"z").digest()),
        ("b/c/deep.nix", b"F" + blake3.blake3(b"deep").digest()),
    ]:
        tree.update(rel.encode() + b"\0" + digest + b"\0")
    source = PathSource(tmp_path)
    assert source.cache_key("latest") == "path:" + tree.hexdigest()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/other")
    assert source.cache_key("latest") == "path:" + tree.hexdigest()
    (tmp_path / "b" / "c" / "deep.nix").write_text("deeper")
    assert source.cache_key("latest") != "path:" + tree.hexdigest()


def test_platforms_in_order() -> None:
    assert make_config(raw(channel="a")).platforms == (Arch.AMD64,)
    config = make_config(raw(channel="a", platforms="linux/arm64, linux/amd64"))
    assert config.platforms == (Arch.ARM64, Arch.AMD64)


# --- one definition: flags, environment, config file, defaults ---------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'nix_timeout = 30\nstorage_path = "/s"\n')
    env = {"NIX_TIMEOUT": "40"}
    flag = {"nix_timeout": "50"}
    assert settings.load("serve", flag, toml, env).values["nix_timeout"] == "50"
    loaded = settings.load("serve", {}, toml, env)
    assert (loaded.values["nix_timeout"], loaded.origins["nix_timeout"]) == ("40", "NIX_TIMEOUT")
    loaded = settings.load("serve", {}, toml, {})
    assert loaded.values["nix_timeout"] == "30"
    assert loaded.origins["nix_timeout"] == f"nix_timeout in {toml}"
    loaded = settings.load("serve", {}, None, {})
    assert (loaded.values["nix_timeout"], loaded.origins["nix_timeout"]) == ("60", "default")
    assert loaded.values["storage_path"] is None
    # NIXERY_CONFIG names the file when --config does not.
    via_env = settings.load("gc", {}, None, {"NIXERY_CONFIG": str(toml)})
    given = {name: value for name, value in via_env.values.items() if value is not None}
    assert given == {"storage_path": "/s", "storage_backend": "filesystem",
                     "s3_region": "us-east-1"}


def test_an_empty_variable_does_not_hide_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'storage_path = "/s"\n')
    assert settings.load("ls", {}, toml, {"STORAGE_PATH": ""}).values["storage_path"] == "/s"


def test_toml_values_of_every_kind(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", "\n".join([
        f'storage_path = "{tmp_path}"', f'pkgs_path = "{tmp_path}"', "oci = false",
        "any_tag = true", "nix_timeout = 2.5", "layer_budget = 20",
        'platforms = ["linux/arm64", "linux/amd64"]', 'listen = "127.0.0.3:9"',
    ]))  # fmt: skip
    loaded = settings.load("serve", {}, toml, {})
    config = make_config(loaded.values, loaded.origins)
    assert (config.oci, config.any_tag, config.nix_timeout) == (False, True, 2.5)
    assert config.layer_budget == 20
    assert config.platforms == (Arch.ARM64, Arch.AMD64)
    assert (config.host, config.port) == ("127.0.0.3", 9)
    assert config.storage_path == tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stroage_path = '/x'\n", "unknown setting 'stroage_path'"),
        ("oci = 'maybe'\noci = 1\n", "not valid TOML"),
        ("oci = 2.5\n", "oci must be true or false"),
        ("layer_budget = '9'\nnix_timeout = true\n", "nix_timeout must be a seconds"),
        ("platforms = [1]\n", "platforms must be a list of strings"),
        ("[server]\nlisten = 'x'\n", "unknown setting 'server'"),
    ],
)
def test_a_bad_config_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    toml = write_toml(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=message):
        settings.load("serve", {}, toml, {})


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        settings.load("serve", {}, tmp_path / "absent.toml", {})


def test_an_invalid_value_says_where_it_came_from(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", "nix_timeout = -1\nstorage_path = '/s'\n")
    loaded = settings.load("serve", {"channel": "c"}, toml, {})
    with pytest.raises(ConfigError, match=r"NIX_TIMEOUT \(nix_timeout in .*c\.toml\): must be"):
        make_config(loaded.values, loaded.origins)
    loaded = settings.load("serve", {"channel": "c", "layer_budget": "0", "nix_timeout": "9"},
                           toml, {})  # fmt: skip
    with pytest.raises(ConfigError, match=r"NIXERY_LAYER_BUDGET \(--layer-budget\): must be"):
        make_config(loaded.values, loaded.origins)


def test_every_setting_is_named_once_and_read_by_some_command() -> None:
    for attribute in ("name", "env", "flag"):
        values = [getattr(s, attribute) for s in settings.SETTINGS]
        assert len(values) == len(set(values)), attribute
    commands = ("serve", "prefetch", "ls")
    read = {s.name for command in commands for s in settings.settings_for(command)}
    assert read == set(settings.BY_NAME)
    store = {"storage_path", "storage_backend", "s3_bucket", "s3_endpoint", "s3_region",
             "s3_access_key_id", "s3_secret_access_key"}
    assert {s.name for s in settings.settings_for("gc")} == store


def test_docs_configuration_md_is_generated_from_the_settings() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert docs.read_text() == settings.render_docs(), (
        "docs/configuration.md is out of date: "
        "run `nixery-trio settings --docs > docs/configuration.md`"
    )
    for setting in settings.SETTINGS:
        assert f"`{setting.flag}` | `{setting.env}`" in docs.read_text()


def test_access_settings(tmp_path: Path) -> None:
    config = make_config(raw(channel="c", allow_packages="git, python3* ,",
                             deny_packages="cow*", cold_builds_per_minute="5"))  # fmt: skip
    assert config.packages.allow == ("git", "python3*")
    assert config.packages.deny == ("cow*",)
    assert config.cold_builds_per_minute == 5
    assert config.tls_cert is None and config.htpasswd is None
    toml = tmp_path / "c.toml"
    toml.write_text('allow_packages = ["git", "htop"]\nstorage_path = "/s"\nchannel = "c"\n')
    loaded = settings.load("serve", {}, toml, {})
    assert make_config(loaded.values).packages.allow == ("git", "htop")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert": "/does/not/exist"}, "NIXERY_TLS_CERT: '/does/not/exist' is not a readable"),
        ({"tls_cert": __file__}, "NIXERY_TLS_KEY: is needed too"),
        ({"tls_cert": __file__, "tls_key": __file__}, "NIXERY_TLS_CERT: cannot be used"),
        ({"htpasswd": __file__}, "NIXERY_HTPASSWD: line 1"),
        ({"cold_builds_per_minute": "-1"}, "NIXERY_COLD_BUILDS_PER_MINUTE: must be between"),
    ],
)
def test_bad_access_settings_are_clear_errors(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(raw(channel="c", **values))
