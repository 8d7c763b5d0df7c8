"""Settings: one definition of each, and the one typed configuration object.

Every setting is declared once in :data:`SETTINGS`: its name (the key in the
TOML config file), its Nixery-compatible environment variable, its command
line flag, its default, its help and which commands read it.  ``cli.py``
makes its options from that list, :func:`load` merges the four places a
value can come from (flags over environment over the config file over the
defaults), and :func:`render_docs` writes docs/configuration.md from it, so
none of them is ever written twice.  :func:`make_config` turns the merged
text into a validated :class:`Config`, or raises :class:`ConfigError` with a
message that names the setting and where its value came from.
"""

from __future__ import annotations

import enum
import math
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .build.archive import DEFAULT_LEVELS, ENGINE_LEVELS, READ_SIZE, Deflate, engine_available
from .build.sources import ChannelSource, GitSource, OfflineSource, PathSource, Source
from .core.errors import ConfigError
from .core.htpasswd import parse_htpasswd
from .core.image import Arch
from .core.policy import PackagePolicy

#: The ``nix/`` directory of this checkout (prepare-image.nix, demo set).
DEFAULT_NIX_DIR = Path(__file__).resolve().parent.parent / "nix"


@dataclass(frozen=True)
class S3Settings:
    """Where the ``s3`` storage backend keeps the store, and how blobs are served."""

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    #: ``None``: boto3's own lookup (its config files, an instance role).
    access_key_id: str | None = None
    secret_access_key: str | None = None
    #: Send clients to the bucket with a presigned URL (307), or proxy blobs.
    presigned_urls: bool = True
    presign_seconds: int = 300
    build_lease_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    """Everything the server needs, validated."""

    host: str
    port: int
    source: Source
    storage_path: Path
    nix_timeout: float
    popularity_url: str | None
    nix_dir: Path
    layer_budget: int
    max_packages: int
    gzip_level: int
    build_threads: int
    deflate_engine: str = "isal"
    deflate_threads: int = 1
    read_size: int = READ_SIZE
    blob_sendfile: bool = True
    workers: int = 1
    send_timeout: float = 60.0
    header_timeout: float = 20.0
    keepalive_timeout: float = 75.0
    drain_timeout: float = 30.0
    max_builds: int = 2
    not_found_ttl: float = 60.0
    any_tag: bool = False
    oci: bool = True
    platforms: tuple[Arch, ...] = (Arch.AMD64,)
    offline: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    htpasswd: Path | None = None
    packages: PackagePolicy = field(default_factory=PackagePolicy)
    cold_builds_per_minute: int = 0
    #: The S3 bucket of the ``s3`` storage backend; ``None``: the filesystem.
    s3: S3Settings | None = None

    @property
    def deflate(self) -> Deflate:
        """How the layer writer compresses (see ``archive.Deflate``)."""
        return Deflate(self.deflate_engine, self.gzip_level, self.deflate_threads, self.read_size)


class Scope(enum.Enum):
    """Which commands read a setting."""

    #: Every command: where the store is.
    STORE = "every command"
    #: ``serve`` and ``prefetch``: what is built, and how.
    BUILD = "serve, prefetch"
    #: ``serve`` alone: the HTTP server.
    SERVE = "serve"


class Kind(enum.Enum):
    """What a setting's value is; how a TOML value of it is read."""

    TEXT = "string"
    INT = "integer"
    SECONDS = "seconds"
    SWITCH = "0 or 1"
    LIST = "comma-separated list"


