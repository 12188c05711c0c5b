"""The progress display of ``reconciler apply``: a bar with per-outcome counts.

On a terminal, a rich progress bar on stderr advances as each result lands
(``apply_plan`` reports every result at once, not when its pass ends) and
shows how many tasks synced, were not running or failed so far. While it is
up, rich redirects ``sys.stderr``; event lines go through
:class:`~reconciler.events.SafeStream`, which looks ``sys.stderr`` up on every
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

from reconciler.reconcile import Outcome, Result

_LABELS = (
    (Outcome.SYNCED, "synced", "green"),
    (Outcome.NOT_RUNNING, "not running", "magenta"),
    (Outcome.FAILED, "failed", "red"),
    (Outcome.RETRY, "failed, will retry", "red"),
)


class ApplyProgress:
    """Counts results; draws them as a bar when ``enabled`` (a terminal)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total = total
        self.counts: Counter[Outcome] = Counter()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("calls"),
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
            self._task = self._progress.add_task("calls", total=total, counts=self._counts())

    def _counts(self) -> str:
        shown = [
            f"[{colour}]{self.counts[outcome]} {label}[/]"
            for outcome, label, colour in _LABELS
            if self.counts[outcome] or outcome is Outcome.SYNCED
        ]
        return " · ".join(shown)

    def advance(self, result: Result) -> None:
        self.counts[result.outcome] += 1
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
