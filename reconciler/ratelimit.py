"""Per-action QPS limits that hold over *any* one-second window.

The server counts requests over a sliding one-second window, so a token bucket
(which lets ``2N`` through around a bucket boundary) would be throttled. Each
:class:`SlidingWindowLimiter` instead keeps a log of its last ``N`` grant times
and grants a new slot only once the oldest of them is a full window old. That
invariant — any ``N + 1`` consecutive grants span at least a window — is the
same as "no window holds more than ``N``".

The client takes its slot when it sends; the server counts on arrival. Network
jitter can bring two sends closer together on arrival than they were on
departure, so the window is widened by a small ``guard`` (15 ms by default).

Waiters queue behind one :class:`asyncio.Lock`, which is FIFO and gives up a
cancelled waiter's place; the holder sleeps until its slot is due, so grants go
out in arrival order. :meth:`SlidingWindowLimiter.penalize` pauses every sender
for a while after the server says it throttled us; the pause lapses by itself.

:class:`RateLimits` holds the per-action numbers (the documented limits by
default) and :class:`RateLimiter` keeps one limiter per action.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

Clock = Callable[[], float]

#: Default window widening that absorbs send/arrival jitter, in seconds.
DEFAULT_GUARD = 0.015

_ACTION_FIELDS: Mapping[str, str] = {
    "UpdateSegment": "update",
    "StopSegment": "stop",
    "StartSegment": "start",
    "GetSegmentTask": "get",
}


class SlidingWindowLimiter:
    """At most ``limit`` grants in any ``window + guard`` seconds, FIFO."""

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
        self._grants: deque[float] = deque(maxlen=limit)
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def delay(self) -> float:
        """Seconds until a slot would be free, ignoring queued waiters."""
        now = self._clock()
        due = self._paused_until
        if len(self._grants) == self.limit:
            due = max(due, self._grants[0] + self.span)
        return max(0.0, due - now)

    async def acquire(self) -> float:
        """Wait for a slot and take it; return the grant time (clock units)."""
        async with self._lock:
            # Loop: a penalty may arrive while we sleep, and the loop may wake early.
            while True:
                wait = self.delay()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            granted = self._clock()
            self._grants.append(granted)
            return granted

    def penalize(self, seconds: float) -> None:
        """Hold every sender back for ``seconds`` from now (longest pause wins)."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until


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
        """Wait for a slot for ``action``; return the grant time."""
        return await self.for_action(action).acquire()

    def penalize(self, action: str, seconds: float) -> None:
        """Pause every sender of ``action`` for ``seconds``."""
        self.for_action(action).penalize(seconds)
