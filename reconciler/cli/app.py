"""The ``reconciler`` command group: the global options, every command, and
:func:`entry_point`, which the console script runs (through
:mod:`reconciler.cli.interrupt`).

Each command lives in a module of its own and is a thin shell: parse options
into the operation's arguments, run the operation, print its report, exit
with the documented status (:mod:`reconciler.cli.shell`).
"""

from __future__ import annotations

import sys

import click

from reconciler.cli import apply, completion, emulator, plan, run, schema, state, status, validate
from reconciler.cli.options import LOG_FORMATS, LOG_LEVELS, ReconcilerGroup, env_option
from reconciler.cli.shell import configure_events, fail
from reconciler.eventlog import setup as events
from reconciler.store.base import StoreError

# The distribution (what pip installs), not the command: `reconciler` on the public
# package index is an unrelated project.
DISTRIBUTION = "rtc-segment-reconciler"


@click.group(
    cls=ReconcilerGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@env_option(
    "--log-format",
    env="LOG_FORMAT",
    type=LOG_FORMATS,
    default="auto",
    show_default=True,
    help="Events as JSON lines or console lines; auto: JSON unless the stream they go to "
    "(stderr; stdout for run) is a terminal. "
    "Also accepted after the command.",
)
@env_option(
    "--log-level",
    env="LOG_LEVEL",
    type=LOG_LEVELS,
    default="info",
    show_default=True,
    help="Also accepted after the command.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Only warnings and errors, no progress bar (same as --log-level warning for events).",
)
@click.version_option(
    package_name=DISTRIBUTION, message="%(prog)s %(version)s (distribution %(package)s)"
)
@click.pass_context
def main(ctx: click.Context, log_format: events.LogFormat, log_level: str, quiet: bool) -> None:
    """Keep Volcengine RTC audio-segment tasks in line with a desired tree.

    Colour follows the terminal; set NO_COLOR to turn it off.
    """
    given = ctx.get_parameter_source("log_level") is not click.core.ParameterSource.DEFAULT
    ctx.obj = {
        "log_format": log_format,
        "log_level": log_level,
        "level_given": given,
        "quiet": quiet,
    }
    if events.no_color():
        ctx.color = False  # click.echo strips styles for every command below
    configure_events()


for command in (
    validate.validate,
    completion.completion,
    schema.schema,
    status.status,
    plan.plan,
    apply.apply,
    run.run,
    state.state_group,
    emulator.emulator_command,
):
    main.add_command(command)


def entry_point() -> None:
    """The console script: click's own errors exit 1, never 2.

    Click ends a usage error (unknown option, bad choice) with status 2, which
    ``plan --detailed-exitcode`` uses for "calls pending"; a CI job would read
    a typo as pending calls. So every error is 1.
    """
    try:
        status = main.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            # Ctrl-C: click has ended the "^C" line already; reconciler.interrupt says it.
            raise KeyboardInterrupt from None
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except StoreError as exc:  # a store that fails while read or written: one line, no traceback
        fail(str(exc))
    sys.exit(status if isinstance(status, int) else 0)
