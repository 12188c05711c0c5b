"""``reconciler plan``: the dry run, printed as text, JSON or a pull-request comment.

The command parses its options into :class:`~reconciler.engine.operations.plan.PlanArgs`,
runs the operation, and prints its report between the operation's two steps.
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
    deprecated_alias,
    dir_argument,
    drift_option,
    env_option,
    file_limits,
    guard_options,
    limit_options,
    output_option,
    refresh_option,
    state_option,
)
from reconciler.cli.shell import configure_events, fail, operation_errors, quiet
from reconciler.cli.views.notices import ConsoleNotices
from reconciler.cli.views.plan import print_plan
from reconciler.core.guard import ForgetLimit
from reconciler.core.plan import DriftPolicy
from reconciler.engine.operations.common import Guards
from reconciler.engine.operations.plan import PlanArgs, conclude, make_plan_report
from reconciler.store.base import StoreLocation


@click.command(cls=SectionedCommand)
@dir_argument
@state_option
@env_option(
    "--base",
    env="BASE",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Compare against another tree taken as fully applied, instead of the state store.",
)
@output_option("plan", formats=("text", "json", "markdown"), file_option="--save")
@env_option(
    "--save",
    env="PLAN_SAVE",
    deprecated_env="PLAN_OUT",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also save the plan to FILE, for `reconciler apply FILE` to make exactly its calls.",
)
@click.option(
    "--out",
    "out_deprecated",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    hidden=True,
    callback=lambda ctx, _, value: deprecated_alias(ctx, value, old="--out", new="--save"),
)
@env_option(
    "--detailed-exitcode",
    env="DETAILED_EXITCODE",
    is_flag=True,
    help="Exit 0 when no call is needed, 2 when calls are pending, 1 on error.",
)
@guard_options
@change_control_options()
@refresh_option
@drift_option
@api_options
@limit_options
def plan(
    directory: Path,
    state: StoreLocation,
    base: Path | None,
    output: str,
    save: Path | None,
    out_deprecated: Path | None,
    detailed_exitcode: bool,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    refresh: bool | None,
    drift: DriftPolicy,
) -> None:
    """Dry run: show the calls `apply` would make, with exact bodies.

    First the tasks a call would go to, and those never confirmed, are read
    with GetSegmentTask, and the plan compares with what live holds: no call
    re-sends a value live already has. --refresh reads every task (restarts,
    drift); --no-refresh, or no credentials, plans against last-applied and
    says so. With --save FILE the plan is also saved, with what it was made from, for
    `reconciler apply FILE` (which refuses it once the tree or store changed).
    """
    configure_events(report=True)
    if out_deprecated is not None and save is not None and out_deprecated != save:
        fail(f"--save {save} and --out {out_deprecated} (its old name) name different files")
    args = PlanArgs(
        directory=directory,
        state=state,
        base=base,
        save=save or out_deprecated,
        refresh=refresh,
        drift=drift,
        guards=Guards(
            allow_root_change=allow_root_change,
            max_forget=max_forget,
            allow_mass_forget=allow_mass_forget,
        ),
        control=change_control(),
        client=client_config(),
        limits=file_limits(),
    )
    notices = ConsoleNotices(quiet=quiet())
    with operation_errors():
        report = make_plan_report(args, notices=notices)
        print_plan(report, output=output, root=str(directory))
        conclude(report, args, notices=notices)
    if detailed_exitcode and report.plan.calls:
        sys.exit(2)
