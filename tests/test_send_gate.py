"""The client's send gate (``RtcClient.gate``) against the emulator over real loopback HTTP.

A daemon replica asks it right before each request is written: every attempt
(retries too), every action (reads too). A closed gate withdraws the request
unsent (:class:`~reconciler.core.errors.CallWithdrawn`); the emulator then counts
nothing for the client's key. The gate is asked once more right before the
body of a POST, which is written apart from its headers: a request cut there
never reaches the server as a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from reconciler.api.client import CallEvent, ClientConfig, RtcClient
from reconciler.api.credentials import Credentials
from reconciler.core.errors import CallWithdrawn
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorConfig, EmulatorHandle, running_emulator

AK, SK = "AKLTgatetestkey000001", "c2VjcmV0LWZvci10aGUtZ2F0ZS10ZXN0cw=="
KEY = TaskKey("app1", "room1", "task1")


@contextmanager
def emulator(**faults: Any) -> Iterator[EmulatorHandle]:
    with running_emulator(EmulatorConfig(credentials={AK: SK}, seed=5, **faults)) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        yield h


class Gate:
    """Answers from ``script`` in turn (then the last one again), and counts the asks."""

    def __init__(self, *script: bool) -> None:
        self.script = list(script)
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.script[min(self.asked, len(self.script)) - 1]


def call(
    h: EmulatorHandle,
    gate: Gate,
    use: Callable[[RtcClient], Awaitable[Any]],
    *,
    on_call: Callable[[CallEvent], None] | None = None,
) -> Any:
    async def main() -> Any:
        config = ClientConfig(
            endpoint=h.url, backoff_base=0.01, backoff_cap=0.05, max_attempts=3, trust_env=False
        )
        async with RtcClient(Credentials(AK, SK), config=config, on_call=on_call) as client:
            client.gate = gate
            return await use(client)

    return asyncio.run(main())


async def update(client: RtcClient) -> Any:
    return await client.update_segment({**KEY.identity(), "Duration": 7})


async def read(client: RtcClient) -> Any:
    return await client.get_segment_task(
        app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id
    )


def update_calls(h: EmulatorHandle) -> int:
    live = h.live(KEY)
    assert live is not None
    return live.update_calls


def arrived(h: EmulatorHandle) -> dict[str, Any]:
    """The client's signed requests the emulator received, by action."""
    by_key: dict[str, Any] = h.stats_snapshot()["by_key"].get(AK, {})
    return {action: sum(per.values()) for action, per in by_key.items()}


@pytest.mark.parametrize("use", [update, read], ids=["UpdateSegment", "GetSegmentTask"])
def test_a_closed_gate_withdraws_the_request_unsent(use: Callable[..., Any]) -> None:
    with emulator() as h:
        with pytest.raises(CallWithdrawn):
            call(h, Gate(False), use)
        assert arrived(h) == {}
        assert update_calls(h) == 0


@pytest.mark.parametrize("use", [update, read], ids=["UpdateSegment", "GetSegmentTask"])
def test_an_open_gate_lets_the_request_go(use: Callable[..., Any]) -> None:
    with emulator() as h:
        gate = Gate(True)
        call(h, gate, use)
        assert sum(arrived(h).values()) == 1
        assert gate.asked >= 2  # POST: headers and body; GET: before and at the write


@pytest.mark.parametrize("use", [update, read], ids=["UpdateSegment", "GetSegmentTask"])
def test_a_retry_asks_the_gate_again(use: Callable[..., Any]) -> None:
    """The first attempt is answered 500; the lease lapses before the retry: not sent."""
    with emulator(error_rate=1.0) as h:
        gate = Gate(True)

        def lapse(event: CallEvent) -> None:
            if event.outcome == "retried":
                gate.script = [False]

        with pytest.raises(CallWithdrawn):
            call(h, gate, use, on_call=lapse)
        assert sum(arrived(h).values()) == 1


def test_a_gate_that_closes_after_the_headers_leaves_no_request() -> None:
    """The headers were written, the body not: the connection is closed, and the server,
    which acts on a request only once all of it came, never sees one."""
    with emulator() as h:
        with pytest.raises(CallWithdrawn):
            call(h, Gate(True, False), update)
        assert arrived(h) == {}
        assert update_calls(h) == 0
        # The client goes on: the next request takes another connection.
        call(h, Gate(True), update)
        assert arrived(h) == {"UpdateSegment": 1}


def test_a_read_is_gated_at_the_write_itself() -> None:
    """aiohttp asks the gate (its headers-sent hook runs before it writes them) after
    the connection was taken: a gate that closes in between still stops the read."""
    with emulator() as h:
        with pytest.raises(CallWithdrawn):
            call(h, Gate(True, False), read)
        assert arrived(h) == {}
