"""Tasks the emulator ends, restarts, changes and ages, read back with the real client.

A closed-loop controller observes tasks with GetSegmentTask and must cope with
what the service (or another client) does on its own. These tests drive the
emulator's admin API over loopback HTTP (and its thread-safe handle), then
check through :class:`~reconciler.api.client.RtcClient` what a reader sees: the
full ``SegmentTask`` shape, ended tasks, new incarnations, foreign changes,
the 72 h read window, and the 60 QPS read limit. The task table's rules are
also checked directly with explicit times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar
from unittest import mock
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from reconciler.api.client import CallResult, ClientConfig, RtcClient
from reconciler.api.credentials import Credentials
from reconciler.api.ratelimit import RateLimits
from reconciler.api.signing import sign
from reconciler.core.errors import NotRunningError, RetryableError
from reconciler.core.task import TaskKey
from reconciler.emulator import (
    READ_WINDOW_MS,
    ApiFault,
    Emulator,
    EmulatorConfig,
    EmulatorHandle,
    LiveTask,
    TaskNotRunningError,
    TaskTable,
    UnknownTaskError,
    parse_start,
    running_emulator,
)

AK, SK = "AKLTlifecycleKey", "c2VjcmV0LWxpZmVjeWNsZS1vbmx5LWZvci10ZXN0cw=="
CREDS = Credentials(AK, SK)
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SEGMENT_TASK_KEYS = {
    "StartTime",
    "EndTime",
    "Status",
    "StopReason",
    "MaxIdleTime",
    "TargetStreams",
    "Duration",
    "Identifier",
    "Handle",
    "StorageConfig",
    "Control",
}
#: Past the 72 h read window by 100 s.
AGED = 72 * 3600 + 100

T = TypeVar("T")


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorHandle]:
    """One emulator for tests that use their own task keys and stay under the QPS limits."""
    with running_emulator(EmulatorConfig(credentials={AK: SK}, seed=11)) as handle:
        yield handle


def _key(name: str) -> TaskKey:
    return TaskKey("app-life", "room-" + name, "task-" + name)


def _start(emu: EmulatorHandle, name: str, **params: Any) -> TaskKey:
    key = _key(name)
    emu.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id, **params)
    return key


def with_client(
    url: str, use: Callable[[RtcClient], Awaitable[T]], *, limits: RateLimits | None = None
) -> T:
    config = ClientConfig(
        endpoint=url,
        backoff_base=0.01,
        backoff_cap=0.05,
        max_attempts=1,
        trust_env=False,
        limits=limits or RateLimits(),
    )

    async def main() -> T:
        async with RtcClient(CREDS, config=config) as client:
            return await use(client)

    return asyncio.run(main())


def read(url: str, key: TaskKey) -> dict[str, Any]:
    """GetSegmentTask through the real client; the validated ``SegmentTask`` mapping."""

    async def use(client: RtcClient) -> CallResult:
        return await client.get_segment_task(
            app_id=key.app_id, room_id=key.room_id, task_id=key.task_id
        )

    task: dict[str, Any] = with_client(url, use).result
    return task


def update(url: str, key: TaskKey, **fields: object) -> CallResult:
    return with_client(url, lambda c: c.update_segment({**key.identity(), **fields}))


def admin(url: str, verb: str, body: Mapping[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}/_emulator/tasks/{verb}",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )


def row(url: str, key: TaskKey) -> dict[str, Any]:
    resp = httpx.get(f"{url}/_emulator/tasks", params=key.identity(), timeout=5)
    (only,) = resp.json()["tasks"]
    return dict(only)


# --------------------------------------------------------------------------- the read shape


def test_get_segment_task_answers_the_full_documented_shape(emu: EmulatorHandle) -> None:
    key = _key("shape")
    streams = {"StreamList": [{"UserId": "u1", "Index": 0, "StreamType": 0}]}
    body = {
        **key.identity(),
        "Identifier": "shape_prefix",
        "Duration": 45,
        "Handle": False,
        "MaxIdleTime": 600,
        "TargetStreams": streams,
        "Control": {"Align": True},
    }
    before = int(time.time() * 1000)
    with_client(emu.url, lambda c: c.start_segment(body))
    task = read(emu.url, key)
    assert set(task) == SEGMENT_TASK_KEYS
    assert before <= task["StartTime"] <= int(time.time() * 1000)
    assert task == {
        "StartTime": task["StartTime"],
        "EndTime": 0,
        "Status": 2,
        "StopReason": "",
        "MaxIdleTime": 600,
        "TargetStreams": streams,
        "Duration": 45,
        "Identifier": "shape_prefix",
        "Handle": False,
        "StorageConfig": {},
        "Control": {"Align": True},
    }


def test_a_task_that_never_existed_is_not_found(emu: EmulatorHandle) -> None:
    with pytest.raises(NotRunningError) as caught:
        read(emu.url, _key("never"))
    assert caught.value.code == "InvalidParameter.ErrorActiveTaskNotFound"


# --------------------------------------------------------------------------- end


def test_ended_task_stays_readable_and_refuses_updates(emu: EmulatorHandle) -> None:
    key = _start(emu, "ended", identifier="ended_prefix", duration=30)
    started = read(emu.url, key)["StartTime"]
    resp = admin(emu.url, "end", key.identity())
    assert resp.status_code == 200, resp.text
    shown = resp.json()["task"]
    assert (shown["Running"], shown["Status"], shown["StopReason"]) == (False, 3, "IdleTimeOut")

    task = read(emu.url, key)
    assert (task["Status"], task["StopReason"]) == (3, "IdleTimeOut")
    assert task["StartTime"] == started and task["EndTime"] >= started > 0
    # The ended incarnation's values are still what a reader sees.
    assert (task["Identifier"], task["Duration"]) == ("ended_prefix", 30)
    assert task["EndTime"] == shown["EndTime"]

    with pytest.raises(NotRunningError) as caught:
        update(emu.url, key, Duration=40)
    assert caught.value.code == "InvalidParameter.ErrorActiveTaskNotFound"
    assert read(emu.url, key) == task, "a refused update changes nothing"
    live = emu.live(key)
    assert live is not None and live.update_calls == 0


def test_end_takes_a_documented_stop_reason(emu: EmulatorHandle) -> None:
    failed = _start(emu, "failed")
    assert emu.end_task(failed, stop_reason="StartTaskFailed").status == 4
    assert (read(emu.url, failed)["Status"], read(emu.url, failed)["StopReason"]) == (
        4,
        "StartTaskFailed",
    )
    gone = _start(emu, "disconnect")
    resp = admin(emu.url, "end", {**gone.identity(), "StopReason": "UserDisconnect"})
    assert resp.json()["task"]["Status"] == 3
    assert read(emu.url, gone)["StopReason"] == "UserDisconnect"
    with pytest.raises(ValueError, match="StopReason must be one of"):
        emu.end_task(_start(emu, "badreason"), stop_reason="Tired")
    assert read(emu.url, _key("badreason"))["Status"] == 2, "a refused end changes nothing"


# --------------------------------------------------------------------------- restart


def test_restart_is_a_new_incarnation_with_start_defaults(emu: EmulatorHandle) -> None:
    key = _start(emu, "restart", identifier="first_prefix", duration=30, max_idle_time=900)
    update(emu.url, key, Duration=45, Handle=False)
    old = read(emu.url, key)
    admin(emu.url, "end", key.identity())

    resp = admin(emu.url, "restart", key.identity())
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"]["Incarnation"] == 2
    new = read(emu.url, key)
    assert new["StartTime"] > old["StartTime"]
    assert (new["Status"], new["EndTime"], new["StopReason"]) == (2, 0, "")
    # StartSegment's defaults, not what UpdateSegment sent to the old incarnation.
    assert (new["Duration"], new["Handle"], new["MaxIdleTime"]) == (20, True, 180)
    assert UUID4.fullmatch(new["Identifier"]) and new["Identifier"] != old["Identifier"]

    update(emu.url, key, Duration=50)
    assert read(emu.url, key)["Duration"] == 50
    live = emu.live(key)
    assert live is not None
    # Counters span incarnations: both of our calls are there.
    assert (live.update_calls, live.timer_restarts, live.incarnation) == (2, 2, 2)
    assert [b["Duration"] for b in live.last_bodies] == [45, 50]


def test_start_segment_on_an_ended_task_is_a_new_incarnation(emu: EmulatorHandle) -> None:
    key = _start(emu, "again", identifier="again_first")
    update(emu.url, key, Duration=45)
    with_client(emu.url, lambda c: c.stop_segment(key.identity()))
    ended = read(emu.url, key)
    assert (ended["Status"], ended["StopReason"]) == (3, "StopByAPI")
    with_client(emu.url, lambda c: c.start_segment({**key.identity(), "Handle": False}))
    new = read(emu.url, key)
    assert new["StartTime"] > ended["StartTime"] and new["EndTime"] == 0
    assert (new["Status"], new["Duration"], new["Handle"]) == (2, 20, False)
    assert UUID4.fullmatch(new["Identifier"])
    live = emu.live(key)
    assert live is not None and live.incarnation == 2


def test_restart_of_a_running_task_takes_given_params(emu: EmulatorHandle) -> None:
    key = _start(emu, "hot", identifier="hot_prefix", duration=60)
    before = read(emu.url, key)
    body = {**key.identity(), "Identifier": "hot_again", "Duration": 700, "Handle": False}
    resp = admin(emu.url, "restart", {**body, "MaxIdleTime": 30})
    assert resp.status_code == 200, resp.text
    after = read(emu.url, key)
    assert after["StartTime"] > before["StartTime"]
    # Normalised like StartSegment: 700 is out of range and becomes 20.
    assert (after["Identifier"], after["Duration"], after["Handle"], after["MaxIdleTime"]) == (
        "hot_again",
        20,
        False,
        30,
    )
    assert after["Status"] == 2


def test_restarts_in_the_same_millisecond_still_move_start_time(emu: EmulatorHandle) -> None:
    key = _start(emu, "rapid")
    starts = [emu.restart_task(key).start_time_ms for _ in range(5)]
    assert all(a < b for a, b in itertools.pairwise(starts)), starts
    incarnations = emu.live(key)
    assert incarnations is not None and incarnations.incarnation == 6


# --------------------------------------------------------------------------- set


def test_set_changes_live_fields_as_another_client(emu: EmulatorHandle) -> None:
    key = _start(emu, "foreign", identifier="ours", duration=30)
    emu.reset_stats()
    resp = admin(
        emu.url, "set", {**key.identity(), "Identifier": "theirs", "Handle": False, "Duration": 90}
    )
    assert resp.status_code == 200, resp.text
    task = read(emu.url, key)
    assert (task["Identifier"], task["Handle"], task["Duration"]) == ("theirs", False, 90)
    shown = row(emu.url, key)
    assert (shown["ExternalUpdates"], shown["ExternalTimerRestarts"]) == (1, 1)
    # Not ours: the reconciler sent nothing.
    assert (shown["UpdateCalls"], shown["TimerRestarts"], shown["LastBodies"]) == (0, 0, [])
    assert emu.stats_snapshot()["by_action"].get("UpdateSegment", {}) == {}

    live = emu.set_task(key, handle=True)
    assert (live.external_updates, live.external_timer_restarts) == (2, 1)
    # Out of range is normalised as UpdateSegment would.
    assert emu.set_task(key, duration=0).duration == 20
    update(emu.url, key, Identifier="ours_again")
    after = emu.live(key)
    assert after is not None
    assert (after.update_calls, after.external_updates, after.identifier) == (1, 3, "ours_again")


def test_set_refuses_nothing_to_set_and_an_ended_task(emu: EmulatorHandle) -> None:
    key = _start(emu, "setrules")
    empty = admin(emu.url, "set", key.identity())
    assert empty.status_code == 400 and "nothing to set" in empty.json()["error"]
    wrong = admin(emu.url, "set", {**key.identity(), "Handle": "yes"})
    assert wrong.status_code == 400 and "Handle" in wrong.json()["error"]
    emu.end_task(key)
    ended = admin(emu.url, "set", {**key.identity(), "Duration": 40})
    assert ended.status_code == 409 and "not running" in ended.json()["error"]
    with pytest.raises(TaskNotRunningError):
        emu.set_task(key, duration=40)
    live = emu.live(key)
    assert live is not None and (live.duration, live.external_updates) == (20, 0)


# --------------------------------------------------------------------------- the 72 h window


def test_aged_task_is_invisible_to_reads_but_updatable(emu: EmulatorHandle) -> None:
    key = _start(emu, "aged")
    resp = admin(emu.url, "age", {**key.identity(), "StartedSecondsAgo": AGED})
    assert resp.status_code == 200, resp.text
    shown = resp.json()["task"]
    assert shown["Visible"] is False
    assert int(time.time() * 1000) - shown["StartTime"] >= AGED * 1000
    with pytest.raises(NotRunningError) as caught:
        read(emu.url, key)
    assert caught.value.code == "InvalidParameter.ErrorActiveTaskNotFound"

    update(emu.url, key, Duration=55)
    live = emu.live(key)
    assert live is not None and (live.duration, live.update_calls, live.running) == (55, 1, True)

    # Inside the window again: readable, with the update applied.
    emu.age_task(key, started_seconds_ago=72 * 3600 - 60)
    assert read(emu.url, key)["Duration"] == 55
    # A restart is a fresh start, readable whatever the old incarnation's age.
    emu.age_task(key, started_seconds_ago=AGED)
    emu.restart_task(key)
    assert read(emu.url, key)["Duration"] == 20


def test_an_ended_task_past_the_window_is_not_found(emu: EmulatorHandle) -> None:
    key = _start(emu, "agedend")
    emu.end_task(key)
    emu.age_task(key, started_seconds_ago=AGED)
    with pytest.raises(NotRunningError):
        read(emu.url, key)
    # Moving an ended task's start past its end would be nonsense.
    emu.age_task(key, started_seconds_ago=30)
    later = admin(emu.url, "age", {**key.identity(), "StartedSecondsAgo": 0})
    assert later.status_code == 400 and "ended" in later.json()["error"]


def test_read_window_boundary_in_the_task_table() -> None:
    table = TaskTable(new_identifier=lambda: "id")
    key = TaskKey("a", "r", "t")
    table.start(parse_start(key.identity()), version="2022-06-01", now_ms=1_000)
    assert table.segment_task(key, now_ms=1_000 + READ_WINDOW_MS)["StartTime"] == 1_000
    live = table.live(key, now_ms=1_001 + READ_WINDOW_MS)
    assert live is not None and not live.visible
    with pytest.raises(ApiFault) as caught:
        table.segment_task(key, now_ms=1_001 + READ_WINDOW_MS)
    assert caught.value.code == "InvalidParameter.ErrorActiveTaskNotFound"
    # A new incarnation at the same instant still gets a later StartTime.
    table.restart(parse_start(key.identity()), now_ms=1_000)
    again = table.live(key, now_ms=1_000)
    assert again is not None and (again.start_time_ms, again.incarnation) == (1_001, 2)


# --------------------------------------------------------------------------- admin refusals


@pytest.mark.parametrize("verb", ["end", "restart", "set", "age"])
def test_admin_task_routes_refuse_bad_requests_clearly(emu: EmulatorHandle, verb: str) -> None:
    extras: dict[str, dict[str, Any]] = {"set": {"Handle": True}, "age": {"StartedSecondsAgo": 5}}
    extra = extras.get(verb, {})
    unknown = admin(emu.url, verb, {**_key("nobody").identity(), **extra})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": f"task {_key('nobody')} does not exist"}
    not_json = admin(emu.url, verb, b"{nope")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
    no_key = admin(emu.url, verb, {"AppId": "app-life", "RoomId": "r"})
    assert no_key.status_code == 400 and "TaskId" in no_key.json()["error"]
    typo = admin(emu.url, verb, {**_key("nobody").identity(), "Duraton": 5})
    assert typo.status_code == 400 and "Duraton" in typo.json()["error"]


def test_handle_raises_precise_exceptions(emu: EmulatorHandle) -> None:
    nobody = _key("handle-nobody")
    ops: list[Callable[[], LiveTask]] = [
        lambda: emu.end_task(nobody),
        lambda: emu.restart_task(nobody),
        lambda: emu.set_task(nobody, handle=False),
        lambda: emu.age_task(nobody, started_seconds_ago=1),
    ]
    for op in ops:
        with pytest.raises(UnknownTaskError):
            op()
    key = _start(emu, "handle-rules")
    with pytest.raises(ValueError, match="Identifier"):
        emu.restart_task(key, identifier="not/an/id")
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="StartedSecondsAgo"):
            emu.age_task(key, started_seconds_ago=bad)
    emu.end_task(key)
    with pytest.raises(TaskNotRunningError):
        emu.end_task(key)
    live = emu.live(key)
    assert live is not None and live.incarnation == 1 and live.stop_reason == "IdleTimeOut"


ADMIN_ROUTES = [
    ("GET", "/_emulator/tasks"),
    ("POST", "/_emulator/tasks"),
    ("DELETE", "/_emulator/tasks"),
    ("GET", "/_emulator/stats"),
    ("POST", "/_emulator/reset-stats"),
    ("POST", "/_emulator/faults"),
    ("POST", "/_emulator/tasks/end"),
    ("POST", "/_emulator/tasks/restart"),
    ("POST", "/_emulator/tasks/set"),
    ("POST", "/_emulator/tasks/age"),
]


@pytest.mark.parametrize(
    ("remote", "allowed"),
    [("203.0.113.7", False), ("::ffff:198.51.100.1", False), ("127.0.0.1", True), ("::1", True)],
)
def test_admin_routes_answer_loopback_clients_only(remote: str, allowed: bool) -> None:
    emulator = Emulator(EmulatorConfig(credentials={AK: SK}))
    app = emulator.app()
    emulator.start_task(app_id="a", room_id="r", task_id="t")

    async def status(method: str, path: str) -> int:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (
            (remote, 40000) if name == "peername" else default
        )
        request = make_mocked_request(method, path, app=app, transport=transport)
        match = await app.router.resolve(request)
        assert not isinstance(match.http_exception, web.HTTPException), (method, path)
        response = await match.handler(request)
        assert isinstance(response, web.Response)
        return response.status

    async def all_routes() -> list[int]:
        return [await status(method, path) for method, path in ADMIN_ROUTES]

    statuses = asyncio.run(all_routes())
    if allowed:
        assert 403 not in statuses
    else:
        assert statuses == [403] * len(ADMIN_ROUTES)
        live = emulator.live(TaskKey("a", "r", "t"))
        assert live is not None and live.running, "a refused admin call changes nothing"


def _outward_address() -> str | None:
    """A non-loopback address of this host, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith(("127.", "0.")) else address


