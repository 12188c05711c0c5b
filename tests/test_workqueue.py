"""The keyed work queue: dedupe, dirty re-queue, delays, backoff, shutdown."""

from __future__ import annotations

import asyncio
import time

from reconciler.engine.workqueue import WorkQueue


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_key_queued_twice_is_one_item() -> None:
    async def go() -> list[str | None]:
        q: WorkQueue[str] = WorkQueue()
        for name in ["a", "b", "a", "a", "c", "b"]:
            q.add(name)
        assert len(q) == 3
        got = [await q.get() for _ in range(3)]
        for k in got:
            if k is not None:
                q.done(k)
        return got

    assert run(go()) == ["a", "b", "c"]


def test_key_added_while_processing_is_requeued_once_after_done() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        assert await q.get() == "a"
        q.add("a")
        q.add("a")
        assert len(q) == 0, "not handed to a second worker while held"
        q.done("a")
        assert len(q) == 1
        assert await q.get() == "a"

    run(go())


def test_add_after_waits_and_the_sooner_schedule_wins() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("slow", 5.0)
        q.add_after("slow", 0.05)
        q.add_after("slow", 3.0)
        start = time.monotonic()
        assert await asyncio.wait_for(q.get(), 2.0) == "slow"
        assert 0.04 <= time.monotonic() - start < 1.0

    run(go())


def test_immediate_add_supersedes_a_schedule() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.05)
        q.add("a")
        assert await q.get() == "a"
        q.done("a")
        await asyncio.sleep(0.08)
        assert len(q) == 0, "the stale schedule must not queue it again"

    run(go())


def test_backoff_grows_and_is_capped_and_forget_resets_it() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue(backoff_base=0.5, backoff_cap=3.0)
        delays = []
        for _ in range(5):
            delays.append(q.add_rate_limited("k"))
        assert delays[:3] == [0.5, 1.0, 2.0] and delays[3:] == [3.0, 3.0]
        q.forget("k")
        assert q.failures("k") == 0
        assert q.add_rate_limited("k") == 0.5

    run(go())


def test_shutdown_wakes_waiting_workers_with_none() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        q.shutdown()
        assert await asyncio.wait_for(waiter, 1.0) is None
        q.add("late")
        assert len(q) == 0

    run(go())


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_key_wakes_one_idle_worker_not_all() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        got: list[str | None] = []

        async def worker() -> None:
            got.append(await q.get())

        workers = [asyncio.create_task(worker()) for _ in range(50)]
        await _settle()
        waits = 0
        arm = q._arm

        def counting_arm() -> None:
            nonlocal waits
            waits += 1
            arm()

        q._arm = counting_arm  # type: ignore[method-assign]
        q.add("a")
        await _settle()
        # One worker took it; no other woke up only to wait again.
        assert got == ["a"] and waits == 0
        q.shutdown()
        await asyncio.gather(*workers)
        assert got.count(None) == 49

    run(go())


def test_a_worker_cancelled_after_its_wake_up_hands_it_on() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        first = asyncio.create_task(q.get())
        await _settle()
        second = asyncio.create_task(q.get())
        await _settle()
        q.add("a")  # wakes ``first``...
        first.cancel()  # ...which is cancelled before it runs
        assert await asyncio.wait_for(second, 1.0) == "a"
        assert first.cancelled()

    run(go())


def test_delayed_keys_reach_waiting_workers_one_each() -> None:
    async def go() -> None:
        q: WorkQueue[str] = WorkQueue()
        workers = [asyncio.create_task(q.get()) for _ in range(10)]
        await _settle()
        q.add_after("x", 0.05)
        q.add_after("y", 0.02)
        got: list[str | None] = []
        pending = set(workers)
        while len(got) < 2:
            done, pending = await asyncio.wait(
                pending, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            assert done, "a delayed key never reached a waiting worker"
            got.extend(t.result() for t in done)
        await asyncio.sleep(0.05)
        # Two keys, two workers; the other eight still wait.
        assert sorted(k or "" for k in got) == ["x", "y"] and len(pending) == 8
        assert not any(t.done() for t in pending)
        q.shutdown()
        assert await asyncio.gather(*pending) == [None] * 8

    run(go())
