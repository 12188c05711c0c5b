"""How many requests to keep in flight: enough to use the QPS budget at the latency seen.

Little's law: a stream of ``B`` requests per second that each take ``W``
seconds keeps ``B * W`` of them in flight. A fixed cap is therefore right for
one latency only: 64 in flight carry 150/s up to about 0.4 s, and against a
server answering in 1 s they carry 64/s. :class:`AdaptiveLimit` is a resizable
semaphore whose limit follows the latency::

    limit = clamp(ceil(headroom * sum(budget[a] * latency[a] for a in actions)) + spare,
                  floor, ceiling)

* **Per action, summed.** ``budget[a]`` is the configured QPS of each action
  this client has called (``RateLimits``: UpdateSegment 150, GetSegmentTask
  reads their own), ``latency[a]`` that action's estimate. Independent
  streams add up under Little's law, and reads and updates need not take
  equally long, so one latency times the sum of the budgets would be wrong
  whenever they differ. The configured budget, not the observed rate: the
  observed rate is capped by this very limit and would never let it grow. An
  action called once keeps its term: the limit is a cap, not a target; the QPS
  limiter still paces what is sent, and the seats are ready for the next burst.
* **Latency estimate: a high percentile** (``quantile``, the 90th) of the
  last ``keep`` answered attempts of the action. The mean underestimates
  when answers jitter: the calls that take longest hold their seats longest.
  Only *wire time* counts, from sending to the answer: time spent waiting
  for a seat or a QPS slot would feed back (a longer queue, a higher limit,
  a longer queue). Attempts that got no answer (refused, timed out,
  cancelled) give no sample.
* **Unanswered attempts are evidence too.** An attempt still unanswered after
  ``t`` seconds proves its latency is at least ``t``; if a tenth of the
  attempts on the wire have been out for ``t``, the 90th percentile is at
  least ``t``. While callers wait for a seat (the only time the limit holds
  anyone back), the estimate is raised to that age (the same ``quantile``,
  counted from the oldest), re-evaluated every ``tick`` seconds. So the limit
  grows while the first answers are still on their way (start-up against a
  2 s server does not idle at 64 for a whole round trip), and a server that
  slows down is followed within a fraction of its new latency. A rank, not
  the oldest: one straggler among many does not swing the limit. With nobody
  waiting no timer runs and the bound is left out.
* **Headroom and spare**: ``headroom`` (1.25) covers the fluctuation of the
  number in flight around its mean and an estimate that lags; ``spare`` (8)
  covers the moments a seat is held off the wire (signing, connecting) and
  estimates from few samples. The client takes a seat only once its QPS
  slot is granted (:mod:`reconciler.api.client`), so callers waiting for an
  action's budget hold none.
* **Bounds**: ``floor`` (16) keeps a burst moving when the latency is tiny;
  ``ceiling`` (``--max-in-flight``) bounds connections and memory whatever the
  server does. Until some attempt of any action has been answered, the limit
  is ``initial`` (64) or more.

Why not always the ceiling, since the QPS limiter paces sends anyway: each
second's window lets its whole budget go at once, so at 10 ms latency a
ceiling of 512 would open 150 connections in a burst every second where 16
carry the same rate; a limit sized to the need keeps connections, pools and
server bursts small.

Resizing: seats are granted first come, first served while fewer than the
limit are taken. Growing grants waiting callers at once. Shrinking cancels
nothing: calls in flight finish; new ones wait until the count is below the
new limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

Clock = Callable[[], float]

#: Limits for the adaptive in-flight semaphore; see the module docstring.
DEFAULT_FLOOR = 16
DEFAULT_INITIAL = 64
DEFAULT_HEADROOM = 1.25
DEFAULT_SPARE = 8
DEFAULT_QUANTILE = 0.9
DEFAULT_KEEP = 256
DEFAULT_TICK = 0.1


def percentile(samples: Iterable[float], q: float) -> float | None:
    """Nearest-rank ``q``-quantile (``q`` in (0, 1]) of ``samples``; ``None`` if empty."""
    ordered = sorted(samples)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def in_flight_for(
    demand: Iterable[tuple[float, float]],
    *,
    headroom: float,
    spare: int,
    floor: int,
    ceiling: int,
) -> int:
    """The limit for ``(budget per second, latency in seconds)`` pairs: Little's law, clamped."""
    needed = headroom * sum(budget * latency for budget, latency in demand)
    return max(floor, min(ceiling, math.ceil(needed) + spare))


class _Stream:
    """One action's answered latencies and its attempts still on the wire."""

    __slots__ = ("_estimate", "budget", "outstanding", "samples")

    def __init__(self, budget: float, keep: int) -> None:
        self.budget = budget
        self.samples: deque[float] = deque(maxlen=keep)
        # Send times by attempt number; attempts start in clock order, so the
        # dict's insertion order is oldest first.
        self.outstanding: dict[int, float] = {}
        self._estimate: float | None = None

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._estimate = None

    def answered(self, q: float) -> float | None:
        if self._estimate is None and self.samples:
            self._estimate = percentile(self.samples, q)
        return self._estimate

    def age_at(self, q: float, now: float) -> float | None:
        """Age of the outstanding attempt a ``1 - q`` share of them are older than or as old as."""
        n = len(self.outstanding)
        if not n:
            return None
        # Nearest rank counted from the oldest, which is first in insertion order.
        rank = max(1, math.ceil((1 - q) * n))
        start = next(itertools.islice(self.outstanding.values(), rank - 1, None))
        return now - start


