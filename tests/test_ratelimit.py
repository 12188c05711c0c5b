"""The sliding-window limiter, on real time with short windows."""

from __future__ import annotations

import asyncio
import time

import pytest

from reconciler.api.ratelimit import RateLimiter, RateLimits, SlidingWindowLimiter

WINDOW = 0.2


def max_in_any_window(times: list[float], span: float) -> int:
    """Most grants in any half-open interval of length ``span`` (every start checked)."""
    ordered = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(ordered):
        # The busiest windows start at a grant, so checking each grant covers all.
        j = max(j, i)
        while j < len(ordered) and ordered[j] < start + span:
            j += 1
        best = max(best, j - i)
    return best


def test_max_in_any_window_sees_a_window_that_fixed_buckets_would_miss() -> None:
    # Two fixed 1 s buckets hold 2 each, but [0.9, 1.9) holds 4.
    assert max_in_any_window([0.1, 0.9, 0.95, 1.05, 1.1], 1.0) == 4
    assert max_in_any_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_in_any_window([], 1.0) == 0


def test_burst_never_exceeds_limit_in_any_window_and_keeps_the_pace() -> None:
    limit = 5

    async def main() -> tuple[list[float], float]:
        limiter = SlidingWindowLimiter(limit, window=WINDOW, guard=0.0)
        start = time.monotonic()
        grants = await asyncio.gather(*(limiter.acquire() for _ in range(3 * limit)))
        return list(grants), time.monotonic() - start

    grants, elapsed = asyncio.run(main())
    assert len(grants) == 3 * limit
    assert max_in_any_window(grants, WINDOW) == limit
    # Full throughput: batch 1 at once, batch 2 after one window, batch 3 after two.
    # A lost window would show as a third; less than one window of slack is left to a
    # loaded machine (the grants' spacing above is what is exact).
    assert 2 * WINDOW <= elapsed < 3 * WINDOW


def test_guard_widens_the_window() -> None:
    limit, guard = 3, 0.05

    async def main() -> list[float]:
        limiter = SlidingWindowLimiter(limit, window=WINDOW, guard=guard)
        return list(await asyncio.gather(*(limiter.acquire() for _ in range(2 * limit))))

    grants = asyncio.run(main())
    assert max_in_any_window(grants, WINDOW + guard) == limit
    assert grants[limit] - grants[0] >= WINDOW + guard


def test_grants_are_first_come_first_served() -> None:
    async def main() -> list[int]:
        limiter = SlidingWindowLimiter(2, window=0.05, guard=0.0)
        order: list[int] = []

        async def take(i: int) -> None:
            await limiter.acquire()
            order.append(i)

        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(take(i)))
            await asyncio.sleep(0)  # let each one queue before the next arrives
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == list(range(8))


def test_cancelled_waiter_gives_up_its_place_and_takes_no_slot() -> None:
    async def main() -> tuple[float, float, list[float]]:
        limiter = SlidingWindowLimiter(1, window=WINDOW, guard=0.0)
        first = await limiter.acquire()
        # `head` sleeps in the lock until first + WINDOW; `behind` waits for the lock.
        head = asyncio.create_task(limiter.acquire())
        behind = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.02)
        head.cancel()
        with pytest.raises(asyncio.CancelledError):
            await head
        second = await behind
        third = await limiter.acquire()
        return first, second, [first, second, third]

    first, second, grants = asyncio.run(main())
    # `behind` got the slot `head` would have had: one window after the first.
    assert WINDOW <= second - first < WINDOW + 0.06
    assert max_in_any_window(grants, WINDOW) == 1
    assert len(grants) == 3


def test_a_reserved_slot_counts_from_when_it_is_marked_sent() -> None:
    async def main() -> tuple[float, float]:
        limiter = SlidingWindowLimiter(2, window=WINDOW, guard=0.0)
        start = time.monotonic()
        first = await limiter.reserve()
        second = await limiter.reserve()
        # Both pending: a third must wait, however long they take to go out.
        third = asyncio.create_task(limiter.reserve())
        await asyncio.sleep(0.05)
        assert not third.done()
        marked = first.mark()
        assert first.mark() == marked  # marking twice keeps the first time
        second.mark()
        granted = (await third).granted
        return marked - start, granted - marked

    marked_after, waited = asyncio.run(main())
    assert marked_after >= 0.05
    # The window runs from the send, not from the grant 50 ms earlier.
    assert WINDOW <= waited < WINDOW + 0.06


