"""Where a build stands: what the builder reports, and what its watchers read
(the web page's activity board, ``/metrics``, ``prefetch``).  Plain data, so
that the store and the metrics can read it without importing the builder."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RegistryError


@dataclass
class BuildProgress:
    """Where one platform's image build stands, for whoever watches builds.

    ``phase`` is ``queued`` (waiting for a build slot), ``nix``,
    ``layering``, ``layers`` (writing ``layers_total`` layers, of which
    ``layers_cached`` were already stored), then ``done``, or ``failed``
    (with the ``error`` its clients get; ``None`` for an unexpected one) or
    ``cancelled`` (nobody waited for it, or the server stopped); ``bytes``
    counts the compressed bytes of the layers written so far, ``started`` is
    the Unix time the build was asked for.
    """

    image: str
    tag: str
    platform: str
    phase: str = "queued"
    layers_total: int = 0
    layers_cached: int = 0
    layers_written: int = 0
    bytes: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    error: RegistryError | None = None


#: Called with a build's progress each time it moves on (on the event loop).
ProgressHook = Callable[[BuildProgress], None]
