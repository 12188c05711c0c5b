"""The emulator behaves as the API's documentation describes, over real loopback HTTP.

Requests are signed with the project's own signer and sent with httpx to an
emulator running in a background thread (``running_emulator``); the pure parts
(limiter, parameter parsing) are also checked directly with explicit inputs.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from structlog.testing import capture_logs

from reconciler.api.credentials import Credentials
from reconciler.api.signing import sign, x_date
from reconciler.core.task import TaskKey
from reconciler.emulator import (
    LAST_BODIES,
    ApiFault,
    EmulatorConfig,
    EmulatorHandle,
    SlidingWindowLimiter,
    parse_start,
    parse_update,
    running_emulator,
    serve,
)

AK, SK = "AKLTtestkey", "sk-Very-Secret-0123456789"
CRED = Credentials(AK, SK)
KEY = TaskKey("app1", "room1", "task1")


def _config(**kw: Any) -> EmulatorConfig:
    return EmulatorConfig(credentials={AK: SK}, **kw)


def _args(
    url: str,
    action: str,
    *,
    body: Mapping[str, Any] | bytes | None = None,
    query: Mapping[str, str] | None = None,
    version: str = "2022-06-01",
    cred: Credentials = CRED,
    date: str | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``httpx.request`` of a signed API call."""
    verb = method or ("GET" if action == "GetSegmentTask" else "POST")
    params = {"Action": action, "Version": version, **(query or {})}
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if verb == "POST" else {}
    headers |= sign(
        credentials=cred,
        region="cn-north-1",
        service="rtc",
        method=verb,
        host=urlsplit(url).netloc,
        path="/",
        query=params,
        headers=headers,
        body=raw,
        date=date,
    )
    return {"method": verb, "url": url + "/", "params": params, "headers": headers, "content": raw}


def call(url: str, action: str, **kw: Any) -> httpx.Response:
    return httpx.request(**_args(url, action, **kw), timeout=5)


def _ident(key: TaskKey = KEY, **fields: Any) -> dict[str, Any]:
    return {**key.identity(), **fields}


def _error(resp: httpx.Response) -> str:
    code: str = resp.json()["ResponseMetadata"]["Error"]["Code"]
    return code


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorHandle]:
    """One emulator for tests that use their own task keys and stay under the QPS limits."""
    with running_emulator(_config(seed=7)) as handle:
        yield handle


def _fresh(emu: EmulatorHandle, name: str, **start: Any) -> TaskKey:
    key = TaskKey("app1", "room-" + name, "task-" + name)
    emu.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id, **start)
    return key


# --------------------------------------------------------------------------- signing


def test_update_is_accepted_with_the_reference_response_shape(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "shape")
    first = call(emu.url, "UpdateSegment", body=_ident(key, Duration=30))
    second = call(emu.url, "UpdateSegment", body=_ident(key, Handle=False))
    assert first.status_code == 200
    doc = first.json()
    assert doc["Result"] == "ok"
    meta = doc["ResponseMetadata"]
    assert set(meta) == {"RequestId", "Action", "Version", "Service", "Region"}
    assert (meta["Action"], meta["Version"], meta["Service"], meta["Region"]) == (
        "UpdateSegment",
        "2022-06-01",
        "rtc",
        "cn-north-1",
    )
    ids = {meta["RequestId"], second.json()["ResponseMetadata"]["RequestId"]}
    assert len(ids) == 2
    assert all(re.fullmatch(r"\d{14}[0-9A-F]{20}", i) for i in ids)


def test_session_token_must_be_presented_and_signed() -> None:
    token = "sts-token-abcdef"
    with running_emulator(_config(session_tokens={AK: token})) as emu:
        emu.start_task(app_id="a", room_id="r", task_id="t")
        body = {"AppId": "a", "RoomId": "r", "TaskId": "t", "Handle": True}
        ok = call(emu.url, "UpdateSegment", body=body, cred=Credentials(AK, SK, token))
        assert ok.status_code == 200, ok.text
        missing = call(emu.url, "UpdateSegment", body=body, cred=CRED)
        wrong = call(emu.url, "UpdateSegment", body=body, cred=Credentials(AK, SK, "other"))
        for resp in (missing, wrong):
            assert resp.status_code == 401
            assert _error(resp) == "InvalidSecurityToken"
            assert token not in resp.text


