"""``run``: the daemon with everything it serves: the health and metrics server,
the dashboard, webhook notices, and (``--emulator``) an emulator in-process.

It composes the engine's daemon with this layer's servers, so it lives here
and not in the engine. :func:`run` takes a :class:`RunArgs` and returns when a
SIGTERM/SIGINT has drained the daemon; a refusal before it starts raises an
:class:`~reconciler.engine.operations.common.OperationError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from reconciler.api.credentials import Credentials
from reconciler.core.plan import DriftPolicy
from reconciler.engine.operations.common import (
    Guards,
    Notices,
    OperationError,
    check_tree_root,
    listen,
    load_checked_credentials,
    open_store,
    record_tree_root,
)
from reconciler.eventlog import setup as events
from reconciler.serve.health import HealthAccess, HealthServer
from reconciler.store.base import PostgresURL, Store, StoreLocation
from reconciler.tree.desired import DesiredIndex, FileLimits, load_tree

if TYPE_CHECKING:
    from reconciler.api.client import ClientConfig
    from reconciler.core.rollout import ChangeControl
    from reconciler.emulator import Emulator
    from reconciler.engine.daemon import Daemon, DaemonConfig
    from reconciler.engine.metrics import Metrics
    from reconciler.store.leader import Leadership


@dataclass(frozen=True, kw_only=True)
class RunArgs:
    """What ``run`` is asked."""

    directory: Path
    state: StoreLocation
    #: Start the emulator in-process and talk to it (no cloud account).
    embedded: bool = False
    emulator_port: int = 8780
    health_host: str = "127.0.0.1"
    health_port: int = 9108
    access: HealthAccess = dataclasses.field(default_factory=HealthAccess)
    resync: float = 300.0
    retry_delay: float = 5.0
    drain_timeout: float = 20.0
    guards: Guards
    drift: DriftPolicy = "heal"
    observe_interval: float = 10.0
    observe: bool = True
    notify: Sequence[str] = ()
    allow_open_credentials: bool = False
    replica: str | None = None
    control: ChangeControl
    client: ClientConfig
    limits: FileLimits


#: ``run --emulator`` starts every this-many-th task of the tree (in key order)
#: with the tree's own values, the rest with StartSegment's defaults.
DEMO_MATCHING_EVERY: Final = 3


def run(args: RunArgs, *, notices: Notices) -> None:
    """Start the daemon and serve until a signal drains it."""
    from reconciler.engine.daemon import DaemonConfig

    creds = (
        Credentials("AKLTreconcilerEmbedded", secrets.token_urlsafe(32))
        if args.embedded
        else load_checked_credentials(notices=notices, refuse_open=not args.allow_open_credentials)
    )
    events.register_secret(creds.secret_key)
    config, control = args.client, args.control
    if control.canary and not args.observe:
        raise OperationError("--canary confirms canaries by reading them back: it needs --observe")
    directory, state, guards = args.directory, args.state, args.guards
    daemon_config = DaemonConfig(
        root=directory,
        workers=config.max_in_flight,
        resync_interval=args.resync,
        retry_base=args.retry_delay,
        drain_timeout=args.drain_timeout,
        max_forget=guards.max_forget,
        allow_mass_forget=guards.allow_mass_forget,
        observe=args.observe,
        observe_interval=args.observe_interval,
        read_qps=config.limits.get,
        drift=args.drift,
        control=control,
        limits=args.limits,
    )
    leadership = None
    if isinstance(state, PostgresURL):
        # A shared store: replicas elect a leader; the fence guards every write.
        from reconciler.store.leader import Leadership
        from reconciler.store.postgres import SCHEMA

        leadership = Leadership(state.conninfo(), replica=args.replica, schema=SCHEMA)
    with open_store(state, create=True, fencing=leadership, command="reconciler run") as store:
        check_tree_root(
            store.tree_root(),
            directory,
            store=state,
            allow=guards.allow_root_change,
            notices=notices,
        )
        if leadership is None:
            record_tree_root(store, directory)
        asyncio.run(
            serve(
                daemon_config,
                creds,
                config,
                store,
                embedded=args.embedded,
                emulator_port=args.emulator_port,
                health=(args.health_host, args.health_port),
                access=args.access,
                notify=args.notify,
                leadership=leadership,
                on_elected=lambda: record_tree_root(store, directory),
            )
        )


async def serve(
    daemon_config: DaemonConfig,
    creds: Credentials,
    config: ClientConfig,
    store: Store,
    *,
    embedded: bool,
    emulator_port: int,
    health: tuple[str, int],
    access: HealthAccess,
    notify: Sequence[str] = (),
    leadership: Leadership | None = None,
    on_elected: Callable[[], None] = lambda: None,
) -> None:
    from reconciler.api.client import RtcClient
    from reconciler.engine.daemon import Daemon
    from reconciler.engine.metrics import Metrics
    from reconciler.engine.reconcile import TaskReconciler
    from reconciler.store.recorder import Recorder

    log = events.get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_on_signal(stop, sig, log))
    # SIGHUP re-reads the tree and re-plans every task (a daemon's reload); before
    # the daemon exists it is only noted: the start reads the tree anyway.
    daemon: Daemon | None = None

    def on_hup() -> None:
        if daemon is None:
            log.info("daemon.signal", signal="SIGHUP", action="ignored: starting")
        else:
            daemon.reload()

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    emulator: Emulator | None = None
    if embedded:
        emulator, config = await start_embedded(
            creds, config, port=emulator_port, root=daemon_config.root
        )

    metrics = Metrics()
    recorder = Recorder(store)
    metrics.watch_status(store.counts)
    notifier = None
    if notify:
        from reconciler.serve.notify import Notifier

        # Before the daemon, so the first pass's failures are told too.
        notifier = Notifier(notify, counter=metrics.notifications)
        await notifier.start()
    try:
        async with RtcClient(creds, config=config, on_call=metrics.on_call) as client:
            metrics.watch_client(
                limit=lambda: client.in_flight_limit, latency_ms=lambda: client.latency_estimates_ms
            )
            daemon = Daemon(
                config=daemon_config,
                reconciler=TaskReconciler(client=client, recorder=recorder, stop=stop),
                recorder=recorder,
                metrics=metrics,
                leadership=leadership,
                on_elected=on_elected,
            )
            if leadership is not None:
                lead = leadership
                metrics.watch_leader(
                    replica=lead.replica,
                    leading=lambda: daemon.leading,
                    epoch=lambda: lead.epoch or (lead.leader.epoch if lead.leader else None),
                )
            server, health_url = await start_health(
                daemon, metrics=metrics, store=store, access=access, address=health
            )
            log.info(
                "daemon.started",
                root=str(daemon_config.root),
                endpoint=config.endpoint,
                health=health_url,
                state=str(store.path),
                qps=config.limits.update,
                workers=daemon_config.workers,
                replica=None if leadership is None else leadership.holder,
            )
            try:
                await daemon.run(stop)
            finally:
                await server.stop()
    finally:
        if notifier is not None:
            await notifier.close()  # bounded: a hanging webhook cannot hold the exit
        if emulator is not None:
            await emulator.stop()


async def start_health(
    daemon: Daemon,
    *,
    metrics: Metrics,
    store: Store,
    access: HealthAccess,
    address: tuple[str, int],
) -> tuple[HealthServer, str]:
    """The probes, /metrics and the dashboard, listening at ``address``; and their URL."""
    from reconciler.serve.dashboard import Dashboard

    server = HealthServer(
        metrics=metrics,
        readiness=daemon.readiness,
        liveness=daemon.liveness,
        degraded=daemon.degraded,
        standby=daemon.standby,
        dashboard=Dashboard(daemon=daemon, store_path=store.path),
        access=access,
    )
    host, port = address
    url = await listen(
        server.start(host=host, port=port),
        what="health and metrics (--health-port)",
        host=host,
        port=port,
    )
    return server, url


async def start_embedded(
    creds: Credentials, config: ClientConfig, *, port: int, root: Path
) -> tuple[Emulator, ClientConfig]:
    """``run --emulator``: an emulator in-process with the tree's tasks running, and the
    client's configuration pointed at it."""
    from reconciler.emulator import Emulator, EmulatorConfig

    emulator = Emulator(EmulatorConfig(credentials={creds.access_key: creds.secret_key}))
    url = await listen(
        emulator.start(host="127.0.0.1", port=port),
        what="the embedded emulator (--emulator-port)",
        host="127.0.0.1",
        port=port,
    )
    started, matching = start_tree_tasks(
        emulator, load_tree(root), matching_every=DEMO_MATCHING_EVERY
    )
    events.get_logger().info(
        "emulator.embedded", url=url, running_tasks=started, matching_tree=matching
    )
    return emulator, dataclasses.replace(config, endpoint=url)


