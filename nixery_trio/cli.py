"""The command line: ``nixery-trio serve``, ``prefetch``, ``ls``, ``export``, ``import``,
``fsck`` and ``gc``.

Every command reads its settings the same way, from the one list of them
(:data:`nixery_trio.config.SETTINGS`): flags over Nixery-compatible
environment variables over the TOML file of ``--config`` over defaults.
The values are validated once into a :class:`~nixery_trio.config.Config`
(or, for the store commands, the store's path) and passed down explicitly.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import click
import hypercorn.config
import trio
from hypercorn.utils import repr_socket_addr
from rich.console import Console
from rich.table import Table

from . import config as settings
from . import logs, metrics
from .build.builder import Builder
from .build.sources import LATEST
from .config import Config, S3Settings, make_config
from .core.errors import ConfigError, StorageError
from .core.popularity import parse_popularity
from .http import httpserver, supervisor
from .http.registry import create_app
from .ops import bundle, maintenance, prefetch
from .store.inventory import held_images
from .store.storage import Storage, open_storage
from .version import source_version


def load_popularity(url: str | None) -> dict[str, int]:
    """Popularity data from an http(s) URL or a local file; empty if none."""
    if url is None:
        return {}
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        else:
            with open(url.removeprefix("file://"), "rb") as f:
                data = f.read()
        return parse_popularity(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load popularity data from {url}: {exc}") from exc


#: glibc's mallopt parameter for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own mmap and go back at free.
MMAP_THRESHOLD = 1 << 20


def release_large_buffers() -> None:
    """Make glibc return large buffers to the system when they are freed.

    The server allocates many short-lived buffers of a few MiB (blob chunks,
    deflate blocks) in many threads.  glibc's default raises its mmap
    threshold after the first such buffer is freed, and from then on serves
    them from per-thread arenas that keep the memory: in a ten-minute soak
    the server's RSS grew from 270 to 700 MiB.  A fixed threshold keeps each
    big buffer in its own mapping, returned at once (the soak then stayed
    under 90 MiB).  Other C libraries are left alone.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        logs.warning("malloc.untuned", reason="not glibc")


#: Connections the kernel queues for accept (capped by net.core.somaxconn):
#: Hypercorn's 100 drops bursts of new clients.
LISTEN_BACKLOG = 1024


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it.

    Every connection holds a descriptor, and a blob being sent a second one:
    the usual soft limit of 1,024 is a few hundred idle clients (as nginx's
    ``worker_rlimit_nofile``, but from the limit the system already grants).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    ]
    hc.accesslog = None
    hc.errorlog = None
    hc.include_server_header = False
    hc.keep_alive_timeout = config.keepalive_timeout
    hc.backlog = LISTEN_BACKLOG
    hc.graceful_timeout = config.drain_timeout
    hc.h11_max_incomplete_size = 64 * 1024
    return hc


def bind(config: Config) -> list[socket.socket]:
    """The listening sockets of ``config``."""
    hc = hypercorn_config(config)
    sockets = hc.create_sockets().insecure_sockets
    for sock in sockets:
        sock.listen(hc.backlog)
    return sockets


def _log_store_opened(config: Config, removed: int | None) -> None:
    """Log what ``CAS.open_store`` found: crash leftovers removed, or another server."""
    if removed is None:
        logs.warning(
            "storage.in_use",
            storage=str(config.storage_path),
            detail="another server uses this store; its files in tmp/ are left alone",
        )
    elif removed:
        logs.warning("storage.leftovers_removed", count=removed)


