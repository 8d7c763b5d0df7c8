"""The one typed configuration object, read once at start-up.

Every setting has a Nixery-compatible environment variable and a command
line flag (``cli.py`` declares both from :data:`SETTINGS`); ``make_config``
turns the raw strings into a validated :class:`Config` or raises
:class:`ConfigError` with a message an operator can act on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .build.archive import DEFAULT_LEVELS, ENGINE_LEVELS, READ_SIZE, Deflate, engine_available
from .build.sources import ChannelSource, GitSource, OfflineSource, PathSource, Source
from .core.errors import ConfigError
from .core.image import Arch

#: The ``nix/`` directory of this checkout (prepare-image.nix, demo set).
DEFAULT_NIX_DIR = Path(__file__).resolve().parent.parent / "nix"


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

    @property
    def deflate(self) -> Deflate:
        """How the layer writer compresses (see ``archive.Deflate``)."""
        return Deflate(self.deflate_engine, self.gzip_level, self.deflate_threads, self.read_size)


@dataclass(frozen=True)
class Setting:
    """A configuration knob: its flag, environment variable and help."""

    flag: str
    env: str
    help: str
    default: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("--listen", "NIXERY_LISTEN", "HOST:PORT to listen on (default 127.0.0.1:8080)."),
    Setting("--port", "PORT", "Port to listen on all interfaces, as in Nixery."),
    Setting("--channel", "NIXERY_CHANNEL", "nixpkgs channel name or commit (tarball)."),
    Setting("--pkgs-repo", "NIXERY_PKGS_REPO", "Git URL of the package set; tag = git ref."),
    Setting("--pkgs-path", "NIXERY_PKGS_PATH", "Local directory holding the package set."),
    Setting(
        "--storage-backend",
        "NIXERY_STORAGE_BACKEND",
        "Storage backend; only 'filesystem'.",
        "filesystem",
    ),
    Setting("--storage-path", "STORAGE_PATH", "Directory of the blob store and caches."),
    Setting("--nix-timeout", "NIX_TIMEOUT", "Seconds a Nix build may take.", "60"),
    Setting("--popularity-url", "NIX_POPULARITY_URL", "Popularity data: http(s) URL or file."),
    Setting("--nix-dir", "NIXERY_NIX_DIR", "Directory holding prepare-image.nix."),
    Setting("--layer-budget", "NIXERY_LAYER_BUDGET", "Maximum layers per image.", "94"),
    Setting("--max-packages", "NIXERY_MAX_PACKAGES", "Maximum packages per image.", "64"),
    Setting(
        "--gzip-level",
        "NIXERY_GZIP_LEVEL",
        "Deflate level: 0 to 3 for isal (default 2), 1 to 9 for zlib and zlib-ng (default 6).",
    ),
    Setting("--build-threads", "NIXERY_BUILD_THREADS", "Threads writing layers (0: cores).", "0"),
    Setting(
        "--deflate-engine",
        "NIXERY_DEFLATE_ENGINE",
        "Deflate engine: isal, zlib or zlib-ng (needs the zlib-ng package).",
        "isal",
    ),
    Setting(
        "--deflate-threads",
        "NIXERY_DEFLATE_THREADS",
        "Threads compressing the blocks of one layer (0: cores).",
        "0",
    ),
    Setting(
        "--read-size", "NIXERY_READ_SIZE", "Bytes per read of a file being layered.", "1048576"
    ),
    Setting(
        "--workers",
        "NIXERY_WORKERS",
        "Server processes sharing the port (0: one per core).",
        "0",
    ),
    Setting(
        "--blob-sendfile",
        "NIXERY_BLOB_SENDFILE",
        "Send blobs with sendfile(2) (1), or read them through Python (0).",
        "1",
    ),
    Setting(
        "--send-timeout",
        "NIXERY_SEND_TIMEOUT",
        "Seconds a response may wait for its client to take more bytes; then the "
        "connection is closed.",
        "60",
    ),
    Setting(
        "--header-timeout",
        "NIXERY_HEADER_TIMEOUT",
        "Seconds a request's headers may take to arrive (from the connection's start or the "
        "request's first byte); then the connection is closed.",
        "20",
    ),
    Setting(
        "--keepalive-timeout",
        "NIXERY_KEEPALIVE_TIMEOUT",
        "Seconds an idle connection is kept open for a next request.",
        "75",
    ),
    Setting(
        "--drain-timeout",
        "NIXERY_DRAIN_TIMEOUT",
        "Seconds SIGTERM gives the responses in flight to finish before the server stops.",
        "30",
    ),
    Setting(
        "--max-builds",
        "NIXERY_MAX_BUILDS",
        "Nix builds at once across all workers (0: the number of cores, at least 2); more "
        "wait in a queue.",
        "0",
    ),
    Setting(
        "--not-found-ttl",
        "NIXERY_NOT_FOUND_TTL",
        "Seconds a failed package lookup (MANIFEST_UNKNOWN) is answered from memory, "
        "per package source, before Nix is asked again.",
        "60",
    ),
    Setting(
        "--any-tag",
        "NIXERY_ANY_TAG",
        "Serve every tag of a channel or path source as latest, as Nixery did (1); by "
        "default only latest is served (0).",
        "0",
    ),
    Setting(
        "--oci",
        "NIXERY_OCI",
        "Answer a tag with an OCI manifest when the client prefers it (1), or always with "
        "Docker's schema 2, as Nixery did (0).",
        "1",
    ),
    Setting(
        "--platforms",
        "NIXERY_PLATFORMS",
        "Platforms every image is built for, comma-separated (linux/amd64, linux/arm64); "
        "with more than one, a tag answers with an index (arm64/... still gives one arm64 "
        "image).",
        "linux/amd64",
    ),
    Setting(
        "--offline",
        "NIXERY_OFFLINE",
        "Serve only what the store holds, with no package source and no Nix (1), as an "
        "air-gapped mirror does; build on demand (0).",
        "0",
    ),
)


def _platforms(raw: str | None) -> tuple[Arch, ...]:
    platforms: list[Arch] = []
    for text in (raw or "linux/amd64").split(","):
        try:
            arch = Arch.from_platform(text)
        except ValueError as exc:
            raise ConfigError(f"NIXERY_PLATFORMS: {exc}") from None
        if arch in platforms:
            raise ConfigError(f"NIXERY_PLATFORMS names {arch.platform} twice")
        platforms.append(arch)
    return tuple(platforms)


def _int(name: str, raw: str | None, lo: int, hi: int) -> int:
    try:
        value = int(raw or "")
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _seconds(name: str, raw: str | None, default: str) -> float:
    try:
        value = float(raw or default)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _listen(listen: str | None, port: str | None) -> tuple[str, int]:
    if listen:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"--listen must be HOST:PORT, got {listen!r}")
        return host.strip("[]"), _int("--listen port", port_text, 0, 65535)
    if port:
        return "0.0.0.0", _int("PORT", port, 0, 65535)
    return "127.0.0.1", 8080


def _source(channel: str | None, repo: str | None, path: str | None, offline: bool) -> Source:
    given = [
        name
        for name, value in (
            ("NIXERY_CHANNEL", channel),
            ("NIXERY_PKGS_REPO", repo),
            ("NIXERY_PKGS_PATH", path),
        )
        if value
    ]
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
        raise ConfigError(f"NIXERY_PKGS_PATH {path!r} is not a directory")
    return PathSource(resolved)


def make_config(raw: dict[str, str | None]) -> Config:
    """Validate raw settings (keyed by flag name without dashes, ``_`` for ``-``)."""
    host, port = _listen(raw.get("listen"), raw.get("port"))
    offline = bool(_int("NIXERY_OFFLINE", raw.get("offline") or "0", 0, 1))
    backend = raw.get("storage_backend") or "filesystem"
    if backend != "filesystem":
        raise ConfigError(f"NIXERY_STORAGE_BACKEND {backend!r} is not supported; use filesystem")
    storage = raw.get("storage_path")
    if not storage:
        raise ConfigError("STORAGE_PATH (--storage-path) must be set for the filesystem backend")
    timeout = _seconds("NIX_TIMEOUT", raw.get("nix_timeout"), "60")
    nix_dir = Path(raw.get("nix_dir") or DEFAULT_NIX_DIR).resolve()
    if not offline and not (nix_dir / "prepare-image.nix").is_file():
        raise ConfigError(f"{nix_dir}/prepare-image.nix not found (set NIXERY_NIX_DIR)")
    threads = _int("NIXERY_BUILD_THREADS", raw.get("build_threads") or "0", 0, 256)
    engine = raw.get("deflate_engine") or "isal"
    if engine not in ENGINE_LEVELS or not engine_available(engine):
        raise ConfigError(
            f"NIXERY_DEFLATE_ENGINE {engine!r} is not available; use "
            + ", ".join(name for name in ENGINE_LEVELS if engine_available(name))
        )
    levels = ENGINE_LEVELS[engine]
    level_text = raw.get("gzip_level") or str(DEFAULT_LEVELS[engine])
    level = _int("NIXERY_GZIP_LEVEL", level_text, levels[0], levels[-1])
    deflate_threads = _int("NIXERY_DEFLATE_THREADS", raw.get("deflate_threads") or "0", 0, 256)
    read_size = _int("NIXERY_READ_SIZE", raw.get("read_size") or str(READ_SIZE), 512, 1 << 30)
    sendfile = _int("NIXERY_BLOB_SENDFILE", raw.get("blob_sendfile") or "1", 0, 1)
    workers = _int("NIXERY_WORKERS", raw.get("workers") or "0", 0, 256)
    return Config(
        host=host,
        port=port,
        source=_source(raw.get("channel"), raw.get("pkgs_repo"), raw.get("pkgs_path"), offline),
        storage_path=Path(storage).resolve(),
        nix_timeout=timeout,
        popularity_url=raw.get("popularity_url") or None,
        nix_dir=nix_dir,
        layer_budget=_int("NIXERY_LAYER_BUDGET", raw.get("layer_budget") or "94", 1, 124),
        max_packages=_int("NIXERY_MAX_PACKAGES", raw.get("max_packages") or "64", 1, 1000),
        gzip_level=level,
        build_threads=threads or (os.cpu_count() or 1),
        deflate_engine=engine,
        deflate_threads=deflate_threads or (os.cpu_count() or 1),
        read_size=read_size,
        blob_sendfile=bool(sendfile),
        workers=workers or (os.cpu_count() or 1),
        send_timeout=_seconds("NIXERY_SEND_TIMEOUT", raw.get("send_timeout"), "60"),
        header_timeout=_seconds("NIXERY_HEADER_TIMEOUT", raw.get("header_timeout"), "20"),
        keepalive_timeout=_seconds("NIXERY_KEEPALIVE_TIMEOUT", raw.get("keepalive_timeout"), "75"),
        drain_timeout=_seconds("NIXERY_DRAIN_TIMEOUT", raw.get("drain_timeout"), "30"),
        max_builds=_int("NIXERY_MAX_BUILDS", raw.get("max_builds") or "0", 0, 1000)
        or max(2, os.cpu_count() or 1),
        not_found_ttl=_seconds("NIXERY_NOT_FOUND_TTL", raw.get("not_found_ttl"), "60"),
        any_tag=bool(_int("NIXERY_ANY_TAG", raw.get("any_tag") or "0", 0, 1)),
        oci=bool(_int("NIXERY_OCI", raw.get("oci") or "1", 0, 1)),
        platforms=_platforms(raw.get("platforms")),
        offline=offline,
    )
