"""Building images into the store without a client: ``nixery-trio prefetch``.

A mirror is filled before it goes where there is no Nix: each named image
is built exactly as a pull by tag would build it (the same builder, the same
cache records, every platform the settings name), so a server on the store
later answers it from its cache.  Images are built at once, as concurrent
pulls would be: ``NIXERY_MAX_BUILDS`` still bounds the Nix runs.

While it runs, a table shows each image's platforms and where each stands
(queued, Nix, layering, layers written of total, bytes); a build that needs
nothing is ``cached``.  The result is one line per image: its digests, or
its error.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..build.builder import Builder, ImageManifests
from ..build.sources import LATEST
from ..config import Config
from ..core.errors import RegistryError
from ..core.image import validate_name
from ..core.manifest import Format
from ..core.progress import BuildProgress
from ..store.storage import open_storage

#: Seconds between two redraws of the progress table.
REFRESH_SECONDS = 0.25


@dataclass
class Prefetched:
    """One image asked for: how it went."""

    ref: str
    name: str
    tag: str
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    digests: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    platforms: dict[str, BuildProgress] = field(default_factory=dict)


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME[:TAG]`` as (name, tag); ValueError, saying why, for anything else."""
    if "@" in ref:
        raise ValueError(f"{ref!r}: prefetch builds by tag; a digest names what is built already")
    name, _, tag = ref.partition(":")
    try:
        validate_name(name)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    return name, tag or LATEST


def read_refs(lines: Iterable[str]) -> list[str]:
    """Image references from a list file: one per line; blank lines and ``#`` comments skipped."""
    refs = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            refs.append(text)
    return refs


async def prefetch(
    config: Config, popularity: dict[str, int], refs: list[str], console: Console | None = None
) -> list[Prefetched]:
    """Build every image of ``refs`` into the store; how each went, in order."""
    results = []
    for ref in refs:
        name, tag = parse_ref(ref)
        results.append(Prefetched(ref, name, tag))
    by_build: dict[tuple[str, str], Prefetched] = {(r.name, r.tag): r for r in results}

    def watch(progress: BuildProgress) -> None:
        result = by_build.get((progress.image, progress.tag))
        if result is not None:
            result.platforms[progress.platform] = progress

    async with trio.open_nursery() as nursery:
        builder = Builder(config, open_storage(config.storage_path, config.s3), popularity, nursery)
        await trio.to_thread.run_sync(builder.open)
        builder.progress_hooks.append(watch)
        with Live(_table(results), console=console, auto_refresh=False,
                  transient=False) as live:  # fmt: skip
            async with trio.open_nursery() as builds:
                for result in results:
                    builds.start_soon(_build, builder, result)
                while True:
                    live.update(_table(results), refresh=True)
                    if all(r.seconds is not None for r in results):
                        break
                    await trio.sleep(REFRESH_SECONDS)
        if not live.console.is_terminal:
            live.console.line()  # the table's last line, ended
        await builder.tags_recorded()
        nursery.cancel_scope.cancel()  # the builder's background tasks
    return results


async def _build(builder: Builder, result: Prefetched) -> None:
    try:
        found = await builder.manifest_for_tag(result.name, result.tag)
        result.digests = _digests(found)
    except RegistryError as exc:
        result.error = exc.message
    finally:
        result.seconds = time.monotonic() - result.started


def _digests(found: ImageManifests) -> dict[str, str]:
    """What was stored, by kind: ``oci index``, ``docker list``, ``oci manifest``, ..."""
    kinds = {Format.OCI: "oci index", Format.DOCKER: "docker list"}
    return {
        kinds[fmt] if found.single is not None else f"{fmt.name.lower()} manifest": m.digest
        for fmt, m in sorted(found.by_format.items(), key=lambda item: item[0].name, reverse=True)
    }


def _table(results: list[Prefetched]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("image", "platform", "phase", "layers", "MB", "s"):
        table.add_column(column, justify="right" if column in ("layers", "MB", "s") else "left")
    for result in results:
        seconds = result.seconds
        if seconds is None:
            seconds = time.monotonic() - result.started
        rows: list[tuple[str, BuildProgress | None]] = [*sorted(result.platforms.items())]
        rows = rows or [("", None)]
        for index, (platform, progress) in enumerate(rows):
            if result.error is not None:
                phase = "[red]failed"
            elif progress is None:
                phase = "cached" if result.seconds is not None else "looking"
            else:
                phase = progress.phase
            layers = mb = ""
            if progress is not None and progress.layers_total:
                done = progress.layers_cached + progress.layers_written
                layers = f"{done}/{progress.layers_total}"
                mb = f"{progress.bytes / 1e6:.1f}"
            table.add_row(result.ref if index == 0 else "", platform, phase, layers, mb,
                          f"{seconds:.1f}" if index == 0 else "")  # fmt: skip
    return table
