"""A keyed work queue in the manner of client-go's ``workqueue``.

Guarantees the daemon relies on:

- **Dedupe**: a key queued twice is one item. Workers look up the latest
  desired spec when they take a key, so the item always carries it.
- **No concurrent processing of one key**: a key added while a worker holds it
  is marked dirty and queued again when that worker calls :meth:`done`.
- **Delays**: :meth:`add_after` schedules a key; the earlier of two schedules
  wins. :meth:`add_rate_limited` schedules with per-key capped exponential
  backoff; :meth:`forget` resets it once the key succeeds.
- **Shutdown**: after :meth:`shutdown`, :meth:`get` returns ``None`` so workers
  finish what they hold and stop (graceful drain).

It is single-threaded asyncio code, without locks. Each item wakes one waiting
worker, and one timer (armed only while workers wait) wakes them for delayed
items: a shared event would wake every idle worker for every key, which with
hundreds of workers (one per request in flight) costs more than the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(
        self,
        *,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._base = backoff_base
        self._cap = backoff_cap
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # --- adding ---------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue ``key`` now (no-op if already queued; deferred if being processed)."""
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._due.pop(key, None)  # a ready item supersedes a scheduled one
        self._queued.add(key)
        self._ready.append(key)
        self._wake_one()

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds, unless it is due sooner anyway."""
        if self._closed:
            return
        if delay <= 0:
            self.add(key)
            return
        if key in self._queued:
            return
        when = self._clock() + delay
        current = self._due.get(key)
        if current is not None and current <= when:
            return
        self._due[key] = when
        heapq.heappush(self._delayed, (when, next(self._seq), key))
        if self._waiters:
            self._arm()

    def next_delay(self, key: K) -> float:
        """The delay the next :meth:`add_rate_limited` of ``key`` will use."""
        delay: float = min(self._cap, self._base * 2.0 ** self._failures.get(key, 0))
        return delay

    def add_rate_limited(self, key: K) -> float:
        """Schedule ``key`` with its next backoff delay; return that delay."""
        delay = self.next_delay(key)
        self._failures[key] = self._failures.get(key, 0) + 1
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff after a success."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def is_scheduled(self, key: K) -> bool:
        """Queued, delayed or being processed."""
        return key in self._queued or key in self._due or key in self._processing

    # --- taking -----------------------------------------------------------------

    async def get(self) -> K | None:
        """The next ready key, waiting as needed; ``None`` once shut down."""
        while True:
            if self._closed:
                return None
            self._promote_due()
            if self._ready:
                key = self._ready.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                return key
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._arm()
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: hand the wake-up on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise

    def done(self, key: K) -> None:
        """A worker finished ``key``; re-queue it if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shutdown(self) -> None:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- introspection ------------------------------------------------------------

    def __len__(self) -> int:
        """Depth: keys ready or scheduled, not counting those being processed."""
        return len(self._queued) + len(self._due)

    @property
    def processing(self) -> int:
        return len(self._processing)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not cancelled meanwhile
                waiter.set_result(None)
                return

    def _arm(self) -> None:
        """Have the timer fire when the soonest delayed item is due."""
        if not self._delayed:
            return
        due = self._delayed[0][0]
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer_loop is loop:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, due - self._clock()), self._on_timer)
        self._timer_due, self._timer_loop = due, loop

    def _on_timer(self) -> None:
        self._timer = None
        self._promote_due()
        for _ in range(len(self._ready)):
            self._wake_one()
        if self._waiters:
            self._arm()

    def _promote_due(self) -> None:
        now = self._clock()
        while self._delayed and self._delayed[0][0] <= now:
            when, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != when:
                continue  # superseded by a sooner schedule or an immediate add
            del self._due[key]
            if key in self._processing:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)
