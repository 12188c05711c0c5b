"""The adaptive in-flight limit: pure computation on a fake clock, then real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator

import pytest

from reconciler.api.client import ClientConfig, RtcClient
from reconciler.api.concurrency import AdaptiveLimit, in_flight_for, percentile
from reconciler.api.credentials import Credentials
from reconciler.api.ratelimit import RateLimits
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.engine.metrics import Metrics
from tests.conftest import ACCESS_KEY, SECRET_KEY

BUDGETS = {"UpdateSegment": 150.0, "GetSegmentTask": 20.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit_of(clock: FakeClock | None = None, **overrides: object) -> AdaptiveLimit:
    settings: dict[str, object] = {"budget": BUDGETS.__getitem__, "ceiling": 512}
    if clock is not None:
        settings["clock"] = clock
    settings.update(overrides)
    return AdaptiveLimit(**settings)  # type: ignore[arg-type]


def formula(*demand: tuple[float, float]) -> int:
    """:func:`in_flight_for` with the default bounds and a ceiling of 512."""
    return in_flight_for(demand, headroom=1.25, spare=8, floor=16, ceiling=512)


# -- the formula --------------------------------------------------------------------------


def test_in_flight_for_is_budget_times_latency_with_headroom_clamped() -> None:
    assert formula((150, 1.0)) == 188 + 8
    assert formula((150, 2.0)) == 375 + 8
    assert formula((150, 0.3)) == 57 + 8
    # Tiny latency: the floor; a server stuck for 10 s: the ceiling.
    assert formula((150, 0.01)) == 16
    assert formula((150, 10.0)) == 512
    # Streams add up: updates at 1 s and reads at 0.5 s.
    assert formula((150, 1.0), (20, 0.5)) == 200 + 8
    assert formula() == 16
    assert in_flight_for([(150, 2.0)], headroom=1.0, spare=0, floor=1, ceiling=1000) == 300


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.9) is None
    assert percentile([5.0], 0.9) == 5.0
    assert percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert percentile([float(i) for i in range(1, 101)], 0.5) == 50.0


def test_initial_limit_until_a_latency_is_known() -> None:
    limit = limit_of(FakeClock())
    assert limit.limit == 64 and limit.target() == 64
    assert limit.latency("UpdateSegment") is None and limit.latencies() == {}


def test_limit_follows_the_tail_of_jittered_latencies() -> None:
    limit = limit_of(FakeClock())
    rng = random.Random(3)
    samples = [rng.uniform(1.0, 1.5) for _ in range(256)]
    for s in samples:
        limit.observe("UpdateSegment", s)
    estimate = limit.latency("UpdateSegment")
    assert estimate is not None and estimate == percentile(samples, 0.9)
    mean = sum(samples) / len(samples)
    # The mean would leave the slowest tenth of calls without seats.
    assert limit.limit == formula((150, estimate))
    assert limit.limit > formula((150, mean)) + 10


def test_limit_sums_the_budgets_of_the_actions_in_use() -> None:
    limit = limit_of(FakeClock())
    limit.observe("UpdateSegment", 1.0)
    assert limit.limit == 188 + 8
    limit.observe("GetSegmentTask", 0.5)
    assert limit.limit == formula((150, 1.0), (20, 0.5))
    assert limit.latencies() == {"UpdateSegment": 1.0, "GetSegmentTask": 0.5}


def test_limit_is_clamped_and_follows_latency_down() -> None:
    limit = limit_of(FakeClock(), ceiling=300, floor=10)
    limit.observe("UpdateSegment", 5.0)
    assert limit.limit == 300
    for _ in range(256):  # the old samples age out of the window
        limit.observe("UpdateSegment", 0.005)
    assert limit.limit == 10


def test_floor_and_initial_never_exceed_a_small_ceiling() -> None:
    limit = limit_of(FakeClock(), ceiling=1)
    assert (limit.floor, limit.initial, limit.limit) == (1, 1, 1)
    limit.observe("UpdateSegment", 2.0)
    assert limit.limit == 1


def test_changes_are_reported() -> None:
    seen: list[tuple[int, int]] = []
    limit = limit_of(FakeClock(), on_change=lambda old, new: seen.append((old, new)))
    limit.observe("UpdateSegment", 1.0)
    limit.observe("UpdateSegment", 1.0)  # same target: no report
    assert seen == [(64, 196)]


def test_a_failed_attempt_is_no_sample() -> None:
    clock = FakeClock()
    limit = limit_of(clock)
    with pytest.raises(ConnectionError), limit.measure("UpdateSegment"):
        clock.now += 3.0
        raise ConnectionError
    assert limit.latency("UpdateSegment") is None and limit.limit == 64
    with limit.measure("UpdateSegment"):
        clock.now += 2.0
    assert limit.latency("UpdateSegment") == 2.0 and limit.limit == 383


# -- seats: grow, shrink, cancel -----------------------------------------------------------


async def hold(limit: AdaptiveLimit, release: asyncio.Event, entered: list[int]) -> None:
    async with limit:
        entered.append(1)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_shrinking_cancels_nothing_and_admits_only_below_the_new_limit() -> None:
    async def main() -> None:
        limit = limit_of()
        gates = [asyncio.Event() for _ in range(64)]
        entered: list[int] = []
        holders = [asyncio.create_task(hold(limit, g, entered)) for g in gates]
        await settle()
        assert limit.in_use == 64 and len(entered) == 64
        for _ in range(10):
            limit.observe("UpdateSegment", 0.001)
        assert limit.limit == 16
        await settle()
        assert not any(t.done() for t in holders) and limit.in_use == 64

        late_gate = asyncio.Event()
        late = asyncio.create_task(hold(limit, late_gate, entered))
        await settle()
        assert len(entered) == 64 and limit.waiting == 1
        for g in gates[:48]:  # 16 left: not below the limit yet
            g.set()
        await settle()
        assert limit.in_use == 16 and len(entered) == 64
        gates[48].set()
        await settle()
        assert len(entered) == 65 and limit.in_use == 16
        for g in [*gates[49:], late_gate]:
            g.set()
        await asyncio.gather(*holders, late)
        assert all(not t.cancelled() for t in holders) and limit.in_use == 0

    asyncio.run(main())


def test_growing_admits_waiters_at_once_in_order() -> None:
    async def main() -> None:
        limit = limit_of()
        gate = asyncio.Event()
        order: list[int] = []

        async def numbered(i: int) -> None:
            async with limit:
                order.append(i)
                await gate.wait()

        tasks = [asyncio.create_task(numbered(i)) for i in range(100)]
        await settle()
        assert order == list(range(64)) and limit.waiting == 36
        limit.observe("UpdateSegment", 1.0)  # 196 seats now
        await settle()
        assert order == list(range(100)) and limit.waiting == 0
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_cancelled_waiters_take_no_seat() -> None:
    async def main() -> None:
        limit = limit_of(ceiling=2, floor=2, initial=2)
        await limit.acquire()
        await limit.acquire()
        queued = asyncio.create_task(limit.acquire())
        await settle()
        assert limit.waiting == 1
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        assert limit.waiting == 0 and limit.in_use == 2
        # Granted a seat, then cancelled before it could resume: the seat comes back.
        granted = asyncio.create_task(limit.acquire())
        await settle()
        limit.release()
        granted.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await granted
        assert granted.cancelled() and limit.in_use == 1
        limit.release()
        assert limit.in_use == 0
        await limit.acquire()  # nothing left queued or leaked
        assert limit.in_use == 1

    asyncio.run(main())


# -- unanswered attempts -------------------------------------------------------------------


class _Unanswered(Exception):
    """Ends the attempts of :func:`outstanding` without an answer (no sample)."""


@contextlib.contextmanager
def outstanding(limit: AdaptiveLimit, clock: FakeClock, ages: list[float]) -> Iterator[None]:
    """Attempts on the wire that started ``ages`` seconds ago; they end unanswered."""
    now = clock.now
    with contextlib.ExitStack() as stack:
        for age in sorted(ages, reverse=True):  # oldest first, as real attempts start
            clock.now = now - age
            stack.enter_context(limit.measure("UpdateSegment"))
        clock.now = now
        yield
        raise _Unanswered


def with_waiter(limit: AdaptiveLimit, check: Callable[[], None]) -> None:
    """Run ``check`` while a caller waits for a seat (all seats taken)."""

    async def main() -> None:
        gate = asyncio.Event()
        entered: list[int] = []
        holders = [asyncio.create_task(hold(limit, gate, entered)) for _ in range(limit.limit)]
        await settle()
        waiter = asyncio.create_task(limit.acquire())
        await settle()
        try:
            check()
        finally:
            waiter.cancel()
            gate.set()
            await asyncio.gather(*holders, waiter, return_exceptions=True)

    asyncio.run(main())


def test_unanswered_attempts_raise_the_limit_only_while_callers_wait() -> None:
    clock = FakeClock()
    limit = limit_of(clock)
    with pytest.raises(_Unanswered), outstanding(limit, clock, [1.0] * 64):
        # Nobody waits: the limit holds nobody back and stays.
        assert limit.target() == 64

        def check() -> None:
            assert limit.latency("UpdateSegment") == pytest.approx(1.0)
            assert limit.refresh() == 196

        with_waiter(limit, check)
    # The attempts left without an answer: no sample, and the bound went with them.
    assert limit.latency("UpdateSegment") is None


def test_young_unanswered_attempts_never_lower_the_initial_limit() -> None:
    clock = FakeClock()
    limit = limit_of(clock)
    with pytest.raises(_Unanswered), outstanding(limit, clock, [0.1] * 64):

        def check() -> None:
            assert limit.latency("UpdateSegment") == pytest.approx(0.1)
            assert limit.refresh() == 64

        with_waiter(limit, check)


def test_one_straggler_does_not_swing_the_limit() -> None:
    clock = FakeClock()
    limit = limit_of(clock)
    for _ in range(50):
        limit.observe("UpdateSegment", 0.2)
    assert limit.limit == 46
    # One attempt out for 8 s among 45 young ones; the 10 % oldest rank is young.
    with pytest.raises(_Unanswered), outstanding(limit, clock, [8.0] + [0.1] * 45):

        def check() -> None:
            assert limit.latency("UpdateSegment") == pytest.approx(0.2)
            assert limit.refresh() == 46

        with_waiter(limit, check)


def test_the_timer_grows_the_limit_while_no_answer_comes() -> None:
    clock = FakeClock()

    async def main() -> int:
        limit = limit_of(clock, tick=0.01)
        entered: list[int] = []
        gate, reached = asyncio.Event(), asyncio.Event()

        async def on_the_wire() -> None:
            async with limit:
                entered.append(1)
                if len(entered) >= 196:
                    reached.set()
                with limit.measure("UpdateSegment"):
                    await gate.wait()

        tasks = [asyncio.create_task(on_the_wire()) for _ in range(300)]
        await settle()
        assert len(entered) == 64
        clock.now += 1.0  # a second passes and no answer comes
        await asyncio.wait_for(reached.wait(), timeout=10)
        grown = limit.limit
        gate.set()
        await asyncio.gather(*tasks)
        return grown

    assert asyncio.run(main()) >= 196


# -- through real loopback HTTP -----------------------------------------------------------


def busiest_second(times: list[float]) -> int:
    """Most of ``times`` in any half-open one-second interval."""
    ordered = sorted(times)
    best = j = 0
    for i, start in enumerate(ordered):
        while j < len(ordered) and ordered[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def test_a_slow_server_gets_more_than_64_in_flight_and_the_budget(
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    """300 calls, 1 s latency, 150/s: with 64 in flight at most 64 could arrive in a second.

    Every request that arrives within one second is still unanswered at its
    end (each takes at least 1 s), so the busiest second at the server counts
    requests in flight together, however slow this machine is.
    """
    calls = 300
    h = make_emulator(latency_ms=1000, qps={"UpdateSegment": 150}, seed=1)
    keys = [TaskKey("app1", "room1", f"slow{i}") for i in range(calls)]
    for key in keys:
        h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)
    config = ClientConfig(
        endpoint=h.url, limits=RateLimits(update=150), trust_env=False, max_attempts=1
    )

    async def main() -> tuple[int, int, float]:
        async with RtcClient(Credentials(ACCESS_KEY, SECRET_KEY), config=config) as client:
            peak_in_flight = peak_limit = 0
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak_in_flight, peak_limit
                while not done.is_set():
                    peak_in_flight = max(peak_in_flight, client.in_flight)
                    peak_limit = max(peak_limit, client.in_flight_limit)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.01)

            sampler = asyncio.create_task(sample())
            await asyncio.gather(
                *(client.update_segment({**k.identity(), "Handle": True}) for k in keys)
            )
            done.set()
            await sampler
            return peak_in_flight, peak_limit, client.latency_estimates_ms["UpdateSegment"]

    peak_in_flight, peak_limit, latency_ms = asyncio.run(main())
    stats = h.stats_snapshot()
    assert stats["throttled"] == 0
    assert stats["by_action"]["UpdateSegment"]["ok"] == calls
    assert latency_ms >= 1000 and peak_limit >= 196 and peak_in_flight > 100
    arrivals: list[float] = []
    for key in keys:
        live = h.live(key)
        assert live is not None
        arrivals.extend(live.update_times)
    # The budget is 150 in any second (the client's window is 15 ms wider).
    assert 120 <= busiest_second(arrivals) <= 150


def test_metrics_show_the_limit_and_its_latency_estimate() -> None:
    async def main() -> str:
        config = ClientConfig(trust_env=False)
        async with RtcClient(Credentials(ACCESS_KEY, SECRET_KEY), config=config) as client:
            metrics = Metrics()
            metrics.watch_client(
                limit=lambda: client.in_flight_limit, latency_ms=lambda: client.latency_estimates_ms
            )
            before = metrics.render().decode()
            assert "reconciler_in_flight_limit 512.0" in before
            client._limit.observe("UpdateSegment", 1.0)
            return metrics.render().decode()

    text = asyncio.run(main())
    assert "reconciler_in_flight_limit 196.0" in text
    assert 'reconciler_latency_estimate_seconds{action="UpdateSegment"} 1.0' in text


def test_reads_waiting_for_their_budget_hold_no_seats_updates_need(
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    """60 readers on a 5/s read budget, then 20 updates: the updates do not queue behind them.

    A seat is taken only once the QPS slot is granted, so callers waiting for
    their action's budget hold none; otherwise the readers would hold every
    seat for seconds (16 seats, 5 reads a second) and the updates would wait.
    """
    h = make_emulator(latency_ms=10, seed=1)
    reads = TaskKey("app1", "room1", "read")
    keys = [TaskKey("app1", "room1", f"u{i}") for i in range(20)]
    for key in [reads, *keys]:
        h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)
    config = ClientConfig(
        endpoint=h.url, limits=RateLimits(update=150, get=5), trust_env=False, max_attempts=1
    )

    async def main() -> tuple[int, float]:
        async with RtcClient(Credentials(ACCESS_KEY, SECRET_KEY), config=config) as client:
            stop = asyncio.Event()

            async def reader() -> None:
                while not stop.is_set():
                    await client.get_segment_task(
                        app_id=reads.app_id, room_id=reads.room_id, task_id=reads.task_id
                    )

            readers = [asyncio.create_task(reader()) for _ in range(60)]
            held = 0
            for _ in range(50):  # half a second of reads: a queue of 60 for 5 a second
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.01)
                held = max(held, client.in_flight)
            started = asyncio.get_running_loop().time()
            await asyncio.gather(
                *(client.update_segment({**k.identity(), "Handle": True}) for k in keys)
            )
            took = asyncio.get_running_loop().time() - started
            stop.set()
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            return held, took

    held, took = asyncio.run(main())
    # At most a few reads on the wire at once; none waiting in a seat.
    assert held <= 5, f"{held} seats held by reads"
    # Behind 16 seated readers the updates would wait about 3 s; alone, some 10s of ms.
    assert took < 1.5, f"20 updates took {took:.2f} s"
