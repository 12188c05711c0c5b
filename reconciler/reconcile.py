"""One reconcile step per task, shared by ``apply`` and the daemon.

Modelled on controller-runtime's ``Reconciler``: :meth:`TaskReconciler.reconcile`
takes one planned :class:`~reconciler.plan.Call`, makes it, records what the
server said, and returns a :class:`Result` that tells the caller what to do
next (nothing, requeue after a delay, or wait for a new spec). Credential and
permission errors are not results: :class:`~reconciler.errors.FatalError`
propagates so the whole run stops at once instead of failing every task.

:class:`Recorder` is the single writer of recorded state. It writes the SQLite
store (one transaction per result, so a crash loses nothing confirmed) and keeps
an in-memory copy of the planner's view, so the daemon re-plans 100k tasks
without reading the database back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal, TypeVar

from reconciler import events
from reconciler.client import RtcClient
from reconciler.errors import (
    TIMEOUT,
    ApiError,
    BadInputError,
    FatalError,
    NotRunningError,
    OutcomeUnknownError,
    UnresponsiveError,
)
from reconciler.live import Observation
from reconciler.observe import read_task
from reconciler.plan import Call, Drift, Plan, same_value
from reconciler.state import ResultNotRecorded, StateStore, StoreWriteError, heal_reason
from reconciler.task import (
    AppliedIndex,
    AppliedRecord,
    DesiredTask,
    FieldValue,
    SyncStatus,
    TaskKey,
)

_T = TypeVar("_T")


class Outcome(StrEnum):
    SYNCED = "synced"
    NOT_RUNNING = "not_running"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one call, and when (if ever) to look at the task again."""

    key: TaskKey
    outcome: Outcome
    #: Seconds after which the task should be reconciled again; ``None``: not
    #: by itself (synced, or refused until its spec changes).
    requeue_after: float | None = None
    error: ApiError | None = None
    request_id: str | None = None
    latency_ms: float | None = None

    @property
    def terminal(self) -> bool:
        """True when retrying cannot help until the desired spec changes."""
        return self.outcome is Outcome.FAILED and self.requeue_after is None


def task_fields(key: TaskKey) -> dict[str, str]:
    """The fields every event about a task carries."""
    return {"app_id": key.app_id, "room_id": key.room_id, "task_id": key.task_id}


class Recorder:
    """Writes results to the store and mirrors them in :attr:`applied`."""

    def __init__(self, store: StateStore) -> None:
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
        (:func:`~reconciler.state.heal_reason`): recorded as the task's last heal.
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


def _changes(call: Call) -> dict[str, Any]:
    return {c.field: {"old": c.old, "new": c.new} for c in call.changes}


#: What a call that had to carry every managed field says of it.
UNREAD_NOTES: Mapping[str, str] = {
    "unreadable": "GetSegmentTask cannot see this task (started more than 72 h ago, or "
    "not started): every managed field was sent",
    "not_read": "live was not read (observation off, or --no-refresh): every managed "
    "field was sent",
}


def call_fields(call: Call) -> dict[str, Any]:
    """What every event about a call says of why it was made and what it was compared with."""
    out: dict[str, Any] = {"cause": call.cause, "basis": call.basis}
    if call.unread is not None:
        out["unread"] = call.unread
        out["note"] = UNREAD_NOTES[call.unread]
    return out