def test_wrong_secret_is_refused_and_never_echoed(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "wrongsk")
    bad = Credentials(AK, "sk-Wrong-Secret-987")
    with capture_logs() as events:
        resp = call(emu.url, "UpdateSegment", body=_ident(key, Duration=30), cred=bad)
    assert resp.status_code == 401
    assert _error(resp) == "SignatureDoesNotMatch"
    assert "Result" not in resp.json()
    assert SK not in resp.text and "sk-Wrong-Secret-987" not in resp.text
    logged = [e for e in events if e["event"] == "emulator.request"]
    assert logged and logged[0]["result"] == "SignatureDoesNotMatch"
    assert SK not in repr(events) and "sk-Wrong" not in repr(events)
    live = emu.live(key)
    assert live is not None and live.update_calls == 0


def test_tampered_body_or_query_breaks_the_signature(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "tamper")
    args = _args(emu.url, "UpdateSegment", body=_ident(key, Duration=30))
    args["content"] = json.dumps(_ident(key, Duration=31)).encode()
    body_changed = httpx.request(**args)
    args = _args(emu.url, "UpdateSegment", body=_ident(key, Duration=30))
    args["params"] = {**args["params"], "Version": "2023-11-01"}
    query_changed = httpx.request(**args)
    for resp in (body_changed, query_changed):
        assert (resp.status_code, _error(resp)) == (401, "SignatureDoesNotMatch")
    live = emu.live(key)
    assert live is not None and live.duration == 20


def test_unknown_access_key_and_missing_authorization(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "authless")
    unknown = call(emu.url, "UpdateSegment", body=_ident(key), cred=Credentials("AKnobody", SK))
    assert (unknown.status_code, _error(unknown)) == (401, "InvalidAccessKey")
    bare = httpx.post(
        emu.url + "/",
        params={"Action": "UpdateSegment", "Version": "2022-06-01"},
        json=_ident(key),
    )
    assert (bare.status_code, _error(bare)) == (401, "MissingAuthenticationToken")


def test_timestamp_beyond_fifteen_minutes_is_refused(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "clock")
    now = datetime.now(UTC)
    stale = call(
        emu.url, "UpdateSegment", body=_ident(key), date=x_date(now - timedelta(minutes=16))
    )
    future = call(
        emu.url, "UpdateSegment", body=_ident(key), date=x_date(now + timedelta(minutes=16))
    )
    recent = call(
        emu.url, "UpdateSegment", body=_ident(key), date=x_date(now - timedelta(minutes=14))
    )
    assert (stale.status_code, _error(stale)) == (400, "InvalidTimestamp")
    assert (future.status_code, _error(future)) == (400, "InvalidTimestamp")
    assert recent.status_code == 200


def test_action_and_version_routing(emu: EmulatorHandle) -> None:
    missing = httpx.post(emu.url + "/", params={"Action": "UpdateSegment"}, content=b"{}")
    assert (missing.status_code, _error(missing)) == (400, "MissingParameter")
    assert "Version" in missing.json()["ResponseMetadata"]["Error"]["Message"]
    for action, version, method in [
        ("DeleteSegment", "2022-06-01", None),
        ("UpdateSegment", "2019-01-01", None),
        ("UpdateSegment", "2022-06-01", "GET"),
    ]:
        resp = call(emu.url, action, body={}, version=version, method=method)
        assert (resp.status_code, _error(resp)) == (404, "InvalidActionOrVersion"), action


# --------------------------------------------------------------------------- actions