@dataclass(frozen=True)
class Setting:
    """One setting: its key in the config file, variable, flag, default and help."""

    name: str
    env: str
    help: str
    default: str | None = None
    kind: Kind = Kind.TEXT
    scope: Scope = Scope.BUILD
    #: Never printed by ``nixery-trio settings``.
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("storage_path", "STORAGE_PATH",
            "Directory of the blob store and caches; with the s3 backend, of this server's own "
            "lock files and state (blobs and caches are in the bucket).", scope=Scope.STORE),
    Setting("storage_backend", "NIXERY_STORAGE_BACKEND",
            "Where blobs and caches are kept: filesystem (under STORAGE_PATH) or s3 (in "
            "S3_BUCKET, shared by every replica; docs/storage.md).", "filesystem",
            scope=Scope.STORE),
    Setting("s3_bucket", "S3_BUCKET", "The bucket of the s3 backend.", scope=Scope.STORE),
    Setting("s3_endpoint", "AWS_ENDPOINT_URL",
            "URL of an S3-compatible service (SeaweedFS, Ceph RGW, MinIO, GCS's XML API); "
            "default: AWS.", scope=Scope.STORE),
    Setting("s3_region", "AWS_REGION", "Region of the bucket.", "us-east-1",
            scope=Scope.STORE),
    Setting("s3_access_key_id", "AWS_ACCESS_KEY_ID",
            "Access key of the s3 backend (default: boto3's own lookup: ~/.aws, an instance "
            "role).", scope=Scope.STORE),
    Setting("s3_secret_access_key", "AWS_SECRET_ACCESS_KEY",
            "Secret key of the s3 backend; better in the environment or the config file than "
            "as a flag.", scope=Scope.STORE, secret=True),
    Setting("s3_use_presigned_urls", "S3_USE_PRESIGNED_URLS",
            "Answer a blob GET with a 307 redirect to a presigned bucket URL (1), or send the "
            "bytes through the registry (0), for clients that cannot reach the bucket.", "1",
            Kind.SWITCH, Scope.SERVE),
    Setting("s3_presign_seconds", "NIXERY_S3_PRESIGN_SECONDS",
            "Seconds a presigned blob URL stays valid.", "300", Kind.INT, Scope.SERVE),
    Setting("build_lease_seconds", "NIXERY_BUILD_LEASE_SECONDS",
            "s3 backend: seconds a replica's build lease on an image lasts unless renewed; a "
            "replica that died mid-build is taken over after this.", "30", Kind.SECONDS,
            Scope.BUILD),
    Setting("channel", "NIXERY_CHANNEL", "nixpkgs channel name or commit, fetched as a tarball."),
    Setting("pkgs_repo", "NIXERY_PKGS_REPO",
            "Git URL of the package set; the image tag is the ref (40 hex: a commit, latest: "
            "the default branch)."),
    Setting("pkgs_path", "NIXERY_PKGS_PATH", "Local directory holding the package set."),
    Setting("offline", "NIXERY_OFFLINE",
            "Serve only the tags the store holds (prefetched or imported), with no package "
            "source and no Nix (1), as an air-gapped mirror does; anything else is 404 "
            "MANIFEST_UNKNOWN. Build on demand (0).", "0", Kind.SWITCH),
    Setting("nix_timeout", "NIX_TIMEOUT", "Seconds a Nix build may take before it is killed.",
            "60", Kind.SECONDS),
    Setting("popularity_url", "NIX_POPULARITY_URL", "Popularity data: http(s) URL or file."),
    Setting("nix_dir", "NIXERY_NIX_DIR",
            "Directory holding prepare-image.nix (default: the nix/ folder beside the package)."),
    Setting("layer_budget", "NIXERY_LAYER_BUDGET", "Most store-path layers per image.", "94",
            Kind.INT),
    Setting("max_packages", "NIXERY_MAX_PACKAGES", "Most packages per image.", "64",
            Kind.INT),
    Setting("platforms", "NIXERY_PLATFORMS",
            "Platforms every image is built for (linux/amd64, linux/arm64); with more than "
            "one, a tag answers with an index (arm64/... still gives one arm64 image).",
            "linux/amd64", Kind.LIST),
    Setting("oci", "NIXERY_OCI",
            "Answer a tag with an OCI manifest when the client prefers it (1), or always with "
            "Docker's schema 2, as Nixery did (0).", "1", Kind.SWITCH),
    Setting("any_tag", "NIXERY_ANY_TAG",
            "Serve every tag of a channel or path source as latest, as Nixery did (1); by "
            "default only latest is served (0).", "0", Kind.SWITCH),
    Setting("max_builds", "NIXERY_MAX_BUILDS",
            "Nix builds at once across all workers (0: the number of cores, at least 2); more "
            "wait in a queue.", "0", Kind.INT),
    Setting("not_found_ttl", "NIXERY_NOT_FOUND_TTL",
            "Seconds a failed package lookup (MANIFEST_UNKNOWN) is answered from memory, "
            "per package source, before Nix is asked again.", "60", Kind.SECONDS),
    Setting("gzip_level", "NIXERY_GZIP_LEVEL",
            "Deflate level: 0 to 3 for isal (default 2), 1 to 9 for zlib and zlib-ng "
            "(default 6).", kind=Kind.INT),
    Setting("deflate_engine", "NIXERY_DEFLATE_ENGINE",
            "Deflate engine: isal, zlib or zlib-ng (needs the zlib-ng package).", "isal"),
    Setting("deflate_threads", "NIXERY_DEFLATE_THREADS",
            "Threads compressing the blocks of one layer (0: cores).", "0", Kind.INT),
    Setting("build_threads", "NIXERY_BUILD_THREADS", "Layers written at once (0: cores).", "0",
            Kind.INT),
    Setting("read_size", "NIXERY_READ_SIZE", "Bytes per read of a file being layered.",
            str(READ_SIZE), Kind.INT),
    Setting("listen", "NIXERY_LISTEN",
            "HOST:PORT to listen on (default 127.0.0.1:8080, or all interfaces on PORT).",
            scope=Scope.SERVE),
    Setting("port", "PORT", "Port to listen on all interfaces, as in Nixery.", kind=Kind.INT,
            scope=Scope.SERVE),
    Setting("workers", "NIXERY_WORKERS",
            "Server processes sharing the port (0: one per core); builds still run once per "
            "image and layer.", "0", Kind.INT, Scope.SERVE),
    Setting("blob_sendfile", "NIXERY_BLOB_SENDFILE",
            "Send blobs with sendfile(2) (1), or read them through Python (0), for filesystems "
            "without sendfile.", "1",
            Kind.SWITCH, Scope.SERVE),
    Setting("send_timeout", "NIXERY_SEND_TIMEOUT",
            "Seconds a response may wait for its client to take more bytes; then the "
            "connection is closed (as nginx's send_timeout).", "60", Kind.SECONDS, Scope.SERVE),
    Setting("header_timeout", "NIXERY_HEADER_TIMEOUT",
            "Seconds a request's headers may take to arrive (from the connection's start or "
            "the request's first byte); then the connection is closed.", "20", Kind.SECONDS,
            Scope.SERVE),
    Setting("keepalive_timeout", "NIXERY_KEEPALIVE_TIMEOUT",
            "Seconds an idle connection is kept open for a next request.", "75", Kind.SECONDS,
            Scope.SERVE),
    Setting("drain_timeout", "NIXERY_DRAIN_TIMEOUT",
            "Seconds SIGTERM gives the responses in flight to finish before the server stops.",
            "30", Kind.SECONDS, Scope.SERVE),
    Setting("tls_cert", "NIXERY_TLS_CERT",
            "PEM certificate chain; with --tls-key the server speaks HTTPS only (TLS 1.2 or "
            "later).", scope=Scope.SERVE),
    Setting("tls_key", "NIXERY_TLS_KEY", "PEM private key of --tls-cert.", scope=Scope.SERVE),
    Setting("htpasswd", "NIXERY_HTPASSWD",
            "htpasswd file of bcrypt hashes (htpasswd -B): every request then needs HTTP basic "
            "authentication (docker login). Re-read when it changes.", scope=Scope.SERVE),
    Setting("allow_packages", "NIXERY_ALLOW_PACKAGES",
            "Glob patterns of the packages images may name; anything else is 403 DENIED "
            "before Nix runs (default: all). Meta-packages (shell, nonroot, zstd, arm64) are "
            "always allowed.", kind=Kind.LIST, scope=Scope.SERVE),
    Setting("deny_packages", "NIXERY_DENY_PACKAGES",
            "Glob patterns of packages refused with 403 DENIED, even when allowed.",
            kind=Kind.LIST, scope=Scope.SERVE),
    Setting("cold_builds_per_minute", "NIXERY_COLD_BUILDS_PER_MINUTE",
            "Builds of images not in the store that one client (its user, else its address) "
            "may start per minute, all workers together; more get 429 TOOMANYREQUESTS with "
            "Retry-After (0: no limit).", "0", Kind.INT, Scope.SERVE),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}

