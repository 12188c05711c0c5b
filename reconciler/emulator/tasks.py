"""The segment tasks the emulated server holds, and the server's rules for them.

Pure state: :class:`TaskTable` applies StartSegment, UpdateSegment, StopSegment
and GetSegmentTask with the API's documented rules, plus the things the real
service does on its own that a closed-loop test must be able to cause (end a
task, start it again, another client's update, the passing of 72 hours). Time
is always an argument, so every rule is tested without a server or a clock.

Model:

* A key (``AppId``, ``RoomId``, ``TaskId``) holds one :class:`_Incarnation` at a
  time: one run from a start to its end. Starting a key again (StartSegment on
  an ended task, the admin's restart or seed) replaces it with a new
  incarnation: StartSegment's parameters and defaults, a ``StartTime`` strictly
  greater than the old one (bumped by 1 ms when the clock has not moved, so a
  reader can always tell incarnations apart by StartTime), and ``Incarnation``
  one higher. Nothing of the old incarnation's live values survives, exactly
  as with the real service: a new incarnation lacks what UpdateSegment sent.
* An ended incarnation stays readable (Status 3, or 4 for ``StartTaskFailed``,
  with its ``EndTime`` and ``StopReason``) until the key is started again.
* GetSegmentTask sees only tasks started within the last 72 h
  (:data:`READ_WINDOW_MS`); older ones answer ``ErrorActiveTaskNotFound`` like
  a key that never existed. UpdateSegment and StopSegment on a running task do
  not look at its age.
* Counters belong to the key and span incarnations, so a test sees every call
  it ever made; to count what one incarnation received, compare before and
  after. ``UpdateCalls``, ``TimerRestarts``, ``LastBodies`` and ``UpdateTimes``
  count *applied* UpdateSegment calls through the signed API (ours);
  ``ExternalUpdates`` and ``ExternalTimerRestarts`` count changes made as
  another client would (:meth:`TaskTable.set_fields`), so "the reconciler sent
  N calls" stays readable while something else also changes the task.

API methods raise :class:`~reconciler.emulator.errors.ApiFault` with the
server's answer; the admin's methods raise :class:`UnknownTaskError` or
:class:`TaskNotRunningError`, which the admin API turns into 404 and 409.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from reconciler.core.task import TaskKey
from reconciler.emulator.config import IDEMPOTENT_START_VERSIONS
from reconciler.emulator.errors import ApiFault, not_running
from reconciler.emulator.params import JsonObject, StartParams, UpdateParams

__all__ = [
    "DEFAULT_STOP_REASON",
    "LAST_BODIES",
    "READ_WINDOW_MS",
    "STATUS_ENDED",
    "STATUS_FAILED",
    "STATUS_RUNNING",
    "STOP_REASONS",
    "LiveTask",
    "TaskNotRunningError",
    "TaskTable",
    "UnknownTaskError",
]

#: How many applied UpdateSegment bodies each task remembers.
LAST_BODIES: Final = 8
#: GetSegmentTask sees only tasks started within this long (72 h), in milliseconds.
READ_WINDOW_MS: Final = 72 * 3600 * 1000

STATUS_RUNNING: Final = 2
STATUS_ENDED: Final = 3
STATUS_FAILED: Final = 4
#: The documented ``StopReason`` values, and the ``Status`` a task ended so reads with.
STOP_REASONS: Final[Mapping[str, int]] = {
    "StopByAPI": STATUS_ENDED,
    "IdleTimeOut": STATUS_ENDED,
    "UserDisconnect": STATUS_ENDED,
    "UnknownStopReason": STATUS_ENDED,
    "StartTaskFailed": STATUS_FAILED,
}
#: Why the service ends a task by itself when a test does not say: its streams went idle.
DEFAULT_STOP_REASON: Final = "IdleTimeOut"


class UnknownTaskError(LookupError):
    """No task was ever started under this key."""

    def __init__(self, key: TaskKey) -> None:
        super().__init__(f"task {key} does not exist")
        self.key = key


class TaskNotRunningError(Exception):
    """The task exists but its current incarnation has ended."""

    def __init__(self, key: TaskKey) -> None:
        super().__init__(f"task {key} is not running (it has ended)")
        self.key = key


@dataclass(frozen=True, slots=True)
class LiveTask:
    """A snapshot of one task as the emulated server holds it."""

    key: TaskKey
    business_id: str | None
    running: bool
    #: GetSegmentTask's ``Status``: 2 running, 3 ended, 4 failed.
    status: int
    #: 1 for the first start of this key, one more for each start after.
    incarnation: int
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject
    #: Our applied UpdateSegment calls that carried Duration (each cuts the slice).
    timer_restarts: int
    #: Our applied UpdateSegment calls.
    update_calls: int
    #: The last few of our applied UpdateSegment bodies, oldest first, as received.
    last_bodies: tuple[JsonObject, ...]
    #: When each of ``last_bodies`` was applied (wall clock, ``time.time()``
    #: seconds), so a bench can time an edit to its call at the server.
    update_times: tuple[float, ...]
    #: Changes made as another client's UpdateSegment would (admin ``set``).
    external_updates: int
    #: Those of ``external_updates`` that carried Duration.
    external_timer_restarts: int
    start_time_ms: int
    end_time_ms: int
    stop_reason: str
    #: Whether GetSegmentTask sees the task (started within the last 72 h).
    visible: bool

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
            "TargetStreams": self.target_streams,
            "Running": self.running,
            "Status": self.status,
            "Incarnation": self.incarnation,
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "StopReason": self.stop_reason,
            "Visible": self.visible,
            "TimerRestarts": self.timer_restarts,
            "UpdateCalls": self.update_calls,
            "LastBodies": list(self.last_bodies),
            "UpdateTimes": list(self.update_times),
            "ExternalUpdates": self.external_updates,
            "ExternalTimerRestarts": self.external_timer_restarts,
        }


@dataclass(slots=True)
class _Incarnation:
    """One run of a task, from its start to its end."""

    number: int
    business_id: str | None
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject
    start_time_ms: int
    status: int = STATUS_RUNNING
    end_time_ms: int = 0
    stop_reason: str = ""

    @property
    def running(self) -> bool:
        return self.status == STATUS_RUNNING

    def end(self, *, now_ms: int, reason: str) -> None:
        self.status = STOP_REASONS[reason]
        # Never before it started (a StartTime bumped ahead of the clock).
        self.end_time_ms = max(now_ms, self.start_time_ms)
        self.stop_reason = reason

    def segment_task(self) -> JsonObject:
        """``Result.SegmentTask`` of GetSegmentTask."""
        return {
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "Status": self.status,
            "StopReason": self.stop_reason,
            "MaxIdleTime": self.max_idle_time,
            "TargetStreams": copy.deepcopy(self.target_streams),
            "Duration": self.duration,
            "Identifier": self.identifier,
            "Handle": self.handle,
            "StorageConfig": {},
            "Control": copy.deepcopy(self.control),
        }


@dataclass(slots=True)
class _Task:
    """A key's current incarnation and the counters that span all of them."""

    key: TaskKey
    run: _Incarnation
    timer_restarts: int = 0
    update_calls: int = 0
    last_bodies: deque[JsonObject] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))
    update_times: deque[float] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))
    external_updates: int = 0
    external_timer_restarts: int = 0

    def snapshot(self, *, now_ms: int) -> LiveTask:
        run = self.run
        return LiveTask(
            key=self.key,
            business_id=run.business_id,
            running=run.running,
            status=run.status,
            incarnation=run.number,
            identifier=run.identifier,
            handle=run.handle,
            duration=run.duration,
            max_idle_time=run.max_idle_time,
            target_streams=copy.deepcopy(run.target_streams),
            control=copy.deepcopy(run.control),
            timer_restarts=self.timer_restarts,
            update_calls=self.update_calls,
            last_bodies=tuple(copy.deepcopy(b) for b in self.last_bodies),
            update_times=tuple(self.update_times),
            external_updates=self.external_updates,
            external_timer_restarts=self.external_timer_restarts,
            start_time_ms=run.start_time_ms,
            end_time_ms=run.end_time_ms,
            stop_reason=run.stop_reason,
            visible=_visible(run, now_ms=now_ms),
        )


