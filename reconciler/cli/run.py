"""``reconciler run``: the daemon. Its options become a
:class:`~reconciler.serve.run.RunArgs`; :func:`reconciler.serve.run.run` does the rest."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from reconciler.cli.options import (
    SectionedCommand,
    api_options,
    change_control,
    change_control_options,
    check_notify,
    client_config,
    dir_argument,
    drain_option,
    drift_option,
    env_option,
    file_limits,
    guard_options,
    health_access,
    health_access_options,
    limit_options,
    state_option,
)
from reconciler.cli.shell import configure_events, fail, operation_errors, quiet
from reconciler.cli.views.notices import ConsoleNotices
from reconciler.core.guard import ForgetLimit
from reconciler.core.plan import DriftPolicy
from reconciler.engine.operations.common import Guards
from reconciler.store.base import StoreLocation


@click.command(cls=SectionedCommand)
@dir_argument
@state_option
@api_options
@env_option(
    "--emulator",
    "embedded",
    env="EMULATOR",
    is_flag=True,
    help="Start the emulator in-process with every task of the tree running, and talk to "
    "it instead of the real API (no cloud account needed).",
)
@env_option(
    "--emulator-port",
    env="EMULATOR_PORT",
    type=click.IntRange(0, 65535),
    default=8780,
    show_default=True,
    help="Port of the embedded emulator (0: any free port).",
)
@env_option(
    "--health-host",
    env="HEALTH_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address for /healthz, /readyz and /metrics (0.0.0.0 in a container).",
)
@env_option(
    "--health-port",
    env="HEALTH_PORT",
    type=click.IntRange(0, 65535),
    default=9108,
    show_default=True,
    help="Port for /healthz, /readyz and /metrics (0: any free port).",
)
@health_access_options
@env_option(
    "--resync",
    env="RESYNC",
    type=click.FloatRange(1, 86400),
    default=300.0,
    show_default=True,
    help="Seconds between full re-plans of the whole tree.",
)
@env_option(
    "--retry-delay",
    env="RETRY_DELAY",
    type=click.FloatRange(0.01, 3600),
    default=5.0,
    show_default=True,
    help="First delay before a NotRunning or failed task is tried again; it doubles, up "
    "to 10 minutes.",
)
@drain_option
@guard_options
@change_control_options(pacing=True)
@drift_option
@env_option(
    "--observe-interval",
    env="OBSERVE_INTERVAL",
    type=click.FloatRange(1, 86400),
    default=10.0,
    show_default=True,
    help="Read each live task at most this often (seconds); with N tasks a full sweep "
    "takes max(interval, N / --read-qps).",
)
@env_option(
    "--observe/--no-observe",
    env="OBSERVE",
    default=True,
    show_default=True,
    help="Read live tasks (GetSegmentTask) and plan against them; --no-observe compares "
    "with last-applied only.",
)
@env_option(
    "--notify",
    env="NOTIFY",
    metavar="URL",
    multiple=True,
    callback=check_notify,
    help="Slack-compatible webhook told of failures, heals, pauses and held forgets "
    "(repeatable; the variable takes URLs separated by spaces).",
)
@env_option(
    "--allow-open-credentials",
    env="ALLOW_OPEN_CREDENTIALS",
    is_flag=True,
    help="Start even though others may read ~/.volc/credentials (chmod 600 it instead).",
)
@env_option(
    "--replica",
    env="REPLICA",
    default=None,
    metavar="NAME",
    help="This replica's name in the leader election of a postgresql:// store (default: "
    "the host name, a pod's name in Kubernetes); status and metrics show it.",
)
@limit_options
def run(
    directory: Path,
    state: StoreLocation,
    embedded: bool,
    emulator_port: int,
    health_host: str,
    health_port: int,
    resync: float,
    retry_delay: float,
    drain_timeout: float,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    drift: DriftPolicy,
    observe_interval: float,
    observe: bool,
    notify: tuple[str, ...],
    allow_open_credentials: bool,
    replica: str | None,
) -> None:
    """The daemon: watch the tree, reconcile, resync; SIGTERM/SIGINT drain and exit 0."""
    # Imported here: the health server and the daemon bring aiohttp and the rest.
    from reconciler.serve.run import RunArgs
    from reconciler.serve.run import run as run_daemon

    if not directory.is_dir():
        fail(f"desired tree {directory} does not exist or is not a directory")
    configure_events(stream=sys.stdout)
    args = RunArgs(
        directory=directory,
        state=state,
        embedded=embedded,
        emulator_port=emulator_port,
        health_host=health_host,
        health_port=health_port,
        access=health_access(),
        resync=resync,
        retry_delay=retry_delay,
        drain_timeout=drain_timeout,
        guards=Guards(
            allow_root_change=allow_root_change,
            max_forget=max_forget,
            allow_mass_forget=allow_mass_forget,
        ),
        drift=drift,
        observe_interval=observe_interval,
        observe=observe,
        notify=notify,
        allow_open_credentials=allow_open_credentials,
        replica=replica,
        control=change_control(),
        client=client_config(),
        limits=file_limits(),
    )
    with operation_errors():
        run_daemon(args, notices=ConsoleNotices(quiet=quiet()))