class TaskReconciler:
    """Makes one planned call and records its outcome."""

    def __init__(
        self,
        *,
        client: RtcClient,
        recorder: Recorder,
        not_running_retry: float = 60.0,
        failed_retry: float = 30.0,
        probe_attempts: int = 2,
        stop: asyncio.Event | None = None,
        read_back_delay: float | None = None,
        credentials_proven: bool = False,
    ) -> None:
        """``credentials_proven``: an answer with these credentials and this endpoint
        came already (``apply``'s reads before its calls), so calls need no probe."""
        self.client = client
        self.recorder = recorder
        #: Once set, calls still waiting for a slot are withdrawn unsent
        #: (:class:`~reconciler.errors.CallWithdrawn`), never sent late.
        self.stop = stop
        #: Asked as each call is about to go out; ``False`` withdraws it unsent
        #: (a replica whose lead is in doubt sends nothing). ``None``: always.
        self.may_send: Callable[[], bool] | None = None
        self.not_running_retry = not_running_retry
        self.failed_retry = failed_retry
        self.probe_attempts = probe_attempts
        #: Seconds to wait before reading back a call whose outcome is unknown,
        #: so that a request still being worked on by the server has landed.
        self.read_back_delay = (
            read_back_delay
            if read_back_delay is not None
            else min(READ_BACK_DELAY_MAX_S, max(1.0, client.config.timeout))
        )
        self._told_timeout = False
        # Until one answer proves the credentials work, calls go one at a time:
        # a wrong key then costs one refused request, not one per worker, and
        # an endpoint that cannot be reached costs one probe of
        # ``probe_attempts`` attempts, not the full retries of every task.
        self._credentials_proven = credentials_proven
        self._probe = asyncio.Lock()
        self._refusals = 0
        self._last_refusal: FatalError | None = None

    async def reconcile(self, call: Call) -> Result:
        """Make ``call``; raises :class:`FatalError` for credentials/permissions, and
        :class:`~reconciler.errors.CallWithdrawn` when ``stop`` came before it was sent."""
        return await self._gated(lambda: self._reconcile(call))

    async def read(self, key: TaskKey, *, last: Observation | None) -> Observation:
        """Read one live task (GetSegmentTask) behind the same credentials probe as calls.

        Raises the :class:`ApiError` of a failed read; :class:`FatalError`
        means every other request would fail alike.
        """

        return await self._gated(lambda: self._read(key, last=last))

    async def _read(self, key: TaskKey, *, last: Observation | None) -> Observation:
        try:
            obs = await read_task(self.client, key, last=last)
        except FatalError as exc:
            self._refused(exc)
            raise
        except ApiError:
            self._credentials_proven = True  # an answer: the key is good
            raise
        self._credentials_proven = True
        return obs

    async def _gated(self, request: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``request`` at once once credentials are proven, else one at a time."""
        if self._credentials_proven:
            return await request()
        refusals = self._refusals
        async with self._probe:
            if self._refusals != refusals and self._last_refusal is not None:
                raise self._last_refusal  # refused while we waited: don't ask again
            if not self._credentials_proven:
                return await request()
        return await request()  # proven while we waited: go concurrently

    def _refused(self, exc: FatalError) -> None:
        self._credentials_proven = False
        self._refusals += 1
        self._last_refusal = exc

    async def _reconcile(self, call: Call) -> Result:
        task, key = call.task, call.key
        log = events.get_logger(**task_fields(key))
        started = time.monotonic()
        sent: Mapping[str, FieldValue] = call.body

        def before_send() -> bool:
            # Pending (one more attempt) only once the call really goes out: a
            # call withdrawn while it waited for a slot leaves no trace.
            if self.stop is not None and self.stop.is_set():
                return False
            if self.may_send is not None and not self.may_send():
                return False
            self.recorder.pending(task)
            log.debug("call.sending", action=call.action, changes=_changes(call))
            return True

        sends = 0
        while True:
            sends += 1
            try:
                res = await self.client.update_segment(
                    sent,
                    log_fields=task_fields(key),
                    attempts=None if self._credentials_proven else self.probe_attempts,
                    before_send=before_send,
                    abort=self.stop,
                    # Never re-sent blindly: it may have been applied, and Duration
                    # would cut the slice again. Read back below instead.
                    resend_unknown=False,
                )
            except FatalError as exc:
                self._refused(exc)
                if isinstance(exc, UnresponsiveError):
                    self.recorder.in_doubt(task)  # sent, and it may yet land
                raise  # not a result: the whole run stops or pauses
            except OutcomeUnknownError as exc:
                back = await self._read_back(call, exc, log=log)
                if back.outcome == "confirmed" and back.observation is not None:
                    return self._synced(
                        call,
                        request_id=exc.request_id or "",
                        attempts=sends,
                        latency_ms=_since(started),
                        incarnation=back.observation.start_time_ms,
                        log=log,
                        confirmed_by_read=True,
                    )
                if back.outcome == "not_running" and back.observation is not None:
                    _recorded(
                        key,
                        functools.partial(self.recorder.live_not_running, task, back.observation),
                    )
                    log.warning(
                        "task.not_running",
                        source="read_back",
                        state=str(back.observation.state),
                        stop_reason=back.observation.stop_reason,
                        end_time=back.observation.end_time_ms,
                    )
                    return Result(key, Outcome.NOT_RUNNING, self.not_running_retry, exc)
                if back.outcome == "missing" and sends < MAX_SENDS:
                    sent = {**_identity_of(call), **back.missing}
                    continue
                # partial, not a lambda: ``exc`` is unbound once this clause ends
                return _recorded(
                    key, functools.partial(self._failed, call, exc, log=log, started=started)
                )
            except ApiError as exc:
                self._credentials_proven = True
                return _recorded(
                    key, functools.partial(self._failed, call, exc, log=log, started=started)
                )
            self._credentials_proven = True
            return self._synced(
                call,
                request_id=res.request_id,
                attempts=res.attempts if sends == 1 else sends,
                latency_ms=res.latency_ms,
                incarnation=call.incarnation,
                log=log,
                fields=sent,
            )

    def _synced(
        self,
        call: Call,
        *,
        request_id: str,
        attempts: int,
        latency_ms: float | None,
        incarnation: int | None,
        log: Any,
        fields: Mapping[str, FieldValue] | None = None,
        confirmed_by_read: bool = False,
    ) -> Result:
        """Record and log a call the server applied (answered ok, or read back)."""
        changes = [(c.field, c.old, c.new) for c in call.changes]
        heal = heal_reason(call.cause, changes) if call.heal else None
        _recorded(
            call.key,
            lambda: self.recorder.success(
                call.task, request_id=request_id, incarnation=incarnation, heal=heal
            ),
        )
        extra: dict[str, Any] = {"confirmed_by_read": True} if confirmed_by_read else {}
        log.info(
            "task.synced",
            action=call.action,
            request_id=request_id,
            attempt=attempts,
            latency_ms=latency_ms,  # the answering attempt's, as in call.succeeded
            fields=dict(call.body if fields is None else fields),
            changes=_changes(call),
            **call_fields(call),
            **extra,
        )
        return Result(call.key, Outcome.SYNCED, None, None, request_id, latency_ms)

    async def _read_back(self, call: Call, exc: OutcomeUnknownError, *, log: Any) -> ReadBack:
        """After a call whose outcome is unknown, read the task: did it land?

        Waits first for a request still on its way to be applied (a timeout
        fires while the server may still be working on it), then reads on the
        read budget. ``confirmed``: live holds every field of the call;
        ``missing``: live lacks some (only those are sent again); ``not_running``;
        ``unverified``: the read failed or cannot see the task, so the call stays
        in doubt and the task is tried again later, after a read.
        """
        # A timeout may leave the request still being worked on; a dropped
        # connection was most likely answered already.
        delay = self.read_back_delay if exc.code == TIMEOUT else min(1.0, self.read_back_delay)
        await asyncio.sleep(delay)
        key = call.key
        try:
            obs = await self._read(key, last=self.recorder.observations.get(key))
        except FatalError:
            self.recorder.in_doubt(call.task)
            raise
        except ApiError as read_exc:
            log.warning(
                "call.read_back", outcome="unverified", code=read_exc.code, message=read_exc.message
            )
            return ReadBack("unverified")
        self.recorder.observed(obs)
        if obs.not_running:
            log.info("call.read_back", outcome="not_running", state=str(obs.state))
            return ReadBack("not_running", obs)
        if not obs.running:
            log.warning("call.read_back", outcome="unverified", state=str(obs.state))
            return ReadBack("unverified", obs)
        missing = {n: v for n, v in call.fields.items() if not same_value(obs.fields.get(n), v)}
        if missing:
            log.warning("call.read_back", outcome="missing", missing=missing)
            return ReadBack("missing", obs, missing)
        log.info("call.read_back", outcome="confirmed", code=exc.code)
        if exc.code == TIMEOUT and not self._told_timeout:
            self._told_timeout = True
            timeout = self.client.config.timeout
            log.warning(
                "client.timeout_too_short",
                timeout_s=timeout,
                message=f"UpdateSegment timed out after {timeout:g} s but the server applied "
                "it: its answers arrive after --timeout; raise --timeout (e.g. --timeout "
                f"{max(timeout * 3, 10):g}) so calls are not left in doubt",
            )
        return ReadBack("confirmed", obs)

    def _failed(self, call: Call, exc: ApiError, *, log: Any, started: float) -> Result:
        """Record and log a call that did not succeed; say when to look again."""
        task, key = call.task, call.key
        detail = {
            "action": call.action,
            "attempt": exc.attempts,
            "latency_ms": _since(started),
            "fields": call.body,
            "code": exc.code,
            "request_id": exc.request_id,
            "message": exc.message,
        }
        if isinstance(exc, NotRunningError):
            self.recorder.not_running(task, exc)
            log.warning("task.not_running", **detail)
            return Result(key, Outcome.NOT_RUNNING, self.not_running_retry, exc, exc.request_id)
        if isinstance(exc, BadInputError):
            self.recorder.failure(task, exc, terminal=True)
            log.error("task.failed", **detail, terminal=True)
            return Result(key, Outcome.FAILED, None, exc, exc.request_id)
        # Retryable errors whose retries ran out, and answers that made no
        # sense: the task is tried again later, never given up on.
        self.recorder.failure(task, exc, terminal=False)
        log.warning(
            "task.failed",
            **detail,
            terminal=False,
            outcome_unknown=isinstance(exc, OutcomeUnknownError),
        )
        return Result(key, Outcome.RETRY, self.failed_retry, exc, exc.request_id)


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What a read after a call in doubt found (see :meth:`TaskReconciler._read_back`)."""

    outcome: Literal["confirmed", "missing", "not_running", "unverified"]
    observation: Observation | None = None
    missing: Mapping[str, FieldValue] = dataclasses.field(default_factory=dict)


#: The longest wait before reading back a call in doubt (the client's timeout, 1 s at least).
READ_BACK_DELAY_MAX_S: Final = 5.0
#: UpdateSegment sends of one call at most: the first, then re-sends of only
#: what a read back showed missing after an outcome unknown.
MAX_SENDS: Final = 3


def _identity_of(call: Call) -> dict[str, FieldValue]:
    """The call's body without its managed fields: identity and BusinessId."""
    return {n: v for n, v in call.body.items() if n not in call.fields}


def _recorded(key: TaskKey, write: Callable[[], _T]) -> _T:
    """``write`` records a call's answer; a store that cannot take it raises
    :class:`~reconciler.state.ResultNotRecorded`, which keeps ``write`` to make
    again. (A Pending mark that fails raises before the call is sent.)"""
    try:
        return write()
    except StoreWriteError as exc:
        raise ResultNotRecorded(key, exc, write) from exc


def _held(record: AppliedRecord | None) -> int | None:
    return None if record is None else record.incarnation


def _ms_iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