def _visible(run: _Incarnation, *, now_ms: int) -> bool:
    return now_ms - run.start_time_ms <= READ_WINDOW_MS


class TaskTable:
    """Segment tasks by identity, with the server's rules.

    ``new_identifier`` supplies the default Identifier (a random UUID on the
    server); time is passed in, in milliseconds since the epoch.
    """

    def __init__(self, *, new_identifier: Callable[[], str]) -> None:
        self._tasks: dict[TaskKey, _Task] = {}
        self._new_identifier = new_identifier

    def __len__(self) -> int:
        return len(self._tasks)

    # ---- the API's rules

    def start(self, params: StartParams, *, version: str | None, now_ms: int) -> None:
        """StartSegment: start a task, or a new incarnation of an ended one.

        ``version`` None is the admin's seeding: a running task is replaced by
        a new incarnation instead of being refused.
        """
        task = self._tasks.get(params.key)
        if task is not None and task.run.running and version is not None:
            if version in IDEMPOTENT_START_VERSIONS:
                return
            raise ApiFault(
                "InvalidParameter.TaskAlreadyExists",
                f"task {params.key} is already running",
                status=400,
            )
        self._begin(
            params.key,
            params,
            business_id=params.business_id,
            target_streams=params.target_streams,
            control=params.control,
            now_ms=now_ms,
        )

    def update(self, params: UpdateParams, *, body: JsonObject, now: float) -> None:
        """UpdateSegment from us; ``now`` is the wall-clock time in seconds.

        A running task is updated whatever its age: the 72 h window only limits reads.
        """
        task = self._tasks.get(params.key)
        if task is None or not task.run.running:
            raise not_running(params.key)
        if _apply_update(task.run, params):
            task.timer_restarts += 1
        task.update_calls += 1
        task.last_bodies.append(body)
        task.update_times.append(now)

    def stop(self, key: TaskKey, *, now_ms: int) -> None:
        """StopSegment: end a running task with ``StopByAPI``."""
        task = self._tasks.get(key)
        if task is None or not task.run.running:
            raise not_running(key)
        task.run.end(now_ms=now_ms, reason="StopByAPI")

    def segment_task(self, key: TaskKey, *, now_ms: int) -> JsonObject:
        """GetSegmentTask: the current incarnation, running or ended, if started within 72 h."""
        task = self._tasks.get(key)
        if task is None or not _visible(task.run, now_ms=now_ms):
            raise not_running(key)
        return task.run.segment_task()

    # ---- what the service (or another client) does on its own

    def end(self, key: TaskKey, *, now_ms: int, reason: str) -> None:
        """End a running task as the service would (``IdleTimeOut``, ``UserDisconnect``, ...).

        Raises :class:`ValueError` for a reason the API does not list.
        """
        if not isinstance(reason, str) or reason not in STOP_REASONS:
            raise ValueError(f"StopReason must be one of {sorted(STOP_REASONS)}, got {reason!r}")
        self._running(key).run.end(now_ms=now_ms, reason=reason)

    def restart(self, params: StartParams, *, now_ms: int) -> None:
        """Start a task again as a new incarnation, ended or running.

        Identifier, Handle, Duration and MaxIdleTime come from ``params`` (so
        StartSegment's defaults when it left them out); BusinessId,
        TargetStreams and Control carry over from the incarnation replaced,
        as a service restarting the same recording would send them again.
        """
        old = self._get(params.key).run
        self._begin(
            params.key,
            params,
            business_id=old.business_id,
            target_streams=old.target_streams,
            control=old.control,
            now_ms=now_ms,
        )

    def set_fields(self, params: UpdateParams) -> None:
        """Change live fields as another client's UpdateSegment would.

        Duration restarts the slice timer, as any UpdateSegment carrying it
        does. Counted in ``external_updates``, never in our ``update_calls``.
        """
        if params.identifier is None and params.handle is None and params.duration is None:
            raise ValueError("nothing to set: give Identifier, Handle or Duration")
        task = self._running(params.key)
        if _apply_update(task.run, params):
            task.external_timer_restarts += 1
        task.external_updates += 1

    def set_start_time(self, key: TaskKey, *, start_time_ms: int) -> None:
        """Move a task's StartTime, e.g. more than 72 h back to hide it from GetSegmentTask.

        Raises :class:`ValueError` if an ended task would start after it ended.
        """
        run = self._get(key).run
        if not run.running and start_time_ms > run.end_time_ms:
            raise ValueError(
                f"task {key} ended at {run.end_time_ms}; it cannot have started after that"
            )
        run.start_time_ms = start_time_ms

    # ---- reading

    def live(self, key: TaskKey, *, now_ms: int) -> LiveTask | None:
        task = self._tasks.get(key)
        return None if task is None else task.snapshot(now_ms=now_ms)

    def select(
        self,
        *,
        now_ms: int,
        app_id: str | None = None,
        room_id: str | None = None,
        task_id: str | None = None,
    ) -> list[LiveTask]:
        """Snapshots of the tasks matching every given id part, sorted by key."""
        return [
            task.snapshot(now_ms=now_ms)
            for key, task in sorted(self._tasks.items())
            if (app_id is None or key.app_id == app_id)
            and (room_id is None or key.room_id == room_id)
            and (task_id is None or key.task_id == task_id)
        ]

    # ---- internals

    def _get(self, key: TaskKey) -> _Task:
        task = self._tasks.get(key)
        if task is None:
            raise UnknownTaskError(key)
        return task

    def _running(self, key: TaskKey) -> _Task:
        task = self._get(key)
        if not task.run.running:
            raise TaskNotRunningError(key)
        return task

    def _begin(
        self,
        key: TaskKey,
        params: StartParams,
        *,
        business_id: str | None,
        target_streams: JsonObject,
        control: JsonObject,
        now_ms: int,
    ) -> None:
        old = self._tasks.get(key)
        start_ms = now_ms if old is None else max(now_ms, old.run.start_time_ms + 1)
        run = _Incarnation(
            number=1 if old is None else old.run.number + 1,
            business_id=business_id,
            identifier=params.identifier or self._new_identifier(),
            handle=params.handle,
            duration=params.duration,
            max_idle_time=params.max_idle_time,
            target_streams=copy.deepcopy(target_streams),
            control=copy.deepcopy(control),
            start_time_ms=start_ms,
        )
        if old is None:
            self._tasks[key] = _Task(key=key, run=run)
        else:
            old.run = run  # the counters stay with the key


def _apply_update(run: _Incarnation, params: UpdateParams) -> bool:
    """Override the fields ``params`` carries; True if it carried Duration (timer restarted)."""
    if params.identifier is not None:
        run.identifier = params.identifier
    if params.handle is not None:
        run.handle = params.handle
    if params.duration is not None:
        run.duration = params.duration
        return True
    return False
