"""Recent events, kept in memory for the dashboard: bounded whatever the number of tasks.

:class:`RecentEvents` is an :func:`reconciler.eventlog.setup.subscribe` subscriber:
it sees the redacted copy of every event written (never the raw one) and
sorts each into rings, each with a per-task index:

- **all**: the last :attr:`~RecentEvents.size` events of any kind, so the
  latest activity is there however quiet or busy the daemon is;
- **activity**: the last :attr:`~RecentEvents.activity_size` heals, restarts,
  drift, failures and holds (:func:`activity_kind`), for the overview's
  recent-activity panel and the task pages; a failure that says again what
  the task's last one said (each retry of a task not running) is not news:
  it is kept with the notable ones instead;
- **notable**: the last :attr:`~RecentEvents.notable_size` other warnings
  and errors that are not routine;
- **changes**: the last :attr:`~RecentEvents.changes_size` other events
  about a task that are not routine (a call that synced it, a release, a
  forget).

*Routine* events (:func:`is_routine`) are the bookkeeping of every read and
every attempt: ``observe.*``, ``call.*`` (a GetSegmentTask read is a
``call.succeeded``; an UpdateSegment's outcome is said again by its
``task.*`` event), ``task.queued``, ``task.requeued``, ``task.matches_live``
(debug events included: subscribers hear every level). They go to *all*
only, so a busy daemon's reads (a few a second per hundred tasks) cannot
push a task's last changes out of the other rings: a task that was healed
or failed an hour ago still shows it after thousands of reads, and a first
sync's thousands of ``task.synced`` cannot push out a failure either.

A task's last changes are its entries in the three kept rings, newest
first; its routine events are its entries in *all*. The per-task index only
points into the rings: an event leaves the index when its ring drops it, and
each task keeps at most :attr:`~RecentEvents.per_task` entries in each kept
ring and :attr:`~RecentEvents.routine_per_task` in *all*. So memory is
bounded by the ring sizes (a few thousand small dicts, a few MB), not by the
tasks: 100k tasks with events cost no more than 100.

It also remembers since when each desired file has been reported invalid
(``desired.invalid_file`` / ``desired.refused_path`` until
``desired.file_fixed``), which no store row records.

The subscriber is called on whichever thread logged; it takes one lock for
a few dict and deque operations and returns, as a subscriber must.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from reconciler.core.plan import HEALS
from reconciler.core.task import TaskKey

Event = Mapping[str, Any]

#: Events about a file's validity, and what they do to its since-time.
_INVALID_EVENTS: Final = frozenset({"desired.invalid_file", "desired.refused_path"})
_FIXED_EVENT: Final = "desired.file_fixed"
_NOTABLE_LEVELS: Final = frozenset({"warning", "error", "critical"})
#: Invalid files remembered at most (a tree of thousands of broken files is its own news).
_MAX_INVALID: Final = 10_000

#: Routine events: every read's and every attempt's bookkeeping (see :func:`is_routine`).
ROUTINE_PREFIXES: Final = ("observe.", "call.", "client.", "emulator.")
ROUTINE_EVENTS: Final = frozenset({"task.queued", "task.requeued", "task.matches_live"})
#: Not kept at all: a call about to go, which its outcome's event says again (a
#: subscriber hears debug events too; this one would halve what the rings hold).
UNKEPT_EVENTS: Final = frozenset({"call.sending"})

#: The recent-activity kinds, by event name (a heal is a ``task.synced`` whose
#: ``cause`` is ``restart`` or ``drift``: see :func:`activity_kind`).
ACTIVITY: Final[Mapping[str, str]] = {
    "task.restarted": "restart",
    "task.drifted": "drift",
    "task.failed": "failure",
    "task.error": "failure",
    "task.not_running": "failure",
    "daemon.paused": "failure",
    "rollout.canary_failed": "failure",
    "task.waiting": "hold",
    "desired.invalid_file": "hold",
    "desired.refused_path": "hold",
    "plan.mass_change_held": "hold",
    "plan.mass_forget_refused": "hold",
}


def task_key(event: Event) -> TaskKey | None:
    """The task an event is about (its ``app_id``, ``room_id``, ``task_id``), if any."""
    app, room, task = event.get("app_id"), event.get("room_id"), event.get("task_id")
    if isinstance(app, str) and isinstance(room, str) and isinstance(task, str):
        return TaskKey(app, room, task)
    return None


def is_routine(event: Event) -> bool:
    """Whether ``event`` is bookkeeping of a read or an attempt, not a change of a task."""
    name = event.get("event")
    if not isinstance(name, str):
        return False
    return name in ROUTINE_EVENTS or name.startswith(ROUTINE_PREFIXES)


def activity_kind(event: Event) -> str | None:
    """``heal``, ``restart``, ``drift``, ``failure`` or ``hold``; ``None`` for other events."""
    name = event.get("event")
    if name == "task.synced":
        return "heal" if event.get("cause") in HEALS else None
    return ACTIVITY.get(name) if isinstance(name, str) else None


def _repeats(last: Event | None, event: Event) -> bool:
    """Whether ``event`` says again what the task's last activity said (a retry of a
    NotRunning or failed task ending the same way): the panel keeps the first."""
    if last is None:
        return False
    return all(last.get(f) == event.get(f) for f in ("event", "code", "terminal", "state"))


class _Ring:
    """The last ``size`` entries, and per task the last ``per_task`` of them still held."""

    __slots__ = ("_by_task", "_entries", "_per_task", "_size")

    def __init__(self, *, size: int, per_task: int) -> None:
        self._size = size
        self._per_task = per_task
        self._entries: deque[tuple[int, TaskKey | None, Event]] = deque()
        self._by_task: dict[TaskKey, deque[tuple[int, Event]]] = {}

    def add(self, seq: int, key: TaskKey | None, event: Event) -> None:
        self._entries.append((seq, key, event))
        if key is not None:
            mine = self._by_task.get(key)
            if mine is None:
                mine = self._by_task[key] = deque(maxlen=self._per_task)
            mine.append((seq, event))
        if len(self._entries) > self._size:
            old_seq, old_key, _ = self._entries.popleft()
            if old_key is not None:
                theirs = self._by_task[old_key]
                # It may be gone already: the task's own cap dropped it earlier.
                if theirs and theirs[0][0] == old_seq:
                    theirs.popleft()
                if not theirs:
                    del self._by_task[old_key]

    def latest(self, limit: int) -> list[tuple[int, Event]]:
        out: list[tuple[int, Event]] = []
        for seq, _, event in reversed(self._entries):
            if len(out) >= limit:
                break
            out.append((seq, event))
        return out

    def of(self, key: TaskKey) -> list[tuple[int, Event]]:
        return list(self._by_task.get(key, ()))

    def last_of(self, key: TaskKey) -> Event | None:
        mine = self._by_task.get(key)
        return mine[-1][1] if mine else None

    def tasks(self) -> set[TaskKey]:
        return set(self._by_task)

    def __len__(self) -> int:
        return len(self._entries)


class RecentEvents:
    """A bounded memory of recent events; subscribe an instance with :func:`events.subscribe`."""

    def __init__(
        self,
        *,
        size: int = 2000,
        activity_size: int = 2000,
        notable_size: int = 2000,
        changes_size: int = 2000,
        per_task: int = 20,
        routine_per_task: int = 10,
    ) -> None:
        self.size = size
        self.activity_size = activity_size
        self.notable_size = notable_size
        self.changes_size = changes_size
        self.per_task = per_task
        self.routine_per_task = routine_per_task
        self._lock = threading.Lock()
        self._seq = 0
        self._all = _Ring(size=size, per_task=routine_per_task)
        self._activity = _Ring(size=activity_size, per_task=per_task)
        self._notable = _Ring(size=notable_size, per_task=per_task)
        self._changes = _Ring(size=changes_size, per_task=per_task)
        self._invalid_since: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        name = event.get("event")
        if name in UNKEPT_EVENTS:
            return
        key = task_key(event)
        routine = is_routine(event)
        kind = None if routine else activity_kind(event)
        with self._lock:
            self._seq += 1
            self._all.add(self._seq, key, event)
            last = None if key is None else self._activity.last_of(key)
            if kind == "failure" and _repeats(last, event):
                kind = None  # a retry failing as the last one did: not news, kept below
            if kind is not None:
                self._activity.add(self._seq, key, event)
            elif routine:
                pass
            elif event.get("level") in _NOTABLE_LEVELS:
                self._notable.add(self._seq, key, event)
            elif key is not None:
                self._changes.add(self._seq, key, event)
            path = event.get("path")
            if isinstance(path, str):
                if name in _INVALID_EVENTS and len(self._invalid_since) < _MAX_INVALID:
                    self._invalid_since.setdefault(path, str(event.get("timestamp", "")))
                elif name == _FIXED_EVENT:
                    self._invalid_since.pop(path, None)

    def for_task(self, key: TaskKey, *, limit: int = 20) -> list[Event]:
        """The task's recent events of every kind, newest first."""
        with self._lock:
            merged = dict(self._all.of(key))
            for ring in (self._activity, self._notable, self._changes):
                merged.update(ring.of(key))
        return [merged[seq] for seq in sorted(merged, reverse=True)[:limit]]

    def changes_of(self, key: TaskKey, *, limit: int = 20) -> list[Event]:
        """The task's last changes (heals and other calls, restarts, drift, failures,
        holds), newest first: what no number of routine reads pushes out."""
        with self._lock:
            merged = {
                seq: event
                for ring in (self._activity, self._notable, self._changes)
                for seq, event in ring.of(key)
            }
        return [merged[seq] for seq in sorted(merged, reverse=True)[:limit]]

    def routine_of(self, key: TaskKey, *, limit: int = 10) -> list[Event]:
        """The task's latest routine events (reads, attempts, queueing), newest first."""
        with self._lock:
            held = self._all.of(key)
        return [event for _, event in reversed(held) if is_routine(event)][:limit]

    def activity(self, *, limit: int = 20) -> list[Event]:
        """The latest heals, restarts, drift, failures and holds, newest first."""
        with self._lock:
            return [event for _, event in self._activity.latest(limit)]

    def latest(self, *, limit: int = 20) -> list[Event]:
        """The latest events of any task or none, newest first."""
        with self._lock:
            return [event for _, event in self._all.latest(limit)]

    def invalid_since(self, path: str) -> str | None:
        """When ``path`` was first reported invalid (ISO-8601), if it still is."""
        with self._lock:
            return self._invalid_since.get(path)

    def stats(self) -> dict[str, int]:
        """How much is held: events in each ring and tasks indexed."""
        with self._lock:
            rings = (self._all, self._activity, self._notable, self._changes)
            return {
                "events": len(self._all),
                "activity": len(self._activity),
                "notable": len(self._notable),
                "changes": len(self._changes),
                "tasks": len(set().union(*(r.tasks() for r in rings))),
            }
