"""The dashboard: read-only HTML pages at ``/`` on the daemon's health port.

``GET /`` shows counts by sync status and by live state, a *needs
attention* list (Failed, OutOfSync and NotRunning tasks, invalid desired
files with their problems, stale observations) with reasons and since-when,
a *recent activity* panel (the latest heals, restarts, drift, failures and
holds, each with its time and task) and a filtered, paged task list.
``GET /task?app=&room=&task=`` shows one task: desired, last-applied and
live values side by side, where it is declared, what the next pass would
do, when it was last healed and why (from the store), its last changes and,
apart, its latest routine events (reads), which cannot push the changes out. Filters are a
plain GET form (status, live state, AppId, path glob, free text); pages
refresh themselves with ``<meta http-equiv="refresh">`` unless ``refresh=0``.
No route changes anything, and no page needs JavaScript.

Three layers, like the rest of the reconciler:

- **Reading** (:class:`Dashboard`): a snapshot per request. The in-memory
  part (the daemon's desired index, invalid files, observations) is read on
  the event loop, where the daemon mutates it, so it is consistent. The
  store is read on a read-only connection of its own in a worker thread
  (SQLite releases the GIL), so paging and counting 100k rows never holds
  the loop. Tasks are paged in SQL (:meth:`Store.page_tasks`); tasks
  the tree declares and the store has never seen (``New``) are in memory
  only, sorted, and merged into the key order by rank (:func:`merge_page`).
- **Joining**: the page's rows and the tree's declarations for those keys go
  through :func:`reconciler.serve.status.build_report`, so a task's status, tree
  state, next action and live axis here are exactly what ``reconciler
  status`` says.
- **Viewing**: pure functions from the snapshot (:class:`Overview`,
  :class:`TaskDetail`) to view models of plain strings
  (:func:`index_page`, :func:`task_page`), rendered by Jinja2 templates
  under ``reconciler/serve/templates/`` with autoescaping on: every value from a
  file, the store, the server or an event is escaped.

Nothing here can show a secret: events come from the redacted copies
(:mod:`reconciler.serve.recent_events`), and no other source holds credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import heapq
import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypedDict
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import (
    MANAGED_FIELDS,
    DesiredTask,
    FieldValue,
    Source,
    SyncStatus,
    TaskKey,
)
from reconciler.engine.observe import sweep_seconds
from reconciler.eventlog.setup import subscribe
from reconciler.serve.recent_events import Event, RecentEvents, activity_kind, task_key
from reconciler.serve.status import (
    NEW,
    StatusReport,
    TaskStatus,
    build_report,
    parse_live_states,
    parse_statuses,
    report_statuses,
)
from reconciler.store.base import (
    Store,
    StoredTask,
    StoreError,
    StoreLocation,
    TaskQuery,
    format_time,
    heal_reason,
)
from reconciler.tree.desired import DesiredIndex, FileResult, Problem

if TYPE_CHECKING:
    from reconciler.engine.daemon import Daemon

PER_PAGE: Final = 50
MAX_PER_PAGE: Final = 500
#: Seconds between automatic refreshes of a page.
REFRESH_S: Final = 10
#: Tasks of each kind listed under "needs attention" (the counts say how many in all).
ATTENTION_LIMIT: Final = 20
#: Problems shown per invalid file.
PROBLEMS_PER_FILE: Final = 5
#: A task page's last changes shown, and its latest routine events (reads) apart.
TASK_EVENTS: Final = 20
TASK_ROUTINE_EVENTS: Final = 10
#: Entries of the overview's recent-activity panel.
ACTIVITY_LIMIT: Final = 20
#: The statuses that need a person's attention.
ATTENTION_STATUSES: Final = (SyncStatus.FAILED, SyncStatus.OUT_OF_SYNC, SyncStatus.NOT_RUNNING)
#: An observation is stale after this many full read sweeps (and never sooner than the floor).
STALE_SWEEPS: Final = 3
STALE_FLOOR_S: Final = 30.0
#: Event fields every event has or the page already shows.
_EVENT_HEADER: Final = frozenset({"event", "level", "timestamp", "app_id", "room_id", "task_id"})


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Filters:
    """What the task list is narrowed to, and which page of it; the form's GET parameters."""

    statuses: frozenset[str] = frozenset()
    lives: frozenset[LiveStatus] = frozenset()
    apps: frozenset[str] = frozenset()
    path: str = ""
    text: str = ""
    page: int = 1
    per_page: int = PER_PAGE
    #: ``False``: the page does not refresh itself (``refresh=0``).
    refresh: bool = True

    @property
    def active(self) -> bool:
        return bool(self.statuses or self.lives or self.apps or self.path or self.text)

    @property
    def wants_new(self) -> bool:
        return not self.statuses or NEW in self.statuses

    @property
    def wants_recorded(self) -> bool:
        return not self.statuses or bool(self.statuses - {NEW})

    def store_query(self) -> TaskQuery:
        return TaskQuery(
            statuses=self.statuses - {NEW},
            apps=self.apps,
            lives=frozenset(s.value for s in self.lives),
            path_glob=self.path or None,
            text=self.text or None,
        )

    def matches_new(self, task: DesiredTask, observation: Observation | None) -> bool:
        """The in-memory twin of :meth:`TaskQuery.where`, for tasks with no row."""
        if self.apps and task.key.app_id not in self.apps:
            return False
        if self.lives:
            state = LiveStatus.UNKNOWN if observation is None else observation.state
            if state not in self.lives:
                return False
        if self.path and not glob_match(task.source.path, self.path):
            return False
        if self.text:
            hay = f"{task.key.app_id} {task.key.room_id} {task.key.task_id} {task.source}"
            if self.text.lower() not in hay.lower():
                return False
        return True

    def params(self, **changes: object) -> list[tuple[str, str]]:
        """These filters as GET parameters (defaults left out), with ``changes`` applied."""
        values: dict[str, object] = {
            "status": sorted(self.statuses),
            "live": [s.value for s in LiveStatus if s in self.lives],
            "app": ",".join(sorted(self.apps)),
            "path": self.path,
            "q": self.text,
            "page": self.page,
            "per_page": self.per_page,
            "refresh": self.refresh,
        }
        values.update(changes)
        out: list[tuple[str, str]] = []
        for name, value in values.items():
            if isinstance(value, list):
                out.extend((name, str(v)) for v in value)
            elif (name, value) in (("page", 1), ("per_page", PER_PAGE)):
                continue
            elif name == "refresh":
                if value is False:
                    out.append((name, "0"))
            elif value:
                out.append((name, str(value)))
        return out

    def href(self, **changes: object) -> str:
        """A link to ``/`` with these filters and ``changes``."""
        query = urlencode(self.params(**changes))
        return f"/?{query}" if query else "/"


