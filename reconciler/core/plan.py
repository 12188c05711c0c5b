"""The planner: desired tasks + last-applied records → a :class:`Plan` value.

:func:`compute_plan` is a pure, deterministic function. It makes no I/O and
reads no clock, so ``plan``, ``apply`` and the daemon share exactly one notion
of "what needs doing", and tests can check it with properties.

The rules:

- A task's *managed fields* are those its file sets. A call carries the task's
  identity (plus ``BusinessId`` when set) and only the managed fields whose
  value differs from last-applied. No difference, no call: an unchanged
  ``Duration`` re-sent would cut the current slice.
- A task never confirmed by the server is *first contact*. Given
  ``observations``, it is planned against its live values once it has been
  read, and until then it is *unread*: no call, since re-sending a value live
  already has would cut its slice for nothing. A task GetSegmentTask cannot
  see (``unknown``: started more than 72 h ago), or planned without reads,
  gets one call with every managed field, and the call says why
  (:attr:`Call.unread`). A task whose last call's outcome is unknown (it timed
  out or lost its connection after it went out, or a run stopped with it
  Pending) is read again before its next call, for the same reason.
- A managed field that disappears from the file is *released*: no call, the
  record drops it. A task that disappears from the tree is *forgotten*.
- A task whose file is currently invalid is *held*: neither forgotten nor
  touched, until the file is fixed.
- A task the server refused as bad input is *blocked* until its spec changes.
- ``BusinessId`` cannot be changed by UpdateSegment: a change is a warning.

Live state wins over memory. Given ``observations`` (the latest
GetSegmentTask read of each task), a task whose observation is newer than our
last successful call for it by more than ``settle_s`` is compared with its
**live** values instead of last-applied:

- a running task whose incarnation (StartTime) differs from the one the
  values were applied to (or, when that is not known, started after our last
  successful call) was *restarted*: its new incarnation carries
  StartSegment's parameters, so it gets exactly the fields it lacks;
- a live value that differs from last-applied while the file still wants the
  last-applied one is *drift* (another client changed it): healed by the call,
  or with ``drift="report"`` left alone and listed as such;
- an ended task, or one no longer found, is *not running*: no call is planned
  for it; when a new incarnation shows up it is planned at once.

Reads taken within ``settle_s`` of our own success never count, so a stale
read can never cause a second call (and a second Duration cut). An observation
the planner cannot use (``unknown``: GetSegmentTask cannot see tasks started
more than 72 h ago) falls back to last-applied.

``Plan.bookkeeping`` lists in-sync tasks whose record still has to be written
(never recorded, moved to another file, or a refused spec since reverted), so
that recording a plan's outcome makes the next plan empty.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import (
    MANAGED_FIELDS,
    AppliedRecord,
    DesiredTask,
    FieldValue,
    Source,
    SyncStatus,
    TaskKey,
)

UPDATE_ACTION = "UpdateSegment"
#: Seconds after our own successful call in which a read of the task still
#: may not show it (a read in flight, eventual consistency): it never counts.
SETTLE_S: Final = 5.0

DriftPolicy = Literal["heal", "report"]
#: What a call's ``old`` values are: last-applied, the live task, or nothing known.
Basis = Literal["last_applied", "live", "none"]
#: Why a call is made: the first one for a task nothing is known of, a change
#: of the desired spec, or a heal (a restarted incarnation, drift set back).
Cause = Literal["first", "change", "restart", "drift"]
#: Why a call's basis is ``none``: GetSegmentTask cannot see the task (started
#: more than 72 h ago, or never), or nothing was read (observation off, ``--no-refresh``).
Unread = Literal["unreadable", "not_read"]
#: Causes that set back what live lost: they are heals, not changes.
HEALS: Final = frozenset({"restart", "drift"})


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of a call: the last-applied value (``None`` if unknown) and the new one."""

    field: str
    old: FieldValue | None
    new: FieldValue


