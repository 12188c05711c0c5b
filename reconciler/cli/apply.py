"""``reconciler apply``: plan (or take a saved plan), make the calls, record them.

The command parses its options into :class:`~reconciler.engine.operations.apply.ApplyArgs`,
runs the operation with a console view, prints its outcome, and turns the
outcome into the exit status: why the calls stopped, and which tasks were
left without a call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from reconciler.cli.options import (
    SectionedCommand,
    api_options,
    change_control,
    change_control_options,
    client_config,
    drain_option,
    drift_option,
    env_option,
    file_limits,
    guard_options,
    limit_options,
    plan_or_tree_argument,
    refresh_option,
    state_option,
)
from reconciler.cli.shell import console_shows, fail, operation_errors, quiet
from reconciler.cli.views import apply as view
from reconciler.core.guard import ForgetLimit
from reconciler.core.plan import DriftPolicy
from reconciler.engine.clock import REAL_CLOCK
from reconciler.engine.operations.apply import ApplyArgs, ApplyOutcome
from reconciler.engine.operations.apply import apply as apply_operation
from reconciler.engine.operations.common import Guards
from reconciler.store.base import StoreLocation


@click.command(cls=SectionedCommand)
@plan_or_tree_argument
@state_option
@api_options
@drain_option
@guard_options
@change_control_options(pacing=True, override=True)
@refresh_option
@drift_option
@env_option(
    "--force-while-leading",
    env="FORCE_WHILE_LEADING",
    is_flag=True,
    help="With a postgresql:// store that a run replica leads, apply anyway, beside it "
    "(both may send). Without it apply is refused while a daemon leads.",
)
@limit_options
def apply(
    directory: str,
    state: StoreLocation,
    drain_timeout: float,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    refresh: bool | None,
    drift: DriftPolicy,
    force_while_leading: bool,
) -> None:
    """Plan, then make the calls within the QPS budget and record the results.

    Like plan, it first reads the tasks a call would go to and those never
    confirmed (--refresh: every task, --no-refresh: none), so a call carries
    only what live lacks; a task never confirmed that could not be read gets
    no call.

    Ctrl-C (or SIGTERM) starts no new call, lets the calls in flight finish
    and records them, prints the summary and exits 1; a second Ctrl-C aborts
    at once.

    Given a FILE saved by `plan --save`, makes exactly that plan's calls, and
    refuses ("plan is stale") when the tree or the state store changed since.

    One writer per store: apply is refused while another process writes it (a
    daemon, another apply). At the first write the store refuses it sends no
    more calls, lists the calls made whose results were not recorded, exits 1.
    """
    if Path(directory).is_file():
        refuse_plan_shapers()
    args = ApplyArgs(
        target=directory,
        state=state,
        drain_timeout=drain_timeout,
        refresh=refresh,
        drift=drift,
        force_while_leading=force_while_leading,
        guards=Guards(
            allow_root_change=allow_root_change,
            max_forget=max_forget,
            allow_mass_forget=allow_mass_forget,
        ),
        control=change_control(),
        client=client_config(),
        limits=file_limits(),
        clock=REAL_CLOCK,
    )
    with operation_errors():
        outcome = apply_operation(args, view=view.ApplyConsole(quiet=quiet()))
    finish(outcome, drain_timeout=drain_timeout)


def refuse_plan_shapers() -> None:
    """A saved plan is applied as made: options that would change it are refused."""
    ctx = click.get_current_context()
    for name, flag in (("refresh", "--refresh"), ("drift", "--drift")):
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            fail(f"{flag} shapes a plan: give it to `plan --save`; a saved plan is applied as made")


def finish(outcome: ApplyOutcome, *, drain_timeout: float) -> None:
    """Print what the calls did, then end with the first reason they stopped, if any."""
    report = outcome.report
    if report is None:  # no call could go: the plan was printed
        exit_if_unread(outcome)
        return
    view.results(report, each=not console_shows("info"))  # else each was a console line
    stopped = f"{len(report.not_started)} call(s) not made"
    if report.abandoned:
        stopped += (
            f", {report.abandoned} abandoned in flight after the {drain_timeout:g} s drain "
            "(outcome unknown; they stay Pending)"
        )
    view.echo_held(report.waiting)
    if report.store_error is not None:
        # The store refused a write: which calls were made but not recorded.
        view.unrecorded(report.unrecorded)
        made = len(report.unrecorded)
        fail(
            f"{report.store_error}; stopped sending at the first write it refused: {stopped}; "
            + (
                f"{made} call(s) were made but their results may not be recorded (listed "
                "above; their tasks stay Pending)"
                if made
                else "every answer received was recorded"
            )
        )
    if report.fatal is not None:
        fail(f"{report.fatal}; stopped the run: {stopped}")
    if report.stopped_rollout is not None and not report.interrupted:
        fail(
            f"{report.stopped_rollout}, so the rollout stopped: {stopped}. Fix it, then apply again"
        )
    if report.canary_failed is not None:
        fail(
            f"canary failed: {report.canary_failed}; the rollout stopped: {len(report.held)} "
            "change(s) held, not sent. Fix or revert the change, then apply again"
        )
    if report.interrupted:
        view.interrupted(stopped)
    exit_if_unread(outcome)
    if not report.ok:
        sys.exit(1)


def exit_if_unread(outcome: ApplyOutcome) -> None:
    """First-contact tasks whose read failed got no call: say which and why, and exit 1."""
    plan, refused = outcome.plan, outcome.refused
    if not plan.unread and not refused:
        return
    view.unread(plan, refused, outcome.read_failures)
    listed = len(refused) + len(plan.unread)
    more = f" ({listed - 50} not listed)" if listed > 50 else ""
    parts = []
    if refused:
        parts.append(
            f"{len(refused)} task(s) never confirmed were refused as bad input when read: "
            "Failed, and tried again once their spec changes"
        )
    if plan.unread:
        parts.append(
            f"{len(plan.unread)} task(s) never confirmed could not be read, so no call was "
            "made to them (it could re-send what live already has); apply again once "
            "GetSegmentTask answers for them"
        )
    fail("; ".join(parts) + more)