def glob_match(path: str, pattern: str) -> bool:
    """SQLite's ``GLOB`` in Python: case-sensitive, ``*`` crosses ``/``, ``[^...]`` negates."""
    return fnmatch.fnmatchcase(path, pattern.replace("[^", "[!"))


def parse_filters(query: Mapping[str, Sequence[str]]) -> Filters:
    """GET parameters (each name with all its values) → :class:`Filters`.

    A bad value is a :class:`ValueError` whose message says what is valid.
    """

    def every(name: str) -> list[str]:
        return [v for v in query.get(name, ()) if v.strip()]

    def last(name: str) -> str:
        values = query.get(name, ())
        return values[-1].strip() if values else ""

    def number(name: str, default: int, *, high: int | None = None) -> int:
        text = last(name)
        if not text:
            return default
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, not {text!r}") from None
        if n < 1 or (high is not None and n > high):
            upper = f" to {high}" if high is not None else " or more"
            raise ValueError(f"{name} must be 1{upper}, not {n}")
        return n

    apps = frozenset(a for part in every("app") for a in part.replace(",", " ").split())
    return Filters(
        statuses=parse_statuses(every("status")),
        lives=parse_live_states(every("live")),
        apps=apps,
        path=last("path"),
        text=last("q"),
        page=number("page", 1),
        per_page=number("per_page", PER_PAGE, high=MAX_PER_PAGE),
        refresh=last("refresh") not in ("0", "false", "no", "off"),
    )


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True, slots=True)
class InvalidFileInfo:
    path: str
    problems: tuple[Problem, ...]
    #: Recorded tasks the file's invalidity holds as they are.
    held_tasks: int
    #: When the daemon first reported it (ISO-8601), if its event is remembered.
    since: str | None


@dataclass(frozen=True, slots=True)
class StaleTask:
    key: TaskKey
    #: Seconds since the last read, or since the daemon started for a task never read.
    age_s: float
    never_read: bool


@dataclass(frozen=True, slots=True)
class Overview:
    """What ``/`` shows, read at one moment."""

    now: datetime
    filters: Filters
    #: Every task by sync status (``New`` included), unfiltered.
    counts: Mapping[str, int]
    live_counts: Mapping[LiveStatus, int]
    total: int
    readiness: str | None
    degraded: tuple[str, ...]
    invalid_files: tuple[InvalidFileInfo, ...]
    #: The latest tasks to enter a status of :data:`ATTENTION_STATUSES`.
    attention: tuple[TaskStatus, ...]
    #: ``None``: the daemon does not read live tasks, so nothing can be stale.
    stale_after_s: float | None
    stale_total: int
    stale: tuple[StaleTask, ...]
    #: The page of tasks (``report.tasks``) and how many match the filters in all.
    report: StatusReport
    matched: int
    #: The page shown (the one asked for, or the last one when that is beyond the end).
    page: int
    #: The latest heals, restarts, drift, failures and holds, newest first.
    activity: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class TaskDetail:
    """What ``/task`` shows for one task."""

    now: datetime
    task: TaskStatus
    #: Its last changes (calls, restarts, drift, failures, holds), newest first.
    events: tuple[Event, ...]
    observing: bool
    refresh: bool = True
    #: Its latest routine events (reads, attempts, queueing), newest first.
    routine: tuple[Event, ...] = ()


def new_tasks(
    desired: Mapping[TaskKey, DesiredTask], recorded: Mapping[TaskKey, object]
) -> list[DesiredTask]:
    """Tasks the tree declares that the store has never seen (status ``New``)."""
    # A set difference of the keys runs in C: 100k keys in a few milliseconds.
    return [desired[k] for k in desired.keys() - recorded.keys()]