@dataclass(frozen=True, slots=True)
class Call:
    """One UpdateSegment the plan needs, with its exact body."""

    task: DesiredTask
    #: The managed fields to send: those whose value differs from ``last``.
    fields: Mapping[str, FieldValue]
    #: The values ``fields`` differ from: last-applied or live (see ``basis``);
    #: ``None`` when the server never confirmed any.
    last: Mapping[str, FieldValue] | None
    action: str = UPDATE_ACTION
    basis: Basis = "last_applied"
    #: The live incarnation (StartTime, ms) the call brings in line, when known.
    incarnation: int | None = None
    cause: Cause = "change"
    #: With basis ``none``: why live was not compared (see :data:`Unread`).
    unread: Unread | None = None

    @property
    def heal(self) -> bool:
        return self.cause in HEALS

    @property
    def body(self) -> dict[str, FieldValue]:
        """The exact UpdateSegment body: identity, BusinessId when set, changed fields."""
        app_id, room_id, task_id = self.task.key
        body: dict[str, FieldValue] = {"AppId": app_id, "RoomId": room_id, "TaskId": task_id}
        if self.task.business_id is not None:
            body["BusinessId"] = self.task.business_id
        body.update(self.fields)
        return body

    @property
    def key(self) -> TaskKey:
        return self.task.key

    @property
    def source(self) -> Source:
        return self.task.source

    @property
    def first(self) -> bool:
        """True when nothing is known of the task's values: not applied, not observed."""
        return self.last is None

    @property
    def changes(self) -> tuple[FieldChange, ...]:
        # Derived on demand: a 100k-task plan should not build 300k of these.
        last = self.last or {}
        return tuple(FieldChange(n, last.get(n), v) for n, v in self.fields.items())


@dataclass(frozen=True, slots=True)
class Release:
    """Managed fields that left the file: no call; the record drops them."""

    key: TaskKey
    fields: tuple[str, ...]
    #: Last-applied values that stay recorded once the release is written.
    remaining: Mapping[str, FieldValue]
    last: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class Forget:
    """A recorded task no longer in the tree: no call; the record is deleted."""

    key: TaskKey
    last: Mapping[str, FieldValue] | None
    source_path: str | None


@dataclass(frozen=True, slots=True)
class Held:
    """A recorded task whose file is invalid: kept as it is until the file is fixed."""

    key: TaskKey
    source_path: str


@dataclass(frozen=True, slots=True)
class Restart:
    """A running task with another StartTime than the values were applied to."""

    key: TaskKey
    #: ``None`` when the values were applied before any read of the task.
    old_incarnation: int | None
    new_incarnation: int
    #: The new incarnation's live values.
    live: Mapping[str, FieldValue]


@dataclass(frozen=True, slots=True)
class Drift:
    """Live values another client changed: ``{field: (last_applied, live)}``."""

    key: TaskKey
    fields: Mapping[str, tuple[FieldValue, FieldValue | None]]
    #: The plan's call sets them back (``drift="heal"``), or they are left.
    healed: bool
    source: Source


@dataclass(frozen=True, slots=True)
class Ended:
    """A task observed not running (ended, failed or gone): no call while it is so."""

    task: DesiredTask
    observation: Observation


@dataclass(frozen=True, slots=True)
class Blocked:
    """A task the server refused as bad input; waits for its spec to change."""

    task: DesiredTask
    reason: str


@dataclass(frozen=True, slots=True)
class PlanWarning:
    key: TaskKey
    code: str
    message: str
    source: Source | None


#: How far ``plan`` and ``apply`` read live before planning: the tasks a call
#: would go to and those never confirmed (the default), every task, or none.
RefreshMode = Literal["targeted", "full", "none"]


