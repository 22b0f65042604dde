"""structlog, configured once: JSON lines under systemd or when piped, colours on a terminal.

Registered secrets (the API key) are replaced by ``[redacted]`` in every event, whatever
field or exception text they end up in.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

_secrets: set[str] = set()


def redact(secret: str) -> None:
    """Never print ``secret`` in a log line."""
    if len(secret) >= 4:
        _secrets.add(secret)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            value = value.replace(secret, "[redacted]")
    elif isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    elif isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event.items():
            event[key] = _scrub(value)
    return event


def _scrub_rendered(_logger: Any, _name: str, event: Any) -> Any:
    # Exception texts are rendered late: scrub the final line too.
    return _scrub(event)


def configure(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog for the whole process (call once, from the CLI)."""
    out = stream or sys.stdout
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM")) or not out.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    renderer: list[Any]
    # Tracebacks without local variables: a frame holding the key (or its headers) would
    # be printed cut to 80 characters, a prefix of a long key that no redaction matches.
    if json:
        renderer = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            _redact_processor,  # the structured traceback, before JSON escaping hides a key
            structlog.processors.JSONRenderer(ensure_ascii=False),
            _scrub_rendered,
        ]
    else:
        # Plain: a rich traceback wraps long lines, and a key cut in two escapes redaction.
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
            _scrub_rendered,
        ]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
