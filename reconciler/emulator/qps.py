"""Server-side QPS admission: at most N requests per action in any one-second window.

The real service counts arrivals over a sliding window, not per wall-clock
second, so a burst split across a second boundary is throttled like any other.
:class:`SlidingWindowLimiter` keeps a log of admitted arrival times and decides
from an explicit ``now``, so it is tested without sleeping. One limiter per
action: each action has its own budget, as the API documents (GetSegmentTask 60,
UpdateSegment 150, ...).

This is the server's side; the client's own pacing is
:mod:`reconciler.api.ratelimit`, which must keep under these limits.
"""

from __future__ import annotations

from collections import deque

__all__ = ["SlidingWindowLimiter"]


class SlidingWindowLimiter:
    """At most ``limit`` admissions in any window of ``window`` seconds.

    A log of admitted arrival times, not fixed buckets: a burst split across a
    second boundary is limited like any other. A refused request is not logged,
    so it does not use up budget. ``limit`` 0 admits everything.
    """

    def __init__(self, limit: int, *, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> bool:
        if self.limit == 0:
            return True
        horizon = now - self.window
        while self._admitted and self._admitted[0] <= horizon:
            self._admitted.popleft()
        if len(self._admitted) >= self.limit:
            return False
        self._admitted.append(now)
        return True