#: The config file's own setting (it cannot be set in itself).
CONFIG_ENV = "NIXERY_CONFIG"


def settings_for(command: str) -> list[Setting]:
    """The settings ``command`` reads, in declaration order."""
    wanted = {
        "serve": (Scope.STORE, Scope.BUILD, Scope.SERVE),
        "prefetch": (Scope.STORE, Scope.BUILD),
    }.get(command, (Scope.STORE,))
    return [setting for setting in SETTINGS if setting.scope in wanted]


@dataclass(frozen=True)
class Loaded:
    """Merged settings as text, and where each value came from."""

    values: dict[str, str | None]
    origins: dict[str, str]


def read_file(path: Path) -> dict[str, str]:
    """The settings in a TOML config file, as text; unknown keys and bad types are errors."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, str] = {}
    for key, value in data.items():
        setting = BY_NAME.get(key)
        if setting is None:
            raise ConfigError(
                f"config file {path}: unknown setting {key!r} (see docs/configuration.md)"
            )
        values[key] = _toml_text(setting, value, path)
    return values


def _toml_text(setting: Setting, value: object, path: Path) -> str:
    """A TOML value as the text the flag or variable would give."""
    kind = setting.kind
    if kind is Kind.SWITCH and isinstance(value, bool):
        return "1" if value else "0"
    if kind in (Kind.INT, Kind.SWITCH) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if kind is Kind.SECONDS and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if kind is Kind.LIST and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, str):
        return value
    expected = {Kind.SWITCH: "true or false", Kind.LIST: "a list of strings"}.get(
        kind, f"a {kind.value}" if kind is not Kind.TEXT else "a string"
    )
    raise ConfigError(f"config file {path}: {setting.name} must be {expected}, got {value!r}")


def load(
    command: str,
    given: Mapping[str, str | None],
    config_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Loaded:
    """Merge ``command``'s settings: flags over environment over file over defaults.

    ``given`` holds the flags' values (``None`` when not given);
    ``config_file`` is ``--config``, else ``NIXERY_CONFIG``.
    """
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
    from_file = read_file(config_file) if config_file is not None else {}
    values: dict[str, str | None] = {}
    origins: dict[str, str] = {}
    for setting in settings_for(command):
        for origin, value in (
            (setting.flag, given.get(setting.name)),
            (setting.env, environ.get(setting.env) or None),
            (f"{setting.name} in {config_file}", from_file.get(setting.name)),
            ("default", setting.default),
        ):
            if value is not None:
                values[setting.name], origins[setting.name] = value, origin
                break
        else:
            values[setting.name] = None
    return Loaded(values, origins)


def render_docs() -> str:
    """docs/configuration.md, from :data:`SETTINGS`."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from nixery_trio/config.py by `nixery-trio settings --docs`; "
        "tests/unit/test_config.py fails when this file is out of date. -->",
        "",
        "Every setting can be given as a command line flag, an environment variable or a "
        "key in a TOML config file (`--config FILE` or `NIXERY_CONFIG`). A flag wins over "
        "the environment, the environment over the file, the file over the default. "
        "Nixery's own variables (`PORT`, `STORAGE_PATH`, `NIXERY_CHANNEL`, "
        "`NIXERY_PKGS_REPO`, `NIXERY_PKGS_PATH`, `NIX_TIMEOUT`, `NIX_POPULARITY_URL`) keep "
        "their meaning. A switch is `1` or `0` as a flag or variable, `true` or `false` in "
        "the file; a list is comma-separated, or a TOML list of strings. An unknown key in "
        "the file is an error. `nixery-trio settings` prints what a command would use, "
        "and where each value came from.",
        "",
        "```toml",
        "# /etc/nixery-trio/config.toml",
        'storage_path = "/var/lib/nixery-trio"',
        'pkgs_path = "/srv/nixpkgs"',
        'listen = "0.0.0.0:8080"',
        'platforms = ["linux/amd64", "linux/arm64"]',
        "oci = true",
        "```",
        "",
    ]
    for scope in Scope:
        lines += [f"## Read by {scope.value}", "", "| key | flag | variable | kind | default | "
                  "meaning |", "|---|---|---|---|---|---|"]  # fmt: skip
        for s in SETTINGS:
            if s.scope is scope:
                default = f"`{s.default}`" if s.default is not None else ""
                lines.append(f"| `{s.name}` | `{s.flag}` | `{s.env}` | {s.kind.value} | "
                             f"{default} | {s.help} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def storage_path(values: Mapping[str, str | None]) -> Path:
    """The store's directory, which every command needs."""
    raw = values.get("storage_path")
    if not raw:
        raise ConfigError(
            "STORAGE_PATH must be set (--storage-path, the variable, or storage_path in the "
            "config file)"
        )
    return Path(raw).resolve()


def store_settings(
    raw: Mapping[str, str | None], origins: Mapping[str, str] | None = None
) -> tuple[Path, S3Settings | None]:
    """Where the store commands find the store: its directory, and its bucket
    for the s3 backend."""
    v = _Values(raw, origins or {})
    return storage_path(v.raw), v.s3()


class _Values:
    """The merged values, parsed by kind, with errors naming where a value came from."""

    def __init__(self, raw: Mapping[str, str | None], origins: Mapping[str, str]) -> None:
        self.raw = {s.name: s.default for s in SETTINGS}
        self.raw.update({k: v for k, v in raw.items() if v is not None})
        self.origins = origins

    def error(self, name: str, problem: str) -> ConfigError:
        origin = self.origins.get(name)
        where = f" ({origin})" if origin and origin != BY_NAME[name].env else ""
        return ConfigError(f"{BY_NAME[name].env}{where}: {problem}")

    def text(self, name: str) -> str | None:
        return self.raw.get(name) or None

    def integer(self, name: str, lo: int, hi: int, text: str | None = None) -> int:
        raw = self.raw.get(name) if text is None else text
        try:
            value = int(raw or "")
        except ValueError:
            raise self.error(name, f"must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {value}")
        return value

    def switch(self, name: str) -> bool:
        return bool(self.integer(name, 0, 1))

    def seconds(self, name: str) -> float:
        raw = self.raw.get(name)
        try:
            value = float(raw or "")
        except ValueError:
            raise self.error(name, f"must be a number of seconds, got {raw!r}") from None
        if not 0 < value < math.inf:
            raise self.error(name, f"must be a positive number of seconds, got {raw!r}")
        return value

    def s3(self) -> S3Settings | None:
        """The bucket of the ``s3`` backend, or ``None`` for the filesystem."""
        backend = self.text("storage_backend") or "filesystem"
        if backend == "filesystem":
            return None
        if backend != "s3":
            raise self.error("storage_backend", f"must be filesystem or s3, got {backend!r}")
        bucket = self.text("s3_bucket")
        if not bucket:
            raise self.error("s3_bucket", "must be set for the s3 storage backend")
        endpoint = self.text("s3_endpoint")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise self.error("s3_endpoint", f"must be an http:// or https:// URL, got {endpoint!r}")
        key_id, secret = self.text("s3_access_key_id"), self.text("s3_secret_access_key")
        if (key_id is None) != (secret is None):
            raise self.error("s3_secret_access_key" if secret is None else "s3_access_key_id",
                             "is needed too: give both keys, or neither")  # fmt: skip
        return S3Settings(
            bucket=bucket, endpoint_url=endpoint, region=self.text("s3_region") or "us-east-1",
            access_key_id=key_id, secret_access_key=secret,
            presigned_urls=self.switch("s3_use_presigned_urls"),
            presign_seconds=self.integer("s3_presign_seconds", 1, 7 * 24 * 3600),
            build_lease_seconds=self.seconds("build_lease_seconds"),
        )  # fmt: skip

    def platforms(self) -> tuple[Arch, ...]:
        platforms: list[Arch] = []
        for text in (self.raw.get("platforms") or "").split(","):
            try:
                arch = Arch.from_platform(text)
            except ValueError as exc:
                raise self.error("platforms", str(exc)) from None
            if arch in platforms:
                raise self.error("platforms", f"names {arch.platform} twice")
            platforms.append(arch)
        return tuple(platforms)

    def patterns(self, name: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in (self.text(name) or "").split(",") if p.strip())

    def readable(self, name: str) -> Path | None:
        text = self.text(name)
        if text is None:
            return None
        path = Path(text).resolve()
        if not os.access(path, os.R_OK) or not path.is_file():
            raise self.error(name, f"{text!r} is not a readable file")
        return path

    def tls(self) -> dict[str, Path | None]:
        cert, key = self.readable("tls_cert"), self.readable("tls_key")
        if (cert is None) != (key is None):
            raise self.error("tls_cert" if cert is None else "tls_key",
                             "is needed too: TLS takes both a certificate and its key")  # fmt: skip
        if cert is not None and key is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise self.error("tls_cert", f"cannot be used with its key: {exc}") from None
        return {"tls_cert": cert, "tls_key": key}

    def htpasswd(self) -> Path | None:
        path = self.readable("htpasswd")
        if path is not None:
            try:
                parse_htpasswd(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise self.error("htpasswd", str(exc)) from None
        return path

    def listen(self) -> tuple[str, int]:
        listen, port = self.text("listen"), self.text("port")
        if listen:
            host, sep, port_text = listen.rpartition(":")
            if not sep or not host:
                raise self.error("listen", f"must be HOST:PORT, got {listen!r}")
            return host.strip("[]"), self.integer("listen", 0, 65535, port_text)
        if port:
            return "0.0.0.0", self.integer("port", 0, 65535)
        return "127.0.0.1", 8080

    def source(self, offline: bool) -> Source:
        channel, repo, path = self.text("channel"), self.text("pkgs_repo"), self.text("pkgs_path")
        given = [BY_NAME[n].env for n in ("channel", "pkgs_repo", "pkgs_path") if self.text(n)]
        if offline:
            if given:
                raise ConfigError(
                    f"--offline serves the store only: it takes no package source, got {given[0]}"
                )
            return OfflineSource()
        if len(given) != 1:
            raise ConfigError(
                "exactly one package source must be set (NIXERY_CHANNEL, NIXERY_PKGS_REPO or "
                f"NIXERY_PKGS_PATH); got {', '.join(given) if given else 'none'}"
            )
        if channel:
            return ChannelSource(channel)
        if repo:
            return GitSource(repo)
        assert path is not None
        resolved = Path(path).resolve()
        if not resolved.is_dir():
            raise self.error("pkgs_path", f"{path!r} is not a directory")
        return PathSource(resolved)


def make_config(
    raw: Mapping[str, str | None], origins: Mapping[str, str] | None = None
) -> Config:
    """Validate merged settings (keyed by :attr:`Setting.name`; missing ones take defaults)."""
    v = _Values(raw, origins or {})
    cores = os.cpu_count() or 1
    host, port = v.listen()
    offline = v.switch("offline")
    storage = storage_path(v.raw)
    nix_dir = Path(v.text("nix_dir") or DEFAULT_NIX_DIR).resolve()
    if not offline and not (nix_dir / "prepare-image.nix").is_file():
        raise v.error("nix_dir", f"{nix_dir} holds no prepare-image.nix")
    engine = v.text("deflate_engine") or "isal"
    if engine not in ENGINE_LEVELS or not engine_available(engine):
        raise v.error(
            "deflate_engine",
            f"{engine!r} is not available; use "
            + ", ".join(name for name in ENGINE_LEVELS if engine_available(name)),
        )
    levels = ENGINE_LEVELS[engine]
    level_text = v.text("gzip_level") or str(DEFAULT_LEVELS[engine])
    level = v.integer("gzip_level", levels[0], levels[-1], level_text)
    return Config(
        host=host,
        port=port,
        source=v.source(offline),
        storage_path=storage,
        nix_timeout=v.seconds("nix_timeout"),
        popularity_url=v.text("popularity_url"),
        nix_dir=nix_dir,
        layer_budget=v.integer("layer_budget", 1, 124),
        max_packages=v.integer("max_packages", 1, 1000),
        gzip_level=level,
        build_threads=v.integer("build_threads", 0, 256) or cores,
        deflate_engine=engine,
        deflate_threads=v.integer("deflate_threads", 0, 256) or cores,
        read_size=v.integer("read_size", 512, 1 << 30),
        blob_sendfile=v.switch("blob_sendfile"),
        workers=v.integer("workers", 0, 256) or cores,
        send_timeout=v.seconds("send_timeout"),
        header_timeout=v.seconds("header_timeout"),
        keepalive_timeout=v.seconds("keepalive_timeout"),
        drain_timeout=v.seconds("drain_timeout"),
        max_builds=v.integer("max_builds", 0, 1000) or max(2, cores),
        not_found_ttl=v.seconds("not_found_ttl"),
        any_tag=v.switch("any_tag"),
        oci=v.switch("oci"),
        platforms=v.platforms(),
        offline=offline,
        **v.tls(),
        htpasswd=v.htpasswd(),
        packages=PackagePolicy(v.patterns("allow_packages"), v.patterns("deny_packages")),
        cold_builds_per_minute=v.integer("cold_builds_per_minute", 0, 1_000_000),
        s3=v.s3(),
    )
