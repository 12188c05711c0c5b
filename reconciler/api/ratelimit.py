"""Per-action QPS limits that hold over *any* one-second window.

The server counts requests over a sliding one-second window, so a token bucket
(which lets ``2N`` through around a bucket boundary) would be throttled. Each
:class:`SlidingWindowLimiter` instead keeps a log of recent send times and lets
a new request go only while fewer than ``N`` sends lie within the last window.

The server counts on *arrival*, so what matters is when a request leaves, not
when it was allowed to: a burst of grants can leave over tens of milliseconds
(new connections, a busy CPU), and the next burst, on warm connections, would
then land inside the same server window. So a slot is taken with
:meth:`SlidingWindowLimiter.reserve` and :meth:`Slot.mark`-ed when the request
has been written; until then it counts against every window. Proof sketch: of
any ``N + 1`` sends within one window, the last one granted saw all the others
either pending or sent within its window, and was refused. Remaining jitter
between sending and arrival is absorbed by widening the window by ``guard``
(15 ms by default).

Waiters queue behind one :class:`asyncio.Lock`, which is FIFO and gives up a
cancelled waiter's place; the holder waits until its slot is due, so grants go
out in arrival order. :meth:`SlidingWindowLimiter.penalize` pauses every sender
for a while after the server says it throttled us; the pause lapses by itself.

:class:`RateLimits` holds the per-action numbers (the documented limits by
default) and :class:`RateLimiter` keeps one limiter per action.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

Clock = Callable[[], float]

#: Default window widening that absorbs send/arrival jitter, in seconds.
DEFAULT_GUARD = 0.015
#: The API's own limit for GetSegmentTask; ``--read-qps`` may not exceed it.
READ_QPS_MAX = 60

_ACTION_FIELDS: Mapping[str, str] = {
    "UpdateSegment": "update",
    "StopSegment": "stop",
    "StartSegment": "start",
    "GetSegmentTask": "get",
}


class Slot:
    """A granted request whose time is recorded when it is actually sent.

    Until :meth:`mark` is called the slot counts against every window (we do
    not yet know when it will reach the server); after, it counts against the
    windows that hold its send time. Marking twice keeps the first time.
    """

    __slots__ = ("_limiter", "granted", "sent")

    def __init__(self, limiter: SlidingWindowLimiter, granted: float) -> None:
        self._limiter = limiter
        self.granted = granted
        self.sent: float | None = None

    def mark(self) -> float:
        """Record that the request went out now; return the recorded time."""
        if self.sent is None:
            self.sent = self._limiter._record_sent()
        return self.sent


class SlidingWindowLimiter:
    """At most ``limit`` sends in any ``window + guard`` seconds, granted FIFO.

    A slot taken with :meth:`reserve` counts from its grant until it is marked
    sent and then for ``window + guard`` after its send time; :meth:`acquire`
    marks at once. With sends recorded when the bytes actually leave (not when
    the slot was granted), a burst that waits for connections or for the CPU
    cannot bunch up on arrival.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = 1.0,
        guard: float = DEFAULT_GUARD,
        clock: Clock = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if window <= 0 or guard < 0:
            raise ValueError("window must be positive and guard not negative")
        self.limit = limit
        self.span = window + guard
        self._clock = clock
        # Send times still inside the span; marks happen in clock order, so sorted.
        self._sent: deque[float] = deque()
        self._pending = 0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._marked = asyncio.Event()

    def delay(self) -> float | None:
        """Seconds until a slot is free; ``None`` if that waits for a pending send.

        Queued waiters are not considered.
        """
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.span:
            self._sent.popleft()
        due = self._paused_until
        if self._pending + len(self._sent) >= self.limit:
            if not self._sent:
                return None
            due = max(due, self._sent[0] + self.span)
        return max(0.0, due - now)

    async def reserve(self) -> Slot:
        """Wait for a slot and take it; call :meth:`Slot.mark` when it is sent."""
        async with self._lock:
            # Loop: a penalty may arrive while we wait, and the loop may wake early.
            while True:
                wait = self.delay()
                if wait is not None and wait <= 0:
                    break
                self._marked.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._marked.wait(), timeout=wait)
            self._pending += 1
            return Slot(self, self._clock())

    async def acquire(self) -> float:
        """Wait for a slot and count it as sent now; return that time."""
        return (await self.reserve()).mark()

    def penalize(self, seconds: float) -> None:
        """Hold every sender back for ``seconds`` from now (longest pause wins)."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    def _record_sent(self) -> float:
        now = self._clock()
        self._pending -= 1
        self._sent.append(now)
        self._marked.set()
        return now


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests per second allowed for each action.

    Defaults are the documented limits for API version 2022-06-01; set lower
    ones to leave room for other users of the same account. ``default`` applies
    to any other action.
    """

    update: int = 150
    stop: int = 150
    start: int = 60
    get: int = 60
    default: int = 60
    window: float = 1.0
    guard: float = DEFAULT_GUARD

    def __post_init__(self) -> None:
        for name in ("update", "stop", "start", "get", "default"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rate limit {name!r} must be a positive integer, not {value!r}")
        if self.window <= 0 or self.guard < 0:
            raise ValueError("window must be positive and guard not negative")

    @classmethod
    def from_mapping(
        cls, per_action: Mapping[str, int], *, window: float = 1.0, guard: float = DEFAULT_GUARD
    ) -> RateLimits:
        """Limits from ``{"UpdateSegment": 100, ...}``; unnamed actions keep their default.

        Keys may be action names or the field names (``update``, ``stop``, ...).
        """
        known = {f.name for f in fields(cls)} - {"window", "guard"}
        values: dict[str, int] = {}
        for key, value in per_action.items():
            name = _ACTION_FIELDS.get(key, key)
            if name not in known:
                choices = ", ".join([*_ACTION_FIELDS, "default"])
                raise ValueError(f"unknown action {key!r} for a rate limit (known: {choices})")
            values[name] = value
        return cls(**values, window=window, guard=guard)

    def for_action(self, action: str) -> int:
        value: int = getattr(self, _ACTION_FIELDS.get(action, "default"))
        return value


class RateLimiter:
    """One :class:`SlidingWindowLimiter` per action, made on first use."""

    def __init__(self, limits: RateLimits | None = None, *, clock: Clock = time.monotonic) -> None:
        self.limits = limits or RateLimits()
        self._clock = clock
        self._by_action: dict[str, SlidingWindowLimiter] = {}

    def for_action(self, action: str) -> SlidingWindowLimiter:
        limiter = self._by_action.get(action)
        if limiter is None:
            limiter = SlidingWindowLimiter(
                self.limits.for_action(action),
                window=self.limits.window,
                guard=self.limits.guard,
                clock=self._clock,
            )
            self._by_action[action] = limiter
        return limiter

    async def acquire(self, action: str) -> float:
        """Wait for a slot for ``action`` and count it as sent now."""
        return await self.for_action(action).acquire()

    async def reserve(self, action: str) -> Slot:
        """Wait for a slot for ``action``; mark it when the request is sent."""
        return await self.for_action(action).reserve()

    def penalize(self, action: str, seconds: float) -> None:
        """Pause every sender of ``action`` for ``seconds``."""
        self.for_action(action).penalize(seconds)
