"""Reading live tasks: one GetSegmentTask per task, on a read budget of its own.

There is no list action, so the reconciler reads each desired task by name.
Reads have their own QPS budget (``--read-qps``, default 20, at most the
API's 60), held over any one-second window by the client's limiter for
GetSegmentTask, so reads never take from the UpdateSegment budget and are
never throttled.

:class:`ObserveSchedule` decides *which* task to read next: the one whose
observation is oldest, never one read less than ``interval`` seconds ago. With
N tasks a full sweep therefore takes ``max(interval, N / read_qps)``. A task
just updated is read again soon after (:meth:`ObserveSchedule.soon`, the
read-after-write check); the planner ignores reads taken within the settle
window after our own call, so that early read confirms rather than misleads.
A task the daemon may not write to before it has read it (first contact, a
hold just lifted) is read ahead of every other (:meth:`ObserveSchedule.urgent`).

:func:`read_task` turns one answer into an :class:`~reconciler.core.live.Observation`
(or ``None`` for a transient failure: the last observation stands), and
:func:`observe_all` reads a whole tree once (``plan --refresh``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Final

from reconciler.api.client import RtcClient
from reconciler.core.errors import ApiError, FatalError, NotRunningError
from reconciler.core.live import Observation, from_segment_task, not_found
from reconciler.core.task import TaskKey

GET_ACTION: Final = "GetSegmentTask"
#: Attempts of the first read of a refresh, which finds out whether the endpoint answers.
PROBE_ATTEMPTS: Final = 2
#: An urgent read is due this long before now: ahead of any key merely due.
URGENT_AHEAD_S: Final = 1e9


def sweep_seconds(tasks: int, *, interval: float, read_qps: int) -> float:
    """How long one full pass over ``tasks`` takes: the interval, or the budget's limit."""
    return max(interval, tasks / read_qps)


class ObserveSchedule:
    """Which task to read next: oldest observation first, each at most once per ``interval``.

    Times are ``time.monotonic()``. A key is either waiting in the heap with
    its due time, or taken (being read); :meth:`done` puts it back.
    """

    def __init__(self, *, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._heap: list[tuple[float, int, TaskKey]] = []
        self._due: dict[TaskKey, tuple[float, int]] = {}
        self._taken: set[TaskKey] = set()
        self._soon: set[TaskKey] = set()
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._due) + len(self._taken)

    def keys(self) -> set[TaskKey]:
        """Every tracked key, waiting or being read."""
        return {*self._due, *self._taken}

    def _push(self, key: TaskKey, due: float) -> None:
        entry = (due, next(self._seq))
        self._due[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        self._changed.set()

    def track(self, keys: Iterable[TaskKey], *, first_due: float | None = None) -> None:
        """Read these keys from now on; new ones are due at once (or at ``first_due``)."""
        for key in keys:
            if key not in self._due and key not in self._taken:
                self._push(key, self._clock() if first_due is None else first_due)

    def untrack(self, keys: Iterable[TaskKey]) -> None:
        """Stop reading these keys (their entries in the heap are skipped)."""
        for key in keys:
            self._due.pop(key, None)
            self._taken.discard(key)
            self._soon.discard(key)

    def soon(self, key: TaskKey, after: float) -> None:
        """Read ``key`` again ``after`` seconds from now, sooner than its turn."""
        due = self._clock() + after
        if key in self._taken:
            self._soon.add(key)  # being read right now: the next read comes early
            return
        current = self._due.get(key)
        if current is None or current[0] > due:
            self._push(key, due)

    def urgent(self, key: TaskKey) -> None:
        """Read ``key`` before every key merely due: nothing may be sent to it until then.

        First-contact reads (and reads before writing to a task whose hold just
        lifted) go to the front, oldest request first, on the same read budget.
        """
        if key in self._taken:
            return  # being read right now: that read is the one awaited
        current = self._due.get(key)
        front = self._clock() - URGENT_AHEAD_S
        if current is None or current[0] > front:
            self._push(key, front)

    def done(self, key: TaskKey, *, after: float | None = None) -> None:
        """``key`` was read (or failed to be); it is due again after ``interval``."""
        if key not in self._taken:
            return  # untracked while it was being read
        self._taken.discard(key)
        wait = self.interval if after is None else after
        if key in self._soon:
            self._soon.discard(key)
            wait = min(wait, 1.0)
        self._push(key, self._clock() + wait)

    def oldest_due(self) -> float | None:
        """The due time of the next read (monotonic), if any key waits."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][:2]:
            heapq.heappop(heap)

    async def take(self, stop: asyncio.Event) -> TaskKey | None:
        """Wait until some key is due and take it; ``None`` once ``stop`` is set."""
        while not stop.is_set():
            self._drop_stale()
            wait = 3600.0
            if self._heap:
                due, _, key = self._heap[0]
                wait = due - self._clock()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    del self._due[key]
                    self._taken.add(key)
                    return key
            self._changed.clear()
            stopping = asyncio.ensure_future(stop.wait())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait(
                    [stopping, changed], timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stopping.cancel()
                changed.cancel()
        return None


async def read_task(
    client: RtcClient, key: TaskKey, *, last: Observation | None, attempts: int | None = None
) -> Observation:
    """One GetSegmentTask, as an observation.

    Raises the client's :class:`~reconciler.core.errors.ApiError` for a failed read
    (the caller keeps the last observation); a
    :class:`~reconciler.core.errors.FatalError` (credentials, permissions, an
    unreachable endpoint) means every other read would fail alike.
    """
    sent = time.time()
    try:
        res = await client.get_segment_task(
            app_id=key.app_id, room_id=key.room_id, task_id=key.task_id, attempts=attempts
        )
    except NotRunningError:
        return not_found(key, observed_at=sent, last=last)
    return from_segment_task(key, res.result, observed_at=sent)


async def observe_all(
    client: RtcClient,
    keys: Iterable[TaskKey],
    *,
    last: dict[TaskKey, Observation] | None = None,
    concurrency: int = 64,
    on_read: Callable[[TaskKey, Observation | None], None] | None = None,
    failures: dict[TaskKey, ApiError] | None = None,
) -> dict[TaskKey, Observation]:
    """Read every key once, paced by the client's GetSegmentTask budget.

    A task whose read failed has no entry (and its error goes into ``failures``);
    a :class:`~reconciler.core.errors.FatalError` ends the whole refresh.
    """
    pending = list(keys)
    found: dict[TaskKey, Observation] = {}
    previous = last or {}

    async def reader(queue: list[TaskKey], attempts: int | None = None) -> None:
        while queue:
            key = queue.pop()
            obs: Observation | None
            try:
                obs = await read_task(client, key, last=previous.get(key), attempts=attempts)
            except FatalError:
                raise
            except ApiError as exc:
                obs = None  # this task is planned against last-applied, or not at all
                if failures is not None:
                    failures[key] = exc
            if obs is not None:
                found[key] = obs
            if on_read is not None:
                on_read(key, obs)

    if pending:
        # One read alone first, as a probe: a wrong key then costs one refused request,
        # not one per reader, and an endpoint that cannot be reached two attempts.
        await reader([pending.pop()], attempts=PROBE_ATTEMPTS)
    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(concurrency, len(pending)))):
            group.create_task(reader(pending))
    return found