def live_counts(
    observations: Mapping[TaskKey, Observation],
    *,
    desired: Collection[TaskKey],
    recorded: Collection[TaskKey],
    total: int,
) -> dict[LiveStatus, int]:
    """Tasks by live state; of ``total`` known tasks, those never read are ``unknown``.

    Observations of keys neither ``desired`` nor ``recorded`` (a task just
    forgotten) do not count.
    """
    out = dict.fromkeys(LiveStatus, 0)
    out.update(Counter(o.state for k, o in observations.items() if k in desired or k in recorded))
    out[LiveStatus.UNKNOWN] += max(0, total - sum(out.values()))
    return out


def stale_tasks(
    keys: Collection[TaskKey],
    observations: Mapping[TaskKey, Observation],
    *,
    now: float,
    started: float,
    after_s: float,
    limit: int,
) -> tuple[int, list[StaleTask]]:
    """How many of ``keys`` were last read more than ``after_s`` ago, and the oldest ``limit``.

    A task never read counts from ``started`` (the daemon's start): it is stale
    only once the daemon has had the time to read it.
    """
    # Over the observations, not the keys: at 100k tasks the common case (nothing
    # stale) then costs one pass in Python and one set difference in C.
    wanted = keys if isinstance(keys, Set) else frozenset(keys)
    cutoff = now - after_s
    found: list[tuple[float, TaskKey, bool]] = [
        (now - obs.observed_at, key, False)
        for key, obs in observations.items()
        if obs.observed_at < cutoff and key in wanted
    ]
    if started < cutoff:
        never = wanted - observations.keys()
        found.extend((now - started, key, True) for key in never)
    count = len(found)
    oldest = heapq.nlargest(limit, found, key=lambda item: (item[0], item[1]))
    return count, [StaleTask(key, age, never) for age, key, never in oldest]


def stale_after(tasks: int, *, interval: float, read_qps: int) -> float:
    """When an observation counts as stale: several sweeps over ``tasks`` late."""
    return max(
        STALE_FLOOR_S, STALE_SWEEPS * sweep_seconds(tasks, interval=interval, read_qps=read_qps)
    )


def invalid_file_infos(
    problems: Iterable[Problem],
    invalid: Collection[str],
    *,
    held: Mapping[str, int],
    since: Callable[[str], str | None],
) -> list[InvalidFileInfo]:
    """Invalid files (those ``invalid`` names and any with a problem), sorted by path."""
    by_path: dict[str, list[Problem]] = {path: [] for path in invalid}
    for p in problems:
        by_path.setdefault(p.source.path, []).append(p)
    return [
        InvalidFileInfo(path, tuple(by_path[path]), held.get(path, 0), since(path))
        for path in sorted(by_path)
    ]


def page_index(
    tasks: Iterable[DesiredTask], invalid: Mapping[str, Sequence[Problem]]
) -> DesiredIndex:
    """The part of the tree a page needs: its tasks, and which files are invalid.

    :func:`build_report` plans the tasks it is given against the tree; a
    task's plan depends only on its own declaration and on whether the file
    that recorded it is invalid, so this small index gives each task of the
    page the verdict the whole tree would.
    """
    by_path: dict[str, list[DesiredTask]] = {}
    for t in tasks:
        by_path.setdefault(t.source.path, []).append(t)
    results = [FileResult(path, tuple(ts), ()) for path, ts in by_path.items()]
    for path, problems in invalid.items():
        # A file in a cross-file conflict may have no problem at its own path.
        marks = tuple(problems) or (Problem(Source(path, 1, 1), None, "in conflict"),)
        results.append(FileResult(path, (), marks))
    return DesiredIndex.build(results)


def merge_page(
    store: Store,
    query: TaskQuery | None,
    new_keys: Sequence[TaskKey],
    *,
    offset: int,
    limit: int,
) -> tuple[list[StoredTask], list[TaskKey]]:
    """The rows and the ``New`` keys at ``offset`` of the key-sorted union of both.

    ``query`` ``None``: no row matches. ``new_keys`` is sorted. The number of
    ``New`` keys before ``offset`` is found by bisection: ``New`` key ``k``
    sits at ``k`` + (rows sorting before it), one counting query per step,
    so a page costs O(log n) small queries, not a scan of the union.
    """
    if query is None:
        return [], list(new_keys[offset : offset + limit])
    before = 0
    if new_keys and offset:
        lo, hi = 0, min(len(new_keys), offset)
        while lo < hi:
            mid = (lo + hi) // 2
            if mid + store.count_tasks(query, before=new_keys[mid]) < offset:
                lo = mid + 1
            else:
                hi = mid
        before = lo
    rows = store.page_tasks(query, offset=offset - before, limit=limit)
    fresh = list(new_keys[before : before + limit])
    recorded = {r.key for r in rows}
    # A task recorded since the snapshot of New keys is shown once, as its row.
    merged = sorted([*recorded, *(k for k in fresh if k not in recorded)])[:limit]
    keep = set(merged)
    return [r for r in rows if r.key in keep], [k for k in fresh if k in keep and k not in recorded]


# --------------------------------------------------------------------------- view models


def ago(seconds: float | None) -> str:
    """``42 s``, ``3 m 20 s``, ``5 h 2 m``, ``3 d 4 h`` (``—`` for ``None``)."""
    if seconds is None:
        return "—"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} m"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _since(at: datetime | None, now: datetime) -> tuple[str, str]:
    """(``3 m 20 s ago``, the ISO time) for a time in the past."""
    if at is None:
        return "—", ""
    return f"{ago((now - at).total_seconds())} ago", format_time(at) or ""


