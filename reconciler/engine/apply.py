"""One-shot apply: make a plan's calls concurrently within the QPS budget.

A fixed pool of workers pulls calls from a queue, so concurrency is bounded by
the pool (and, per action, by the client's limiter) however long the plan is.
Each result is recorded as it arrives, through the shared
:class:`~reconciler.engine.reconcile.TaskReconciler`, and reported to ``on_result``
at once, so a progress display moves with the run and a crash loses nothing
already confirmed.

Stopping drains, like the daemon. When ``stop`` is set (SIGINT/SIGTERM), or a
:class:`~reconciler.core.errors.FatalError` says every further call would fail the
same way (credentials, permissions, an endpoint that cannot be reached), the
workers start no new call, calls still waiting for an in-flight or QPS slot
are withdrawn unsent (the reconciler's ``stop`` must be the same event), the
calls in flight finish and are recorded, and only calls still unanswered
after ``drain_timeout`` are abandoned. Cancelling
an in-flight call would throw away an answer the server already acted on:
the next run would re-send it, and a re-sent ``Duration`` cuts the slice.

A store that cannot take a write stops the run the same way, at the first
failed write: no new call goes out once a result could not be recorded
(:class:`~reconciler.store.base.StoreWriteError`; a call whose Pending mark could
not be written is never sent). The report lists the calls that were made and
answered but whose results were not recorded (``unrecorded``): their tasks
stay Pending in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.core.errors import CallWithdrawn, FatalError
from reconciler.core.live import Observation
from reconciler.core.plan import SETTLE_S, Call, Plan
from reconciler.core.rollout import (
    CanaryState,
    Gate,
    Reason,
    TokenBucket,
    Waiting,
    check_canary,
    judge,
)
from reconciler.core.task import DesiredTask, TaskKey
from reconciler.engine.reconcile import Outcome, Result
from reconciler.eventlog import setup as events
from reconciler.store.base import ResultNotRecorded, StoreWriteError
from reconciler.store.recorder import Recorder


class CallHeld(Exception):
    """Change control holds this call now (a window opened mid-apply): it was not sent."""

    def __init__(self, waiting: Waiting) -> None:
        super().__init__(waiting.message)
        self.waiting = waiting


@dataclass(slots=True)
class ApplyReport:
    results: list[Result] = field(default_factory=list)
    #: Calls of the plan that were never made (stopped, or a fatal error).
    not_started: list[TaskKey] = field(default_factory=list)
    #: Calls still unanswered when the drain deadline passed; their outcome is unknown.
    abandoned: int = 0
    #: The error that stopped the run, if one did.
    fatal: FatalError | None = None
    #: ``stop`` was set before every call was made.
    interrupted: bool = False
    #: Why the canaries failed (``--canary``); the rest of the rollout was not sent.
    canary_failed: str | None = None
    #: Changes held back because the canaries failed (also in ``not_started``).
    held: list[TaskKey] = field(default_factory=list)
    #: Calls change control held when their turn came (a window opened): not sent, and
    #: not counted as failed, like the calls held before the apply began.
    waiting: list[Waiting] = field(default_factory=list)
    #: Why the rest of a rollout was not sent when no canary failed (a first-phase call
    #: failed); they are in ``not_started``.
    stopped_rollout: str | None = None
    #: The first write the store refused; no call was sent after it.
    store_error: StoreWriteError | None = None
    #: Calls made and answered whose results the store did not take: left Pending.
    unrecorded: list[TaskKey] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def ok(self) -> bool:
        """Exit 0: every call succeeded or found its task not running."""
        return (
            self.fatal is None
            and self.store_error is None
            and not self.not_started
            and not self.abandoned
            and all(r.outcome in (Outcome.SYNCED, Outcome.NOT_RUNNING) for r in self.results)
        )


class Reconciles(Protocol):
    """What a pass needs of a reconciler: :class:`TaskReconciler`, or one pacing it."""

    async def reconcile(self, call: Call) -> Result: ...


async def apply_plan(
    plan: Plan,
    *,
    reconciler: Reconciles,
    recorder: Recorder,
    workers: int,
    on_result: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
    drain_timeout: float = 20.0,
    retry_passes: int = 2,
    retry_pause: float = 1.0,
) -> ApplyReport:
    """Record the plan's bookkeeping, then make its calls; return every result.

    Calls that failed transiently (retries spent, or an outcome still unknown
    after its one re-send) get up to ``retry_passes`` more passes, after a
    pause that doubles each time: "later", within the same run. ``on_result``
    hears of each task once, when its result is final for this run.
    """
    stop = stop if stop is not None else asyncio.Event()
    report = ApplyReport()
    try:
        recorder.bookkeeping(plan)
    except StoreWriteError as exc:  # before any call: nothing was sent
        report.store_error = exc
        report.not_started = [c.key for c in plan.calls]
        return report
    final: dict[TaskKey, Result] = {}
    held: dict[TaskKey, Waiting] = {}
    reported: set[TaskKey] = set()

    def tell(result: Result) -> None:
        if on_result is not None and result.key not in reported:
            reported.add(result.key)
            on_result(result)

    calls = list(plan.calls)
    pause = retry_pause
    for attempt in range(retry_passes + 1):
        last_pass = attempt == retry_passes

        def landed(result: Result, *, last_pass: bool = last_pass) -> None:
            final[result.key] = result
            if result.outcome is not Outcome.RETRY or last_pass:
                tell(result)

        end = await _pass(
            calls,
            reconciler=reconciler,
            workers=workers,
            stop=stop,
            drain_timeout=drain_timeout,
            landed=landed,
            held=lambda w: held.setdefault(w.key, w),
        )
        report.abandoned += end.abandoned
        report.fatal = end.fatal
        if end.store_errors and report.store_error is None:
            report.store_error = end.store_errors[0]
        report.unrecorded += [e.key for e in end.store_errors if isinstance(e, ResultNotRecorded)]
        retry = {k for k, r in final.items() if r.outcome is Outcome.RETRY}
        calls = [c for c in calls if c.key in retry]
        if not calls or last_pass or end.fatal is not None or stop.is_set():
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        if stop.is_set():
            break
        pause *= 2
    for result in final.values():  # a retry cut short by a stop is final too
        tell(result)
    report.results = list(final.values())
    report.waiting = list(held.values())
    unrecorded = set(report.unrecorded)
    report.not_started = [
        c.key
        for c in plan.calls
        if c.key not in final and c.key not in held and c.key not in unrecorded
    ]
    report.interrupted = (
        report.fatal is None
        and report.store_error is None
        and stop.is_set()
        and bool(report.not_started or report.abandoned)
    )
    return report


@dataclass(frozen=True, slots=True)
class _PassEnd:
    abandoned: int
    fatal: FatalError | None
    #: Writes the store refused, the first first (calls unrecorded among them).
    store_errors: list[StoreWriteError]


async def _pass(
    calls: Sequence[Call],
    *,
    reconciler: Reconciles,
    workers: int,
    stop: asyncio.Event,
    drain_timeout: float,
    landed: Callable[[Result], None],
    held: Callable[[Waiting], object] = lambda _: None,
) -> _PassEnd:
    """One pass over ``calls`` by a pool of workers; drains on ``stop`` or a fatal error."""
    queue = deque(calls)
    halt = asyncio.Event()  # no new calls: stopped, or every call would fail alike
    fatal: list[FatalError] = []
    store_errors: list[StoreWriteError] = []
    crashed: list[BaseException] = []

    async def worker() -> None:
        while queue and not stop.is_set() and not halt.is_set():
            call = queue.popleft()
            try:
                result = await reconciler.reconcile(call)
            except CallWithdrawn:
                return  # stopping: it waited for a slot and was never sent
            except CallHeld as exc:
                held(exc.waiting)  # a window opened while it waited: not sent
                continue
            except FatalError as exc:
                fatal.append(exc)
                halt.set()
                stop.set()  # calls still waiting for a slot are withdrawn, not sent
                return
            except StoreWriteError as exc:  # not recorded: send nothing more
                store_errors.append(exc)
                halt.set()
                stop.set()
                return
            except Exception as exc:  # e.g. the store is locked: stop cleanly, then raise
                crashed.append(exc)
                halt.set()
                return
            landed(result)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(workers, len(calls))))]
    finished: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)

    async def deadline() -> None:
        await stop.wait()
        await asyncio.sleep(drain_timeout)

    timer: asyncio.Future[Any] = asyncio.create_task(deadline())
    try:
        await asyncio.wait([finished, timer], return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        abandoned = sum(1 for t in tasks if not t.done())
        for t in tasks:
            t.cancel()
        await asyncio.gather(finished, timer, return_exceptions=True)
    if crashed:
        raise crashed[0]
    return _PassEnd(
        abandoned=abandoned, fatal=fatal[0] if fatal else None, store_errors=store_errors
    )


class PacedReconciler:
    """A reconciler whose calls for ``paced`` keys wait for a token first, and whose
    every call is checked by ``hold`` at the moment it would go.

    ``--max-changes-per-minute``: changes are paced, heals are not (``bucket``
    ``None``: no cap). ``hold`` (the sync windows, asked at that moment) says
    whether change control now holds the call: a window that opened while it
    waited for its token, or for its rollout's canaries. A held call is not sent
    (:class:`CallHeld`) and spends no token.

    The bucket is a value (:class:`~reconciler.core.rollout.TokenBucket`); this
    shell only keeps it and sleeps. A call still waiting when ``stop`` is set
    is withdrawn unsent (:class:`~reconciler.core.errors.CallWithdrawn`).
    """

    def __init__(
        self,
        inner: Reconciles,
        *,
        bucket: TokenBucket | None,
        paced: Collection[TaskKey],
        stop: asyncio.Event,
        clock: Callable[[], float] = time.monotonic,
        hold: Callable[[Call], Waiting | None] = lambda _: None,
    ) -> None:
        self.inner = inner
        self.bucket = bucket
        self.paced = paced
        self.stop = stop
        self._clock = clock
        self._hold = hold

    def _check(self, call: Call) -> None:
        if (waiting := self._hold(call)) is not None:
            raise CallHeld(waiting)

    async def reconcile(self, call: Call) -> Result:
        if self.bucket is not None and call.key in self.paced:
            while True:
                bucket, wait = self.bucket.take(self._clock())
                if not wait:
                    self._check(call)  # at the moment its token is granted
                    self.bucket = bucket
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)
                if self.stop.is_set():
                    raise CallWithdrawn(call.action)
        else:
            self._check(call)
        return await self.inner.reconcile(call)


async def apply_rollout(
    plan: Plan,
    gate: Gate,
    *,
    reconciler: Reconciles,
    recorder: Recorder,
    desired: Mapping[TaskKey, DesiredTask],
    read_back: Callable[[Sequence[TaskKey]], Awaitable[Mapping[TaskKey, Observation]]],
    workers: int,
    on_result: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
    drain_timeout: float = 20.0,
    settle_s: float = SETTLE_S,
) -> ApplyReport:
    """Make the calls ``gate`` lets go: heals and canaries first, the rest once the
    canaries are observed Synced (``read_back`` reads them after the settle window).

    Without canaries this is one :func:`apply_plan` of ``gate.send``. A canary
    that fails (its call failed or found the task not running, or the read
    shows other values or no running task) stops the rollout: the rest are
    not sent, ``rollout.canary_failed`` is logged, and the report's
    ``canary_failed`` says why. A canary held by a window when its turn came
    holds the rest too (``waiting``); any other first-phase call that failed
    stops the rollout with the rest not made (``stopped_rollout``).
    """
    stop = stop if stop is not None else asyncio.Event()

    async def phase(part: Plan) -> ApplyReport:
        return await apply_plan(
            part,
            reconciler=reconciler,
            recorder=recorder,
            workers=workers,
            on_result=on_result,
            stop=stop,
            drain_timeout=drain_timeout,
        )

    later = set(gate.after_canaries)
    report = await phase(
        dataclasses.replace(plan, calls=tuple(c for c in gate.send if c.key not in later))
    )
    rest = tuple(c for c in gate.send if c.key in later)
    if not rest:
        return report
    if stop.is_set() or report.fatal is not None:
        report.not_started += [c.key for c in rest]
        report.interrupted = report.fatal is None and report.store_error is None
        return report
    waiting = {w.key for w in report.waiting}
    if held_canaries := [k for k in gate.canaries if k in waiting]:
        names = ", ".join(str(k) for k in held_canaries)
        report.waiting += [
            Waiting(c.key, Reason.CANARY, f"waiting for canary {names}, held by a window")
            for c in rest
        ]
        return report
    outcomes = {r.key: r.outcome for r in report.results}
    canaries_went = all(outcomes.get(k) is Outcome.SYNCED for k in gate.canaries)
    if canaries_went and not report.ok:
        report.stopped_rollout = "a call sent with the canaries (a heal) failed"
        report.not_started += [c.key for c in rest]
        return report
    try:
        verdict, why = await _confirm_canaries(
            gate.canaries,
            report=report,
            recorder=recorder,
            desired=desired,
            read_back=read_back,
            stop=stop,
            settle_s=settle_s,
        )
    except StoreWriteError as exc:  # the read-back could not be recorded: go no further
        report.store_error = exc
        report.not_started += [c.key for c in rest]
        return report
    log = events.get_logger()
    if verdict is not CanaryState.PASSED:
        report.canary_failed = why
        report.held = [c.key for c in rest]
        report.not_started += report.held
        log.error(
            "rollout.canary_failed",
            canaries=[str(k) for k in gate.canaries],
            reason=why,
            held=len(rest),
        )
        return report
    log.info("rollout.promoted", canaries=[str(k) for k in gate.canaries], changes=len(rest))
    more = await phase(
        dataclasses.replace(
            plan, calls=rest, releases=(), forgotten=(), bookkeeping=(), incarnations=()
        )
    )
    report.results += more.results
    report.not_started += more.not_started
    report.abandoned += more.abandoned
    report.fatal = more.fatal
    report.store_error = more.store_error
    report.unrecorded += more.unrecorded
    report.interrupted = more.interrupted
    return report


async def _confirm_canaries(
    canaries: Sequence[TaskKey],
    *,
    report: ApplyReport,
    recorder: Recorder,
    desired: Mapping[TaskKey, DesiredTask],
    read_back: Callable[[Sequence[TaskKey]], Awaitable[Mapping[TaskKey, Observation]]],
    stop: asyncio.Event,
    settle_s: float,
) -> tuple[CanaryState, str]:
    """Wait out the settle window after the canaries' calls, read them, judge them."""
    outcomes = {r.key: r for r in report.results}
    failures: dict[TaskKey, str] = {}
    for key in canaries:
        result = outcomes.get(key)
        if result is not None and result.outcome is not Outcome.SYNCED:
            failures[key] = f"its call ended {result.outcome.value}: {result.error or ''}".rstrip(
                ": "
            )
    if not failures:
        applied = [recorder.applied[k].applied_at for k in canaries if k in recorder.applied]
        last = max((a for a in applied if a is not None), default=time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, last + settle_s + 0.2 - time.time()))
        if stop.is_set():
            return CanaryState.PENDING, "interrupted before the canaries were confirmed"
        for obs in (await read_back(list(canaries))).values():
            recorder.observed(obs)
    checks = [
        check_canary(
            key,
            task.spec_hash() if (task := desired.get(key)) is not None else "",
            task=task,
            record=recorder.applied.get(key),
            observation=recorder.observations.get(key),
            failure=failures.get(key),
            settle_s=settle_s,
        )
        for key in canaries
    ]
    state, why = judge(checks)
    if state is CanaryState.PENDING:
        pending = next(c for c in checks if c.state is not CanaryState.PASSED)
        why = f"{pending.key}: not confirmed: {pending.reason}"
    return state, why
