"""Structured logs: one JSON object per line, with a ``severity`` field.

Call sites log an event name plus fields (``log.info("layer.built",
layer=key, digest=..., seconds=...)``).  The format is what Google Cloud
Logging and most collectors parse: ``severity``, ``message`` (the event),
``time``, the process's ``pid`` (the server may run several workers) and
the fields at top level.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_LOGGER = logging.getLogger("nixery_trio")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup(stream: TextIO = sys.stderr, level: int = logging.INFO) -> None:
    """Send every ``nixery_trio`` log record to ``stream`` as JSON lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level)
    _LOGGER.propagate = False


def _log(level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def debug(event: str, **fields: Any) -> None:
    _log(logging.DEBUG, event, fields)


def info(event: str, **fields: Any) -> None:
    _log(logging.INFO, event, fields)


def warning(event: str, **fields: Any) -> None:
    _log(logging.WARNING, event, fields)


def error(event: str, *, exc_info: bool = False, **fields: Any) -> None:
    _log(logging.ERROR, event, fields, exc_info=exc_info)
