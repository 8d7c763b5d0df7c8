"""Run ``nix/prepare-image.nix`` and turn its outcome into data or errors.

One ``nix-build`` per image: it loads the package set, resolves the names
(reporting all missing ones at once), builds them and writes one JSON file
holding the runtime closure graph and the symlink forest (see
``nix/README.md``).  Package names travel as a JSON string argument, never
as Nix code.  The build runs in its own process group so that a timeout or a
cancellation kills nix-build *and* every builder it started; stderr is kept
for the error message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import logs
from ..core.errors import BuildFailed, BuildTimeout, ManifestUnknown, StorageError
from ..core.image import Image
from ..core.layers import StorePathInfo
from .sources import Source

_FAILED_BUILDER = re.compile(r"builder for '([^']+)' failed[^\n]*")
_STDERR_TAIL = 4000
_GRACE_SECONDS = 5


@dataclass(frozen=True)
class NixResult:
    """What Nix built for an image."""

    graph: tuple[StorePathInfo, ...]
    roots: tuple[str, ...]
    forest: str
    #: The ``meta.mainProgram`` of each requested name that declares one.
    main_programs: dict[str, str] = field(default_factory=dict)


async def _deliver_cancel(process: trio.Process) -> None:
    """Stop nix-build on timeout or cancellation, builders included.

    SIGINT lets Nix kill its builders (which run in sessions of their own)
    and release its locks; whatever is left after a grace period is killed
    with its process group.
    """
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    with trio.move_on_after(_GRACE_SECONDS):
        await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def parse_result(data: bytes) -> NixResult:
    """Parse prepare-image.nix's JSON; raise ManifestUnknown for missing names."""
    doc: dict[str, Any] = json.loads(data)
    if doc.get("error") == "not_found":
        missing = [str(p) for p in doc.get("pkgs", [])]
        raise ManifestUnknown(
            f"packages not found in the package set: {', '.join(missing)}",
            {"missing": missing},
        )
    graph = tuple(
        StorePathInfo(
            path=entry["path"],
            references=tuple(entry["references"]),
            nar_size=int(entry["narSize"]),
            closure_size=int(entry["closureSize"]),
        )
        for entry in doc["graph"]
    )
    main_programs = {
        str(name): program
        for name, program in (doc.get("mainPrograms") or {}).items()
        if isinstance(program, str) and program and "/" not in program
    }
    return NixResult(
        graph=graph,
        roots=tuple(sorted(set(doc["roots"].values()))),
        forest=doc["forest"],
        main_programs=main_programs,
    )


def failure_message(stderr: str) -> str:
    """The line of Nix's stderr saying what failed, for the client."""
    match = _FAILED_BUILDER.search(stderr)
    if match:
        return f"nix-build failed: {match.group(0).rstrip(';')}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if errors:
        return f"nix-build failed: {errors[-1][len('error:') :].strip()}"
    return "nix-build failed: " + (stderr.strip().splitlines() or ["no output"])[-1]


async def prepare_image(
    *, nix_dir: Path, source: Source, image: Image, timeout: float
) -> NixResult:
    """Build ``image`` with Nix; return its closure graph and forest."""
    argv = [
        "nix-build", "--no-out-link", str(nix_dir / "prepare-image.nix"),
        "--argstr", "srcType", source.src_type,
        "--argstr", "srcArgs", json.dumps(source.render(image.tag)),
        "--argstr", "system", image.arch.nix_system,
        "--argstr", "packages", json.dumps(list(image.packages)),
    ]  # fmt: skip
    started = time.monotonic()
    logs.info("nix.build", image=image.name, tag=image.tag, system=image.arch.nix_system,
              packages=list(image.packages))  # fmt: skip
    try:
        with trio.fail_after(timeout):
            proc = await trio.run_process(
                argv,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                deliver_cancel=_deliver_cancel,
            )
    except trio.TooSlowError:
        logs.error("nix.timeout", image=image.name, seconds=timeout)
        raise BuildTimeout(
            f"nix-build of {image.name}:{image.tag} timed out after {timeout:g} s and was killed",
            {"timeout": timeout},
        ) from None
    stderr = proc.stderr.decode("utf-8", "replace")
    seconds = round(time.monotonic() - started, 3)
    if proc.returncode != 0:
        message = failure_message(stderr)
        logs.error(
            "nix.failed",
            image=image.name,
            seconds=seconds,
            message=message,
            stderr=stderr[-_STDERR_TAIL:],
        )
        if "No space left on device" in stderr:
            raise StorageError(f"Nix ran out of disk space: {message}")
        raise BuildFailed(message, {"stderr": stderr[-_STDERR_TAIL:]})
    out_path = proc.stdout.decode().strip().splitlines()[-1]
    data = await trio.Path(out_path).read_bytes()
    result = parse_result(data)
    logs.info("nix.built", image=image.name, seconds=seconds, paths=len(result.graph))
    return result
