"""What a live task looks like, as GetSegmentTask shows it.

An :class:`Observation` is one read of one task, taken at a known time. It is a
plain value, like the rest of the functional core, so the planner can compare
desired values with live ones without any I/O, and the store can keep the
latest one per task.

How an answer maps to a :class:`LiveStatus`:

- ``Status`` 2 (running) → ``RUNNING``, with the live managed values and the
  incarnation (``StartTime``): a task started again under the same TaskId has a
  new StartTime and StartSegment's parameters, not the ones last sent.
- ``Status`` 3 (ended) or 4 (failed) → ``ENDED``, with ``EndTime`` and
  ``StopReason``; 0 and 1 (unknown error, not started) count as not running too.
- ``InvalidParameter.ErrorActiveTaskNotFound`` → ``NOT_FOUND`` for a task seen
  before and started less than 72 hours ago; otherwise ``UNKNOWN``:
  GetSegmentTask only sees tasks started within 72 h, so a task it cannot see
  may well be running, and is never taken for "not running".
- anything else (a transient error) → no observation at all; the last one stands.

``observed_at`` is when the read was *sent*, so an answer that raced with our
own UpdateSegment is never taken as newer than it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from reconciler.core.task import MANAGED_FIELDS, FieldValue, TaskKey

#: GetSegmentTask sees only tasks started within this many seconds.
VISIBILITY_S: Final = 72 * 3600
#: ``Status`` of a running task.
STATUS_RUNNING: Final = 2


class LiveStatus(StrEnum):
    RUNNING = "running"
    ENDED = "ended"
    NOT_FOUND = "not_found"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Observation:
    key: TaskKey
    #: Wall clock (epoch seconds) when the read was sent.
    observed_at: float
    state: LiveStatus
    #: The incarnation: StartTime in ms (``None`` when not found or unknown).
    start_time_ms: int | None = None
    end_time_ms: int | None = None
    stop_reason: str | None = None
    #: API ``Status`` (0-4), when the task was found.
    status: int | None = None
    #: Live Identifier / Handle / Duration, as far as the answer carried them.
    fields: Mapping[str, FieldValue] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state is LiveStatus.RUNNING

    @property
    def not_running(self) -> bool:
        return self.state in (LiveStatus.ENDED, LiveStatus.NOT_FOUND)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "observed_at": self.observed_at,
            "start_time_ms": self.start_time_ms,
            "end_time_ms": self.end_time_ms,
            "stop_reason": self.stop_reason,
            "status": self.status,
            "fields": dict(self.fields),
        }


def from_segment_task(key: TaskKey, task: Mapping[str, Any], *, observed_at: float) -> Observation:
    """An observation from ``Result.SegmentTask`` (already validated by the client)."""
    fields: dict[str, FieldValue] = {}
    for name in MANAGED_FIELDS:
        value = task.get(name)
        if value is not None:
            fields[name] = value
    status = int(task["Status"])
    running = status == STATUS_RUNNING
    end = int(task.get("EndTime") or 0)
    return Observation(
        key=key,
        observed_at=observed_at,
        state=LiveStatus.RUNNING if running else LiveStatus.ENDED,
        start_time_ms=int(task["StartTime"]),
        end_time_ms=end or None,
        stop_reason=None if running else (task.get("StopReason") or "UnknownStopReason"),
        status=status,
        fields=fields,
    )


def not_found(key: TaskKey, *, observed_at: float, last: Observation | None) -> Observation:
    """GetSegmentTask does not know the task: gone, or merely out of its sight.

    Only a task seen before, started less than 72 h ago, is known to be gone
    (``NOT_FOUND``). Otherwise it may have started more than 72 h ago, or
    never: ``UNKNOWN``, and the planner falls back to last-applied (it never
    probes with UpdateSegment; a planned call that finds the task not running
    reports it as the call's answer).
    """
    start = None if last is None else last.start_time_ms
    if start is not None and observed_at - start / 1000 < VISIBILITY_S:
        return Observation(key, observed_at, LiveStatus.NOT_FOUND, start_time_ms=start)
    return Observation(key, observed_at, LiveStatus.UNKNOWN, start_time_ms=start)
