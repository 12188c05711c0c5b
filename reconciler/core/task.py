"""What a segment task is, as the rest of the reconciler sees it.

A task is named by its identity (``AppId``, ``RoomId``, ``TaskId``). The desired
side (:class:`DesiredTask`) comes from a file in the desired tree and carries the
*managed fields*: the subset of ``Identifier``, ``Handle`` and ``Duration`` that
the file sets. The recorded side (:class:`AppliedRecord`) comes from the state
store and carries the values the server last confirmed with ``Result: "ok"``.

These are plain immutable values so the loader, the planner and the store can
pass them around, compare and hash them without any I/O. Field names are the
API's own spelling everywhere, so a body can be built without translation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

#: The fields UpdateSegment can change, in the order bodies and plans list them.
MANAGED_FIELDS: tuple[str, ...] = ("Identifier", "Handle", "Duration")
#: The keys that name a task, in API spelling.
IDENTITY_FIELDS: tuple[str, ...] = ("AppId", "RoomId", "TaskId")
#: Every key a task may carry in a desired file.
TASK_KEYS: tuple[str, ...] = ("AppId", "BusinessId", "RoomId", "TaskId", *MANAGED_FIELDS)
#: Keys whose value is an id string.
ID_KEYS: tuple[str, ...] = ("AppId", "BusinessId", "RoomId", "TaskId", "Identifier")

DURATION_MIN = 1
DURATION_MAX = 600

FieldValue = str | bool | int


class TaskKey(NamedTuple):
    """The identity of a task; sorts by app, room, task."""

    app_id: str
    room_id: str
    task_id: str

    def __str__(self) -> str:
        return f"{self.app_id}/{self.room_id}/{self.task_id}"

    def identity(self) -> dict[str, str]:
        """The identity as API body keys."""
        return {"AppId": self.app_id, "RoomId": self.room_id, "TaskId": self.task_id}


@dataclass(frozen=True, slots=True)
class Source:
    """Where something was declared: a path relative to the tree root, 1-based."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class DesiredTask:
    """One task as the desired tree declares it (after ``defaults``)."""

    key: TaskKey
    business_id: str | None
    #: Managed fields only, in :data:`MANAGED_FIELDS` order.
    fields: Mapping[str, FieldValue]
    source: Source

    def spec_hash(self) -> str:
        """A stable digest of everything the task asks for.

        A task that failed for its own bad input waits until this changes.
        """
        return spec_hash(self.business_id, self.fields)


def spec_hash(business_id: str | None, fields: Mapping[str, FieldValue]) -> str:
    """Digest of a desired spec; equal specs give equal digests across runs."""
    doc = json.dumps([business_id, sorted(fields.items())], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class SyncStatus(StrEnum):
    """Where a task stands, as ``status`` shows it."""

    SYNCED = "Synced"
    #: Live values drifted from last-applied and ``--drift report`` leaves them.
    OUT_OF_SYNC = "OutOfSync"
    PENDING = "Pending"
    NOT_RUNNING = "NotRunning"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class AppliedRecord:
    """What the state store knows was last applied to a task.

    ``fields`` is ``None`` when no call for the task has ever succeeded: the
    planner then sends every managed field once. A record may exist with
    ``fields`` ``None`` (a first call is pending, not running, or failed).
    """

    key: TaskKey
    business_id: str | None
    fields: Mapping[str, FieldValue] | None
    #: Path (relative to the tree root) of the file that last declared the task.
    #: While that file is invalid the task is held as it is, never forgotten.
    source: str | None = None
    #: :func:`spec_hash` of a spec the server refused as bad input; the task is
    #: not tried again until its desired spec hashes differently.
    failed_spec: str | None = None
    #: When the server last confirmed a call (epoch seconds); ``None`` if never.
    applied_at: float | None = None
    #: The incarnation (StartTime, ms) the values were applied to, when known:
    #: a live task with another StartTime was restarted and lacks them.
    incarnation: int | None = None
    #: The task's sync status as recorded (``None``: not known here).
    status: SyncStatus | None = None
    #: When a call whose outcome is unknown was sent (epoch seconds): a row left
    #: Pending by a run that stopped, or a call that timed out or lost its
    #: connection after it went out. It may have been applied: the next call
    #: waits for a read taken after it (re-sending Duration would cut again).
    in_doubt_since: float | None = None


class AppliedIndex(dict[TaskKey, AppliedRecord]):
    """Last-applied records by key, counting those with confirmed values as they change.

    The daemon asks how many tasks the server has confirmed values for (what
    ``--max-change`` is a share of) after every task it handles; counting the
    whole store each time made a first sync quadratic in the tree's size.
    """

    def __init__(self, records: Mapping[TaskKey, AppliedRecord] | None = None) -> None:
        super().__init__()
        self.confirmed = 0
        for key, record in (records or {}).items():
            self[key] = record

    def __setitem__(self, key: TaskKey, record: AppliedRecord) -> None:
        old = self.get(key)
        self.confirmed += (record.fields is not None) - (old is not None and old.fields is not None)
        super().__setitem__(key, record)

    def __delitem__(self, key: TaskKey) -> None:
        old = self[key]
        self.confirmed -= old.fields is not None
        super().__delitem__(key)

    def pop(self, key: TaskKey, *default: Any) -> Any:
        if key in self:
            old = self[key]
            self.confirmed -= old.fields is not None
        return super().pop(key, *default)


def task_fields(key: TaskKey) -> dict[str, str]:
    """The fields every event about a task carries."""
    return {"app_id": key.app_id, "room_id": key.room_id, "task_id": key.task_id}