def _iso_since(text: str | None, now: datetime) -> tuple[str, str]:
    if not text:
        return "—", ""
    try:
        return _since(datetime.fromisoformat(text.replace("Z", "+00:00")), now)
    except ValueError:
        return text, text


def task_href(key: TaskKey, *, refresh: bool = True) -> str:
    params = [("app", key.app_id), ("room", key.room_id), ("task", key.task_id)]
    if not refresh:
        params.append(("refresh", "0"))
    return "/task?" + urlencode(params)


def _value(value: FieldValue | None) -> str:
    if value is None:
        return "—"
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Link:
    label: str
    href: str
    count: int = 0
    css: str = ""
    current: bool = False


@dataclass(frozen=True, slots=True)
class TaskRow:
    key: str
    href: str
    status: str
    status_css: str
    since: str
    since_title: str
    live: str
    live_css: str
    read_age: str
    next_action: str
    source: str
    error: str


@dataclass(frozen=True, slots=True)
class AttentionRow:
    kind: str
    css: str
    subject: str
    href: str
    reason: str
    since: str
    since_title: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActivityRow:
    time: str
    time_title: str
    kind: str
    css: str
    #: The task (or file) it is about, and the page that shows it; ``None`` when neither.
    subject: str
    href: str | None
    event: str
    details: str


@dataclass(frozen=True, slots=True)
class Pager:
    page: int
    pages: int
    first: int
    last: int
    matched: int
    prev_href: str | None
    next_href: str | None
    first_href: str | None
    last_href: str | None


@dataclass(frozen=True, slots=True)
class Choice:
    name: str
    value: str
    label: str
    checked: bool


@dataclass(frozen=True, slots=True)
class IndexPage:
    title: str
    generated: str
    refresh_s: int | None
    refresh_toggle: str
    refresh_label: str
    banner: str | None
    banner_css: str
    notes: tuple[str, ...]
    status_links: tuple[Link, ...]
    live_links: tuple[Link, ...]
    total: int
    attention: tuple[AttentionRow, ...]
    attention_more: tuple[Link, ...]
    activity: tuple[ActivityRow, ...]
    status_choices: tuple[Choice, ...]
    live_choices: tuple[Choice, ...]
    app: str
    path: str
    text: str
    per_page: int
    refresh: bool
    filtered: bool
    rows: tuple[TaskRow, ...]
    pager: Pager


def status_css(status: str) -> str:
    return {
        SyncStatus.SYNCED.value: "ok",
        SyncStatus.PENDING.value: "busy",
        NEW: "busy",
        SyncStatus.NOT_RUNNING.value: "warn",
        SyncStatus.OUT_OF_SYNC.value: "warn",
        SyncStatus.FAILED.value: "bad",
    }.get(status, "")


def live_css(state: LiveStatus) -> str:
    return {
        LiveStatus.RUNNING: "ok",
        LiveStatus.ENDED: "warn",
        LiveStatus.NOT_FOUND: "warn",
        LiveStatus.UNKNOWN: "dim",
    }[state]


class _Badges(TypedDict):
    """What a task row and a task page both show of a task's two axes."""

    status: str
    status_css: str
    since: str
    since_title: str
    live: str
    live_css: str
    next_action: str


def _badges(t: TaskStatus, now: datetime) -> _Badges:
    since, title = _since(t.status_since, now)
    return _Badges(
        status=t.status,
        status_css=status_css(t.status),
        since=since,
        since_title=title,
        live=t.live.state.value.replace("_", " "),
        live_css=live_css(t.live.state),
        next_action=_next(t),
    )


def task_row(t: TaskStatus, now: datetime, *, refresh: bool = True) -> TaskRow:
    return TaskRow(
        key=str(t.key),
        href=task_href(t.key, refresh=refresh),
        **_badges(t, now),
        read_age="never" if t.live.never_read else f"{ago(t.live.age_s)} ago",
        source=t.source or "—",
        error=t.last_error or "",
    )


def _next(t: TaskStatus) -> str:
    if t.next_action is None:
        return "—"
    if t.call is not None:
        return "call: " + ", ".join(c.field for c in t.call.changes)
    return {"none": "nothing", "hold": f"hold ({t.held_by})" if t.held_by else "hold"}.get(
        t.next_action.value, t.next_action.value
    )


def _attention(o: Overview) -> list[AttentionRow]:
    f = o.filters
    rows: list[AttentionRow] = []
    for t in o.attention:
        since, title = _since(t.status_since, o.now)
        rows.append(
            AttentionRow(
                kind=t.status,
                css=status_css(t.status),
                subject=str(t.key),
                href=task_href(t.key, refresh=f.refresh),
                reason=t.last_error or "—",
                since=since,
                since_title=title,
                details=(f"declared at {t.source}",) if t.source else (),
            )
        )
    for inv in o.invalid_files:
        since, title = _iso_since(inv.since, o.now)
        first = inv.problems[0] if inv.problems else None
        reason = "invalid" if first is None else _problem_text(first)
        more = [_problem_text(p) for p in inv.problems[1:PROBLEMS_PER_FILE]]
        if len(inv.problems) > PROBLEMS_PER_FILE:
            more.append(f"… and {len(inv.problems) - PROBLEMS_PER_FILE} more problems")
        more.append(
            f"holds {inv.held_tasks} recorded task{'s' * (inv.held_tasks != 1)} as they are"
        )
        rows.append(
            AttentionRow(
                kind="Invalid file",
                css="bad",
                subject=inv.path,
                href=f.href(path=inv.path, page=1),
                reason=reason,
                since=since,
                since_title=title,
                details=tuple(more),
            )
        )
    for s in o.stale:
        reason = (
            "never read since the daemon started"
            if s.never_read
            else f"last read {ago(s.age_s)} ago (stale after {ago(o.stale_after_s)})"
        )
        rows.append(
            AttentionRow(
                kind="Stale observation",
                css="warn",
                subject=str(s.key),
                href=task_href(s.key, refresh=f.refresh),
                reason=reason,
                since=f"{ago(s.age_s)} ago",
                since_title="",
            )
        )
    return rows


