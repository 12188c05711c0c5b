"""What every command does around its work: configure the event log from the global
options, end with one ``error:`` line and exit 1, and turn an operation's
refusal into that line.

Exit statuses: 0 success; 1 an error (invalid tree, unreadable store, failed
call, missing credentials); ``plan --detailed-exitcode`` adds 2 for "calls
pending".
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn, TextIO

import click

from reconciler.cli.views import render
from reconciler.engine.operations.common import InvalidTree, OperationError
from reconciler.eventlog import setup as events


def fail(message: str) -> NoReturn:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(1)


def configure_events(*, stream: TextIO | None = None, report: bool = False) -> None:
    """Configure events from the global options, wherever on the line they were given.

    ``report``: the command prints a report of its own (``validate``, ``plan``);
    in a terminal its events would repeat the report line by line, so they are
    left out unless a level was asked for explicitly. JSON events are unchanged.
    """
    settings = click.get_current_context().find_root().obj
    fmt: events.LogFormat = settings["log_format"]
    level: str = settings["log_level"]
    if settings.get("quiet") and events.LEVELS.index(level) < events.LEVELS.index("warning"):
        level = "warning"
    if report and events.uses_console(fmt, stream) and not settings.get("level_given"):
        level = "error"
    settings["effective_level"] = level
    settings["stream"] = stream
    events.configure(fmt=fmt, level=level, stream=stream)


def console_shows(level: str) -> bool:
    """Whether events at ``level`` reach a person as console lines in this run."""
    settings = click.get_current_context().find_root().obj
    effective: str = settings.get("effective_level", settings["log_level"])
    return events.uses_console(
        settings["log_format"], settings.get("stream")
    ) and events.LEVELS.index(effective) <= events.LEVELS.index(level)


def quiet() -> bool:
    """``-q``: no progress bars."""
    return bool(click.get_current_context().find_root().obj.get("quiet"))


@contextlib.contextmanager
def operation_errors() -> Iterator[None]:
    """An operation's refusal ends the command: its problems if any, then the message."""
    try:
        yield
    except InvalidTree as exc:
        click.echo(render.problems(exc.root, exc.problems), err=True)
        fail(exc.message)
    except OperationError as exc:
        fail(exc.message)