def stop_on_signal(
    stop: asyncio.Event, sig: signal.Signals, log: Any, *, event: str = "daemon.signal"
) -> Callable[[], None]:
    """A signal handler that sets ``stop`` once and logs ``event``."""

    def handler() -> None:
        if stop.is_set():
            return
        stop.set()  # first: whatever happens to the log line, the signal stops the process
        log.info(event, signal=sig.name)

    return handler


def start_tree_tasks(
    emulator: Emulator, index: DesiredIndex, *, matching_every: int = 0
) -> tuple[int, int]:
    """Put every task of a tree in the emulator's running state, as StartSegment would.

    With ``matching_every`` N, every Nth task (in key order) runs with the tree's
    own values already, as an application backend that started it with them, and
    the others with StartSegment's defaults (a random Identifier, Duration 20,
    Handle true): a first sync then has some tasks to fix and some that already
    match live. Returns how many tasks were started, and how many match.
    """
    matching = 0
    for i, key in enumerate(sorted(index.tasks)):
        task = index.tasks[key]
        values: dict[str, Any] = {}
        if matching_every and i % matching_every == 0:
            fields = task.fields
            values = {
                "identifier": fields.get("Identifier"),
                "handle": fields.get("Handle", True),
                **({"duration": fields["Duration"]} if "Duration" in fields else {}),
            }
            matching += 1
        emulator.start_task(
            app_id=key.app_id,
            room_id=key.room_id,
            task_id=key.task_id,
            business_id=task.business_id,
            **values,
        )
    return len(index.tasks), matching