def test_admin_refuses_a_real_non_loopback_client() -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    config = EmulatorConfig(credentials={AK: SK})
    with running_emulator(config, host="0.0.0.0") as handle:
        port = urlsplit(handle.url).port
        outside = httpx.post(
            f"http://{address}:{port}/_emulator/tasks/end", json=_key("x").identity(), timeout=5
        )
        inside = httpx.get(f"http://127.0.0.1:{port}/_emulator/stats", timeout=5)
    assert outside.status_code == 403 and "loopback" in outside.json()["error"]
    assert inside.status_code == 200


# --------------------------------------------------------------------------- 60 QPS for reads


def _signed_read(url: str, key: TaskKey) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, query and headers of a signed GetSegmentTask."""
    params = {"Action": "GetSegmentTask", "Version": "2022-06-01", **key.identity()}
    headers = sign(
        credentials=CREDS,
        region="cn-north-1",
        service="rtc",
        method="GET",
        host=urlsplit(url).netloc,
        path="/",
        query=params,
        headers={},
        body=b"",
    )
    return url + "/", params, headers


class _Reader:
    """Signed reads of one task on connections opened beforehand.

    aiohttp's client, not httpx's: httpx's async pool slows down sharply with
    tens of concurrent connections, and a burst must land within one window.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, key: TaskKey) -> None:
        self._session = session
        self._url = url
        self._read = _signed_read(url, key)

    async def warm(self, connections: int) -> None:
        # Unlimited admin reads open the connections.
        async def one() -> None:
            async with self._session.get(self._url + "/_emulator/stats") as resp:
                await resp.read()

        await asyncio.gather(*(one() for _ in range(connections)))

    async def one(self) -> tuple[int, dict[str, Any]]:
        url, params, headers = self._read
        async with self._session.get(url, params=params, headers=headers) as resp:
            return resp.status, await resp.json()

    async def burst(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        return await asyncio.gather(*(self.one() for _ in range(n)))


@contextlib.asynccontextmanager
async def _reader(url: str, key: TaskKey, *, connections: int) -> AsyncIterator[_Reader]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        reader = _Reader(session, url, key)
        await reader.warm(connections)
        yield reader


class SteppedClock:
    """The emulator's QPS clock, moved by the test only: a burst lands in one window
    however long a loaded machine takes to answer it."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_reads_are_limited_to_sixty_per_second() -> None:
    key = TaskKey("app-qps", "room-qps", "task-qps")
    with running_emulator(EmulatorConfig(credentials={AK: SK}), clock=SteppedClock(50.0)) as h:
        h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def scenario() -> list[tuple[int, dict[str, Any]]]:
            async with _reader(h.url, key, connections=75) as reader:
                return await reader.burst(75)

        answers = asyncio.run(scenario())
        stats = h.stats_snapshot()
    assert sorted(status for status, _ in answers) == [200] * 60 + [429] * 15
    refused = [doc["ResponseMetadata"]["Error"] for status, doc in answers if status == 429]
    assert {e["Code"] for e in refused} == {"FlowLimitExceeded.QPSOverLimit"}
    assert "GetSegmentTask" in refused[0]["Message"] and "60" in refused[0]["Message"]
    assert stats["by_action"]["GetSegmentTask"] == {
        "ok": 60,
        "FlowLimitExceeded.QPSOverLimit": 15,
    }
    assert stats["throttled"] == 15


def test_read_window_slides_across_a_second_boundary() -> None:
    """Fixed per-second buckets would admit reads just after the boundary; the window does not."""
    key = TaskKey("app-qps", "room-slide", "task-slide")
    clock = SteppedClock(50.6)
    with running_emulator(EmulatorConfig(credentials={AK: SK}), clock=clock) as handle:
        handle.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def scenario() -> tuple[list[int], list[int], list[int]]:
            async with _reader(handle.url, key, connections=60) as reader:
                first = await reader.burst(60)
                clock.at = 51.1  # the next second, within a second of the burst
                second = [(await reader.one())[0] for _ in range(5)]
                clock.at = 51.7  # the burst has left the window
                third = await reader.burst(60)
            return [a for a, _ in first], second, [a for a, _ in third]

        first, second, third = asyncio.run(scenario())
    assert first == [200] * 60
    assert second == [429] * 5
    assert third == [200] * 60


def test_read_limit_follows_the_config_and_the_client_sees_429() -> None:
    key = TaskKey("app-qps", "room-cfg", "task-cfg")
    with running_emulator(EmulatorConfig(credentials={AK: SK}, qps={"GetSegmentTask": 5})) as h:
        h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def reads(client: RtcClient) -> list[CallResult | BaseException]:
            calls = [
                client.get_segment_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)
                for _ in range(8)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

        # The client's own pacing is set high so the server's limit is what bites.
        outcomes = with_client(h.url, reads, limits=RateLimits(get=1000))
        assert h.faults()["qps"]["GetSegmentTask"] == 5
        h.set_faults(qps={"GetSegmentTask": 0})
        time.sleep(1.05)  # the earlier reads leave the window either way
        unlimited = with_client(h.url, reads, limits=RateLimits(get=1000))
    ok = [o for o in outcomes if isinstance(o, CallResult)]
    throttled = [o for o in outcomes if isinstance(o, RetryableError)]
    assert (len(ok), len(throttled)) == (5, 3), outcomes
    assert all(e.code == "FlowLimitExceeded.QPSOverLimit" for e in throttled)
    assert all(e.http_status == 429 for e in throttled)
    assert all(isinstance(o, CallResult) for o in unlimited), unlimited
