"""The console face of an operation's notices: warnings, notes and progress on stderr."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from reconciler.cli.views import render
from reconciler.engine.operations.common import ReadProgress
from reconciler.tree.desired import Problem


def warning(text: str) -> None:
    click.echo(click.style("warning: ", fg="yellow", bold=True) + text, err=True)


class ConsoleNotices:
    """:class:`~reconciler.engine.operations.common.Notices` on stderr; progress bars on
    a terminal unless ``quiet``."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    @property
    def bars(self) -> bool:
        return sys.stderr.isatty() and not self.quiet

    def warning(self, text: str) -> None:
        warning(text)

    def note(self, text: str) -> None:
        click.echo(click.style("note: ", fg="yellow") + text, err=True)

    def say(self, text: str) -> None:
        click.echo(text, err=True)

    def problems(self, root: str, problems: Sequence[Problem]) -> None:
        click.echo(render.problems(root, problems), err=True)

    def read_progress(self, total: int) -> ReadProgress:
        from reconciler.cli.views.progress import ReadProgress

        return ReadProgress(total, enabled=self.bars)
