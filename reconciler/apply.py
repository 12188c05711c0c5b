"""One-shot apply: make a plan's calls concurrently within the QPS budget.

A fixed pool of workers pulls calls from a queue, so concurrency is bounded by
the pool (and, per action, by the client's limiter) however long the plan is.
Each result is recorded as it arrives, through the shared
:class:`~reconciler.reconcile.TaskReconciler`, so a crash mid-run loses nothing
already confirmed. A :class:`~reconciler.errors.FatalError` (credentials,
permissions) cancels every worker at once and propagates: one clear message
instead of the same refusal for every task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.plan import Call, Plan
from reconciler.reconcile import Outcome, Recorder, Result, TaskReconciler
from reconciler.task import TaskKey


@dataclass(slots=True)
class ApplyReport:
    results: list[Result] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def ok(self) -> bool:
        """CONTRACT §3: every call succeeded or found its task not running."""
        return all(r.outcome in (Outcome.SYNCED, Outcome.NOT_RUNNING) for r in self.results)


async def apply_plan(
    plan: Plan,
    *,
    reconciler: TaskReconciler,
    recorder: Recorder,
    workers: int,
    on_result: Callable[[Result], None] | None = None,
    retry_passes: int = 2,
    retry_pause: float = 1.0,
) -> ApplyReport:
    """Record the plan's bookkeeping, then make its calls; return every result.

    Calls that failed transiently (retries spent, or an outcome still unknown
    after its one re-send) get up to ``retry_passes`` more passes, after a
    pause that doubles each time: "later", within the same run.
    """
    recorder.bookkeeping(plan)
    final: dict[TaskKey, Result] = {}
    calls = list(plan.calls)
    pause = retry_pause
    for attempt in range(retry_passes + 1):
        for result in await _pass(calls, reconciler=reconciler, workers=workers):
            final[result.key] = result
            if on_result is not None and (
                result.outcome is not Outcome.RETRY or attempt == retry_passes
            ):
                on_result(result)
        retry = {k for k, r in final.items() if r.outcome is Outcome.RETRY}
        calls = [c for c in calls if c.key in retry]
        if not calls or attempt == retry_passes:
            break
        await asyncio.sleep(pause)
        pause *= 2
    return ApplyReport(list(final.values()))


async def _pass(calls: list[Call], *, reconciler: TaskReconciler, workers: int) -> list[Result]:
    """One pass over ``calls`` by a pool of workers."""
    results: list[Result] = []
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)

    async def worker() -> None:
        while True:
            try:
                call = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await reconciler.reconcile(call))

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(workers, len(calls)))):
            group.create_task(worker())
    return results
