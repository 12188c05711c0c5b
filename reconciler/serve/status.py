"""``reconciler status``: what the store recorded, checked against the tree and the live tasks.

The store alone cannot tell the truth about a task: it knows nothing of a
task declared since the last apply, of a file that no longer parses, or of a
task that left the tree. :func:`build_report` is a pure function of the
store's rows and observations, the desired index (or ``None`` when no tree
was read) and the clock reading it is handed; it joins them by task key and
asks the planner what the next ``apply`` or daemon pass would do with each
task, so ``status`` and ``plan`` can never disagree.

Each :class:`TaskStatus` has two axes, like Argo CD's sync and health:

- ``status`` (sync): the recorded :class:`~reconciler.core.task.SyncStatus` value,
  or ``New`` for a task the tree declares and the store has never seen (plain
  strings, so a status added to ``SyncStatus`` is shown and filtered too);
- ``live`` (:class:`LiveView`): the latest GetSegmentTask read of the task
  and its age at ``now``. A task never read is ``unknown``, never assumed
  running: no output may claim live tasks match unless they were observed.

and, from the tree:

- ``tree``: ``in_tree``, ``held`` (the file that declared it is invalid, so
  it is kept as it is) or ``not_in_tree`` (it will be forgotten); ``None``
  when no tree was read;
- ``next_action``: the planner's verdict (``call``, ``none``, ``blocked``,
  ``forget``, ``hold``), with the field changes of a pending call. It is
  planned against last-applied, as ``plan`` without ``--refresh`` is: the
  daemon's drift policy and the incarnation a record was applied to are not
  in the rows, so a plan against the observations here could promise calls
  the daemon would not make. The live axis shows what was read instead.

The report is a value: the CLI renders it as text (:func:`reconciler.cli.views.render.status_table`)
or as the documented JSON (:meth:`StatusReport.to_json`, :data:`FORMAT_VERSION`).
Both say when each task was last healed (a call that set back a restart or
drift) and why, from the store's row.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import Call, compute_plan
from reconciler.core.task import AppliedRecord, DesiredTask, SyncStatus, TaskKey
from reconciler.store.base import StoredTask, format_time
from reconciler.tree.desired import DesiredIndex, Problem

if TYPE_CHECKING:  # psycopg is imported only for a PostgreSQL store
    from reconciler.store.leader import LeaderRow

#: ``status -o json`` shape version; 2 added the tree, since-times and retries,
#: 3 the live axis (``live`` per task, ``live_counts``, the ``live`` filter),
#: 4 ``leader`` (who leads the replicas of a PostgreSQL store), 5 ``last_heal_at``
#: and ``last_heal_reason`` per task (when a call last set back a restart or drift, and why).
FORMAT_VERSION: Final = 5


#: The status of a task in the tree that the store has never seen.
NEW: Final = "New"


def report_statuses() -> tuple[str, ...]:
    """Every status ``status`` shows, in order: the recorded ones, then ``New``."""
    return (*(s.value for s in SyncStatus), NEW)


class TreeStatus(StrEnum):
    IN_TREE = "in_tree"
    HELD = "held"
    NOT_IN_TREE = "not_in_tree"


class NextAction(StrEnum):
    """What the next ``apply`` or daemon pass does with the task."""

    CALL = "call"
    NONE = "none"
    BLOCKED = "blocked"
    FORGET = "forget"
    HOLD = "hold"


def parse_statuses(values: Iterable[str]) -> frozenset[str]:
    """``["failed,new", "Synced"]`` → the statuses, matched case-insensitively.

    Each value may be a comma list. An unknown name is a :class:`ValueError`
    that lists the valid ones.
    """
    by_name = {s.lower(): s for s in report_statuses()}
    chosen: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            status = by_name.get(name.lower())
            if status is None:
                valid = ", ".join(report_statuses())
                raise ValueError(f"unknown status {name!r}; valid: {valid}")
            chosen.add(status)
    return frozenset(chosen)


def parse_live_states(values: Iterable[str]) -> frozenset[LiveStatus]:
    """``["running,not-found", "Ended"]`` → the live states, matched case-insensitively.

    ``not-found`` and ``not_found`` are both accepted (the option and the JSON
    spell it differently). An unknown name is a :class:`ValueError` listing the valid ones.
    """
    chosen: set[LiveStatus] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip().lower().replace("-", "_")
            if not name:
                continue
            try:
                chosen.add(LiveStatus(name))
            except ValueError:
                valid = ", ".join(s.value.replace("_", "-") for s in LiveStatus)
                raise ValueError(f"unknown live state {part.strip()!r}; valid: {valid}") from None
    return frozenset(chosen)


def _iso_ms(ms: int | None) -> str | None:
    """An API time in epoch milliseconds (``StartTime``, ``EndTime``) as ISO-8601 UTC."""
    return None if ms is None else format_time(datetime.fromtimestamp(ms / 1000, UTC))


@dataclass(frozen=True, slots=True)
class LiveView:
    """The live axis of a task: its latest observation, and its age when the report was made."""

    #: ``None``: never read (by the daemon's observer or ``apply --refresh``).
    observation: Observation | None = None
    #: Seconds between the read and the report (never negative); ``None`` when never read.
    age_s: float | None = None

    @property
    def state(self) -> LiveStatus:
        """A task never read is ``unknown``: it may be running or not."""
        return LiveStatus.UNKNOWN if self.observation is None else self.observation.state

    @property
    def never_read(self) -> bool:
        return self.observation is None

    def to_json(self) -> dict[str, object]:
        o = self.observation
        if o is None:
            return {
                "state": str(LiveStatus.UNKNOWN),
                "observed_at": None,
                "age_s": None,
                "start_time": None,
                "end_time": None,
                "stop_reason": None,
                "status": None,
                "fields": None,
            }
        return {
            "state": str(o.state),
            "observed_at": format_time(datetime.fromtimestamp(o.observed_at, UTC)),
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "start_time": _iso_ms(o.start_time_ms),
            "end_time": _iso_ms(o.end_time_ms),
            "stop_reason": o.stop_reason,
            "status": o.status,
            "fields": dict(o.fields),
        }


#: The live axis of a task that was never read.
NEVER_READ: Final = LiveView()


def live_view(observation: Observation | None, now: datetime) -> LiveView:
    if observation is None:
        return NEVER_READ
    # Clamped: a read stamped by another host's clock may look a little ahead of ours.
    return LiveView(observation, max(0.0, now.timestamp() - observation.observed_at))


@dataclass(frozen=True, slots=True)
class InvalidFile:
    """A desired file with problems, the first of them, and how many recorded tasks it holds."""

    path: str
    first_problem: Problem
    problems: int
    held_tasks: int

    def to_json(self) -> dict[str, object]:
        p = self.first_problem
        return {
            "path": self.path,
            "problems": self.problems,
            "first_problem": {"source": str(p.source), "field": p.field, "message": p.message},
            "held_tasks": self.held_tasks,
        }


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """One task as ``status`` shows it: its record (if any) and its place in the tree."""

    key: TaskKey
    #: A :class:`~reconciler.core.task.SyncStatus` value, or :data:`NEW`.
    status: str
    #: ``None`` when no tree was read.
    tree: TreeStatus | None
    next_action: NextAction | None
    #: The store's row; ``None`` for a ``New`` task.
    record: StoredTask | None
    #: The tree's declaration; ``None`` unless the task is in the tree.
    desired: DesiredTask | None
    #: The pending call of ``next_action`` ``call``.
    call: Call | None = None
    #: The invalid file that holds the task, when ``tree`` is ``held``.
    held_by: str | None = None
    #: The latest observation of the live task, if any.
    live: LiveView = NEVER_READ

    @property
    def status_since(self) -> datetime | None:
        return None if self.record is None else self.record.status_since

    @property
    def next_retry_at(self) -> datetime | None:
        return None if self.record is None else self.record.next_retry_at

    @property
    def last_heal_at(self) -> datetime | None:
        """When a call last set back a restart or drift of the task (``None``: never)."""
        return None if self.record is None else self.record.last_heal_at

    @property
    def last_heal_reason(self) -> str | None:
        return None if self.record is None else self.record.last_heal_reason

    @property
    def source(self) -> str | None:
        """Where the task is declared now, else where it was last recorded."""
        if self.desired is not None:
            return str(self.desired.source)
        return None if self.record is None else self.record.source

    @property
    def last_error(self) -> str | None:
        """The last error for a narrow column: the code's last part, then the message
        (``InvalidParameter.ErrorActiveTaskNotFound`` → ``ErrorActiveTaskNotFound``)."""
        r = self.record
        if r is None or not r.last_error:
            return None
        code = (r.last_error_code or "").rsplit(".", 1)[-1]
        return f"{code}: {r.last_error}" if code else r.last_error

    def to_json(self) -> dict[str, object]:
        r, d = self.record, self.desired
        if r is not None:
            doc = r.to_json()
        else:
            assert d is not None  # a task is in the store, the tree or both
            doc = {
                "app_id": self.key.app_id,
                "room_id": self.key.room_id,
                "task_id": self.key.task_id,
                "business_id": d.business_id,
                "status": self.status,
                "fields": None,
                "applied_at": None,
                "request_id": None,
                "attempts": 0,
                "last_call_at": None,
                "last_error": None,
                "last_error_code": None,
                "last_error_request_id": None,
                "source": None,
                "source_path": None,
                "failed_spec": None,
                "updated_at": None,
                "status_since": None,
                "next_retry_at": None,
                "last_heal_at": None,
                "last_heal_reason": None,
            }
        if d is not None:
            doc["source"] = str(d.source)
            doc["source_path"] = d.source.path
        doc["tree"] = None if self.tree is None else self.tree.value
        doc["held_by"] = self.held_by
        doc["desired_fields"] = None if d is None else dict(d.fields)
        doc["next_action"] = None if self.next_action is None else self.next_action.value
        doc["next_call"] = (
            None
            if self.call is None
            else [{"field": c.field, "old": c.old, "new": c.new} for c in self.call.changes]
        )
        doc["live"] = self.live.to_json()
        return doc


@dataclass(frozen=True, slots=True)
class StatusReport:
    generated_at: datetime
    #: The tree as the user named it, and as an absolute root; ``None``: no tree read.
    tree_path: str | None
    tree_root: str | None
    #: The root recorded in the store by ``apply``/``run`` (``None``: never recorded).
    recorded_root: str | None
    tree_files: int
    tree_tasks: int
    invalid_files: tuple[InvalidFile, ...]
    #: The tasks shown (after the filters), sorted by key.
    tasks: tuple[TaskStatus, ...]
    #: How many tasks there are before the filters.
    total: int
    status_filter: frozenset[str] = frozenset()
    app_filter: frozenset[str] = frozenset()
    live_filter: frozenset[LiveStatus] = frozenset()
    #: Who leads the replicas sharing a PostgreSQL store (``None``: a SQLite store,
    #: one replica, no election; or no replica has run on the database yet).
    leader: LeaderRow | None = None
    #: Whether the store is shared by replicas (PostgreSQL), so ``leader`` applies.
    shared: bool = False

    @property
    def filtered(self) -> bool:
        return bool(self.status_filter or self.app_filter or self.live_filter)

    @property
    def tree_read(self) -> bool:
        return self.tree_root is not None

    @property
    def root_matches(self) -> bool | None:
        """Whether the tree read is the one the store was applied from (``None``: unknown)."""
        if self.tree_root is None or self.recorded_root is None:
            return None
        return self.tree_root == self.recorded_root

    def counts(self) -> dict[str, int]:
        """Shown tasks by status; every status present, zero or not."""
        out = dict.fromkeys(report_statuses(), 0)
        for t in self.tasks:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def live_counts(self) -> dict[LiveStatus, int]:
        """Shown tasks by live state; every state present, zero or not."""
        out = dict.fromkeys(LiveStatus, 0)
        for t in self.tasks:
            out[t.live.state] += 1
        return out

    def never_read(self) -> int:
        """Shown tasks with no observation at all (counted as ``unknown``)."""
        return sum(1 for t in self.tasks if t.live.never_read)

    def oldest_read_age_s(self) -> float | None:
        """The age of the oldest observation among the shown tasks (``None``: none read)."""
        ages = [t.live.age_s for t in self.tasks if t.live.age_s is not None]
        return max(ages) if ages else None

    def healed(self) -> list[TaskStatus]:
        """Shown tasks a call has healed, the latest heal first."""
        done = [(t.last_heal_at, t) for t in self.tasks if t.last_heal_at is not None]
        done.sort(key=lambda pair: (-pair[0].timestamp(), pair[1].key))
        return [t for _, t in done]

    def tree_counts(self) -> dict[TreeStatus, int]:
        out = dict.fromkeys(TreeStatus, 0)
        for t in self.tasks:
            if t.tree is not None:
                out[t.tree] += 1
        return out

    def notes(self) -> list[str]:
        """What the reader must know to read the table right."""
        out = []
        if not self.tree_read:
            out.append(
                f"no desired tree at {self.tree_path}: showing the state store alone "
                "(new, held and removed tasks are not shown; give the tree as DIR)"
            )
        elif self.root_matches is False:
            out.append(
                f"the state store was applied from {self.recorded_root}, not {self.tree_root}: "
                "tasks outside this tree show as not in the tree"
            )
        return out

    def to_json(self) -> dict[str, object]:
        """The stable ``status --output json`` shape (documented in docs/commands.md)."""
        return {
            "format_version": FORMAT_VERSION,
            "generated_at": format_time(self.generated_at),
            "tree": {
                "path": self.tree_path,
                "root": self.tree_root,
                "read": self.tree_read,
                "recorded_root": self.recorded_root,
                "root_matches": self.root_matches,
                "files": self.tree_files,
                "tasks": self.tree_tasks,
                "invalid_files": [f.to_json() for f in self.invalid_files],
            },
            "filters": {
                "status": sorted(self.status_filter),
                "app": sorted(self.app_filter),
                "live": [s.value for s in LiveStatus if s in self.live_filter],
            },
            "total": self.total,
            "counts": self.counts(),
            "tree_counts": {s.value: n for s, n in self.tree_counts().items()},
            "live_counts": {s.value: n for s, n in self.live_counts().items()},
            "leader": (None if self.leader is None else self.leader.to_json(now=self.generated_at)),
            "tasks": [t.to_json() for t in self.tasks],
        }


def _record(row: StoredTask) -> AppliedRecord:
    return AppliedRecord(row.key, row.business_id, row.fields, row.source_path, row.failed_spec)


def build_report(
    rows: Sequence[StoredTask],
    *,
    index: DesiredIndex | None,
    now: datetime,
    observations: Mapping[TaskKey, Observation] | None = None,
    tree_path: str | None = None,
    tree_root: str | None = None,
    recorded_root: str | None = None,
    statuses: Collection[str] = frozenset(),
    apps: Collection[str] = frozenset(),
    lives: Collection[LiveStatus] = frozenset(),
) -> StatusReport:
    """Join the store's ``rows`` and ``observations`` with the tree ``index``.

    ``index`` ``None``: no tree was read, the store alone is shown.

    ``now`` dates the report and ages the observations. ``statuses``, ``apps``
    and ``lives`` filter the tasks shown (empty: no filter); the invalid files
    are reported whatever the filters.
    """
    by_key = {r.key: r for r in rows}
    desired: Mapping[TaskKey, DesiredTask] = {} if index is None else index.tasks
    seen = (observations or {}).get
    entries: list[TaskStatus] = []
    invalid: list[InvalidFile] = []
    if index is None:
        for r in rows:
            live = live_view(seen(r.key), now)
            entries.append(TaskStatus(r.key, r.status.value, None, None, r, None, live=live))
    else:
        held_files = index.invalid_files
        plan = compute_plan(
            desired, {k: _record(r) for k, r in by_key.items()}, held_files=held_files
        )
        calls = {c.key: c for c in plan.calls}
        blocked = {b.task.key for b in plan.blocked}
        held = {h.key: h.source_path for h in plan.held}
        held_per_file: dict[str, int] = {}
        for path in held.values():
            held_per_file[path] = held_per_file.get(path, 0) + 1
        for key in sorted(by_key.keys() | desired.keys()):
            row, task = by_key.get(key), desired.get(key)
            status = NEW if row is None else row.status.value
            live = live_view(seen(key), now)
            if task is not None:
                call = calls.get(key)
                action = (
                    NextAction.CALL
                    if call is not None
                    else NextAction.BLOCKED
                    if key in blocked
                    else NextAction.NONE
                )
                entries.append(
                    TaskStatus(key, status, TreeStatus.IN_TREE, action, row, task, call, live=live)
                )
            elif key in held:
                entries.append(
                    TaskStatus(
                        key,
                        status,
                        TreeStatus.HELD,
                        NextAction.HOLD,
                        row,
                        None,
                        held_by=held[key],
                        live=live,
                    )
                )
            else:
                entries.append(
                    TaskStatus(
                        key, status, TreeStatus.NOT_IN_TREE, NextAction.FORGET, row, None, live=live
                    )
                )
        firsts: dict[str, Problem] = {}
        counts: dict[str, int] = {}
        for p in index.problems:  # sorted by place, so the first seen is the first
            firsts.setdefault(p.source.path, p)
            counts[p.source.path] = counts.get(p.source.path, 0) + 1
        invalid = [
            InvalidFile(path, firsts[path], counts[path], held_per_file.get(path, 0))
            for path in sorted(firsts)
        ]
    total = len(entries)
    status_filter, app_filter, live_filter = frozenset(statuses), frozenset(apps), frozenset(lives)
    shown = tuple(
        e
        for e in entries
        if (not status_filter or e.status in status_filter)
        and (not app_filter or e.key.app_id in app_filter)
        and (not live_filter or e.live.state in live_filter)
    )
    return StatusReport(
        generated_at=now,
        tree_path=tree_path,
        tree_root=tree_root if index is not None else None,
        recorded_root=recorded_root,
        tree_files=0 if index is None else len(index.paths),
        tree_tasks=len(desired),
        invalid_files=tuple(invalid),
        tasks=shown,
        total=total,
        status_filter=status_filter,
        app_filter=app_filter,
        live_filter=live_filter,
    )
