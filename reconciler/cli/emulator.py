"""``reconciler emulator``: a local stand-in for the RTC OpenAPI."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from reconciler.cli.options import SectionedCommand, emulator_option, env_option
from reconciler.cli.shell import operation_errors
from reconciler.cli.views.notices import ConsoleNotices
from reconciler.engine.operations.common import listen, load_checked_credentials, load_valid_tree
from reconciler.eventlog import setup as events
from reconciler.tree.desired import DEFAULT_LIMITS


@click.command("emulator", cls=SectionedCommand)
@emulator_option("--host", default="127.0.0.1", show_default=True)
@emulator_option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8780,
    show_default=True,
    # One name with `run --emulator-port`: both are the port the emulator listens on.
    help="Port to listen on (0: any free port); the same variable as run's --emulator-port.",
)
# Shared with apply and run: the region requests are signed for, which the emulator checks.
@env_option("--region", env="REGION", default="cn-north-1", show_default=True)
@emulator_option(
    "--tasks",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Start every task of this desired tree, as if StartSegment ran.",
)
@emulator_option(
    "--latency-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
)
@emulator_option(
    "--jitter-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
)
@emulator_option(
    "--error-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of calls answered HTTP 500 InternalError.",
)
@emulator_option(
    "--drop-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of calls whose connection is closed unanswered.",
)
@emulator_option(
    "--drop-phase",
    type=click.Choice(["before", "after"]),
    default="after",
    show_default=True,
    help="Drop before or after applying the call.",
)
@emulator_option(
    "--update-qps",
    type=click.IntRange(0),
    default=150,
    show_default=True,
    help="UpdateSegment limit over any one-second window (0: none).",
)
@emulator_option(
    "--seed",
    type=int,
    default=None,
    help="Seed for fault draws and generated Identifiers, for repeatable runs.",
)
def emulator_command(
    host: str,
    port: int,
    region: str,
    tasks: Path | None,
    update_qps: int,
    **faults: Any,
) -> None:
    """A local stand-in for the RTC OpenAPI; accepts the VOLC_ACCESSKEY/VOLC_SECRETKEY pair."""
    with operation_errors():
        serve(host=host, port=port, region=region, tasks=tasks, update_qps=update_qps, **faults)


def serve(
    *, host: str, port: int, region: str, tasks: Path | None, update_qps: int, **faults: Any
) -> None:
    """Serve until SIGTERM/SIGINT, with ``tasks``' tasks running."""
    from reconciler.emulator import DEFAULT_QPS, Emulator, EmulatorConfig
    from reconciler.serve.run import start_tree_tasks, stop_on_signal

    creds = load_checked_credentials(notices=ConsoleNotices(quiet=True))
    qps = dict(DEFAULT_QPS)
    qps["UpdateSegment"] = update_qps
    config = EmulatorConfig(
        credentials={creds.access_key: creds.secret_key},
        session_tokens={creds.access_key: creds.session_token} if creds.session_token else {},
        region=region,
        qps=qps,
        **faults,
    )
    index = (
        load_valid_tree(tasks, limits=DEFAULT_LIMITS, what="task tree")
        if tasks is not None
        else None
    )

    async def serve_until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        log = events.get_logger()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_on_signal(stop, sig, log, event="emulator.signal"))
        emulator = Emulator(config)
        url = await listen(
            emulator.start(host=host, port=port), what="the emulator", host=host, port=port
        )
        started = start_tree_tasks(emulator, index)[0] if index is not None else 0
        log.info("emulator.tasks_started", url=url, running_tasks=started)
        click.echo(f"emulator listening on {url}", err=True)
        try:
            await stop.wait()
        finally:
            await emulator.stop()

    asyncio.run(serve_until_signal())