def test_task_lifecycle_through_every_action(emu: EmulatorHandle) -> None:
    key = TaskKey("app1", "room-life", "task-life")
    start = call(
        emu.url,
        "StartSegment",
        body=_ident(key, Identifier="life", Duration=999, MaxIdleTime=0, BusinessId="biz"),
    )
    assert start.status_code == 200 and start.json()["Result"] == "ok"
    got = call(emu.url, "GetSegmentTask", query=key.identity())
    assert got.status_code == 200, got.text
    task = got.json()["Result"]["SegmentTask"]
    assert set(task) == {
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
    assert (task["Status"], task["EndTime"], task["StopReason"]) == (2, 0, "")
    assert (task["Duration"], task["MaxIdleTime"], task["Handle"]) == (20, 180, True)
    assert task["Identifier"] == "life" and task["StartTime"] > 0

    stop = call(emu.url, "StopSegment", body=_ident(key, BusinessId="biz"))
    assert stop.status_code == 200 and stop.json()["Result"] == "ok"
    ended = call(emu.url, "GetSegmentTask", query=key.identity()).json()["Result"]["SegmentTask"]
    assert (ended["Status"], ended["StopReason"]) == (3, "StopByAPI")
    assert ended["EndTime"] >= ended["StartTime"]

    for action in ("UpdateSegment", "StopSegment"):
        again = call(emu.url, action, body=_ident(key, Duration=30))
        assert (again.status_code, _error(again)) == (
            400,
            "InvalidParameter.ErrorActiveTaskNotFound",
        )
        assert "Result" not in again.json()
    never = call(emu.url, "UpdateSegment", body=_ident(TaskKey("app1", "nowhere", "none")))
    assert _error(never) == "InvalidParameter.ErrorActiveTaskNotFound"

    # A new incarnation takes StartSegment's parameters, with a random UUID identifier.
    restart = call(emu.url, "StartSegment", body=_ident(key, Handle=False))
    assert restart.status_code == 200
    live = emu.live(key)
    assert live is not None and live.running and not live.handle
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid4, live.identifier)


@pytest.mark.parametrize(
    ("version", "code"),
    [
        ("2020-12-01", "InvalidParameter.TaskAlreadyExists"),
        ("2022-06-01", "InvalidParameter.TaskAlreadyExists"),
        ("2023-11-01", None),
    ],
)
def test_start_of_a_running_task_per_version(
    emu: EmulatorHandle, version: str, code: str | None
) -> None:
    key = _fresh(emu, "dup" + version, duration=40)
    resp = call(emu.url, "StartSegment", body=_ident(key, Duration=50), version=version)
    if code is None:
        assert resp.status_code == 200 and resp.json()["Result"] == "ok"
    else:
        assert (resp.status_code, _error(resp)) == (400, code)
    live = emu.live(key)
    assert live is not None and live.duration == 40  # either way nothing changed


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (b"", "InvalidParameter.BodyIsEmpty", ""),
        (b"{not json", "InvalidParameter.Unmarshal", ""),
        (b"[1, 2]", "InvalidParameter.Unmarshal", ""),
        ({"AppId": "app1", "RoomId": "r"}, "InvalidParameter", "TaskId"),
        ({"AppId": "app1", "RoomId": "room one", "TaskId": "t"}, "InvalidParameter", "RoomId"),
        ({"AppId": "app1", "RoomId": "r", "TaskId": "x" * 129}, "InvalidParameter", "TaskId"),
        ({"AppId": 5, "RoomId": "r", "TaskId": "t"}, "InvalidParameter", "AppId"),
        (_ident(KEY, Duration="30"), "InvalidParameter", "Duration"),
        (_ident(KEY, Duration=True), "InvalidParameter", "Duration"),
        (_ident(KEY, Handle="true"), "InvalidParameter", "Handle"),
        (_ident(KEY, Identifier="a/b"), "InvalidParameter", "Identifier"),
    ],
)
def test_bad_bodies_are_refused(
    emu: EmulatorHandle, body: dict[str, Any] | bytes, code: str, mentions: str
) -> None:
    resp = call(emu.url, "UpdateSegment", body=body)
    assert (resp.status_code, _error(resp)) == (400, code)
    assert mentions in resp.json()["ResponseMetadata"]["Error"]["Message"]


