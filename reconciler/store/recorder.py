"""The single writer of recorded state.

:class:`Recorder` writes the store (one transaction per result, so a crash
loses nothing confirmed) and keeps an in-memory copy of the planner's view
(:attr:`Recorder.applied`, :attr:`Recorder.observations`), so the daemon
re-plans 100k tasks without reading the database back. Everything the
engine records goes through it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime

from reconciler.core.errors import ApiError, OutcomeUnknownError
from reconciler.core.live import Observation
from reconciler.core.plan import Drift, Plan
from reconciler.core.task import (
    AppliedIndex,
    AppliedRecord,
    DesiredTask,
    SyncStatus,
    TaskKey,
    task_fields,
)
from reconciler.eventlog import setup as events
from reconciler.store.base import Store


class Recorder:
    """Writes results to the store and mirrors them in :attr:`applied`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.applied = AppliedIndex(store.applied())
        self.observations: dict[TaskKey, Observation] = store.observations()
        #: When the caller will try a NotRunning or retryable failed task again
        #: (the daemon's backoff), written in the result's own transaction;
        #: ``None``: nothing scheduled, as for ``apply``.
        self.retry_at: Callable[[TaskKey], datetime | None] = lambda _key: None

    def reload(self) -> None:
        """Read the planner's view from the store again (another replica wrote it)."""
        self.applied = AppliedIndex(self.store.applied())
        self.observations = self.store.observations()

    def pending(self, task: DesiredTask) -> None:
        self.store.mark_pending(task.key, source=task.source, business_id=task.business_id)
        if task.key not in self.applied:
            self.applied[task.key] = AppliedRecord(
                task.key,
                task.business_id,
                None,
                source=task.source.path,
                status=SyncStatus.PENDING,
            )

    def success(
        self,
        task: DesiredTask,
        *,
        request_id: str,
        incarnation: int | None = None,
        heal: str | None = None,
    ) -> None:
        """The server confirmed ``task``'s fields, for the live incarnation if known.

        ``heal``: the call set back a restart or drift, and why
        (:func:`~reconciler.store.base.heal_reason`): recorded as the task's last heal.
        """
        with self.store.bulk():
            self.store.record_success(
                task.key,
                fields=task.fields,
                business_id=task.business_id,
                request_id=request_id,
                source=task.source,
                heal=heal,
            )
            if incarnation is not None:
                self.store.record_incarnation(task.key, incarnation)
        old = self.applied.get(task.key)
        self.applied[task.key] = AppliedRecord(
            task.key,
            task.business_id,
            dict(task.fields),
            source=task.source.path,
            applied_at=time.time(),
            incarnation=incarnation if incarnation is not None else _held(old),
            status=SyncStatus.SYNCED,
        )

    def observed(self, obs: Observation) -> None:
        """Keep ``obs`` as the task's latest observation."""
        self.store.record_observation(obs)
        self.observations[obs.key] = obs

    def in_doubt(self, task: DesiredTask) -> None:
        """A call went out and its outcome is unknown (the run stops or pauses on it).

        The store's row stays Pending; the mirror says so too, so that this run
        reads the task before it sends anything to it again.
        """
        old = self.applied.get(task.key)
        now = time.time()
        if old is None:
            old = AppliedRecord(task.key, task.business_id, None, source=task.source.path)
        self.applied[task.key] = dataclasses.replace(
            old, status=SyncStatus.PENDING, in_doubt_since=now
        )

    def _mirror_not_running(self, key: TaskKey) -> None:
        """NotRunning in the mirror: last-applied kept, no call in doubt (it does not run)."""
        old = self.applied.get(key)
        if old is not None:
            self.applied[key] = dataclasses.replace(
                old, status=SyncStatus.NOT_RUNNING, in_doubt_since=None
            )

    def live_not_running(self, task: DesiredTask, obs: Observation) -> None:
        """The task was observed ended (or gone): NotRunning, last-applied unchanged."""
        when = "" if obs.end_time_ms is None else f" at {_ms_iso(obs.end_time_ms)}"
        if obs.stop_reason:
            message, code = f"the task ended{when}: {obs.stop_reason}", obs.stop_reason
        else:
            message, code = "GetSegmentTask no longer finds the task", "TaskNotFound"
        self.store.record_not_running(
            task.key, message=message, code=code, request_id=None, source=task.source
        )
        self._mirror_not_running(task.key)

    def out_of_sync(self, task: DesiredTask, drift: Drift) -> None:
        """Drift reported, not healed (``--drift report``): OutOfSync, saying what moved."""
        moved = ", ".join(f"{n} {a!r} → {b!r}" for n, (a, b) in drift.fields.items())
        self.store.record_out_of_sync(
            task.key, message=f"live values changed by another client: {moved}", source=task.source
        )

    def not_running(self, task: DesiredTask, error: ApiError) -> None:
        self.store.record_not_running(
            task.key,
            message=error.message,
            code=error.code or "",
            request_id=error.request_id,
            source=task.source,
            next_retry_at=self.retry_at(task.key),
        )
        self._mirror_not_running(task.key)

    def failure(self, task: DesiredTask, error: ApiError, *, terminal: bool) -> None:
        refused = task.spec_hash() if terminal else None
        self.store.record_failure(
            task.key,
            message=error.message,
            code=error.code,
            request_id=error.request_id,
            source=task.source,
            failed_spec=refused,
            next_retry_at=None if terminal else self.retry_at(task.key),
        )
        old = self.applied.get(task.key)
        self.applied[task.key] = AppliedRecord(
            task.key,
            old.business_id if old else task.business_id,
            old.fields if old else None,
            source=task.source.path,
            failed_spec=refused,
            applied_at=None if old is None else old.applied_at,
            incarnation=_held(old),
            status=SyncStatus.FAILED,
            # It may have been applied: the next call waits for a read taken after it.
            in_doubt_since=time.time()
            if isinstance(error, OutcomeUnknownError)
            else None
            if old is None
            else old.in_doubt_since,
        )

    def bookkeeping(self, plan: Plan) -> None:
        """Write what a plan settles without a call: releases, forgets, in-sync records."""
        if not (plan.releases or plan.forgotten or plan.bookkeeping or plan.incarnations):
            return
        log = events.get_logger()
        with self.store.bulk():
            for r in plan.releases:
                self.store.record_release(r.key, fields=r.remaining)
                old = self.applied[r.key]
                self.applied[r.key] = dataclasses.replace(old, fields=dict(r.remaining))
                log.info("task.released", **task_fields(r.key), fields=list(r.fields))
            for f in plan.forgotten:
                self.store.forget(f.key)
                self.applied.pop(f.key, None)
                self.observations.pop(f.key, None)
                log.info("task.forgotten", **task_fields(f.key), source_path=f.source_path)
            for t in plan.bookkeeping:
                self.store.record_in_sync(
                    t.key, business_id=t.business_id, source=t.source, fields=t.fields
                )
                prev = self.applied.get(t.key)
                self.applied[t.key] = AppliedRecord(
                    t.key,
                    t.business_id,
                    dict(t.fields),
                    source=t.source.path,
                    applied_at=None if prev is None else prev.applied_at,
                    incarnation=_held(prev),
                    status=SyncStatus.SYNCED,
                )
            for key, incarnation in plan.incarnations:
                self.store.record_incarnation(key, incarnation)
                if key in self.applied:
                    self.applied[key] = dataclasses.replace(
                        self.applied[key], incarnation=incarnation
                    )


def _held(record: AppliedRecord | None) -> int | None:
    return None if record is None else record.incarnation


def _ms_iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
