"""Structured events: structlog configured in one place.

Every event is a dict with ``event``, ``timestamp`` (ISO-8601 UTC) and ``level``;
the rest of the code calls ``log.info("event.name", **fields)`` and never
formats text itself. Output is JSON lines when stdout is not a terminal (or
with ``--log-format json``) and console lines on a terminal.

A last processor drops any value that looks like a secret key, so a key that
slips into an event by mistake is redacted rather than written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

_SECRET_KEYS = frozenset({"secret_key", "sk", "session_token", "authorization", "password"})
_redacted: set[str] = set()


def register_secret(value: str | None) -> None:
    """Make sure ``value`` is never written, whatever event it ends up in."""
    if value:
        _redacted.add(value)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and _redacted and any(s in value for s in _redacted):
            for secret in _redacted:
                value = value.replace(secret, "[redacted]")
            event[key] = value
    return event


def configure(
    *, fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog for the whole process; call once at start-up.

    Events go to ``stream`` (stderr by default, so a plan on stdout stays
    clean); ``auto`` picks JSON lines whenever stdout is not a terminal, as the
    contract says, so anything piped or run under a supervisor gets JSON.
    """
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    """A logger; ``bound`` fields go on every event it emits."""
    return structlog.get_logger(**bound)