def addresses(sockets: list[socket.socket], config: Config) -> list[str]:
    """The ``http://`` (or, with TLS, ``https://``) addresses ``sockets`` listen on."""
    scheme = "https" if config.tls_cert else "http"
    return [f"{scheme}://{repr_socket_addr(s.family, s.getsockname())}" for s in sockets]


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context: TLS 1.2 or later, HTTP/1.1 by ALPN (the server
    speaks no HTTP/2); ``None`` without ``--tls-cert``."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def run_server(
    config: Config,
    popularity: dict[str, int],
    sockets: list[socket.socket] | None = None,
    *,
    worker: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the registry until drained by a signal, or cancelled; report the bound addresses.

    Binds ``config``'s address unless given ``sockets``.  A ``worker`` (one
    of several processes on the same sockets and store) leaves the store's
    crash leftovers to the parent, which cleared them before any worker ran.
    SIGTERM (and SIGINT, but for a worker) drains the server: no new
    connections, responses in flight finish within ``config.drain_timeout``;
    then builds no request waits for are stopped.  A second signal stops
    everything at once.
    """
    if sockets is None:
        sockets = bind(config)
    binds = addresses(sockets, config)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_on_signal, shutdown, nursery.cancel_scope, worker)
        builder = Builder(config, open_storage(config.storage_path, config.s3), popularity, nursery)
        builder.progress_hooks.append(metrics.BuildObserver())
        metrics.ready()
        _log_store_opened(config, await trio.to_thread.run_sync(builder.open, not worker))
        serving = partial(
            httpserver.serve,
            create_app(builder),
            hypercorn_config(config),
            sockets,
            send_timeout=config.send_timeout,
            header_timeout=config.header_timeout,
            shutdown=shutdown,
            tls=tls_context(config),
        )
        async with trio.open_nursery() as http:
            await http.start(serving)
            logs.info(
                "worker.started" if worker else "server.started",
                listen=binds,
                version=source_version(config.nix_dir),
                source=config.source.describe(),
                storage=str(config.storage_path),
                open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            task_status.started(binds)
        logs.info("worker.drained" if worker else "server.drained")
        nursery.cancel_scope.cancel()


async def _drain_on_signal(
    shutdown: trio.Event, everything: trio.CancelScope, worker: bool
) -> None:
    """Set ``shutdown`` at the first SIGTERM (or SIGINT); cancel ``everything`` at the second."""
    stops = [signal.SIGTERM] if worker else [signal.SIGTERM, signal.SIGINT]
    with trio.open_signal_receiver(*stops) as received:
        async for signum in received:
            name = signal.Signals(signum).name
            if shutdown.is_set():
                logs.warning("server.stopping", signal=name, detail="cutting off the responses")
                everything.cancel()
                return
            if not worker:
                logs.info("server.draining", signal=name)
            shutdown.set()


def _worker(config: Config, popularity: dict[str, int], sockets: list[socket.socket]) -> int:
    """A forked worker process: serve until drained; the exit status."""
    try:
        trio.run(partial(run_server, config, popularity, sockets, worker=True))
    except BaseException:
        logs.error("worker.failed", exc_info=True)
        return 1
    return 0


def run_workers(config: Config, popularity: dict[str, int]) -> int:
    """Serve from ``config.workers`` forked processes sharing one socket.

    The parent binds, clears the store's crash leftovers and hands the rest
    to ``supervisor.supervise``: fork, replace workers that die, drain on
    SIGTERM.  Builds coordinate through the store (``locks.py``).
    """
    sockets = bind(config)
    _log_store_opened(config, open_storage(config.storage_path, config.s3).open_store(clean=True))

    def started(workers: list[int]) -> None:
        logs.info("server.started", listen=addresses(sockets, config), workers=workers,
                  version=source_version(config.nix_dir), source=config.source.describe(),
                  storage=str(config.storage_path),
                  open_files_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # fmt: skip

    return supervisor.supervise(
        partial(_worker, config, popularity, sockets),
        config.workers,
        sockets,
        config.drain_timeout,
        started,
    )


def _settings_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for the settings ``command`` reads, and ``--config``.

    Click reads only the flags: ``settings.load`` merges them with the
    environment, the config file and the defaults, and knows where each
    value came from.
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for setting in reversed(settings.settings_for(command)):
            default = f"; default {setting.default}" if setting.default else ""
            function = click.option(
                setting.flag, setting.name, help=f"{setting.help} [env {setting.env}{default}]"
            )(function)
        return click.option(
            "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
            help=f"TOML file of settings (docs/configuration.md) [env {settings.CONFIG_ENV}].",
        )(function)  # fmt: skip

    return decorate


def _load(command: str, raw: dict[str, Any]) -> settings.Loaded:
    """``command``'s merged settings from its options (``raw``, emptied of them)."""
    config_file = raw.pop("config_file")
    flags = {s.name: raw.pop(s.name) for s in settings.settings_for(command)}
    try:
        return settings.load(command, flags, config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _config(command: str, raw: dict[str, Any]) -> Config:
    loaded = _load(command, raw)
    try:
        return make_config(loaded.values, loaded.origins)
    except ConfigError as exc:
        logs.error("config.invalid", message=str(exc))
        raise click.ClickException(str(exc)) from exc


def _store_settings(raw: dict[str, Any]) -> tuple[Path, S3Settings | None]:
    """Where the store commands find the store: its directory, and the bucket
    of the s3 backend."""
    loaded = _load("store", raw)
    try:
        return settings.store_settings(loaded.values, loaded.origins)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _store(raw: dict[str, Any], *, must_exist: bool = True) -> Path:
    """The directory of a filesystem store, for export and import (only import
    may make it)."""
    path, s3 = _store_settings(raw)
    if s3 is not None:
        command = click.get_current_context().info_name
        raise click.ClickException(
            f"nixery-trio {command} works on the filesystem backend only; this store is the "
            f"bucket {s3.bucket}"
        )
    if must_exist and not path.is_dir():
        raise click.ClickException(f"{path} is not a directory")
    return path


def _storage(raw: dict[str, Any]) -> Storage:
    """The store of ls, fsck and gc, on either backend."""
    path, s3 = _store_settings(raw)
    if s3 is None and not path.is_dir():
        raise click.ClickException(f"{path} is not a directory")
    return open_storage(path, s3)


@click.group()
@click.version_option(version=source_version(), prog_name="nixery-trio")
def main() -> None:
    """nixery-trio: a container registry that builds images on demand with Nix."""


@main.command()
@_settings_options("serve")
def serve(**raw: Any) -> None:
    """Serve the registry."""
    logs.setup()
    config = _config("serve", raw)
    try:
        popularity = load_popularity(config.popularity_url)
    except ConfigError as exc:
        logs.error("config.invalid", message=str(exc))
        raise click.ClickException(str(exc)) from exc
    if config.s3 is not None:  # a wrong bucket or key fails here, not the first pull
        try:
            open_storage(config.storage_path, config.s3).open_store(clean=False)
        except StorageError as exc:
            logs.error("storage.unavailable", bucket=config.s3.bucket, error=str(exc))
            raise click.ClickException(str(exc)) from exc
    release_large_buffers()
    raise_open_files_limit()
    # Asked once here, what the source caches to make its key (a local
    # package set's file hashes) is every worker's from the fork on: a first
    # pull only stats the files.
    logs.info("source.key", key=config.source.cache_key(LATEST))
    with _metrics_directory() as directory:
        metrics.enable_multiprocess(directory)
        if config.workers > 1:
            status = run_workers(config, popularity)
            logs.info("server.stopped")
            sys.exit(status)
        with contextlib.suppress(KeyboardInterrupt):  # before the server watches for SIGINT
            trio.run(run_server, config, popularity)
    logs.info("server.stopped")


@contextlib.contextmanager
def _metrics_directory() -> Iterator[Path]:
    """Where the workers count their metrics: ``PROMETHEUS_MULTIPROC_DIR`` if
    the operator set it, else a temporary directory removed at exit."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        yield Path(given)
        return
    with tempfile.TemporaryDirectory(prefix="nixery-trio-metrics-") as directory:
        yield Path(directory)


@main.command("prefetch")
@_settings_options("prefetch")
@click.option(
    "--from-file", "from_file", type=click.File("r"),
    help="Also build the images listed in this file, one NAME[:TAG] per line ('#' comments).",
)  # fmt: skip
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON log here (default: warnings and errors to stderr).")  # fmt: skip
@click.argument("images", nargs=-1)
def prefetch_command(
    images: tuple[str, ...], from_file: Any, log_file: Path | None, **raw: Any
) -> None:
    """Build IMAGE[:TAG]... into the store as pulls would, without a client.

    Reads the same settings as serve.  Exits 1 when any image failed, naming each.
    """
    refs = [*images, *(prefetch.read_refs(from_file) if from_file else [])]
    if not refs:
        raise click.UsageError("name at least one image, or --from-file")
    if log_file is None:
        logs.setup(level=logging.WARNING)
    else:
        logs.setup(open(log_file, "a"))  # noqa: SIM115 - lives as long as the command
    config = _config("prefetch", raw)
    try:
        popularity = load_popularity(config.popularity_url)
        for ref in refs:
            prefetch.parse_ref(ref)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    results = trio.run(prefetch.prefetch, config, popularity, refs)
    failed = [r for r in results if r.error is not None]
    for result in results:
        if result.error is None:
            digests = ", ".join(f"{kind} {digest}" for kind, digest in result.digests.items())
            click.echo(f"{result.name}:{result.tag}: {digests}")
    for result in failed:
        click.echo(f"failed: {result.name}:{result.tag}: {result.error}", err=True)
    if failed:
        sys.exit(1)


@main.command("export")
@_settings_options("store")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle to write (an OCI image layout archive, a plain tar).")  # fmt: skip
@click.option("--since", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An earlier bundle: leave out the blobs it carried.")  # fmt: skip
@click.argument("images", nargs=-1)
def export_command(
    output: Path, since: Path | None, images: tuple[str, ...], **raw: Any
) -> None:
    """Write IMAGE[:TAG]... (default: every tag the store holds) into one bundle.

    The same store gives the same bytes.
    """
    storage_path = _store(raw)
    partial_path = output.with_name(output.name + ".part")
    try:
        with open(partial_path, "wb") as out:
            exported = bundle.export(storage_path, out, images, since)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial_path, output)
    except bundle.BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        partial_path.unlink(missing_ok=True)
    click.echo(
        f"export: {len(exported.refs)} image(s), {exported.blobs} blob(s), {exported.size} bytes"
        + (f"; {exported.left_out} blob(s) left to {since}" if since else "")
        + f" -> {output}"
    )
    for ref in exported.refs:
        click.echo(f"  {ref}")


@main.command("import")
@_settings_options("store")
@click.argument("bundles", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
def import_command(bundles: tuple[Path, ...], **raw: Any) -> None:
    """Load BUNDLE... (a base, then the deltas made --since it) into the store.

    Every blob and every image's references are checked before anything
    becomes visible; a damaged or incomplete bundle leaves the store as it
    was.  Safe while a server serves the store.
    """
    storage_path = _store(raw, must_exist=False)
    try:
        imported = bundle.import_bundles(storage_path, list(bundles))
    except bundle.BundleError as exc:
        raise click.ClickException(f"nothing imported: {exc}") from exc
    click.echo(f"import: {len(imported.refs)} image(s), {imported.blobs} new blob(s)")
    for ref in imported.refs:
        click.echo(f"  {ref}")


@main.command("ls")
@_settings_options("store")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, per line.")
def list_command(as_json: bool, **raw: Any) -> None:
    """The images the store holds: tag, platforms, digest, size, created, last pulled."""
    try:
        images = held_images(_storage(raw))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        for image in images:
            click.echo(json.dumps(dataclasses.asdict(image)))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("IMAGE", "PLATFORMS", "DIGEST", "SIZE", "CREATED", "LAST PULLED"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for image in images:
        table.add_row(f"{image.name}:{image.tag}", ",".join(image.platforms), image.digest,
                      f"{image.size / 1e6:.1f} MB", _utc(image.created),
                      _utc(image.last_pulled))  # fmt: skip
    Console(width=max(200, Console().width)).print(table)


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when)) if when else "-"


@main.command()
@_settings_options("store")
@click.option("--repair", is_flag=True, help="Drop blobs and records that cannot be trusted.")
def fsck(repair: bool, **raw: Any) -> None:
    """Re-hash every blob and check every cache record.

    Exits 1 if it found problems it did not repair.
    """
    try:
        findings = maintenance.fsck(_storage(raw), repair=repair)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from exc
    for finding in findings:
        click.echo(str(finding))
    broken = [f for f in findings if not f.repaired]
    click.echo(f"fsck: {len(findings)} problem(s), {len(findings) - len(broken)} repaired")
    if broken:
        sys.exit(1)


@main.command()
@_settings_options("store")
@click.option("--max-size", required=True, help="Shrink the store to this size (e.g. 10G).")
@click.option(
    "--grace", default=900.0, show_default=True, type=float,
    help="Seconds since last use within which nothing is removed.",
)  # fmt: skip
def gc(max_size: str, grace: float, **raw: Any) -> None:
    """Remove least recently used blobs until the store fits --max-size."""
    try:
        limit = maintenance.parse_size(max_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-size") from exc
    if grace < maintenance.MIN_GRACE_SECONDS:
        raise click.BadParameter(
            f"at least {maintenance.MIN_GRACE_SECONDS} s: a running server trusts manifests "
            "it checked in the last minutes",
            param_hint="--grace",
        )
    try:
        report = maintenance.gc(_storage(raw), limit, grace=grace)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"gc: {report.size_before} -> {report.size_after} bytes, removed "
        f"{len(report.removed)} blob(s) and {report.records_removed} record(s)"
    )
    if report.size_after > limit:
        click.echo(
            f"gc: still over {limit} bytes: {report.kept_recent} blob(s) were used within "
            f"the last {grace:g} s"
        )


@main.command("settings")
@_settings_options("serve")
@click.option("--docs", is_flag=True, help="Print docs/configuration.md instead.")
def settings_command(docs: bool, **raw: Any) -> None:
    """The settings serve would use, and where each value came from.

    Takes the same flags, environment and --config as serve; values are not
    validated (serve does that).
    """
    if docs:
        click.echo(settings.render_docs(), nl=False)
        return
    loaded = _load("serve", raw)
    for name, value in loaded.values.items():
        if value is not None:
            shown = '"(hidden)"' if settings.BY_NAME[name].secret else json.dumps(value)
            click.echo(f"{name} = {shown}  # {loaded.origins[name]}")


if __name__ == "__main__":
    main()
