"""One reconcile step per task, shared by ``apply`` and the daemon.

Modelled on controller-runtime's ``Reconciler``: :meth:`TaskReconciler.reconcile`
takes one planned :class:`~reconciler.core.plan.Call`, makes it, records what the
server said, and returns a :class:`Result` that tells the caller what to do
next (nothing, requeue after a delay, or wait for a new spec). Credential and
permission errors are not results: :class:`~reconciler.core.errors.FatalError`
propagates so the whole run stops at once instead of failing every task.

Results are written by the store's single writer,
:class:`~reconciler.store.recorder.Recorder`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, TypeVar

from reconciler.api.client import RtcClient
from reconciler.core.errors import (
    TIMEOUT,
    ApiError,
    BadInputError,
    FatalError,
    NotRunningError,
    OutcomeUnknownError,
    UnresponsiveError,
)
from reconciler.core.live import Observation
from reconciler.core.plan import Call, same_value
from reconciler.core.task import (
    FieldValue,
    TaskKey,
    task_fields,
)
from reconciler.engine.observe import read_task
from reconciler.eventlog import setup as events
from reconciler.store.base import ResultNotRecorded, StoreWriteError, heal_reason
from reconciler.store.recorder import Recorder

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
        #: (:class:`~reconciler.core.errors.CallWithdrawn`), never sent late.
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
        :class:`~reconciler.core.errors.CallWithdrawn` when ``stop`` came before it was sent."""
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
    :class:`~reconciler.store.base.ResultNotRecorded`, which keeps ``write`` to make
    again. (A Pending mark that fails raises before the call is sent.)"""
    try:
        return write()
    except StoreWriteError as exc:
        raise ResultNotRecorded(key, exc, write) from exc


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
