"""The segment tasks the emulated server holds, and the server's rules for them.

Pure state: :class:`TaskTable` applies Start/Update/Stop with the reference's
rules and takes the time as an argument, so it is tested without a server.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from reconciler.emulator.config import IDEMPOTENT_START_VERSIONS
from reconciler.emulator.errors import ApiError, not_running
from reconciler.emulator.params import JsonObject, StartParams, UpdateParams
from reconciler.task import TaskKey

__all__ = ["LAST_BODIES", "LiveTask", "TaskTable"]

#: How many applied UpdateSegment bodies each task remembers.
LAST_BODIES: Final = 8


@dataclass(frozen=True, slots=True)
class LiveTask:
    """A snapshot of one task as the emulated server holds it."""

    key: TaskKey
    business_id: str | None
    running: bool
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    #: Applied UpdateSegment calls that carried Duration (each cuts the slice).
    timer_restarts: int
    #: Applied UpdateSegment calls.
    update_calls: int
    #: The last few applied UpdateSegment bodies, oldest first, as received.
    last_bodies: tuple[JsonObject, ...]
    #: When each of ``last_bodies`` was applied (wall clock, ``time.time()``
    #: seconds), so a bench can time an edit to its call at the server.
    update_times: tuple[float, ...]
    start_time_ms: int
    end_time_ms: int
    stop_reason: str

    def admin_view(self) -> JsonObject:
        """The row ``GET /_emulator/tasks`` returns."""
        return {
            "AppId": self.key.app_id,
            "RoomId": self.key.room_id,
            "TaskId": self.key.task_id,
            "BusinessId": self.business_id,
            "Identifier": self.identifier,
            "Handle": self.handle,
            "Duration": self.duration,
            "MaxIdleTime": self.max_idle_time,
            "Running": self.running,
            "TimerRestarts": self.timer_restarts,
            "UpdateCalls": self.update_calls,
            "LastBodies": list(self.last_bodies),
            "UpdateTimes": list(self.update_times),
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "StopReason": self.stop_reason,
        }


@dataclass(slots=True)
class _TaskState:
    key: TaskKey
    business_id: str | None
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject
    start_time_ms: int
    running: bool = True
    end_time_ms: int = 0
    stop_reason: str = ""
    timer_restarts: int = 0
    update_calls: int = 0
    last_bodies: deque[JsonObject] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))
    update_times: deque[float] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))

    def snapshot(self) -> LiveTask:
        return LiveTask(
            key=self.key,
            business_id=self.business_id,
            running=self.running,
            identifier=self.identifier,
            handle=self.handle,
            duration=self.duration,
            max_idle_time=self.max_idle_time,
            timer_restarts=self.timer_restarts,
            update_calls=self.update_calls,
            last_bodies=tuple(json.loads(json.dumps(b)) for b in self.last_bodies),
            update_times=tuple(self.update_times),
            start_time_ms=self.start_time_ms,
            end_time_ms=self.end_time_ms,
            stop_reason=self.stop_reason,
        )

    def segment_task(self) -> JsonObject:
        """``Result.SegmentTask`` of GetSegmentTask."""
        return {
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "Status": 2 if self.running else 3,
            "StopReason": self.stop_reason,
            "MaxIdleTime": self.max_idle_time,
            "TargetStreams": self.target_streams,
            "Duration": self.duration,
            "Identifier": self.identifier,
            "Handle": self.handle,
            "StorageConfig": {},
            "Control": self.control,
        }


class TaskTable:
    """Segment tasks by identity, with the server's Start/Update/Stop rules.

    ``new_identifier`` supplies the default Identifier (a random UUID on the
    server); time is passed in, in milliseconds.
    """

    def __init__(self, *, new_identifier: Callable[[], str]) -> None:
        self._tasks: dict[TaskKey, _TaskState] = {}
        self._new_identifier = new_identifier

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, params: StartParams, *, version: str | None, now_ms: int) -> None:
        """Start a task, or restart it as a new incarnation when not running.

        ``version`` None is the admin's seeding: a running task is replaced.
        """
        old = self._tasks.get(params.key)
        if old is not None and old.running and version is not None:
            if version in IDEMPOTENT_START_VERSIONS:
                return
            raise ApiError(
                "InvalidParameter.TaskAlreadyExists",
                f"task {params.key} is already running",
                status=400,
            )
        state = _TaskState(
            key=params.key,
            business_id=params.business_id,
            identifier=params.identifier or self._new_identifier(),
            handle=params.handle,
            duration=params.duration,
            max_idle_time=params.max_idle_time,
            target_streams=params.target_streams,
            control=params.control,
            start_time_ms=now_ms,
        )
        if old is not None:
            # Counters belong to the key, so a test sees every call it made.
            state.timer_restarts, state.update_calls = old.timer_restarts, old.update_calls
            state.last_bodies, state.update_times = old.last_bodies, old.update_times
        self._tasks[params.key] = state

    def update(self, params: UpdateParams, *, body: JsonObject, now: float) -> None:
        """Apply an UpdateSegment; ``now`` is the wall-clock time in seconds."""
        state = self._tasks.get(params.key)
        if state is None or not state.running:
            raise not_running(params.key)
        if params.identifier is not None:
            state.identifier = params.identifier
        if params.handle is not None:
            state.handle = params.handle
        if params.duration is not None:
            state.duration = params.duration
            state.timer_restarts += 1
        state.update_calls += 1
        state.last_bodies.append(body)
        state.update_times.append(now)

    def stop(self, key: TaskKey, *, now_ms: int, reason: str = "StopByAPI") -> None:
        state = self._tasks.get(key)
        if state is None or not state.running:
            raise not_running(key)
        state.running = False
        state.end_time_ms = now_ms
        state.stop_reason = reason

    def segment_task(self, key: TaskKey) -> JsonObject:
        state = self._tasks.get(key)
        if state is None:
            raise not_running(key)
        return state.segment_task()

    def live(self, key: TaskKey) -> LiveTask | None:
        state = self._tasks.get(key)
        return None if state is None else state.snapshot()

    def select(
        self, *, app_id: str | None = None, room_id: str | None = None, task_id: str | None = None
    ) -> list[LiveTask]:
        """Snapshots of the tasks matching every given id part, sorted by key."""
        return [
            state.snapshot()
            for key, state in sorted(self._tasks.items())
            if (app_id is None or key.app_id == app_id)
            and (room_id is None or key.room_id == room_id)
            and (task_id is None or key.task_id == task_id)
        ]
