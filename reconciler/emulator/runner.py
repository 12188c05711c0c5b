"""Ways to run an :class:`~reconciler.emulator.server.Emulator`: in a thread, or until cancelled.

:func:`running_emulator` gives synchronous tests (and async clients living on
another event loop) an emulator on a private loop in a daemon thread, wrapped
in an :class:`EmulatorHandle`. The emulator's state is only ever touched on
its own loop, so it needs no locks: every handle method hops onto that loop
with ``call_soon_threadsafe`` and waits for the result, which makes the
handle thread-safe and keeps each operation atomic with respect to requests.
Exceptions raised there (``ValueError``, :class:`~reconciler.emulator.tasks.UnknownTaskError`,
...) are re-raised in the calling thread.

:func:`serve` runs one on the current loop until cancelled (the CLI, and the
daemon's ``--emulator``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from reconciler.core.task import TaskKey
from reconciler.emulator.config import EmulatorConfig
from reconciler.emulator.params import DURATION_DEFAULT, MAX_IDLE_DEFAULT, JsonObject
from reconciler.emulator.server import Emulator
from reconciler.emulator.tasks import DEFAULT_STOP_REASON, LiveTask

__all__ = ["EmulatorHandle", "running_emulator", "serve"]

_T = TypeVar("_T")


class EmulatorHandle:
    """An emulator running on its own loop in a thread; helpers are thread-safe."""

    def __init__(self, emulator: Emulator, loop: asyncio.AbstractEventLoop, url: str) -> None:
        self.emulator = emulator
        self.url = url
        self._loop = loop

    def _call(self, fn: Callable[[], _T]) -> _T:
        done: Future[_T] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed back to the calling thread
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def start_task(
        self,
        *,
        app_id: str,
        room_id: str,
        task_id: str,
        business_id: str | None = None,
        identifier: str | None = None,
        handle: bool = True,
        duration: int = DURATION_DEFAULT,
        max_idle_time: int = MAX_IDLE_DEFAULT,
    ) -> None:
        self._call(
            lambda: self.emulator.start_task(
                app_id=app_id,
                room_id=room_id,
                task_id=task_id,
                business_id=business_id,
                identifier=identifier,
                handle=handle,
                duration=duration,
                max_idle_time=max_idle_time,
            )
        )

    def stop_task(self, key: TaskKey) -> bool:
        return self._call(lambda: self.emulator.stop_task(key))

    def end_task(self, key: TaskKey, *, stop_reason: str = DEFAULT_STOP_REASON) -> LiveTask:
        """End a running task as the service would; see :meth:`Emulator.end_task`."""
        return self._call(lambda: self.emulator.end_task(key, stop_reason=stop_reason))

    def restart_task(
        self,
        key: TaskKey,
        *,
        identifier: str | None = None,
        handle: bool | None = None,
        duration: int | None = None,
        max_idle_time: int | None = None,
    ) -> LiveTask:
        """Start a task again as a new incarnation; see :meth:`Emulator.restart_task`."""
        return self._call(
            lambda: self.emulator.restart_task(
                key,
                identifier=identifier,
                handle=handle,
                duration=duration,
                max_idle_time=max_idle_time,
            )
        )

    def set_task(
        self,
        key: TaskKey,
        *,
        identifier: str | None = None,
        handle: bool | None = None,
        duration: int | None = None,
    ) -> LiveTask:
        """Change live fields as another client would; see :meth:`Emulator.set_task`."""
        return self._call(
            lambda: self.emulator.set_task(
                key, identifier=identifier, handle=handle, duration=duration
            )
        )

    def age_task(self, key: TaskKey, *, started_seconds_ago: float) -> LiveTask:
        """Move a task's StartTime back; see :meth:`Emulator.age_task`."""
        return self._call(
            lambda: self.emulator.age_task(key, started_seconds_ago=started_seconds_ago)
        )

    def live(self, key: TaskKey) -> LiveTask | None:
        return self._call(lambda: self.emulator.live(key))

    def tasks(self) -> list[LiveTask]:
        return self._call(self.emulator.tasks)

    def faults(self) -> JsonObject:
        """The faults and QPS limits in force."""
        return self._call(self.emulator.faults)

    def stats_snapshot(self) -> JsonObject:
        return self._call(self.emulator.stats.snapshot)

    def reset_stats(self) -> None:
        self._call(self.emulator.stats.reset)

    def set_faults(
        self,
        *,
        latency_ms: float | None = None,
        jitter_ms: float | None = None,
        error_rate: float | None = None,
        drop_rate: float | None = None,
        drop_phase: str | None = None,
        qps: Mapping[str, int] | None = None,
    ) -> JsonObject:
        return self._call(
            lambda: self.emulator.set_faults(
                latency_ms=latency_ms,
                jitter_ms=jitter_ms,
                error_rate=error_rate,
                drop_rate=drop_rate,
                drop_phase=drop_phase,
                qps=qps,
            )
        )


@contextmanager
def running_emulator(
    config: EmulatorConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[EmulatorHandle]:
    """Run an emulator on a private event loop in a background thread (``clock``: see
    :class:`~reconciler.emulator.server.Emulator`)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="rtc-emulator", daemon=True)
    thread.start()
    emulator = Emulator(config, clock=clock)
    try:
        url = asyncio.run_coroutine_threadsafe(emulator.start(host=host, port=port), loop).result(
            timeout=10
        )
        yield EmulatorHandle(emulator, loop, url)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(emulator.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


async def serve(
    config: EmulatorConfig,
    *,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled; ``ready`` gets the base URL once listening."""
    emulator = Emulator(config)
    url = await emulator.start(host=host, port=port)
    try:
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