def test_a_waiter_blocked_on_pending_slots_wakes_when_one_is_marked() -> None:
    async def main() -> float:
        limiter = SlidingWindowLimiter(1, window=0.05, guard=0.0)
        slot = await limiter.reserve()
        assert limiter.delay() is None  # nothing to count down until it is sent
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.03)
        sent = slot.mark()
        return await waiter - sent

    assert 0.05 <= asyncio.run(main()) < 0.1


def test_penalize_pauses_every_sender_then_recovers() -> None:
    async def main() -> tuple[float, float, bool, bool]:
        limiter = SlidingWindowLimiter(100, window=WINDOW, guard=0.0)
        await limiter.acquire()
        limiter.penalize(0.15)
        paused = limiter.paused
        start = time.monotonic()
        await asyncio.gather(*(limiter.acquire() for _ in range(5)))
        during = time.monotonic() - start
        start = time.monotonic()
        await limiter.acquire()
        return during, time.monotonic() - start, paused, limiter.paused

    during, after, paused_then, paused_now = asyncio.run(main())
    assert paused_then and not paused_now
    assert 0.14 <= during < 0.3
    assert after < 0.02


def test_penalty_arriving_while_a_waiter_sleeps_is_honoured() -> None:
    async def main() -> float:
        limiter = SlidingWindowLimiter(1, window=0.05, guard=0.0)
        await limiter.acquire()
        start = time.monotonic()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        limiter.penalize(0.15)
        await waiter
        return time.monotonic() - start

    assert asyncio.run(main()) >= 0.15


def test_shorter_penalty_does_not_cut_a_longer_one() -> None:
    now = [100.0]
    limiter = SlidingWindowLimiter(1, clock=lambda: now[0])
    limiter.penalize(2.0)
    limiter.penalize(0.5)
    assert limiter.delay() == pytest.approx(2.0)
    now[0] += 2.0
    assert limiter.delay() == 0.0


def test_delay_uses_the_oldest_of_the_last_n_grants() -> None:
    now = [0.0]

    async def main() -> None:
        limiter = SlidingWindowLimiter(2, window=1.0, guard=0.01, clock=lambda: now[0])
        await limiter.acquire()
        now[0] = 0.5
        await limiter.acquire()
        assert limiter.delay() == pytest.approx(0.51)
        now[0] = 1.01
        assert limiter.delay() == 0.0
        await limiter.acquire()
        assert limiter.delay() == pytest.approx(0.5)

    asyncio.run(main())


def test_rate_limits_defaults_and_overrides() -> None:
    limits = RateLimits()
    assert [limits.for_action(a) for a in ("UpdateSegment", "StopSegment")] == [150, 150]
    assert [limits.for_action(a) for a in ("StartSegment", "GetSegmentTask")] == [60, 60]
    assert limits.for_action("SomethingElse") == 60
    assert RateLimits(update=100).for_action("UpdateSegment") == 100
    mapped = RateLimits.from_mapping({"UpdateSegment": 40, "get": 5})
    assert mapped.for_action("UpdateSegment") == 40
    assert mapped.for_action("GetSegmentTask") == 5
    assert mapped.for_action("StopSegment") == 150


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_rate_limits_refuse_non_positive_or_non_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="update"):
        RateLimits(update=bad)  # type: ignore[arg-type]


def test_rate_limits_refuse_unknown_action() -> None:
    with pytest.raises(ValueError, match="UpdateSegmnet"):
        RateLimits.from_mapping({"UpdateSegmnet": 10})


def test_rate_limiter_keeps_actions_apart() -> None:
    async def main() -> float:
        limiter = RateLimiter(RateLimits(update=1, get=1, window=WINDOW, guard=0.0))
        start = time.monotonic()
        await limiter.acquire("UpdateSegment")
        await limiter.acquire("GetSegmentTask")  # its own window: no wait
        fast = time.monotonic() - start
        limiter.penalize("GetSegmentTask", 5.0)
        assert limiter.for_action("GetSegmentTask").paused
        assert not limiter.for_action("StopSegment").paused
        assert limiter.for_action("UpdateSegment") is limiter.for_action("UpdateSegment")
        return fast

    assert asyncio.run(main()) < 0.05