@dataclass(frozen=True, slots=True)
class Refresh:
    """What a plan was compared with: how many live tasks were read, or why none."""

    mode: RefreshMode
    #: Reads answered (a task GetSegmentTask cannot see counts: it was answered).
    read: int = 0
    #: Reads that failed: such a task is planned against last-applied, or, never
    #: confirmed, gets no call (unread).
    failed: int = 0
    #: Why nothing was read (mode ``none``): ``--no-refresh``, no credentials, ``--base``.
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "read": self.read, "failed": self.failed, "reason": self.reason}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Refresh:
        mode = doc.get("mode")
        if mode not in ("targeted", "full", "none"):
            raise ValueError(f"refresh mode {mode!r} is not targeted, full or none")
        return cls(mode, int(doc.get("read", 0)), int(doc.get("failed", 0)), doc.get("reason"))

    def describe(self) -> str:
        """One sentence for people: what live state the plan stands on."""
        if self.mode == "none":
            return (
                f"Planned against the last-applied state; live tasks were not read "
                f"({self.reason or '--no-refresh'}). A task never confirmed gets every "
                "managed field."
            )
        what = "every desired task" if self.mode == "full" else "the tasks a call would go to"
        failed = f"; {self.failed} could not be read" if self.failed else ""
        return f"Read {self.read} live task(s) first ({what}){failed}."


@dataclass(frozen=True, slots=True)
class Plan:
    calls: tuple[Call, ...] = ()
    in_sync: tuple[TaskKey, ...] = ()
    releases: tuple[Release, ...] = ()
    forgotten: tuple[Forget, ...] = ()
    held: tuple[Held, ...] = ()
    blocked: tuple[Blocked, ...] = ()
    warnings: tuple[PlanWarning, ...] = ()
    restarts: tuple[Restart, ...] = ()
    drifts: tuple[Drift, ...] = ()
    ended: tuple[Ended, ...] = ()
    #: Tasks nothing is known of (never confirmed) and not yet read while reads
    #: were given: no call until a read shows what live holds (first contact).
    unread: tuple[TaskKey, ...] = ()
    #: Declared tasks compared with a live observation rather than last-applied.
    observed: int = 0
    #: Declared tasks read within the settle window after our own call to them:
    #: compared with last-applied, since the read may not show that call yet.
    settling: int = 0
    #: Whether observations were given at all (``plan --refresh``, the daemon).
    refreshed: bool = False
    #: How ``plan``/``apply`` read live before planning (set by them, not by the planner).
    refresh: Refresh | None = None
    bookkeeping: tuple[DesiredTask, ...] = field(default=(), repr=False)
    #: ``(key, StartTime)`` to record as the incarnation last-applied holds for.
    incarnations: tuple[tuple[TaskKey, int], ...] = field(default=(), repr=False)

    @property
    def empty(self) -> bool:
        """Nothing to send and nothing to record (warnings and blocks aside)."""
        return not (
            self.calls or self.releases or self.forgotten or self.bookkeeping or self.incarnations
        )

    def summary(self) -> dict[str, int]:
        return {
            "to_update": len(self.calls),
            "in_sync": len(self.in_sync),
            "fields_released": sum(len(r.fields) for r in self.releases),
            "tasks_forgotten": len(self.forgotten),
            "held": len(self.held),
            "blocked": len(self.blocked),
            "warnings": len(self.warnings),
            "restarted": len(self.restarts),
            "drifted": len(self.drifts),
            "not_running": len(self.ended),
            "unread": len(self.unread),
        }

    def to_json(self) -> dict[str, Any]:
        """The stable ``plan --output json`` shape (documented in docs/plans.md)."""
        return {
            # 3: calls' "waiting" and the top-level "waiting" (change control, added by the CLI).
            # 4: calls' "cause" and "unread", the top-level "unread" and "refresh" (the CLI's).
            "format_version": 4,
            "refreshed": self.refreshed,
            "refresh": None if self.refresh is None else self.refresh.to_json(),
            "observed": self.observed,
            "settling": self.settling,
            "summary": self.summary(),
            "calls": [
                {
                    "action": c.action,
                    "task": _key_json(c.key),
                    "source": str(c.source),
                    "first": c.first,
                    "basis": c.basis,
                    "cause": c.cause,
                    "unread": c.unread,
                    "body": dict(c.body),
                    "changes": [{"field": x.field, "old": x.old, "new": x.new} for x in c.changes],
                }
                for c in self.calls
            ],
            "releases": [
                {"task": _key_json(r.key), "fields": list(r.fields), "last": dict(r.last)}
                for r in self.releases
            ],
            "forgotten": [
                {
                    "task": _key_json(f.key),
                    "last": None if f.last is None else dict(f.last),
                    "source_path": f.source_path,
                }
                for f in self.forgotten
            ],
            "held": [{"task": _key_json(h.key), "source_path": h.source_path} for h in self.held],
            "blocked": [
                {"task": _key_json(b.task.key), "source": str(b.task.source), "reason": b.reason}
                for b in self.blocked
            ],
            "restarts": [
                {
                    "task": _key_json(r.key),
                    "old_start_time": r.old_incarnation,
                    "new_start_time": r.new_incarnation,
                    "live": dict(r.live),
                }
                for r in self.restarts
            ],
            "drifts": [
                {
                    "task": _key_json(d.key),
                    "source": str(d.source),
                    "healed": d.healed,
                    "fields": [
                        {"field": n, "last_applied": last, "live": live}
                        for n, (last, live) in d.fields.items()
                    ],
                }
                for d in self.drifts
            ],
            "not_running": [
                {
                    "task": _key_json(e.task.key),
                    "source": str(e.task.source),
                    "state": str(e.observation.state),
                    "stop_reason": e.observation.stop_reason,
                    "end_time": e.observation.end_time_ms,
                }
                for e in self.ended
            ],
            "unread": [_key_json(k) for k in self.unread],
            "warnings": [
                {
                    "task": _key_json(w.key),
                    "code": w.code,
                    "message": w.message,
                    "source": None if w.source is None else str(w.source),
                }
                for w in self.warnings
            ],
        }


