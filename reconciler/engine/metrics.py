"""Prometheus metrics for the daemon, on a registry of its own.

Counters and the latency histogram are fed by the client's per-attempt
observer (:meth:`Metrics.on_call`); gauges that describe current state (tasks
by sync status, queue depth, invalid files) are read at scrape time from
callables the daemon hands in, so they can never drift from the truth: tasks
by status, tasks held by invalid files, forgets refused by the guard,
readiness and the credentials pause (so alerts need no probe of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.api.client import CallEvent
from reconciler.core.task import SyncStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: ``reconciler_notifications_total``'s ``result`` values (:mod:`reconciler.serve.notify`).
NOTIFICATION_RESULTS = ("sent", "failed", "dropped")


class _StatusCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[SyncStatus, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "reconciler_tasks", "Tasks in the state store by sync status.", labels=["status"]
        )
        counts = self._counts()
        for status in SyncStatus:
            family.add_metric([status.value], counts.get(status, 0))
        yield family


class _DaemonCollector(Collector):
    def __init__(self, *, held_tasks: Callable[[], int], forget_refused: Callable[[], int]) -> None:
        self._held_tasks = held_tasks
        self._forget_refused = forget_refused

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "reconciler_held_tasks",
            "Recorded tasks kept as they are because the desired file declaring them is invalid.",
            value=self._held_tasks(),
        )
        yield GaugeMetricFamily(
            "reconciler_forget_refused_tasks",
            "Recorded tasks gone from the tree whose forgetting the guard refuses "
            "(more than --max-forget at once).",
            value=self._forget_refused(),
        )


class _ObservationCollector(Collector):
    def __init__(
        self, oldest_age: Callable[[], float | None], sweep: Callable[[], float] | None
    ) -> None:
        self._oldest_age = oldest_age
        self._sweep = sweep

    def collect(self) -> Iterator[Metric]:
        age = self._oldest_age()
        yield GaugeMetricFamily(
            "reconciler_oldest_observation_age_seconds",
            "Seconds since the least recently read desired task was read "
            "(a task never read counts from the daemon's start).",
            value=0.0 if age is None else age,
        )
        if self._sweep is not None:
            yield GaugeMetricFamily(
                "reconciler_observe_sweep_seconds",
                "Seconds one full sweep of reads should take: max(--observe-interval, "
                "desired tasks / --read-qps); 0 with --no-observe. The oldest observation's "
                "age stays near it while the observer keeps up.",
                value=self._sweep(),
            )


class _ReadinessCollector(Collector):
    def __init__(self, *, ready: Callable[[], bool], paused: Callable[[], bool]) -> None:
        self._ready = ready
        self._paused = paused

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "reconciler_ready",
            "1 while /readyz answers 200 (first reconcile done, calls not paused), else 0.",
            value=1 if self._ready() else 0,
        )
        yield GaugeMetricFamily(
            "reconciler_calls_paused",
            "1 while every call and read is paused by a credentials or permission error.",
            value=1 if self._paused() else 0,
        )


class _LeaderCollector(Collector):
    def __init__(
        self, *, replica: str, leading: Callable[[], bool], epoch: Callable[[], int | None]
    ) -> None:
        self._replica = replica
        self._leading = leading
        self._epoch = epoch

    def collect(self) -> Iterator[Metric]:
        leader = GaugeMetricFamily(
            "reconciler_leader",
            "1 while this replica leads (makes calls), 0 while it stands by.",
            labels=["replica"],
        )
        leader.add_metric([self._replica], 1 if self._leading() else 0)
        yield leader
        epoch = self._epoch()
        yield GaugeMetricFamily(
            "reconciler_leader_epoch",
            "The fencing epoch of the lead this replica holds, or last saw held (0: none yet).",
            value=epoch or 0,
        )


class _ChangeControlCollector(Collector):
    def __init__(
        self,
        *,
        waiting: Callable[[], Mapping[str, int]],
        mass_change_held: Callable[[], int],
        canary_failed: Callable[[], bool],
    ) -> None:
        self._waiting = waiting
        self._mass_change_held = mass_change_held
        self._canary_failed = canary_failed

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "reconciler_waiting_tasks",
            "Tasks whose call change control holds, by reason: window, cap, canary, "
            "canary_failed, mass_change.",
            labels=["reason"],
        )
        for reason, n in sorted(self._waiting().items()):
            family.add_metric([reason], n)
        yield family
        yield GaugeMetricFamily(
            "reconciler_mass_change_held_tasks",
            "Pending changes to applied tasks held because there are more than --max-change "
            "allows (0: none held).",
            value=self._mass_change_held(),
        )
        yield GaugeMetricFamily(
            "reconciler_rollout_canary_failed",
            "1 while a failed canary holds the rest of its rollout, else 0.",
            value=1 if self._canary_failed() else 0,
        )


class _ClientCollector(Collector):
    def __init__(
        self, *, limit: Callable[[], int], latency_ms: Callable[[], Mapping[str, float]]
    ) -> None:
        self._limit = limit
        self._latency_ms = latency_ms

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "reconciler_in_flight_limit",
            "Requests the client lets be in flight now: QPS budget x latency estimate, "
            "with headroom, up to --max-in-flight.",
            value=self._limit(),
        )
        family = GaugeMetricFamily(
            "reconciler_latency_estimate_seconds",
            "The latency the in-flight limit is computed from (90th percentile of recent "
            "answered attempts), by action.",
            labels=["action"],
        )
        for action, ms in sorted(self._latency_ms().items()):
            family.add_metric([action], ms / 1000)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "reconciler_calls",
            "Finished API calls by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "reconciler_requests",
            "HTTP requests (attempts) by action and answer code.",
            ["action", "code"],
            registry=r,
        )
        self.throttled = Counter(
            "reconciler_throttled",
            "Answers saying the QPS limit was exceeded.",
            ["action"],
            registry=r,
        )
        self.latency = Histogram(
            "reconciler_call_latency_seconds",
            "Round trip of each request.",
            ["action"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "reconciler_queue_depth", "Task keys waiting in the work queue.", registry=r
        )
        self.in_flight = Gauge(
            "reconciler_in_flight", "Task keys being reconciled right now.", registry=r
        )
        self.invalid_files = Gauge(
            "reconciler_invalid_files",
            "Desired files that fail to parse or validate.",
            registry=r,
        )
        self.desired_tasks = Gauge(
            "reconciler_desired_tasks", "Tasks declared by valid desired files.", registry=r
        )
        self.observations = Counter(
            "reconciler_observations",
            "GetSegmentTask reads of live tasks by outcome (running, ended, not_found, "
            "unknown, error).",
            ["outcome"],
            registry=r,
        )
        self.drift_detected = Counter(
            "reconciler_drift_detected",
            "Live values found changed by another client (healed or reported).",
            registry=r,
        )
        self.restarts_detected = Counter(
            "reconciler_restarts_detected",
            "Tasks found running as a new incarnation (another StartTime).",
            registry=r,
        )
        self.last_reconcile = Gauge(
            "reconciler_last_complete_reconcile_timestamp_seconds",
            "Unix time when the last full reconcile pass finished.",
            registry=r,
        )
        self.notifications = Counter(
            "reconciler_notifications",
            "Webhook notifications (one per task or daemon event, per --notify URL) by "
            "result: sent, failed (the message was refused or unreachable after retries), "
            "dropped (the queue was full, or shutdown came first).",
            ["result"],
            registry=r,
        )
        for result in NOTIFICATION_RESULTS:  # every series exists from the start, at 0
            self.notifications.labels(result)

    def watch_status(self, counts: Callable[[], Mapping[SyncStatus, int]]) -> None:
        self.registry.register(_StatusCollector(counts))

    def watch_daemon(
        self, *, held_tasks: Callable[[], int], forget_refused: Callable[[], int]
    ) -> None:
        """Gauges of what the daemon is holding back, read at scrape time."""
        self.registry.register(
            _DaemonCollector(held_tasks=held_tasks, forget_refused=forget_refused)
        )

    def watch_observations(
        self,
        oldest_age: Callable[[], float | None],
        *,
        sweep: Callable[[], float] | None = None,
    ) -> None:
        """The age of the oldest observation of a desired task, and the sweep it should
        stay near (an alert compares the two), read at scrape time."""
        self.registry.register(_ObservationCollector(oldest_age, sweep))

    def watch_readiness(self, *, ready: Callable[[], bool], paused: Callable[[], bool]) -> None:
        """Readiness and the credentials pause as gauges, read at scrape time, so an
        alert needs no probe of its own."""
        self.registry.register(_ReadinessCollector(ready=ready, paused=paused))

    def watch_leader(
        self, *, replica: str, leading: Callable[[], bool], epoch: Callable[[], int | None]
    ) -> None:
        """Leadership among replicas sharing a PostgreSQL store, read at scrape time."""
        self.registry.register(_LeaderCollector(replica=replica, leading=leading, epoch=epoch))

    def watch_client(
        self, *, limit: Callable[[], int], latency_ms: Callable[[], Mapping[str, float]]
    ) -> None:
        """The client's adaptive in-flight limit and its latency estimates, read at scrape time."""
        self.registry.register(_ClientCollector(limit=limit, latency_ms=latency_ms))

    def watch_change_control(
        self,
        *,
        waiting: Callable[[], Mapping[str, int]],
        mass_change_held: Callable[[], int],
        canary_failed: Callable[[], bool],
    ) -> None:
        """Tasks waiting for change control, and its holds, read at scrape time."""
        self.registry.register(
            _ChangeControlCollector(
                waiting=waiting, mass_change_held=mass_change_held, canary_failed=canary_failed
            )
        )

    def on_call(self, event: CallEvent) -> None:
        self.attempts.labels(event.action, event.code or "ok").inc()
        self.latency.labels(event.action).observe(event.latency_ms / 1000)
        if event.throttled:
            self.throttled.labels(event.action).inc()
        if event.final:
            self.calls.labels(event.action, event.outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