_ACTIVITY_CSS: Final = {
    "heal": "ok",
    "restart": "warn",
    "drift": "warn",
    "failure": "bad",
    "hold": "busy",
}


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _ms_text(ms: object) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "?"
    return format_time(datetime.fromtimestamp(ms / 1000, UTC)) or "?"


def activity_text(e: Event) -> str:
    """What an activity entry says, in a line: the heal's reason, what moved, the error."""
    name = e.get("event")
    changes, fields = e.get("changes"), e.get("fields")
    if activity_kind(e) == "heal" and isinstance(changes, Mapping):
        moved = [
            (str(n), c.get("old"), c.get("new"))
            for n, c in changes.items()
            if isinstance(c, Mapping)
        ]
        return heal_reason(str(e.get("cause")), moved)
    if name == "task.restarted":
        return (
            f"a new incarnation: StartTime {_ms_text(e.get('old_start_time'))} → "
            f"{_ms_text(e.get('new_start_time'))}"
        )
    if name == "task.drifted" and isinstance(fields, Mapping):
        moved_text = ", ".join(
            f"{n} {_json(c.get('last_applied'))} → {_json(c.get('live'))}"
            for n, c in fields.items()
            if isinstance(c, Mapping)
        )
        left = "healed" if e.get("policy") == "heal" else "reported and left (--drift report)"
        return f"changed by another client: {moved_text}; {left}"
    if name == "task.not_running" and e.get("source") == "observation":
        why = e.get("stop_reason")
        return f"read {e.get('state')}" + (f": {why}" if why else "")
    if name == "desired.invalid_file":
        problems = e.get("problems")
        first = problems[0] if isinstance(problems, list) and problems else None
        held = e.get("held_tasks")
        text = "invalid" if first is None else str(first)
        return text + (f"; holds {held} recorded task(s) as they are" if held else "")
    if name == "plan.mass_change_held":
        return (
            f"{e.get('changes')} changes of {e.get('known')} tasks exceed --max-change "
            f"{e.get('max_change')}: held"
        )
    if name == "plan.mass_forget_refused":
        return (
            f"{e.get('forget')} of {e.get('known')} tasks to forget exceed --max-forget "
            f"{e.get('max_forget')}: kept"
        )
    message = e.get("message") or e.get("reason") or e.get("error")
    code = e.get("code")
    if message:
        return f"{code}: {message}" if code else str(message)
    return _details(e)


def activity_row(e: Event, now: datetime, *, refresh: bool = True) -> ActivityRow:
    kind = activity_kind(e) or "event"
    when, title = _iso_since(str(e.get("timestamp", "")), now)
    key = task_key(e)
    path = e.get("path")
    subject, href = "—", None
    if key is not None:
        subject, href = str(key), task_href(key, refresh=refresh)
    elif isinstance(path, str):
        subject, href = path, Filters(refresh=refresh).href(path=path)
    return ActivityRow(
        time=when,
        time_title=title,
        kind=kind,
        css=_ACTIVITY_CSS.get(kind, "dim"),
        subject=subject,
        href=href,
        event=str(e.get("event", "")),
        details=activity_text(e),
    )


def _problem_text(p: Problem) -> str:
    where = f"line {p.source.line}:{p.source.column}"
    return f"{where}: {p.field}: {p.message}" if p.field else f"{where}: {p.message}"