def _key_json(key: TaskKey) -> dict[str, str]:
    return key.identity()


#: Keys sorted at once by :func:`_in_order`; longer lists are sorted in runs this long.
_RUN: Final = 16_384


def _in_order(keys: Iterable[TaskKey]) -> list[TaskKey]:
    """``sorted(keys)``, in runs merged lazily: one ``sort`` holds the interpreter
    for all its compares (1.6 s for 680,000 keys), which would stop a daemon's
    event loop while its planner runs in a thread; a run holds it for ~30 ms."""
    items = list(keys)
    if len(items) <= _RUN:
        return sorted(items)
    runs = [sorted(items[i : i + _RUN]) for i in range(0, len(items), _RUN)]
    return list(heapq.merge(*runs))


def compute_plan(
    desired: Mapping[TaskKey, DesiredTask],
    applied: Mapping[TaskKey, AppliedRecord],
    *,
    held_files: Collection[str] = frozenset(),
    only: Iterable[TaskKey] | None = None,
    observations: Mapping[TaskKey, Observation] | None = None,
    drift: DriftPolicy = "heal",
    settle_s: float = SETTLE_S,
) -> Plan:
    """What it takes to bring ``applied`` (and, when observed, the live tasks) to ``desired``.

    ``held_files`` are desired files that are currently invalid: their recorded
    tasks are held, not forgotten. ``only`` restricts the plan to some keys (the
    daemon re-plans just the tasks of a changed file); ``None`` means all.
    ``observations``, ``drift`` and ``settle_s``: see the module docstring.
    Every list in the plan is sorted by task key.
    """
    if only is None:
        declared = _in_order(desired)
        orphans = _in_order(k for k in applied if k not in desired)
    else:
        chosen = set(only)
        declared = _in_order(k for k in chosen if k in desired)
        orphans = _in_order(k for k in chosen if k not in desired and k in applied)

    forgotten: list[Forget] = []
    held: list[Held] = []
    for key in orphans:
        orphan = applied[key]
        if orphan.source is not None and orphan.source in held_files:
            held.append(Held(key, orphan.source))
        else:
            forgotten.append(Forget(key, orphan.fields, orphan.source))

    calls: list[Call] = []
    in_sync: list[TaskKey] = []
    releases: list[Release] = []
    blocked: list[Blocked] = []
    warnings: list[PlanWarning] = []
    bookkeeping: list[DesiredTask] = []
    restarts: list[Restart] = []
    drifts: list[Drift] = []
    ended: list[Ended] = []
    incarnations: list[tuple[TaskKey, int]] = []
    observed = settling = 0
    applied_get = applied.get
    live_get = (observations or {}).get
    unread: list[TaskKey] = []
    reads_given = observations is not None
    for key in declared:
        task = desired[key]
        record = applied_get(key)
        wanted = task.fields
        last = None if record is None else record.fields
        obs = raw = live_get(key)
        if reads_given and wanted and _must_read(task, record, raw, settle_s):
            # First contact, or a call in doubt: what live holds is unknown, and a
            # call that re-sends a value live already has would cut its slice.
            unread.append(key)
            continue
        if obs is not None and not _counts(obs, record, settle_s):
            settling += obs.state is not LiveStatus.UNKNOWN
            obs = None
        if obs is not None:
            observed += 1
            if obs.not_running:
                ended.append(Ended(task, obs))  # nothing to update until it runs again
                continue
        basis: Basis = "none" if last is None else "last_applied"
        compare = last
        moved: dict[str, tuple[FieldValue, FieldValue | None]] = {}
        restarted = False
        if obs is not None and obs.start_time_ms is not None:
            live = obs.fields
            if record is not None and _restarted(record, obs.start_time_ms):
                restarted = True
                restarts.append(Restart(key, record.incarnation, obs.start_time_ms, dict(live)))
            elif last is not None:
                moved = {
                    n: (last[n], live.get(n))
                    for n, v in wanted.items()
                    if n in last and same_value(last[n], v) and not same_value(live.get(n), v)
                }
            basis, compare = "live", live
        if compare is None:
            diff: Mapping[str, FieldValue] = wanted
        elif compare == wanted and _int_like_types_match(compare, wanted):
            diff = {}
        else:
            diff = {n: v for n, v in wanted.items() if not same_value(compare.get(n), v)}
        if last is not None:
            gone = tuple(n for n in MANAGED_FIELDS if n in last and n not in wanted)
            if gone:
                releases.append(
                    Release(
                        key,
                        gone,
                        remaining={n: v for n, v in last.items() if n not in gone},
                        last={n: last[n] for n in gone},
                    )
                )
        if record is not None and last is not None and record.business_id != task.business_id:
            warnings.append(_business_id_warning(task, record.business_id))
        if moved:
            healed = drift == "heal"
            drifts.append(Drift(key, moved, healed, task.source))
            if not healed:
                diff = {n: v for n, v in diff.items() if n not in moved}
        incarnation = obs.start_time_ms if obs is not None else None

        if diff:
            if record is not None and record.failed_spec == task.spec_hash():
                blocked.append(Blocked(task, _REFUSED))
                continue
            cause: Cause = (
                "restart"
                if restarted
                else "drift"
                if moved and drift == "heal"
                else "first"
                if last is None
                else "change"
            )
            calls.append(
                Call(
                    task,
                    diff,
                    compare,
                    basis=basis,
                    incarnation=incarnation if incarnation is not None else _held(record),
                    cause=cause,
                    unread=None
                    if compare is not None
                    else "unreadable"
                    if raw is not None and raw.state is LiveStatus.UNKNOWN
                    else "not_read",
                )
            )
            continue
        if moved and drift == "report":
            continue  # out of sync by choice: not in sync, nothing recorded as applied

        in_sync.append(key)
        if (
            record is None
            or last is None
            or record.source != task.source.path
            or record.failed_spec is not None
            or record.in_doubt_since is not None
            or record.status in _UNSETTLED
            or (basis == "live" and not _same_values(last, wanted))
        ):
            bookkeeping.append(task)
        if incarnation is not None and (record is None or record.incarnation != incarnation):
            incarnations.append((key, incarnation))

    return Plan(
        calls=tuple(calls),
        in_sync=tuple(in_sync),
        releases=tuple(releases),
        forgotten=tuple(forgotten),
        held=tuple(held),
        blocked=tuple(blocked),
        warnings=tuple(warnings),
        restarts=tuple(restarts),
        drifts=tuple(drifts),
        ended=tuple(ended),
        unread=tuple(unread),
        observed=observed,
        settling=settling,
        refreshed=observations is not None,
        bookkeeping=tuple(bookkeeping),
        incarnations=tuple(incarnations),
    )


