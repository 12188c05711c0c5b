"""Recent events, kept in memory for the dashboard: bounded whatever the number of tasks.

:class:`RecentEvents` is an :func:`reconciler.events.subscribe` subscriber:
it sees the redacted copy of every event written (never the raw one) and
keeps two rings of them, each with a per-task index:

- the last :attr:`~RecentEvents.size` events of any level, so the latest
  activity is there however quiet or busy the daemon is;
- the last :attr:`~RecentEvents.notable_size` warnings and errors, so a
  task that failed an hour ago still shows why after thousands of routine
  ``task.synced`` events have gone by.

A task's recent events are its entries in both rings, newest first. The
per-task index only points into the rings: an event leaves the index when
its ring drops it, and each task keeps at most :attr:`~RecentEvents.per_task`
entries per ring. So memory is bounded by the ring sizes (a few thousand
small dicts, a few MB), not by the tasks: 100k tasks with events cost no
more than 100.

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

from reconciler.task import TaskKey

Event = Mapping[str, Any]

#: Events about a file's validity, and what they do to its since-time.
_INVALID_EVENTS: Final = frozenset({"desired.invalid_file", "desired.refused_path"})
_FIXED_EVENT: Final = "desired.file_fixed"
_NOTABLE_LEVELS: Final = frozenset({"warning", "error", "critical"})
#: Invalid files remembered at most (a tree of thousands of broken files is its own news).
_MAX_INVALID: Final = 10_000


def task_key(event: Event) -> TaskKey | None:
    """The task an event is about (its ``app_id``, ``room_id``, ``task_id``), if any."""
    app, room, task = event.get("app_id"), event.get("room_id"), event.get("task_id")
    if isinstance(app, str) and isinstance(room, str) and isinstance(task, str):
        return TaskKey(app, room, task)
    return None


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

    def tasks(self) -> set[TaskKey]:
        return set(self._by_task)

    def __len__(self) -> int:
        return len(self._entries)


class RecentEvents:
    """A bounded memory of recent events; subscribe an instance with :func:`events.subscribe`."""

    def __init__(self, *, size: int = 2000, notable_size: int = 5000, per_task: int = 20) -> None:
        self.size = size
        self.notable_size = notable_size
        self.per_task = per_task
        self._lock = threading.Lock()
        self._seq = 0
        self._all = _Ring(size=size, per_task=per_task)
        self._notable = _Ring(size=notable_size, per_task=per_task)
        self._invalid_since: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        key = task_key(event)
        name = event.get("event")
        with self._lock:
            self._seq += 1
            self._all.add(self._seq, key, event)
            if event.get("level") in _NOTABLE_LEVELS:
                self._notable.add(self._seq, key, event)
            path = event.get("path")
            if isinstance(path, str):
                if name in _INVALID_EVENTS and len(self._invalid_since) < _MAX_INVALID:
                    self._invalid_since.setdefault(path, str(event.get("timestamp", "")))
                elif name == _FIXED_EVENT:
                    self._invalid_since.pop(path, None)

    def for_task(self, key: TaskKey, *, limit: int = 20) -> list[Event]:
        """The task's recent events, newest first."""
        with self._lock:
            merged = dict(self._all.of(key))
            merged.update(self._notable.of(key))
        return [merged[seq] for seq in sorted(merged, reverse=True)[:limit]]

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
            return {
                "events": len(self._all),
                "notable": len(self._notable),
                "tasks": len(self._all.tasks() | self._notable.tasks()),
            }