def test_start_only_fields_in_an_update_are_ignored(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "ignored", max_idle_time=300)
    body = _ident(key, MaxIdleTime="nonsense", TargetStreams={"StreamList": [{"UserId": "u"}]})
    resp = call(emu.url, "UpdateSegment", body=body)
    assert resp.status_code == 200, resp.text
    live = emu.live(key)
    assert live is not None and live.max_idle_time == 300 and live.timer_restarts == 0


def test_every_update_carrying_duration_restarts_the_timer(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "timer", duration=20)
    steps: list[tuple[dict[str, Any], int, int]] = [
        ({"Duration": 20}, 20, 1),  # unchanged value still cuts the slice
        ({"Handle": False}, 20, 1),
        ({"Identifier": "new-prefix"}, 20, 1),
        ({"Duration": 700}, 20, 2),  # out of range → 20
        ({"Duration": 0}, 20, 3),
        ({"Duration": 45, "Handle": True}, 45, 4),
    ]
    for fields, duration, restarts in steps:
        assert call(emu.url, "UpdateSegment", body=_ident(key, **fields)).status_code == 200
        live = emu.live(key)
        assert live is not None
        assert (live.duration, live.timer_restarts) == (duration, restarts), fields
    live = emu.live(key)
    assert live is not None and live.update_calls == len(steps)
    assert (live.identifier, live.handle) == ("new-prefix", True)
    assert live.last_bodies[-1] == _ident(key, Duration=45, Handle=True)
    assert [set(b) - set(key.identity()) for b in live.last_bodies[:3]] == [
        {"Duration"},
        {"Handle"},
        {"Identifier"},
    ]


def test_each_applied_update_is_stamped_with_the_wall_clock(emu: EmulatorHandle) -> None:
    key = _fresh(emu, "stamped")
    before = time.time()
    for duration in range(30, 30 + LAST_BODIES + 2):
        assert (
            call(emu.url, "UpdateSegment", body=_ident(key, Duration=duration)).status_code == 200
        )
    refused = call(emu.url, "UpdateSegment", body=_ident(key, Duration=9, Handle="yes"))
    assert _error(refused) == "InvalidParameter"
    after = time.time()
    live = emu.live(key)
    assert live is not None
    # One stamp per remembered body (a refused call applies nothing), in order.
    assert len(live.update_times) == len(live.last_bodies) == LAST_BODIES
    assert before <= live.update_times[0] <= live.update_times[-1] <= after
    assert list(live.update_times) == sorted(live.update_times)
    assert live.last_bodies[-1]["Duration"] == 30 + LAST_BODIES + 1
    with httpx.Client(base_url=emu.url) as admin:
        (row,) = admin.get("/_emulator/tasks", params=key.identity()).json()["tasks"]
    assert row["UpdateTimes"] == list(live.update_times)
    # A restart of the task keeps the stamps with its other counters.
    emu.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)
    again = emu.live(key)
    assert again is not None and again.update_times == live.update_times


def test_parameter_normalisation_rules() -> None:
    start = parse_start(_ident(Duration=601, MaxIdleTime=86401))
    assert (start.duration, start.max_idle_time, start.handle, start.identifier) == (
        20,
        180,
        True,
        None,
    )
    edge = parse_start(_ident(Duration=600, MaxIdleTime=86400, Handle=False))
    assert (edge.duration, edge.max_idle_time, edge.handle) == (600, 86400, False)
    low = parse_start(_ident(Duration=1, MaxIdleTime=1))
    assert (low.duration, low.max_idle_time) == (1, 1)
    update = parse_update(_ident(Handle=False))
    assert (update.duration, update.handle, update.identifier) == (None, False, None)
    assert parse_update(_ident(Duration=0)).duration == 20
    with pytest.raises(ApiFault) as info:
        parse_update(_ident(Duration=-1))
    assert info.value.code == "InvalidParameter"
    with pytest.raises(ApiFault):
        parse_start(_ident(TargetStreams={"StreamList": [{}] * 18}))