#: Recorded statuses that a plan finding the task in sync settles as Synced: a
#: read showing the desired values live ends a failure or a doubt for good.
_UNSETTLED: Final = frozenset({SyncStatus.FAILED, SyncStatus.PENDING, SyncStatus.NOT_RUNNING})


def _must_read(
    task: DesiredTask, record: AppliedRecord | None, raw: Observation | None, settle_s: float
) -> bool:
    """Whether nothing may be sent to ``task`` before a read (see the module docstring).

    Never confirmed and never read (first contact); or a call in doubt (its
    outcome unknown: it may have been applied) and no read taken well after it.
    A spec refused as bad input is blocked instead: no read can change that.
    """
    if record is not None and record.failed_spec == task.spec_hash():
        return False
    if record is not None and record.in_doubt_since is not None:
        return raw is None or raw.observed_at <= record.in_doubt_since + settle_s
    return raw is None and (record is None or record.fields is None)


def _counts(obs: Observation, record: AppliedRecord | None, settle_s: float) -> bool:
    """Whether an observation may stand in for last-applied (see the module docstring)."""
    if obs.state is LiveStatus.UNKNOWN:
        return False
    if record is None or record.applied_at is None:
        return True
    return obs.observed_at > record.applied_at + settle_s


def _restarted(record: AppliedRecord, start_time_ms: int) -> bool:
    """A live incarnation other than the one the values were applied to.

    When that one is not known (applied before any read), an incarnation that
    started after our last successful call cannot have received it.
    """
    if record.incarnation is not None:
        return record.incarnation != start_time_ms
    return record.applied_at is not None and start_time_ms / 1000 > record.applied_at


