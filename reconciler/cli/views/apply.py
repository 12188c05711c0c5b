"""How ``apply`` shows its work: the calls held, the line that starts the calls, the
progress bar, each outcome and the summary, and why it stopped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import click

from reconciler.cli.views import render
from reconciler.cli.views.notices import ConsoleNotices
from reconciler.core.errors import ApiError
from reconciler.core.plan import Plan, Refresh
from reconciler.core.printable import printable
from reconciler.core.task import TaskKey

if TYPE_CHECKING:
    from reconciler.core.rollout import Gate, Waiting
    from reconciler.engine.apply import ApplyReport
    from reconciler.engine.operations.apply import ApplyDisplay
    from reconciler.engine.reconcile import Result


class ApplyConsole(ConsoleNotices):
    """:class:`~reconciler.engine.operations.apply.ApplyView` on the console."""

    def basis(self, refresh: Refresh) -> None:
        click.echo(click.style("note: ", bold=True) + refresh.describe(), err=True)

    def plan(self, plan: Plan, *, root: str, gate: Gate) -> None:
        click.echo(render.plan_text(plan, root=root, waiting=gate.waiting_by_key()))

    def waiting(self, gate: Gate, *, used_up: bool) -> None:
        echo_waiting(gate, used_up=used_up)

    def applying(self, gate: Gate, *, qps: int) -> None:
        click.echo(f"Applying {len(gate.send)} call(s) at up to {qps}/s{_phases(gate)} ...")

    def apply_progress(self, total: int) -> ApplyDisplay:
        from reconciler.cli.views.progress import ApplyProgress

        return ApplyProgress(total, enabled=self.bars)


def results(report: ApplyReport, *, each: bool) -> None:
    """The summary line; ``each``: first a line per outcome (all but the synced ones of
    a large apply), when the event log did not show them already."""
    from reconciler.engine.reconcile import Outcome

    if each:
        for r in report.results:
            if r.outcome is not Outcome.SYNCED or len(report.results) <= 50:
                click.echo(_outcome_line(r))
    click.echo(
        click.style("Apply: ", bold=True)
        + f"{report.count(Outcome.SYNCED)} synced, {report.count(Outcome.NOT_RUNNING)} not "
        f"running, {report.count(Outcome.FAILED)} failed (bad input), "
        f"{report.count(Outcome.RETRY)} failed (will retry)."
    )


def unrecorded(keys: Sequence[TaskKey]) -> None:
    for key in keys:
        click.echo(f"  not recorded: {key}", err=True)


def unread(plan: Plan, refused: Sequence[TaskKey], failures: Mapping[TaskKey, ApiError]) -> None:
    """First-contact tasks whose read failed or was refused, one line each (the first 50)."""
    for key in [*refused, *plan.unread][:50]:
        exc = failures.get(key)
        why = f": {exc.code}: {exc.message}" if exc is not None else ""
        label = "refused: " if key in refused else "unread: "
        click.echo(click.style(label, fg="yellow") + printable(f"{key}{why}"), err=True)


def interrupted(stopped: str) -> None:
    click.echo(
        click.style("Interrupted: ", fg="yellow", bold=True)
        + f"{stopped}; every answer received was recorded. Run apply again to finish.",
        err=True,
    )


def _outcome_line(result: Result) -> str:
    from reconciler.engine.reconcile import Outcome

    mark = {
        Outcome.SYNCED: click.style("✓ synced     ", fg="green"),
        Outcome.NOT_RUNNING: click.style("- not running", fg="magenta"),
        Outcome.FAILED: click.style("✗ failed     ", fg="red"),
        Outcome.RETRY: click.style("✗ failed     ", fg="red"),
    }[result.outcome]
    detail = f"RequestId {result.request_id}" if result.request_id else ""
    if result.error is not None:
        detail = str(result.error)
    return f"{mark}  {printable(result.key)}  {printable(detail)}".rstrip()


def _phases(gate: Gate) -> str:
    """``: 1 first (canary ...), 9 once it is observed Synced`` for a canaried apply."""
    if not gate.canaries or not gate.after_canaries:
        return ""
    names = ", ".join(printable(k) for k in gate.canaries)
    first = len(gate.send) - len(gate.after_canaries)
    return (
        f": {first} first (canary {names}), {len(gate.after_canaries)} once the "
        "canaries are observed Synced"
    )


def echo_held(waiting: Sequence[Waiting]) -> None:
    """Calls change control held when their turn came (a window opened mid-apply)."""
    for w in waiting[:50]:
        click.echo(
            click.style("waiting: ", fg="blue") + printable(f"{w.key}: {w.message}"), err=True
        )
    if waiting:
        more = len(waiting) - 50
        click.echo(
            click.style("Waiting: ", fg="blue", bold=True)
            + f"{len(waiting)} call(s) not made now: held when their turn came"
            + (f" ({more} not listed)" if more > 0 else "")
            + "; apply again when they may go (the daemon sends them by itself).",
            err=True,
        )


def echo_waiting(gate: Gate, *, used_up: bool = False) -> None:
    """The calls change control holds, one line each (the first 50), on stderr.

    ``used_up``: a saved plan whose other calls are being sent; recording them
    makes the file stale, so it cannot be applied again for the held ones.
    """
    for w in gate.waiting[:50]:
        click.echo(
            click.style("waiting: ", fg="blue") + printable(f"{w.key}: {w.message}"), err=True
        )
    if gate.waiting:
        more = len(gate.waiting) - 50
        click.echo(
            click.style("Waiting: ", fg="blue", bold=True)
            + f"{len(gate.waiting)} call(s) not made now"
            + (f" ({more} not listed)" if more > 0 else "")
            + (
                "; this saved plan is used up by the calls sent now: make and review a new "
                "plan for them when they may go."
                if used_up
                else "; apply again when they may go (the daemon sends them by itself)."
            ),
            err=True,
        )
