"""Progress displays: ``apply``'s calls and ``--refresh``'s reads, a bar with per-outcome counts.

On a terminal, a rich progress bar on stderr advances as each result lands
(``apply_plan`` reports every result at once, not when its pass ends) and
shows how many tasks synced, were not running or failed so far. While it is
up, rich redirects ``sys.stderr``; event lines go through
:class:`~reconciler.eventlog.setup.SafeStream`, which looks ``sys.stderr`` up on every
write, so they print above the bar instead of scrolling over it. Off a
terminal, or with ``-q``, the display does nothing and costs nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from reconciler.engine.reconcile import Outcome, Result

_LABELS = (
    (Outcome.SYNCED, "synced", "green"),
    (Outcome.NOT_RUNNING, "not running", "magenta"),
    (Outcome.FAILED, "failed", "red"),
    (Outcome.RETRY, "failed, will retry", "red"),
)
_READS = (
    ("running", "running", "green"),
    ("ended", "ended", "magenta"),
    ("not_found", "not found", "magenta"),
    ("unknown", "not visible", "yellow"),
    ("error", "failed", "red"),
)


class ProgressBar:
    """Counts outcomes; draws them as a bar when ``enabled`` (a terminal).

    ``kinds``: ``(outcome, label, colour)`` in display order; the first is
    always shown, the others once they occur.
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool,
        label: str,
        kinds: tuple[tuple[object, str, str], ...],
    ) -> None:
        self.total = total
        self.kinds = kinds
        self.counts: Counter[object] = Counter()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                redirect_stdout=False,  # stdout may be a file or a pipe: leave it alone
                redirect_stderr=True,
                refresh_per_second=8,
            )
            self._task = self._progress.add_task(label, total=total, counts=self._counts())

    def _counts(self) -> str:
        shown = [
            f"[{colour}]{self.counts[outcome]} {label}[/]"
            for i, (outcome, label, colour) in enumerate(self.kinds)
            if self.counts[outcome] or i == 0
        ]
        return " · ".join(shown)

    def tick(self, outcome: object) -> None:
        self.counts[outcome] += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, counts=self._counts())

    def note(self, text: str) -> None:
        """A message for the person at the terminal, above the bar when there is one."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            with contextlib.suppress(OSError, ValueError):  # a broken stderr must not stop a drain
                print(text, file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


class ApplyProgress(ProgressBar):
    """``apply``'s calls, counted by outcome."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        super().__init__(total, enabled=enabled, label="calls", kinds=_LABELS)

    def advance(self, result: Result) -> None:
        self.tick(result.outcome)


class ReadProgress(ProgressBar):
    """``--refresh``'s GetSegmentTask reads, counted by what they found."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        super().__init__(total, enabled=enabled, label="reads", kinds=_READS)

    def read(self, state: str | None) -> None:
        self.tick("error" if state is None else state)