# --------------------------------------------------------------------------- QPS


def test_sliding_window_limiter_counts_any_one_second() -> None:
    limiter = SlidingWindowLimiter(3)
    assert [limiter.admit(t) for t in (0.0, 0.5, 0.9, 0.95)] == [True, True, True, False]
    assert limiter.admit(1.0)  # 0.0 has left the window (t-1, t]
    assert not limiter.admit(1.2)
    # Refusals do not use budget: admission resumes as soon as 0.5 leaves.
    assert [limiter.admit(t) for t in (1.3, 1.4, 1.49, 1.51)] == [False, False, False, True]
    unlimited = SlidingWindowLimiter(0)
    assert all(unlimited.admit(0.0) for _ in range(1000))


def test_concurrent_burst_admits_exactly_the_limit() -> None:
    limit, extra = 10, 20
    with running_emulator(_config(qps={"UpdateSegment": limit})) as emu:
        emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        requests = [_args(emu.url, "UpdateSegment", body=_ident(Handle=True)) for _ in range(30)]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=30)) as client:
                return await asyncio.gather(*(client.request(**r) for r in requests))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * limit + [429] * extra
        assert {_error(r) for r in responses if r.status_code == 429} == {
            "FlowLimitExceeded.QPSOverLimit"
        }
        stats = emu.stats_snapshot()
        assert stats["throttled"] == extra
        assert stats["by_action"]["UpdateSegment"] == {
            "ok": limit,
            "FlowLimitExceeded.QPSOverLimit": extra,
        }
        live = emu.live(KEY)
        assert live is not None and live.update_calls == limit
        # Each action has its own budget.
        assert call(emu.url, "GetSegmentTask", query=KEY.identity()).status_code == 200