def _pager(o: Overview) -> Pager:
    f = o.filters
    pages = max(1, -(-o.matched // f.per_page))
    page = o.page
    first = (page - 1) * f.per_page + 1 if o.matched else 0
    last = min(o.matched, page * f.per_page)
    return Pager(
        page=page,
        pages=pages,
        first=first,
        last=last,
        matched=o.matched,
        prev_href=f.href(page=page - 1) if page > 1 else None,
        next_href=f.href(page=page + 1) if page < pages else None,
        first_href=f.href(page=1) if page > 2 else None,
        last_href=f.href(page=pages) if page < pages - 1 else None,
    )


def index_page(o: Overview) -> IndexPage:
    """The view model of ``/``: every string the template prints, already decided."""
    f = o.filters
    unfiltered = Filters(refresh=f.refresh, per_page=f.per_page)
    status_links = tuple(
        Link(
            s,
            unfiltered.href(status=[s]),
            o.counts.get(s, 0),
            status_css(s),
            f.statuses == {s},
        )
        for s in report_statuses()
    )
    live_links = tuple(
        Link(
            s.value.replace("_", " "),
            unfiltered.href(live=[s.value]),
            o.live_counts.get(s, 0),
            live_css(s),
            f.lives == {s},
        )
        for s in LiveStatus
    )
    more = []
    for s in ATTENTION_STATUSES:
        n = o.counts.get(s.value, 0)
        if n > sum(1 for t in o.attention if t.status == s.value):
            more.append(Link(f"all {n} {s.value}", unfiltered.href(status=[s.value]), n))
    if o.readiness is not None:
        banner, banner_css = f"Not ready: {o.readiness}", "bad"
    elif o.degraded:
        banner, banner_css = "Ready, degraded: " + "; ".join(o.degraded), "warn"
    else:
        banner, banner_css = None, ""
    notes = []
    if o.stale_total > len(o.stale):
        notes.append(f"{o.stale_total} observations are stale in all; the oldest are listed")
    if o.stale_after_s is None:
        notes.append("live reads are off (--no-observe): live states are not checked")
    return IndexPage(
        title="reconciler",
        generated=format_time(o.now) or "",
        refresh_s=REFRESH_S if f.refresh else None,
        refresh_toggle=f.href(refresh=not f.refresh),
        refresh_label="pause auto-refresh" if f.refresh else "resume auto-refresh",
        banner=banner,
        banner_css=banner_css,
        notes=tuple(notes),
        status_links=status_links,
        live_links=live_links,
        total=o.total,
        attention=tuple(_attention(o)),
        attention_more=tuple(more),
        activity=tuple(activity_row(e, o.now, refresh=f.refresh) for e in o.activity),
        status_choices=tuple(Choice("status", s, s, s in f.statuses) for s in report_statuses()),
        live_choices=tuple(
            Choice("live", s.value, s.value.replace("_", " "), s in f.lives) for s in LiveStatus
        ),
        app=",".join(sorted(f.apps)),
        path=f.path,
        text=f.text,
        per_page=f.per_page,
        refresh=f.refresh,
        filtered=f.active,
        rows=tuple(task_row(t, o.now, refresh=f.refresh) for t in o.report.tasks),
        pager=_pager(o),
    )


@dataclass(frozen=True, slots=True)
class ValueRow:
    field: str
    desired: str
    applied: str
    live: str
    #: Desired differs from last-applied / live differs from last-applied.
    pending: bool
    drifted: bool


@dataclass(frozen=True, slots=True)
class EventRow:
    time: str
    level: str
    level_css: str
    event: str
    details: str


@dataclass(frozen=True, slots=True)
class TaskPage:
    title: str
    generated: str
    refresh_s: int | None
    refresh_toggle: str
    refresh_label: str
    back: str
    key: str
    facts: tuple[tuple[str, str], ...]
    status: str
    status_css: str
    since: str
    since_title: str
    live: str
    live_css: str
    read: str
    next_action: str
    values: tuple[ValueRow, ...]
    values_note: str
    live_facts: tuple[tuple[str, str], ...]
    events: tuple[EventRow, ...]
    routine: tuple[EventRow, ...]
    observing: bool


def _details(e: Event) -> str:
    """An event's own fields as ``name=value`` pairs (those every event has left out)."""
    rest = []
    for name, value in e.items():
        if name in _EVENT_HEADER:
            continue
        rest.append(f"{name}={value if isinstance(value, str) else _json(value)}")
    return "  ".join(rest)


def _event_row(e: Event, now: datetime) -> EventRow:
    level = str(e.get("level", ""))
    when, _ = _iso_since(str(e.get("timestamp", "")), now)
    return EventRow(
        time=when,
        level=level,
        level_css={"warning": "warn", "error": "bad", "critical": "bad"}.get(level, "dim"),
        event=str(e.get("event", "")),
        details=_details(e),
    )


def task_page(d: TaskDetail) -> TaskPage:
    """The view model of ``/task``."""
    t, r = d.task, d.task.record
    desired = {} if t.desired is None else dict(t.desired.fields)
    applied: Mapping[str, FieldValue] = {} if r is None or r.fields is None else r.fields
    obs = t.live.observation
    live: Mapping[str, FieldValue] = {} if obs is None else obs.fields
    values = tuple(
        ValueRow(
            field=name,
            desired=_value(desired.get(name)) if t.desired is not None else "(not in the tree)",
            applied=_value(applied.get(name)),
            live=_value(live.get(name)),
            pending=t.desired is not None and desired.get(name) != applied.get(name),
            drifted=obs is not None and name in live and live.get(name) != applied.get(name),
        )
        for name in MANAGED_FIELDS
    )
    note = ""
    if t.desired is not None and not desired:
        note = "The file declares no managed field: nothing is sent."
    elif r is None or r.fields is None:
        note = "No call has succeeded yet: the first sends every managed field."
    facts: list[tuple[str, str]] = [
        ("AppId", t.key.app_id),
        ("RoomId", t.key.room_id),
        ("TaskId", t.key.task_id),
        (
            "BusinessId",
            (t.desired.business_id if t.desired else r.business_id if r else None) or "—",
        ),
        ("Declared at", t.source or "—"),
        ("In the tree", "—" if t.tree is None else t.tree.value.replace("_", " ")),
    ]
    if t.held_by:
        facts.append(("Held by invalid file", t.held_by))
    if r is not None:
        facts += [
            ("Attempts since last success", str(r.attempts)),
            ("Last call", _since(r.last_call_at, d.now)[0]),
            ("Last applied", _since(r.applied_at, d.now)[0]),
            ("Request id (last success)", r.request_id or "—"),
            ("Next retry", format_time(r.next_retry_at) or "—"),
            (
                "Last healed",
                "never"
                if r.last_heal_at is None
                else f"{_since(r.last_heal_at, d.now)[0]}: {r.last_heal_reason or '—'}",
            ),
        ]
        if r.last_error:
            facts += [
                ("Last error code", r.last_error_code or "—"),
                ("Last error", r.last_error),
                ("Request id (last error)", r.last_error_request_id or "—"),
            ]
    live_facts: list[tuple[str, str]] = []
    if obs is not None:
        o = t.live.to_json()
        live_facts = [
            ("Observed", f"{ago(t.live.age_s)} ago ({o['observed_at']})"),
            ("Started (incarnation)", str(o["start_time"] or "—")),
            ("Ended", str(o["end_time"] or "—")),
            ("Stop reason", str(o["stop_reason"] or "—")),
            ("API Status", "—" if obs.status is None else str(obs.status)),
        ]
    back = "/" if d.refresh else "/?refresh=0"
    return TaskPage(
        title=f"{t.key} · reconciler",
        generated=format_time(d.now) or "",
        refresh_s=REFRESH_S if d.refresh else None,
        refresh_toggle=task_href(t.key, refresh=not d.refresh),
        refresh_label="pause auto-refresh" if d.refresh else "resume auto-refresh",
        back=back,
        key=str(t.key),
        facts=tuple(facts),
        **_badges(t, d.now),
        read="never read" if t.live.never_read else f"read {ago(t.live.age_s)} ago",
        values=values,
        values_note=note,
        live_facts=tuple(live_facts),
        events=tuple(_event_row(e, d.now) for e in d.events),
        routine=tuple(_event_row(e, d.now) for e in d.routine),
        observing=d.observing,
    )


# --------------------------------------------------------------------------- templates


def environment() -> jinja2.Environment:
    """Templates from the package; autoescape on for every template, undefined names fail."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("reconciler.serve", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


# --------------------------------------------------------------------------- reading and serving


@dataclass
class _Timing:
    """Where a request's time went: on the event loop, and in all."""

    started: float = field(default_factory=time.perf_counter)
    loop_s: float = 0.0

    @contextlib.contextmanager
    def on_loop(self) -> Any:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.loop_s += time.perf_counter() - t0

    def header(self) -> str:
        total = (time.perf_counter() - self.started) * 1000
        return f"total;dur={total:.1f}, loop;dur={self.loop_s * 1000:.1f}"


class Dashboard:
    """The dashboard's routes over a running :class:`~reconciler.engine.daemon.Daemon`."""

    def __init__(
        self, *, daemon: Daemon, store_path: StoreLocation, events: RecentEvents | None = None
    ) -> None:
        """``events``: the buffer of recent events; by default one of its own, subscribed
        to every event while the app runs (from before the daemon's first pass)."""
        self._daemon = daemon
        self._store_path = store_path
        self._events = RecentEvents() if events is None else events
        self._unsubscribe: Callable[[], None] | None = None
        self._store: Store | None = None
        # One request at a time on the read connection (and a bound on the work).
        self._reading = asyncio.Lock()
        self._templates = environment()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/task", self._task)
        app.on_startup.append(self._subscribe)
        app.on_cleanup.append(self._close)

    async def _subscribe(self, _: web.Application) -> None:
        self._unsubscribe = subscribe(self._events)

    async def _close(self, _: web.Application) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _read_store(self) -> Store:
        """The read-only connection, opened on first use (in the worker thread)."""
        if self._store is None:
            self._store = Store.open(self._store_path, read_only=True)
        return self._store

    async def _in_thread(self, work: Callable[[Store], Any]) -> Any:
        async with self._reading:
            return await asyncio.to_thread(lambda: work(self._read_store()))

    # -- snapshots ------------------------------------------------------------------

    def _invalid(self) -> tuple[list[InvalidFileInfo], dict[str, list[Problem]]]:
        d = self._daemon
        problems = [*d.index.problems, *d.scan_problems]
        invalid = d.index.invalid_files
        held: dict[str, int] = {}
        if invalid:
            desired = d.index.tasks
            for key, r in d.recorder.applied.items():
                if r.source in invalid and key not in desired:
                    held[r.source] = held.get(r.source, 0) + 1
        infos = invalid_file_infos(problems, invalid, held=held, since=self._events.invalid_since)
        return infos, {i.path: list(i.problems) for i in infos if i.path in invalid}

    def _report(
        self,
        rows: Sequence[StoredTask],
        keys: Iterable[TaskKey],
        invalid: Mapping[str, Sequence[Problem]],
        now: datetime,
    ) -> StatusReport:
        d = self._daemon
        desired = d.index.tasks
        wanted = {*keys, *(r.key for r in rows)}
        tasks = [desired[k] for k in wanted if k in desired]
        observations = d.recorder.observations
        return build_report(
            rows,
            index=page_index(tasks, invalid),
            now=now,
            observations={k: observations[k] for k in wanted if k in observations},
        )

    async def overview(self, filters: Filters, timing: _Timing | None = None) -> Overview:
        timing = timing or _Timing()
        d = self._daemon
        with timing.on_loop():
            now = datetime.now(UTC)
            desired = d.index.tasks
            applied = d.recorder.applied
            observations = d.recorder.observations
            new = new_tasks(desired, applied)
            new_keys = (
                sorted(t.key for t in new if filters.matches_new(t, observations.get(t.key)))
                if filters.wants_new
                else []
            )
            total = len(applied) + len(new)
            lives = live_counts(observations, desired=desired, recorded=applied, total=total)
            cfg = d.config
            stale_s: float | None = None
            stale_n, stale = 0, list[StaleTask]()
            if cfg.observe:
                stale_s = stale_after(
                    len(desired), interval=cfg.observe_interval, read_qps=cfg.read_qps
                )
                stale_n, stale = stale_tasks(
                    desired.keys(),
                    observations,
                    now=now.timestamp(),
                    started=d.started_wall,
                    after_s=stale_s,
                    limit=ATTENTION_LIMIT,
                )
            infos, invalid = self._invalid()
            readiness, degraded = d.readiness(), tuple(d.degraded())
            activity = tuple(self._events.activity(limit=ACTIVITY_LIMIT))

        query = filters.store_query() if filters.wants_recorded else None

        def read(store: Store) -> tuple[Any, ...]:
            counts = store.counts()
            if query is None:
                recorded = 0
            elif query == TaskQuery():
                recorded = sum(counts.values())  # no filter: the counts say it
            else:
                recorded = store.count_tasks(query)
            matched = len(new_keys) + recorded
            pages = max(1, -(-matched // filters.per_page))
            page = min(filters.page, pages)
            rows, keys = merge_page(
                store,
                query,
                new_keys,
                offset=(page - 1) * filters.per_page,
                limit=filters.per_page,
            )
            attention = store.latest_in_status(ATTENTION_STATUSES, limit=ATTENTION_LIMIT)
            return counts, matched, page, rows, keys, attention

        counts, matched, page, rows, keys, attention = await self._in_thread(read)
        with timing.on_loop():
            all_counts = {s: 0 for s in report_statuses()}
            all_counts.update({s.value: n for s, n in counts.items()})
            all_counts[NEW] = len(new)
            report = self._report(rows, keys, invalid, now)
            troubled = self._report(attention, (), invalid, now)
            order = {r.key: i for i, r in enumerate(attention)}
            return Overview(
                now=now,
                filters=filters,
                counts=all_counts,
                live_counts=lives,
                total=total,
                readiness=readiness,
                degraded=degraded,
                invalid_files=tuple(infos),
                attention=tuple(sorted(troubled.tasks, key=lambda t: order[t.key])),
                stale_after_s=stale_s,
                stale_total=stale_n,
                stale=tuple(stale),
                report=report,
                matched=matched,
                page=page,
                activity=activity,
            )

    async def detail(
        self, key: TaskKey, *, refresh: bool = True, timing: _Timing | None = None
    ) -> TaskDetail | None:
        """One task, or ``None`` when neither the tree nor the store knows it."""
        timing = timing or _Timing()
        row = await self._in_thread(lambda store: store.get(key))
        with timing.on_loop():
            now = datetime.now(UTC)
            if row is None and key not in self._daemon.index.tasks:
                return None
            _, invalid = self._invalid()
            report = self._report([] if row is None else [row], [key], invalid, now)
            (task,) = report.tasks
            return TaskDetail(
                now=now,
                task=task,
                events=tuple(self._events.changes_of(key, limit=TASK_EVENTS)),
                observing=self._daemon.config.observe,
                refresh=refresh,
                routine=tuple(self._events.routine_of(key, limit=TASK_ROUTINE_EVENTS)),
            )

    # -- handlers ---------------------------------------------------------------------

    def _html(
        self, template: str, timing: _Timing, *, status: int = 200, **context: Any
    ) -> web.Response:
        with timing.on_loop():
            body = self._templates.get_template(template).render(**context)
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Server-Timing": timing.header(),
                "Cache-Control": "no-store",
                # The pages need no script, style from elsewhere or frame: forbid them all.
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
                " img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    def _error(self, timing: _Timing, status: int, message: str) -> web.Response:
        page = {
            "title": f"{status} · reconciler",
            "refresh_s": None,
            "generated": format_time(datetime.now(UTC)),
            "refresh_toggle": "/",
            "refresh_label": "the dashboard",
        }
        return self._html(
            "error.html", timing, status=status, page=page, status_code=status, message=message
        )

    async def _index(self, request: web.Request) -> web.Response:
        timing = _Timing()
        try:
            filters = parse_filters({k: request.query.getall(k) for k in request.query})
        except ValueError as exc:
            return self._error(timing, 400, str(exc))
        try:
            overview = await self.overview(filters, timing)
        except StoreError as exc:
            return self._error(timing, 503, str(exc))
        return self._html("index.html", timing, page=index_page(overview))

    async def _task(self, request: web.Request) -> web.Response:
        timing = _Timing()
        q = request.query
        app, room, task = q.get("app", ""), q.get("room", ""), q.get("task", "")
        if not (app and room and task):
            return self._error(timing, 400, "a task is named by app, room and task")
        refresh = q.get("refresh", "") not in ("0", "false", "no", "off")
        try:
            detail = await self.detail(TaskKey(app, room, task), refresh=refresh, timing=timing)
        except StoreError as exc:
            return self._error(timing, 503, str(exc))
        if detail is None:
            return self._error(timing, 404, f"no task {app}/{room}/{task} in the tree or the store")
        return self._html("task.html", timing, page=task_page(detail))
