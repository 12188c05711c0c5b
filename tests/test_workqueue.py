"""The keyed work queue: dedupe, dirty re-queue, delays, backoff, shutdown."""

from __future__ import annotations

import asyncio
import time

from reconciler.workqueue import WorkQueue


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
