"""Change control in the daemon: the state behind the gates, and the answers.

The decisions (sync windows, the mass-change gate, the rate cap, the canary)
are pure functions in :mod:`reconciler.core.rollout`; :class:`Admission`
owns what they are decided from and what they leave behind, so the daemon
asks one question per call (:meth:`Admission.admit`) and reports back what
came of it (:meth:`Admission.after_call`, :meth:`Admission.after_read`).

Level-based: the *pending* mirror holds the non-heal calls the latest plans
hold (key -> kind and desired spec), brought in line wherever a plan is made
(:meth:`Admission.note` for a worker's or a read's few keys,
:meth:`Admission.note_all` for a whole replan, in steps). The mass change and
the rollout are judged from it after every note, from counts kept as plans
and records change (walking every pending change for each task handled made
a first sync quadratic). A waiting task is woken when its gate can open (a
window's opening, the next token) or when the hold is lifted (the mass
change clears, the canaries pass or the rollout ends).

It reads no clock: every call that decides takes ``now`` (a
:class:`~reconciler.engine.clock.Moment`, both clocks read together), so a
test drives windows, the cap and canaries by handing in the time. What it
decides it logs through the logger it was given, and it wakes tasks through
the two callbacks the daemon hands it (its work queue), so it needs no
event loop except to yield between the steps of a whole replan.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Protocol

from reconciler.core.live import Observation
from reconciler.core.plan import SETTLE_S, Call, Plan
from reconciler.core.rollout import (
    CanaryState,
    ChangeControl,
    ChangeKind,
    MassChange,
    Reason,
    Rollout,
    TokenBucket,
    Waiting,
    applied_tasks,
    check_canary,
    classifier,
    judge,
    mass_change_of,
    may_go,
    repick_canary,
    start_rollout,
)
from reconciler.core.task import AppliedRecord, DesiredTask, TaskKey, task_fields
from reconciler.engine.clock import Moment
from reconciler.engine.reconcile import Outcome, Result
from reconciler.tree.desired import STEP


class Records(Protocol):
    """The planner's view of recorded state (the :class:`~reconciler.store.recorder.Recorder`'s)."""

    @property
    def applied(self) -> Mapping[TaskKey, AppliedRecord]: ...

    @property
    def observations(self) -> Mapping[TaskKey, Observation]: ...


class Admission:
    """Which planned call may go now; the pending changes, waits, mass change and rollout."""

    def __init__(
        self,
        *,
        control: ChangeControl,
        desired: Callable[[], Mapping[TaskKey, DesiredTask]],
        records: Records,
        log: Any,
        wake: Callable[[Sequence[TaskKey]], None],
        wake_after: Callable[[TaskKey, float], None],
        settle_s: float = SETTLE_S,
        root: str = "",
    ) -> None:
        """``desired``: the desired tasks now (the index's); ``records``: read anew
        each time (a store reload replaces them). ``wake``: queue these keys now;
        ``wake_after``: queue one after so many seconds. ``root`` names the tree in
        the mass-change event."""
        self.control = control
        self._desired = desired
        self._records = records
        self.log = log
        self._wake = wake
        self._wake_after = wake_after
        self._settle_s = settle_s
        self._root = root
        self._pending: dict[TaskKey, tuple[ChangeKind, str]] = {}
        self._pending_changes = 0
        # Keys a worker or a read noted during a whole replan (its view is newer).
        self._touched: set[TaskKey] = set()
        self._waiting: dict[TaskKey, Waiting] = {}
        self._wait_told: dict[TaskKey, object] = {}
        self._mass: MassChange | None = None
        self._rollout: Rollout | None = None
        self._canary_failures: dict[TaskKey, str] = {}
        cap = control.max_changes_per_minute
        self._bucket = TokenBucket(cap) if cap else None

    # --- what readiness, metrics and the dashboard read -------------------------------

    @property
    def waiting(self) -> Mapping[TaskKey, Waiting]:
        """The tasks waiting now, and why."""
        return self._waiting

    @property
    def mass(self) -> MassChange | None:
        """The mass change holding the changes (``None``: none is)."""
        return self._mass

    @property
    def rollout(self) -> Rollout | None:
        """The rollout under way (``None``: none is)."""
        return self._rollout

    def waiting_counts(self) -> dict[str, int]:
        """Tasks waiting by reason (every reason, zeros included)."""
        counts = {str(r): 0 for r in Reason}
        for w in self._waiting.values():
            counts[str(w.reason)] += 1
        return counts

    def mass_change_held(self) -> int:
        """The changes a mass change holds (0: none does)."""
        return 0 if self._mass is None else self._pending_changes

    def canary_failed(self) -> bool:
        return self._rollout is not None and self._rollout.failed is not None

    def degraded(self) -> list[str]:
        """Why change control holds calls back for more than their turn (empty: it does not)."""
        out = []
        if self._mass is not None:
            out.append(f"{self._mass}; the changes are held until fewer are pending")
        if self._rollout is not None and self._rollout.failed is not None:
            held = sum(1 for w in self._waiting.values() if w.reason is Reason.CANARY_FAILED)
            out.append(
                f"rollout stopped: canary failed: {self._rollout.failed}; "
                f"{_count(held, 'change')} held until the desired spec changes"
            )
        return out

    # --- noting plans ------------------------------------------------------------------

    def replanning(self) -> None:
        """A whole replan starts: keys noted from now on are newer than its plan."""
        self._touched = set()

    def note(self, plan: Plan, keys: Sequence[TaskKey], now: Moment) -> None:
        """Bring the pending mirror in line with the plan of a few ``keys`` (a worker's,
        a read's), then judge."""
        self._touched.update(keys)
        calls = {c.key: c for c in plan.calls}
        self._note_keys(keys, calls, classifier(plan, self._records.applied))
        self._judged(now)

    async def note_all(
        self, plan: Plan, only: Iterable[TaskKey] | None, *, clock: Callable[[], Moment]
    ) -> None:
        """:meth:`note` for a whole replan (of ``only``, or all), yielding every
        :data:`~reconciler.tree.desired.STEP` keys; keys noted meanwhile (since
        :meth:`replanning`) keep their newer note. Judged at ``clock()`` once done."""
        calls = {c.key: c for c in plan.calls}
        scope = list(self._pending.keys() | calls.keys() if only is None else only)
        kind_of = classifier(plan, self._records.applied)
        for start in range(0, len(scope), STEP):
            chunk = [k for k in scope[start : start + STEP] if k not in self._touched]
            self._note_keys(chunk, calls, kind_of)
            if start + STEP < len(scope):
                await asyncio.sleep(0)
        self._judged(clock())

    def _note_keys(
        self,
        keys: Iterable[TaskKey],
        calls: dict[TaskKey, Call],
        kind_of: Callable[[Call], ChangeKind],
    ) -> None:
        for key in keys:
            call = calls.get(key)
            old = self._pending.pop(key, None)
            if old is not None and old[0] is ChangeKind.CHANGE:
                self._pending_changes -= 1
            if call is None:
                self._release(key)
                continue
            kind = kind_of(call)
            if kind is ChangeKind.HEAL:
                continue
            self._pending[key] = (kind, call.task.spec_hash())
            self._pending_changes += kind is ChangeKind.CHANGE

    def _judged(self, now: Moment) -> None:
        self._judge_mass()
        if self._rollout is not None:
            self._judge_rollout(now)

    def _judge_mass(self) -> None:
        refusal = mass_change_of(
            self._pending_changes,
            known=applied_tasks(self._records.applied),
            control=self.control,
        )
        if refusal is not None and self._mass is None:
            self.log.error(
                "plan.mass_change_held",
                root=self._root,
                changes=refusal.changes,
                known=refusal.known,
                allowed=refusal.allowed,
                max_change=str(refusal.limit),
            )
        elif refusal is None and self._mass is not None:
            self.log.info("plan.mass_change_cleared", changes=self._pending_changes)
            self._requeue(Reason.MASS_CHANGE)
        self._mass = refusal

    # --- admitting a call --------------------------------------------------------------

    def admit(self, plan: Plan, now: Moment) -> Waiting | None:
        """``None`` if the plan's one call may go at ``now``; else why it waits: the
        task is kept waiting, told once per window (or hold), and woken when due."""
        if (wait := self._decide(plan, now)) is not None:
            self._hold(wait, now)
            return wait
        self._release(plan.calls[0].key)
        return None

    def _decide(self, plan: Plan, now: Moment) -> Waiting | None:
        call, control = plan.calls[0], self.control
        key = call.key
        kind = classifier(plan, self._records.applied)(call)
        at = now.wall
        held = may_go(key, call.source.path, kind, control=control, mass=self._mass, now=at)
        if held is not None:
            self._canary_held(key, now)
            return held
        if kind is ChangeKind.HEAL:
            return None
        spec = call.task.spec_hash()
        if control.canary:
            rollout = self._current_rollout(now)
            if rollout is not None and (held := rollout.admits(key, spec)) is not None:
                return held
        if self._bucket is not None:
            bucket, wait = self._bucket.take(now.monotonic)
            if wait:
                ahead = sum(1 for w in self._waiting.values() if w.reason is Reason.CAP)
                wait += ahead * bucket.interval if key not in self._waiting else 0.0
                return Waiting(
                    key,
                    Reason.CAP,
                    f"waiting for the rate cap ({control.max_changes_per_minute} changes a minute)",
                    until=at + timedelta(seconds=wait),
                )
            self._bucket = bucket
        return None

    def _hold(self, wait: Waiting, now: Moment) -> None:
        key = wait.key
        self._waiting[key] = wait
        # Once per task and window opening (or hold); a cap wait once until the call goes.
        told: object = (wait.reason, tuple(w.source for w in wait.windows), wait.until)
        if wait.reason is Reason.CAP:
            told = wait.reason
        if self._wait_told.get(key) != told:
            self._wait_told[key] = told
            self.log.info(
                "task.waiting",
                **task_fields(key),
                reason=str(wait.reason),
                message=wait.message,
                until=None if wait.until is None else wait.until.isoformat(),
                windows=[w.label for w in wait.windows],
            )
        if wait.until is not None:
            delay = (wait.until - now.wall).total_seconds()
            self._wake_after(key, max(0.05, delay + 0.05))

    def _release(self, key: TaskKey) -> None:
        self._waiting.pop(key, None)
        self._wait_told.pop(key, None)

    def _requeue(self, *reasons: Reason) -> None:
        self._wake([key for key, w in self._waiting.items() if w.reason in reasons])

    def _may_go_now(self, now: Moment) -> set[TaskKey]:
        """The pending changes no window or mass-change hold keeps back at ``now``."""
        tasks, control = self._desired(), self.control
        return {
            k
            for k, (kind, _) in self._pending.items()
            if (t := tasks.get(k)) is not None
            and may_go(k, t.source.path, kind, control=control, mass=self._mass, now=now.wall)
            is None
        }

    # --- the canary ------------------------------------------------------------------

    def _canary_held(self, key: TaskKey, now: Moment) -> None:
        """A canary not yet sent that a window or mass change now holds: pick another."""
        rollout = self._rollout
        if (
            rollout is None
            or rollout.promoted
            or rollout.failed is not None
            or key not in rollout.canaries
        ):
            return
        again = repick_canary(
            rollout,
            key,
            k=self.control.canary,
            eligible=self._may_go_now(now),
            observations=self._records.observations,
        )
        self._rollout = again
        self._canary_failures.pop(key, None)
        if again is None:
            self.log.info("rollout.cleared", canaries=[str(k) for k in rollout.canaries])
        else:
            self.log.info(
                "rollout.canaries_changed",
                held=str(key),
                canaries=[str(k) for k in again.canaries],
            )
        self._requeue(Reason.CANARY)

    def _current_rollout(self, now: Moment) -> Rollout | None:
        if self._rollout is None:
            pending = {k: spec for k, (_, spec) in self._pending.items()}
            if not pending:
                return None
            self._rollout = start_rollout(
                pending,
                k=self.control.canary,
                observations=self._records.observations,
                eligible=self._may_go_now(now),
            )
            self._canary_failures = {}
            self.log.info(
                "rollout.started",
                canaries=[str(k) for k in self._rollout.canaries],
                changes=len(pending),
            )
        return self._rollout

    def after_call(self, result: Result, now: Moment) -> None:
        """A call was made: a canary's failure counts against the rollout at once."""
        rollout = self._rollout
        if rollout is None or result.key not in rollout.canaries:
            return
        if result.outcome in (Outcome.FAILED, Outcome.NOT_RUNNING):
            detail = f": {result.error}" if result.error is not None else ""
            self._canary_failures[result.key] = f"its call ended {result.outcome.value}{detail}"
        self._judge_rollout(now)

    def after_read(self, key: TaskKey, now: Moment) -> None:
        """``key`` was read and its plan noted: a canary's read may settle the rollout."""
        if self._rollout is not None and key in self._rollout.canaries:
            self._judge_rollout(now)

    def _judge_rollout(self, now: Moment) -> None:
        """Promote, fail, end or drop the rollout from what is recorded and observed."""
        rollout = self._rollout
        if rollout is None:
            return
        desired = self._desired()
        if rollout.failed is not None or rollout.promoted:
            changed = any(
                (t := desired.get(k)) is None or t.spec_hash() != spec
                for k, spec in rollout.members.items()
                if rollout.failed is not None
            )
            # Members a window or a mass change holds do not keep it open: held, they
            # would keep every later change waiting; released, they get a canary anew.
            free = self._may_go_now(now) if rollout.promoted else set()
            live = any(
                self._pending.get(k, (None, None))[1] == s
                for k, s in rollout.members.items()
                if k in free
            )
            if changed or (rollout.promoted and not live):
                self.log.info(
                    "rollout.completed" if rollout.promoted else "rollout.cleared",
                    canaries=[str(k) for k in rollout.canaries],
                )
                self._rollout = None
                self._requeue(Reason.CANARY, Reason.CANARY_FAILED)
            return
        records = self._records
        checks = [
            check_canary(
                key,
                spec,
                task=desired.get(key),
                record=records.applied.get(key),
                observation=records.observations.get(key),
                failure=self._canary_failures.get(key),
                settle_s=self._settle_s,
            )
            for key, spec in rollout.canaries.items()
        ]
        state, why = judge(checks)
        if state is CanaryState.CHANGED:
            self.log.info("rollout.cleared", canaries=[str(k) for k in rollout.canaries])
            self._rollout = None
            self._requeue(Reason.CANARY, Reason.CANARY_FAILED)
        elif state is CanaryState.FAILED:
            self._rollout = dataclasses.replace(rollout, failed=why)
            held = [k for k in rollout.members if k not in rollout.canaries]
            self.log.error(
                "rollout.canary_failed",
                canaries=[str(k) for k in rollout.canaries],
                reason=why,
                held=len(held),
            )
            for key, w in list(self._waiting.items()):
                if w.reason is Reason.CANARY:
                    self._waiting[key] = Waiting(
                        key, Reason.CANARY_FAILED, f"held: canary failed: {why}"
                    )
        elif state is CanaryState.PASSED:
            self._rollout = dataclasses.replace(rollout, promoted=True)
            self.log.info(
                "rollout.promoted",
                canaries=[str(k) for k in rollout.canaries],
                changes=len(rollout.members) - len(rollout.canaries),
            )
            self._requeue(Reason.CANARY)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