class SteppedClock:
    """The emulator's QPS clock, moved by the test: a window's edges are where the test
    puts them, however slowly a loaded machine answers the requests in between."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_window_slides_across_a_second_boundary() -> None:
    """Fixed per-second buckets would admit the second batch; a sliding window must not."""
    limit = 10
    clock = SteppedClock(100.7)
    with running_emulator(_config(qps={"UpdateSegment": limit}), clock=clock) as emu:
        emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        with httpx.Client() as client:

            def send(n: int) -> list[int]:
                reqs = [_args(emu.url, "UpdateSegment", body=_ident()) for _ in range(n)]
                return [client.request(**r).status_code for r in reqs]

            before_boundary = send(limit)  # at 100.7 s
            clock.at = 101.15  # the next second, 0.45 s later: a bucket per second would admit
            after_boundary = send(5)
            clock.at = 101.65  # 0.95 s after the ten: still inside their window
            still_inside = send(1)
            clock.at = 101.75  # 1.05 s after: the ten have left the window
            later = send(limit)
        assert before_boundary == [200] * limit
        assert after_boundary == [429] * 5
        assert still_inside == [429]
        assert later == [200] * limit


# --------------------------------------------------------------------------- faults


def test_injected_5xx_is_not_applied() -> None:
    with running_emulator(_config(error_rate=1.0)) as emu:
        emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        resp = call(emu.url, "UpdateSegment", body=_ident(Duration=60))
        assert (resp.status_code, _error(resp)) == (500, "InternalError")
        live = emu.live(KEY)
        assert live is not None and (live.duration, live.update_calls) == (20, 0)
        assert emu.stats_snapshot()["by_action"]["UpdateSegment"] == {"InternalError": 1}


def test_fault_draws_are_reproducible_with_a_seed() -> None:
    def outcomes(seed: int) -> list[int]:
        with running_emulator(_config(error_rate=0.5, seed=seed)) as emu:
            emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
            with httpx.Client() as client:
                return [
                    client.request(**_args(emu.url, "UpdateSegment", body=_ident())).status_code
                    for _ in range(16)
                ]

    first = outcomes(3)
    assert first == outcomes(3)
    assert set(first) == {200, 500}


@pytest.mark.parametrize(("phase", "applied"), [("after", True), ("before", False)])
def test_dropped_request_gets_no_answer(phase: str, applied: bool) -> None:
    with running_emulator(_config(drop_rate=1.0, drop_phase=phase)) as emu:
        emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        with pytest.raises(httpx.TransportError):
            call(emu.url, "UpdateSegment", body=_ident(Duration=90))
        live = emu.live(KEY)
        assert live is not None
        assert (live.duration == 90, live.timer_restarts) == (applied, int(applied))
        stats = emu.stats_snapshot()
        assert (stats["dropped"], stats["by_action"]["UpdateSegment"]) == (1, {"Dropped": 1})


def test_latency_is_added_before_answering() -> None:
    with running_emulator(_config(latency_ms=150, jitter_ms=20, seed=1)) as emu:
        emu.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        began = time.monotonic()
        resp = call(emu.url, "UpdateSegment", body=_ident())
        assert resp.status_code == 200
        assert 0.15 <= time.monotonic() - began < 1.0


def test_config_is_checked_and_keeps_secrets_out_of_repr() -> None:
    config = _config(session_tokens={AK: "tok-secret"})
    assert SK not in repr(config) and "tok-secret" not in repr(config)
    for bad in (
        {"error_rate": 1.5},
        {"drop_phase": "during"},
        {"qps": {"Nope": 1}},
        {"latency_ms": -1},
    ):
        with pytest.raises(ValueError):
            _config(**bad)


# --------------------------------------------------------------------------- admin


def test_admin_api_round_trip() -> None:
    with running_emulator(_config()) as emu, httpx.Client(base_url=emu.url) as admin:
        seed = {
            "tasks": [
                {"AppId": "a", "RoomId": "r1", "TaskId": "t1", "Duration": 0},
                {"AppId": "a", "RoomId": "r2", "TaskId": "t2", "Identifier": "id2"},
                {"AppId": "b", "RoomId": "r1", "TaskId": "t1", "Handle": False, "BusinessId": "x"},
            ]
        }
        assert admin.post("/_emulator/tasks", json=seed).json() == {"started": 3}
        bad = admin.post("/_emulator/tasks", json={"tasks": [{"AppId": "c", "RoomId": "r"}]})
        assert bad.status_code == 400 and "TaskId" in bad.json()["error"]

        rows = admin.get("/_emulator/tasks").json()["tasks"]
        assert [(r["AppId"], r["RoomId"], r["TaskId"]) for r in rows] == [
            ("a", "r1", "t1"),
            ("a", "r2", "t2"),
            ("b", "r1", "t1"),
        ]
        assert rows[0]["Duration"] == 20 and rows[0]["Running"] is True
        assert rows[2]["Handle"] is False and rows[2]["BusinessId"] == "x"

        one_key = TaskKey("a", "r2", "t2")
        resp = call(emu.url, "UpdateSegment", body=_ident(one_key, Duration=33))
        assert resp.status_code == 200
        one = admin.get("/_emulator/tasks", params=one_key.identity()).json()["tasks"]
        assert len(one) == 1
        assert (one[0]["Identifier"], one[0]["Duration"]) == ("id2", 33)
        assert (one[0]["TimerRestarts"], one[0]["UpdateCalls"]) == (1, 1)
        assert one[0]["LastBodies"] == [_ident(one_key, Duration=33)]

        assert admin.delete("/_emulator/tasks", params=one_key.identity()).json() == {"stopped": 1}
        assert admin.delete("/_emulator/tasks", params=one_key.identity()).status_code == 404
        gone = call(emu.url, "UpdateSegment", body=_ident(one_key, Duration=34))
        assert _error(gone) == "InvalidParameter.ErrorActiveTaskNotFound"

        stats = admin.get("/_emulator/stats").json()
        assert stats["total_requests"] == 2
        assert stats["by_action"]["UpdateSegment"] == {
            "ok": 1,
            "InvalidParameter.ErrorActiveTaskNotFound": 1,
        }
        assert admin.post("/_emulator/reset-stats", json={}).json()["total_requests"] == 0

        faults = admin.post(
            "/_emulator/faults", json={"error_rate": 1.0, "qps": {"StopSegment": 5}}
        )
        assert faults.json()["error_rate"] == 1.0 and faults.json()["qps"]["StopSegment"] == 5
        assert admin.post("/_emulator/faults", json={"drop_rate": 2}).status_code == 400
        assert admin.post("/_emulator/faults", json={"speed": 1}).status_code == 400
        failed = call(emu.url, "UpdateSegment", body=_ident(TaskKey("a", "r1", "t1"), Duration=9))
        assert _error(failed) == "InternalError"
        # Faults never hit the admin API.
        assert admin.post("/_emulator/faults", json={"drop_rate": 1.0}).status_code == 200
        assert admin.get("/_emulator/stats").json()["by_action"]["UpdateSegment"] == {
            "InternalError": 1
        }


def test_serve_runs_until_cancelled() -> None:
    async def scenario() -> tuple[int, str]:
        ready: asyncio.Queue[str] = asyncio.Queue()
        server = asyncio.create_task(
            serve(_config(), host="127.0.0.1", port=0, ready=ready.put_nowait)
        )
        url = await asyncio.wait_for(ready.get(), timeout=5)
        async with httpx.AsyncClient() as client:
            resp = await client.request(**_args(url, "UpdateSegment", body=_ident()))
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        return resp.status_code, url

    status, url = asyncio.run(scenario())
    assert status == 400  # served and answered: the task is not running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/_emulator/stats")


def test_the_admin_api_refuses_what_a_web_page_of_another_site_could_send() -> None:
    """CSRF and DNS rebinding from a browser on this machine, which is a loopback client."""
    with running_emulator(_config(seed=7)) as h:
        own = h.url
        port = urlsplit(own).port
        assert port is not None
        before = h.faults()
        evil = json.dumps({"error_rate": 1.0})
        # A form or fetch() with text/plain needs no CORS preflight: the classic CSRF.
        text_plain = {"Content-Type": "text/plain"}
        plain = httpx.post(
            f"{own}/_emulator/faults",
            content=evil,
            headers={**text_plain, "Origin": "http://evil.example"},
        )
        assert plain.status_code == 403, plain.text
        quiet = httpx.post(f"{own}/_emulator/faults", content=evil, headers=text_plain)
        assert quiet.status_code == 415 and "application/json" in quiet.json()["error"]
        form = httpx.post(f"{own}/_emulator/reset-stats", data={"x": "1"})
        assert form.status_code == 415
        for origin in (
            "http://evil.example",
            "null",  # a sandboxed frame, a file:// page
            f"http://localhost:{port + 1}",  # another site on this machine is another origin
            f"https://127.0.0.1:{port}",
        ):
            refused = httpx.post(
                f"{own}/_emulator/faults", json={"error_rate": 1.0}, headers={"Origin": origin}
            )
            assert refused.status_code == 403, origin
            assert (
                httpx.get(f"{own}/_emulator/tasks", headers={"Origin": origin}).status_code == 403
            )
        # A rebinding page is same-origin with itself, under a name it controls.
        rebound = httpx.post(
            f"{own}/_emulator/faults",
            json={"error_rate": 1.0},
            headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
        )
        assert rebound.status_code == 403
        assert h.faults() == before, "no refused request changed anything"
        # The emulator's own page, and tools that send no Origin, still work.
        for headers in ({"Origin": own}, {"Origin": f"http://localhost:{port}"}, {}):
            ok = httpx.post(f"{own}/_emulator/faults", json={}, headers=headers)
            assert ok.status_code == 200, (headers, ok.text)