class AdaptiveLimit:
    """A semaphore whose limit follows Little's law; see the module docstring.

    Use ``async with limit:`` for a seat, and ``with limit.measure(action):``
    around the part of the attempt that is on the wire. ``budget(action)`` is
    the QPS configured for an action. ``on_change(old, new)`` hears of every
    change of the limit.
    """

    def __init__(
        self,
        *,
        budget: Callable[[str], float],
        ceiling: int,
        floor: int = DEFAULT_FLOOR,
        initial: int = DEFAULT_INITIAL,
        headroom: float = DEFAULT_HEADROOM,
        spare: int = DEFAULT_SPARE,
        quantile: float = DEFAULT_QUANTILE,
        keep: int = DEFAULT_KEEP,
        tick: float = DEFAULT_TICK,
        clock: Clock = time.monotonic,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        if min(ceiling, floor, initial, keep) < 1 or spare < 0:
            raise ValueError("ceiling, floor, initial and keep must be at least 1, spare >= 0")
        if headroom < 1 or not 0 < quantile <= 1 or tick <= 0:
            raise ValueError("headroom must be >= 1, quantile in (0, 1], tick positive")
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.initial = max(self.floor, min(initial, ceiling))
        self.headroom = headroom
        self.spare = spare
        self.quantile = quantile
        self._budget = budget
        self._keep = keep
        self._tick = tick
        self._clock = clock
        self._on_change = on_change
        self._limit = self.initial
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    # -- what it is now ------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Seats now; calls beyond it wait."""
        return self._limit

    @property
    def in_use(self) -> int:
        """Seats taken (may exceed :attr:`limit` for a while after it shrank)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def latency(self, action: str) -> float | None:
        """The latency estimate for ``action`` in seconds, as the limit uses it now."""
        stream = self._streams.get(action)
        if stream is None:
            return None
        return self._estimate(stream, censored=self._censoring(), now=self._clock())

    def latencies(self) -> dict[str, float]:
        """Estimates, in seconds, for every action that has one."""
        out = {}
        for action in self._streams:
            estimate = self.latency(action)
            if estimate is not None:
                out[action] = estimate
        return out

    def target(self) -> int:
        """The limit the current estimates call for."""
        now = self._clock()
        censored = self._censoring()
        demand = []
        answered = False
        for stream in self._streams.values():
            answered = answered or bool(stream.samples)
            estimate = self._estimate(stream, censored=censored, now=now)
            if estimate is not None:
                demand.append((stream.budget, estimate))
        limit = in_flight_for(
            demand,
            headroom=self.headroom,
            spare=self.spare,
            floor=self.floor,
            ceiling=self.ceiling,
        )
        # No answer yet: unanswered attempts may raise the limit, never lower it.
        return limit if answered else max(self.initial, limit)

    def refresh(self) -> int:
        """Set the limit to :meth:`target`, grant seats it frees; return the limit."""
        new = self.target()
        if new != self._limit:
            old, self._limit = self._limit, new
            if self._on_change is not None:
                self._on_change(old, new)
            self._grant()
        return new

    # -- latency samples -------------------------------------------------------------

    @contextlib.contextmanager
    def measure(self, action: str) -> Iterator[None]:
        """Time the wire part of one attempt; a sample only if the block exits normally."""
        stream = self._stream(action)
        attempt = next(self._ids)
        started = self._clock()
        stream.outstanding[attempt] = started
        try:
            yield
        finally:
            del stream.outstanding[attempt]
        self.observe(action, self._clock() - started)

    def observe(self, action: str, seconds: float) -> None:
        """Record an answered attempt of ``action`` that took ``seconds``, and resize."""
        self._stream(action).add(max(0.0, seconds))
        self.refresh()

    def _stream(self, action: str) -> _Stream:
        stream = self._streams.get(action)
        if stream is None:
            stream = self._streams[action] = _Stream(self._budget(action), self._keep)
        return stream

    # -- seats -------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait for a seat, first come first served."""
        if not self._waiters and self._in_use < self._limit:
            self._in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._arm()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it could run: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_use -= 1
        self._grant()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- inside ------------------------------------------------------------------------

    def _censoring(self) -> bool:
        return any(not w.done() for w in self._waiters)

    def _estimate(self, stream: _Stream, *, censored: bool, now: float) -> float | None:
        estimate = stream.answered(self.quantile)
        if censored:
            age = stream.age_at(self.quantile, now)
            if age is not None and (estimate is None or age > estimate):
                estimate = age
        return estimate

    def _grant(self) -> None:
        while self._waiters and self._in_use < self._limit:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while queued
                continue
            self._in_use += 1
            waiter.set_result(None)

    def _arm(self) -> None:
        """While anyone waits, re-evaluate every ``tick``: no answer may come for a while."""
        loop = asyncio.get_running_loop()
        # A timer left pending by a loop that has since closed will never fire.
        if self._timer is None or self._timer_loop is not loop:
            self._timer = loop.call_later(self._tick, self._on_tick)
            self._timer_loop = loop

    def _on_tick(self) -> None:
        self._timer = None
        if not self._censoring():
            return
        self.refresh()
        if self._censoring():
            self._arm()
