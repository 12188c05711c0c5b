"""Structured events: structlog configured in one place.

Every event is a dict with ``event``, ``timestamp`` (ISO-8601 UTC) and ``level``;
the rest of the code calls ``log.info("event.name", **fields)`` and never
formats text itself. Output is JSON lines when the stream the events go to is
not a terminal (or with ``--log-format json``) and short lines for people on a
terminal (:mod:`reconciler.eventlog.console`).

A processor drops any value that looks like a secret key, so a key that
slips into an event by mistake is redacted rather than written. Only then do
*subscribers* (:func:`subscribe`: the dashboard's recent events, webhook
notifications) see each event, as a redacted copy; a subscriber must return
at once, and one that raises is ignored, so it can never slow or break the
code that logged.

Writing an event never breaks control flow. Events go through
:class:`SafeStream`: when its stream breaks (the reader of a pipe died, as in
``reconciler run | tee`` then Ctrl-C), it points the broken descriptor at
``/dev/null`` (so Python's own flush at exit cannot fail either), falls back
to stderr, and drops events once that is broken too. A signal handler that
logs must still stop the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Final, Literal, TextIO

import structlog

from reconciler.eventlog import console

LogFormat = Literal["auto", "json", "console"]
LEVELS = ("debug", "info", "warning", "error")

_SECRET_KEYS = frozenset({"secret_key", "sk", "session_token", "authorization", "password"})
_redacted: set[str] = set()


def register_secret(value: str | None) -> None:
    """Make sure ``value`` is never written, whatever event it ends up in."""
    if value:
        _redacted.add(value)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _scrub(key, value)
    return event


def _scrub(key: str, value: Any) -> Any:
    """``value`` with secrets replaced, inside lists and mappings too (a secret
    in a list of windows or a dict of fields must not slip through either)."""
    if key.lower() in _SECRET_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        if _redacted and any(s in value for s in _redacted):
            for secret in _redacted:
                value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, Mapping):
        return {k: _scrub(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub("", v) for v in value]
    return value


Subscriber = Callable[[Mapping[str, Any]], None]
_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> Callable[[], None]:
    """Call ``subscriber`` with every event written from now on; returns the unsubscribe.

    It is called on the thread that logged, with the redacted event
    (``event``, ``level``, ``timestamp`` and the fields), and must not block.
    """
    _subscribers.append(subscriber)

    def unsubscribe() -> None:
        with contextlib.suppress(ValueError):
            _subscribers.remove(subscriber)

    return unsubscribe


def _publish(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _subscribers:
        copy = dict(event)
        for subscriber in tuple(_subscribers):
            with contextlib.suppress(Exception):  # a subscriber never breaks the caller
                subscriber(copy)
    return event


class SafeStream:
    """A text stream for events that never raises.

    ``target`` is looked up on every write (so ``sys.stderr`` swapped by a
    progress display is honoured). On a write error the broken stream is
    silenced and ``fallback`` is used; when that fails too, events are dropped.
    """

    def __init__(self, target: Callable[[], TextIO], *, fallback: Callable[[], TextIO]) -> None:
        self._targets = [target, fallback]
        self._lock = threading.Lock()
        self._partial = ""

    @property
    def broken(self) -> bool:
        """The primary stream failed; events go to the fallback or nowhere."""
        return len(self._targets) < 2

    def isatty(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self._targets and self._targets[0]().isatty())
        return False

    def write(self, text: str) -> int:
        """Buffer ``text`` and pass on whole lines only, one write per event.

        Whole lines matter to a stream that redraws a progress bar below
        them: a line cut in two would be drawn as two.
        """
        with self._lock:
            lines, newline, self._partial = (self._partial + text).rpartition("\n")
            if newline:
                self._emit(lines + newline)
            return len(text)

    def _emit(self, text: str) -> None:
        while self._targets:
            stream = self._targets[0]()
            try:
                stream.write(text)
                stream.flush()
                return
            except (OSError, ValueError):  # EPIPE, EIO, a closed file
                _silence(stream)
                self._targets.pop(0)

    def flush(self) -> None:
        """Whole lines are written as they come; a partial line waits for its end."""


def _silence(stream: TextIO) -> None:
    """Point a broken stream's descriptor at /dev/null and drop what it buffered.

    Otherwise the interpreter's final flush of ``sys.stdout`` hits the same
    broken pipe and the process exits 120 with a traceback-like message.
    """
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    with contextlib.suppress(Exception):
        stream.flush()


def _stderr() -> TextIO:
    return sys.stderr


def _original_stderr() -> TextIO:
    return sys.__stderr__ or sys.stderr


def configure(
    *,
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Set up structlog for the whole process; may be called again to change it.

    Events go to ``stream`` (stderr by default, so a plan on stdout stays
    clean); ``auto`` picks JSON lines whenever that stream is not a terminal,
    so anything piped or run under a supervisor gets JSON, and ``plan > file``
    in a terminal still shows console lines. Subscribers hear every event,
    whatever ``level``: the level only decides what is written.
    Console lines are coloured only on a terminal and never when ``NO_COLOR``
    is set; below ``debug`` they leave out per-attempt detail
    (:data:`reconciler.eventlog.console.DETAIL_EVENTS`) that the task lines already say.
    """
    target: Callable[[], TextIO] = (lambda: stream) if stream is not None else _stderr
    out = SafeStream(target, fallback=_original_stderr)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    threshold = _LEVEL_NUMBERS[level]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Unheard(threshold),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _publish,
        _Below(threshold),
    ]
    if use_json:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        if level != "debug":
            processors.append(console.drop_detail)
        tty = out.isatty()
        processors.append(
            console.ConsoleRenderer(
                colors=tty and not no_color(),
                width=lambda: shutil.get_terminal_size((0, 0)).columns if tty else 0,
            )
        )
    structlog.configure(
        processors=processors,
        # Every level reaches the processors: subscribers hear debug events too
        # (a read's call.succeeded), and _Below keeps them out of the output.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


Event = MutableMapping[str, Any]

#: A method's level (``log.exception`` is an error) as logging numbers it.
_LEVEL_NUMBERS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _Below:
    """Leave events below the configured level out of the output (after subscribers)."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __call__(self, _: Any, __: str, event: Event) -> Event:
        if _LEVEL_NUMBERS.get(str(event.get("level")), logging.INFO) < self.threshold:
            raise structlog.DropEvent
        return event


class _Unheard(_Below):
    """Drop an event below the level at once when no subscriber would hear it: a
    command without a dashboard pays nothing for the debug events it does not write."""

    def __call__(self, _: Any, __: str, event: Event) -> Event:
        return event if _subscribers else super().__call__(_, __, event)


def uses_console(fmt: LogFormat, stream: TextIO | None = None) -> bool:
    """Whether ``fmt`` renders console lines on ``stream`` (stderr by default), as
    :func:`configure` decides: the stream the events are written to is what counts."""
    if fmt != "auto":
        return fmt == "console"
    with contextlib.suppress(Exception):
        return bool((stream or sys.stderr).isatty())
    return False


def no_color() -> bool:
    """https://no-color.org: any non-empty ``NO_COLOR`` turns colour off."""
    return bool(os.environ.get("NO_COLOR"))


def get_logger(**bound: Any) -> Any:
    """A logger; ``bound`` fields go on every event it emits."""
    return structlog.get_logger(**bound)
