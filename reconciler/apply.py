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
) -> ApplyReport:
    """Record the plan's bookkeeping, then make its calls; return every result."""
    recorder.bookkeeping(plan)
    report = ApplyReport()
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in plan.calls:
        queue.put_nowait(call)

    async def worker() -> None:
        while True:
            try:
                call = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            result = await reconciler.reconcile(call)
            report.results.append(result)
            if on_result is not None:
                on_result(result)

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(workers, len(plan.calls)))):
            group.create_task(worker())
    return report