def _held(record: AppliedRecord | None) -> int | None:
    return None if record is None else record.incarnation


def _same_values(last: Mapping[str, FieldValue] | None, wanted: Mapping[str, FieldValue]) -> bool:
    return last is not None and last == wanted and _int_like_types_match(last, wanted)


_REFUSED = "the server refused this spec as bad input; change it to retry"


def same_value(old: FieldValue | None, new: FieldValue) -> bool:
    """Whether a known value is the wanted one (a bool is never an int here)."""
    # ``True == 1`` in Python; a Handle must never compare equal to a Duration-like int.
    return old is not None and type(old) is type(new) and old == new


def _int_like_types_match(last: Mapping[str, FieldValue], wanted: Mapping[str, FieldValue]) -> bool:
    # After ``last == wanted``, only bool/int confusion can hide a difference.
    return type(last.get("Handle")) is type(wanted.get("Handle")) and type(
        last.get("Duration")
    ) is type(wanted.get("Duration"))


def _business_id_warning(task: DesiredTask, old: str | None) -> PlanWarning:
    return PlanWarning(
        task.key,
        "BusinessIdImmutable",
        f"BusinessId changed from {old!r} to {task.business_id!r}; UpdateSegment cannot "
        "change it, so the running task keeps its old BusinessId until it is restarted",
        task.source,
    )


def records_from_tree(tasks: Mapping[TaskKey, DesiredTask]) -> dict[TaskKey, AppliedRecord]:
    """Treat another desired tree as fully applied (``plan --base``)."""
    return {
        key: AppliedRecord(key, t.business_id, dict(t.fields), source=t.source.path)
        for key, t in tasks.items()
    }


def probe_plan(
    desired: Mapping[TaskKey, DesiredTask],
    applied: Mapping[TaskKey, AppliedRecord],
    *,
    held_files: Collection[str] = frozenset(),
) -> Plan:
    """The plan against last-applied with reads given but none taken: its calls and its
    unread tasks are what a targeted refresh reads (:func:`keys_to_read`); its forgets
    are the plan's whatever live holds."""
    return compute_plan(desired, applied, held_files=held_files, observations={})


def keys_to_read(probe: Plan) -> list[TaskKey]:
    """A targeted refresh: the tasks a plan against last-applied would call, and every
    task never confirmed or in doubt (from :func:`probe_plan`). Read them, then plan
    against what was read: a call goes only where live really differs, and nothing
    else costs a read."""
    return sorted({c.key for c in probe.calls} | set(probe.unread))
