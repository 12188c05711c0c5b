"""Change control: which of a plan's calls may go now, as pure decisions.

Every UpdateSegment that carries ``Duration`` cuts a live slice, so ops want
a say in *when* and *how fast* changes go out. Four gates, each a pure
function of (plan, config, now, recorded and observed state) that returns a
value; ``plan``, ``apply`` and the daemon only act on the answer:

- **Sync windows** (:mod:`reconciler.core.windows`): a call held by a window is
  planned and shown as waiting, never sent (``apply --override-window``
  sends it and says so).
- **Mass changes** (:func:`check_changes`): a plan whose changes to
  already-applied tasks exceed ``--max-change`` of them (default 20 %, never
  fewer than :data:`CHANGE_FLOOR` at once; parsed like ``--max-forget``) is
  refused unless ``--allow-mass-change``.
- **Rate cap** (:class:`TokenBucket`): changes go at most N per minute.
- **Canary** (:func:`choose_canaries`, :func:`check_canary`): the first K
  changes of a rollout go first; the rest wait until those K are observed
  Synced (a read after the settle window shows the desired values live). A
  canary that fails holds the rest until the desired spec changes.

What counts as what (:func:`classify`):

- a **heal** brings a live task back to what was applied: every call of a
  restarted task, or a call sending only drifted fields. Heals are never
  capped, canaried or counted as mass changes, and windows let them through
  unless ``heals: deny``;
- a **first sync** (a task never confirmed by the server) carries every
  managed field, ``Duration`` included, so it is a change for windows, the
  cap and the canary; it is not one of the *already-applied* tasks the
  mass-change gate counts;
- anything else is a **change**.

:func:`gate_plan` is the one entry point for a whole plan (``plan``,
``apply DIR`` and a saved plan's ``apply FILE`` alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from reconciler.core.guard import allowed_at_once, format_fraction
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import SETTLE_S, Call, Plan
from reconciler.core.task import AppliedIndex, AppliedRecord, DesiredTask, TaskKey
from reconciler.core.windows import NO_WINDOWS, SyncWindow, SyncWindows, WindowVerdict

#: The share of already-applied tasks one plan may change unless told otherwise.
DEFAULT_MAX_CHANGE: Final = 0.20
#: Changing at most this many tasks at once is never a mass change.
CHANGE_FLOOR: Final = 5


class ChangeKind(StrEnum):
    HEAL = "heal"
    FIRST = "first_sync"
    CHANGE = "change"


class Reason(StrEnum):
    """Why a planned call waits."""

    WINDOW = "window"
    CAP = "cap"
    CANARY = "canary"
    CANARY_FAILED = "canary_failed"
    MASS_CHANGE = "mass_change"


@dataclass(frozen=True, slots=True)
class ChangeLimit:
    """How many already-applied tasks one plan may change: a share, never below a floor."""

    fraction: float = DEFAULT_MAX_CHANGE
    floor: int = CHANGE_FLOOR

    def allowed(self, known: int) -> int:
        return allowed_at_once(self.fraction, self.floor, known)

    def __str__(self) -> str:
        return format_fraction(self.fraction)


@dataclass(frozen=True, slots=True)
class MassChange:
    """Too many changes to already-applied tasks at once."""

    changes: int
    known: int
    limit: ChangeLimit

    @property
    def allowed(self) -> int:
        return self.limit.allowed(self.known)

    def __str__(self) -> str:
        share = 100 * self.changes / self.known if self.known else 100.0
        return (
            f"refusing to change {self.changes} of {self.known} applied tasks ({share:.0f}%) "
            f"at once: more than --max-change {self.limit} allows ({self.allowed} at once)"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "code": "MassChange",
            "message": str(self),
            "changes": self.changes,
            "known": self.known,
            "allowed": self.allowed,
            "max_change": str(self.limit),
        }


@dataclass(frozen=True, slots=True)
class ChangeControl:
    """The change-control settings of a run (the CLI's flags and windows file)."""

    windows: SyncWindows = NO_WINDOWS
    max_change: ChangeLimit = field(default_factory=ChangeLimit)
    allow_mass_change: bool = False
    #: ``apply --override-window``: send calls a window holds, and say so.
    override_window: bool = False
    #: Changes per minute; ``None``: no cap.
    max_changes_per_minute: int | None = None
    #: Canaries per rollout; 0: none.
    canary: int = 0


# --- what a call is ------------------------------------------------------------------


def classify(
    call: Call,
    *,
    record: AppliedRecord | None,
    restarted: bool,
    drifted: Iterable[str] = (),
) -> ChangeKind:
    """A heal, a first sync or a change (see the module docstring)."""
    if record is None or record.fields is None:
        return ChangeKind.FIRST
    if restarted:
        return ChangeKind.HEAL
    moved = set(drifted)
    if moved and set(call.fields) <= moved:
        return ChangeKind.HEAL
    return ChangeKind.CHANGE


def classify_plan(
    plan: Plan, applied: Mapping[TaskKey, AppliedRecord]
) -> dict[TaskKey, ChangeKind]:
    kind_of = classifier(plan, applied)
    return {c.key: kind_of(c) for c in plan.calls}


def classifier(
    plan: Plan, applied: Mapping[TaskKey, AppliedRecord]
) -> Callable[[Call], ChangeKind]:
    """:func:`classify` for any call of ``plan``: its restarts and drifts indexed once."""
    restarted = {r.key for r in plan.restarts}
    drifted = {d.key: tuple(d.fields) for d in plan.drifts if d.healed}

    def kind_of(call: Call) -> ChangeKind:
        return classify(
            call,
            record=applied.get(call.key),
            restarted=call.key in restarted,
            drifted=drifted.get(call.key, ()),
        )

    return kind_of


def applied_tasks(applied: Mapping[TaskKey, AppliedRecord]) -> int:
    """Tasks the server has confirmed values for: what ``--max-change`` is a share of."""
    if isinstance(applied, AppliedIndex):
        return applied.confirmed  # kept as records change: no walk over the store
    return sum(1 for r in applied.values() if r.fields is not None)


def check_changes(changes: int, *, known: int, limit: ChangeLimit) -> MassChange | None:
    """A :class:`MassChange` when ``changes`` (to already-applied tasks) exceed the limit."""
    if changes <= limit.allowed(known):
        return None
    return MassChange(changes=changes, known=max(known, changes), limit=limit)


def mass_change(
    kinds: Iterable[ChangeKind],
    *,
    applied: Mapping[TaskKey, AppliedRecord],
    control: ChangeControl,
) -> MassChange | None:
    """The mass-change gate, for a plan (:func:`gate_plan`) and the daemon's pending changes
    alike: the changes among ``kinds``, as a share of the confirmed tasks
    (:func:`applied_tasks`); ``None`` when within the limit or allowed."""
    if control.allow_mass_change:
        return None
    changes = sum(1 for k in kinds if k is ChangeKind.CHANGE)
    return mass_change_of(changes, known=applied_tasks(applied), control=control)


def mass_change_of(changes: int, *, known: int, control: ChangeControl) -> MassChange | None:
    """:func:`mass_change` from counts kept as they change (the daemon's, for every task)."""
    if control.allow_mass_change:
        return None
    return check_changes(changes, known=known, limit=control.max_change)


def window_hold(
    key: TaskKey, path: str | None, kind: ChangeKind, *, windows: SyncWindows, now: datetime
) -> Waiting | None:
    """Why a window holds the call for ``key`` (declared in ``path``, of ``kind``) at
    ``now``; ``None``: no window does."""
    verdict = windows.verdict(app_id=key.app_id, path=path, heal=kind is ChangeKind.HEAL, now=now)
    return None if verdict.allowed else window_waiting(key, verdict)


def mass_hold(key: TaskKey, kind: ChangeKind, mass: MassChange | None) -> Waiting | None:
    """A change waits while a mass change is held; heals and first syncs never do."""
    if mass is not None and kind is ChangeKind.CHANGE:
        return Waiting(key, Reason.MASS_CHANGE, f"held: {mass}")
    return None


def may_go(
    key: TaskKey,
    path: str | None,
    kind: ChangeKind,
    *,
    control: ChangeControl,
    mass: MassChange | None,
    now: datetime,
) -> Waiting | None:
    """The window and mass-change gates for one call (``--override-window`` aside):
    what :func:`gate_plan` applies to a plan, the daemon to each call, and what a
    canary must pass to be chosen."""
    held = window_hold(key, path, kind, windows=control.windows, now=now)
    return held if held is not None else mass_hold(key, kind, mass)


# --- why a call waits ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Waiting:
    """A planned call held back, why, and (when known) until when."""

    key: TaskKey
    reason: Reason
    message: str
    #: When it may go next (UTC); ``None``: when something else happens.
    until: datetime | None = None
    windows: tuple[SyncWindow, ...] = ()

    def to_json(self) -> dict[str, Any]:
        zone = self.windows[0].zone if self.windows else None
        return {
            "task": self.key.identity(),
            "reason": str(self.reason),
            "message": self.message,
            "until": None if self.until is None else _iso(self.until),
            "until_local": None
            if self.until is None or zone is None
            else self.until.astimezone(zone).isoformat(),
            "windows": [w.to_json() for w in self.windows],
        }


def window_waiting(key: TaskKey, verdict: WindowVerdict) -> Waiting:
    return Waiting(
        key,
        Reason.WINDOW,
        f"waiting for window: {verdict.describe()}",
        until=verdict.until,
        windows=verdict.holding,
    )


@dataclass(frozen=True, slots=True)
class Gate:
    """What may go of one plan now: the calls to send, those waiting, and why."""

    send: tuple[Call, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    #: Calls a window holds that ``--override-window`` sends anyway, with the windows.
    overridden: tuple[tuple[Call, tuple[SyncWindow, ...]], ...] = ()
    mass_change: MassChange | None = None
    kinds: Mapping[TaskKey, ChangeKind] = field(default_factory=dict)
    #: Of ``send``: the canaries that go first, and the changes that wait for them.
    canaries: tuple[TaskKey, ...] = ()
    after_canaries: tuple[TaskKey, ...] = ()

    def waiting_by_key(self) -> dict[TaskKey, Waiting]:
        return {w.key: w for w in self.waiting}

    def waiting_json(self) -> list[dict[str, Any]]:
        return [w.to_json() for w in self.waiting]


def gate_plan(
    plan: Plan,
    *,
    applied: Mapping[TaskKey, AppliedRecord],
    control: ChangeControl,
    now: datetime,
    observations: Mapping[TaskKey, Observation] | None = None,
) -> Gate:
    """Decide, for every call of ``plan``, whether it may go at ``now``.

    Windows first (held calls wait, or with ``override_window`` go and are
    listed in ``overridden``), then the mass-change gate (``mass_change`` is
    set and the changes wait unless ``allow_mass_change``), then the canary
    split of what remains. The rate cap paces sending and is the shell's
    (:class:`TokenBucket`).
    """
    kinds = classify_plan(plan, applied)
    refusal = mass_change(kinds.values(), applied=applied, control=control)
    send: list[Call] = []
    waiting: list[Waiting] = []
    overridden: list[tuple[Call, tuple[SyncWindow, ...]]] = []
    for call in plan.calls:
        kind = kinds[call.key]
        held = window_hold(call.key, call.source.path, kind, windows=control.windows, now=now)
        if held is not None:
            if not control.override_window:
                waiting.append(held)
                continue
            overridden.append((call, held.windows))
        if (held := mass_hold(call.key, kind, refusal)) is not None:
            waiting.append(held)
            continue
        send.append(call)
    canaries: tuple[TaskKey, ...] = ()
    after: tuple[TaskKey, ...] = ()
    if control.canary:
        rollout = [c.key for c in send if kinds[c.key] is not ChangeKind.HEAL]
        canaries = choose_canaries(rollout, k=control.canary, observations=observations)
        after = tuple(k for k in sorted(rollout) if k not in set(canaries))
    return Gate(
        send=tuple(send),
        waiting=tuple(waiting),
        overridden=tuple(overridden),
        mass_change=refusal,
        kinds=kinds,
        canaries=canaries,
        after_canaries=after,
    )


# --- the rate cap ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """At most ``per_minute`` changes a minute: a token every ``60 / per_minute`` s.

    ``capacity`` tokens at most are saved up (1: changes are evenly spaced,
    never more than ``per_minute`` in any minute). A value: :meth:`take`
    returns the next bucket, so the caller keeps the state and the clock.
    """

    per_minute: int
    capacity: float = 1.0
    tokens: float | None = None  # None: full (never used)
    at: float = 0.0

    @property
    def interval(self) -> float:
        return 60.0 / self.per_minute

    def _level(self, now: float) -> float:
        if self.tokens is None:
            return self.capacity
        return min(self.capacity, self.tokens + max(0.0, now - self.at) / self.interval)

    def take(self, now: float) -> tuple[TokenBucket, float]:
        """``(bucket, 0.0)`` with a token taken, or ``(self, wait)`` seconds until one is due."""
        level = self._level(now)
        if level >= 1.0 - 1e-9:
            return TokenBucket(self.per_minute, self.capacity, level - 1.0, now), 0.0
        return self, (1.0 - level) * self.interval


# --- the canary ------------------------------------------------------------------------


def choose_canaries(
    keys: Iterable[TaskKey],
    *,
    k: int,
    observations: Mapping[TaskKey, Observation] | None = None,
) -> tuple[TaskKey, ...]:
    """The first ``k`` of a rollout, in a deterministic order.

    Tasks last seen running come first (a canary must be readable to be
    confirmed; GetSegmentTask does not see tasks started over 72 h ago),
    each group in task-key order.
    """
    seen = observations or {}

    def order(key: TaskKey) -> tuple[bool, TaskKey]:
        obs = seen.get(key)
        return (obs is None or obs.state is not LiveStatus.RUNNING, key)

    return tuple(sorted(set(keys), key=order)[: max(0, k)])


class CanaryState(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"
    #: The task's desired spec is no longer the one the canary was sent for.
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class CanaryCheck:
    key: TaskKey
    state: CanaryState
    reason: str = ""


def check_canary(
    key: TaskKey,
    spec: str,
    *,
    task: DesiredTask | None,
    record: AppliedRecord | None,
    observation: Observation | None,
    failure: str | None = None,
    settle_s: float = SETTLE_S,
) -> CanaryCheck:
    """Is the canary ``key``, sent for desired ``spec``, observed Synced?

    Passed: the server confirmed the call and a read taken after the settle
    window shows the task running with the desired values. Failed: the call
    failed (``failure``, from the shell), or such a read shows the task not
    running, other values live, or cannot see the task at all.
    """
    if task is None or task.spec_hash() != spec:
        return CanaryCheck(key, CanaryState.CHANGED, "its desired spec changed")
    if failure is not None:
        return CanaryCheck(key, CanaryState.FAILED, failure)
    if record is not None and record.failed_spec == spec:
        return CanaryCheck(key, CanaryState.FAILED, "the server refused its call as bad input")
    if record is None or record.fields is None or dict(record.fields) != dict(task.fields):
        return CanaryCheck(key, CanaryState.PENDING, "its call has not succeeded yet")
    if (
        observation is None
        or record.applied_at is None
        or observation.observed_at <= record.applied_at + settle_s
    ):
        return CanaryCheck(key, CanaryState.PENDING, "not read since the settle window")
    if observation.state is LiveStatus.UNKNOWN:
        return CanaryCheck(
            key,
            CanaryState.FAILED,
            "GetSegmentTask cannot see the task (started over 72 h ago?), so the change "
            "cannot be confirmed",
        )
    if observation.not_running:
        how = f"ended: {observation.stop_reason}" if observation.stop_reason else "not found"
        return CanaryCheck(key, CanaryState.FAILED, f"the task is not running ({how})")
    live = observation.fields
    differ = {
        n: (live.get(n), v)
        for n, v in task.fields.items()
        if live.get(n) != v or type(live.get(n)) is not type(v)
    }
    if differ:
        text = ", ".join(f"{n} {a!r} (desired {b!r})" for n, (a, b) in differ.items())
        return CanaryCheck(key, CanaryState.FAILED, f"live values differ: {text}")
    return CanaryCheck(key, CanaryState.PASSED)


@dataclass(frozen=True, slots=True)
class Rollout:
    """One rollout: the pending changes when it started, and its canaries.

    ``members`` (key → desired spec hash, canaries included) are released
    together once every canary passed; a change saved meanwhile is not a
    member and waits for the next rollout. ``failed`` holds the rest until a
    member's desired spec changes.
    """

    canaries: Mapping[TaskKey, str]
    members: Mapping[TaskKey, str]
    promoted: bool = False
    failed: str | None = None

    def admits(self, key: TaskKey, spec: str) -> Waiting | None:
        """``None`` if this change may go, else why it waits."""
        if self.failed is not None:
            return Waiting(key, Reason.CANARY_FAILED, f"held: canary failed: {self.failed}")
        if self.canaries.get(key) == spec:
            return None
        if self.promoted and self.members.get(key) == spec:
            return None
        names = ", ".join(str(k) for k in sorted(self.canaries))
        if self.promoted:
            return Waiting(key, Reason.CANARY, "waiting for the current rollout to finish")
        return Waiting(key, Reason.CANARY, f"waiting for canary {names} to be observed Synced")


def start_rollout(
    pending: Mapping[TaskKey, str],
    *,
    k: int,
    observations: Mapping[TaskKey, Observation] | None = None,
    eligible: Iterable[TaskKey] | None = None,
) -> Rollout:
    """A rollout of the ``pending`` changes (key → spec hash), its first ``k`` as canaries.

    Canaries are chosen among ``eligible`` (default: all pending): the changes
    no window or mass-change hold keeps from going now, as :func:`gate_plan`
    chooses them among the calls it sends; a canary that cannot go would hold
    the whole rollout.
    """
    can = set(pending) if eligible is None else set(eligible) & set(pending)
    canaries = choose_canaries(can, k=k, observations=observations)
    return Rollout(canaries={c: pending[c] for c in canaries}, members=dict(pending))


def repick_canary(
    rollout: Rollout,
    held: TaskKey,
    *,
    k: int,
    eligible: Iterable[TaskKey],
    observations: Mapping[TaskKey, Observation] | None = None,
) -> Rollout | None:
    """``rollout`` with its canary ``held`` (now held by a window or mass change) replaced
    by an ``eligible`` member; ``None`` when no canary is left to go (start afresh)."""
    kept = {c: s for c, s in rollout.canaries.items() if c != held}
    can = (set(eligible) & set(rollout.members)) - set(rollout.canaries)
    for c in choose_canaries(can, k=k - len(kept), observations=observations):
        kept[c] = rollout.members[c]
    if not kept:
        return None
    return dataclasses.replace(rollout, canaries=kept)


def judge(checks: Iterable[CanaryCheck]) -> tuple[CanaryState, str]:
    """One verdict for a rollout's canaries: failed or changed if any is, passed if all are."""
    found = list(checks)
    for state in (CanaryState.CHANGED, CanaryState.FAILED):
        for c in found:
            if c.state is state:
                return state, f"{c.key}: {c.reason}"
    if all(c.state is CanaryState.PASSED for c in found):
        return CanaryState.PASSED, ""
    return CanaryState.PENDING, ""


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
