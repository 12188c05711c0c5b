"""The planner: desired tasks + last-applied records → a :class:`Plan` value.

:func:`compute_plan` is a pure, deterministic function. It makes no I/O and
reads no clock, so ``plan``, ``apply`` and the daemon share exactly one notion
of "what needs doing", and tests can check it with properties.

The rules (CONTRACT §2):

- A task's *managed fields* are those its file sets. A call carries the task's
  identity (plus ``BusinessId`` when set) and only the managed fields whose
  value differs from last-applied. No difference, no call: an unchanged
  ``Duration`` re-sent would cut the current slice.
- A task never confirmed by the server gets one call with every managed field.
- A managed field that disappears from the file is *released*: no call, the
  record drops it. A task that disappears from the tree is *forgotten*.
- A task whose file is currently invalid is *held*: neither forgotten nor
  touched, until the file is fixed.
- A task the server refused as bad input is *blocked* until its spec changes.
- ``BusinessId`` cannot be changed by UpdateSegment: a change is a warning.

``Plan.bookkeeping`` lists in-sync tasks whose record still has to be written
(never recorded, moved to another file, or a refused spec since reverted), so
that recording a plan's outcome makes the next plan empty.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.task import (
    MANAGED_FIELDS,
    AppliedRecord,
    DesiredTask,
    FieldValue,
    Source,
    TaskKey,
)

UPDATE_ACTION = "UpdateSegment"


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
    #: Last-applied values, ``None`` when the server never confirmed any.
    last: Mapping[str, FieldValue] | None
    action: str = UPDATE_ACTION

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
        """True when the server never confirmed any value for the task."""
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


@dataclass(frozen=True, slots=True)
class Plan:
    calls: tuple[Call, ...] = ()
    in_sync: tuple[TaskKey, ...] = ()
    releases: tuple[Release, ...] = ()
    forgotten: tuple[Forget, ...] = ()
    held: tuple[Held, ...] = ()
    blocked: tuple[Blocked, ...] = ()
    warnings: tuple[PlanWarning, ...] = ()
    bookkeeping: tuple[DesiredTask, ...] = field(default=(), repr=False)

    @property
    def empty(self) -> bool:
        """Nothing to send and nothing to record (warnings and blocks aside)."""
        return not (self.calls or self.releases or self.forgotten or self.bookkeeping)

    def summary(self) -> dict[str, int]:
        return {
            "to_update": len(self.calls),
            "in_sync": len(self.in_sync),
            "fields_released": sum(len(r.fields) for r in self.releases),
            "tasks_forgotten": len(self.forgotten),
            "held": len(self.held),
            "blocked": len(self.blocked),
            "warnings": len(self.warnings),
        }

    def to_json(self) -> dict[str, Any]:
        """The stable ``plan --output json`` shape (documented in the README)."""
        return {
            "format_version": 1,
            "summary": self.summary(),
            "calls": [
                {
                    "action": c.action,
                    "task": _key_json(c.key),
                    "source": str(c.source),
                    "first": c.first,
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


def compute_plan(
    desired: Mapping[TaskKey, DesiredTask],
    applied: Mapping[TaskKey, AppliedRecord],
    *,
    held_files: Collection[str] = frozenset(),
    only: Iterable[TaskKey] | None = None,
) -> Plan:
    """What it takes to bring ``applied`` to ``desired``.

    ``held_files`` are desired files that are currently invalid: their recorded
    tasks are held, not forgotten. ``only`` restricts the plan to some keys (the
    daemon re-plans just the tasks of a changed file); ``None`` means all.
    Every list in the plan is sorted by task key.
    """
    if only is None:
        declared = sorted(desired)
        orphans = sorted(k for k in applied if k not in desired)
    else:
        chosen = set(only)
        declared = sorted(k for k in chosen if k in desired)
        orphans = sorted(k for k in chosen if k not in desired and k in applied)

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
    applied_get = applied.get
    for key in declared:
        task = desired[key]
        record = applied_get(key)
        wanted = task.fields
        last = None if record is None else record.fields
        if last is None:
            diff: Mapping[str, FieldValue] = wanted
        elif last == wanted and _int_like_types_match(last, wanted):
            diff = {}
        else:
            diff = {n: v for n, v in wanted.items() if not _same(last.get(n), v)}
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

        if diff:
            if record is not None and record.failed_spec == task.spec_hash():
                blocked.append(Blocked(task, _REFUSED))
                continue
            calls.append(Call(task, diff, last))
            continue

        in_sync.append(key)
        if (
            record is None
            or last is None
            or record.source != task.source.path
            or record.failed_spec is not None
        ):
            bookkeeping.append(task)

    return Plan(
        calls=tuple(calls),
        in_sync=tuple(in_sync),
        releases=tuple(releases),
        forgotten=tuple(forgotten),
        held=tuple(held),
        blocked=tuple(blocked),
        warnings=tuple(warnings),
        bookkeeping=tuple(bookkeeping),
    )


_REFUSED = "the server refused this spec as bad input; change it to retry"


def _same(old: FieldValue | None, new: FieldValue) -> bool:
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
