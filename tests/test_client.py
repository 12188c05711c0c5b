"""The API client against the emulator over real loopback HTTP.

Answers the emulator cannot give (a non-JSON 200, a ``Result`` that is not
"ok") come from an ``httpx.MockTransport`` standing in for a broken gateway.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import pytest
from structlog.testing import capture_logs

from reconciler.api.client import (
    CallEvent,
    CallResult,
    ClientConfig,
    RtcClient,
    _shard_sizes,
    backoff_delay,
    encode_body,
)
from reconciler.api.credentials import Credentials
from reconciler.api.ratelimit import RateLimits
from reconciler.api.signing import sha256_hex
from reconciler.core.errors import (
    ApiError,
    BadInputError,
    FatalError,
    NotRunningError,
    OutcomeUnknownError,
    RetryableError,
    UnreachableError,
    UnresponsiveError,
    classify,
)
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorConfig, EmulatorHandle, running_emulator

AK, SK = "AKLTtestaccesskey", "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ=="
TOKEN = "STS-token-ZXhhbXBsZS1zZXNzaW9uLXRva2Vu"
CREDS = Credentials(AK, SK)
KEY = TaskKey("app1", "room1", "task1")

T = TypeVar("T")


@contextmanager
def emulator(**overrides: Any) -> Iterator[EmulatorHandle]:
    cfg = EmulatorConfig(credentials={AK: SK}, seed=1, **overrides)
    with running_emulator(cfg) as handle:
        yield handle


def config(url: str, **overrides: Any) -> ClientConfig:
    settings: dict[str, Any] = {
        "endpoint": url,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "max_attempts": 3,
        "trust_env": False,
    }
    settings.update(overrides)
    return ClientConfig(**settings)


def with_client(
    url: str,
    use: Callable[[RtcClient], Awaitable[T]],
    *,
    credentials: Credentials = CREDS,
    on_call: Callable[[CallEvent], None] | None = None,
    **overrides: Any,
) -> T:
    async def main() -> T:
        async with RtcClient(
            credentials, config=config(url, **overrides), on_call=on_call
        ) as client:
            return await use(client)

    return asyncio.run(main())


def update(body: dict[str, object]) -> Callable[[RtcClient], Awaitable[CallResult]]:
    async def use(client: RtcClient) -> CallResult:
        return await client.update_segment(body)

    return use


def body_for(key: TaskKey, **fields: object) -> dict[str, object]:
    return {**key.identity(), **fields}


def expect_error(
    url: str, body: dict[str, object], kind: type[ApiError], **overrides: Any
) -> ApiError:
    with pytest.raises(kind) as caught:
        with_client(url, update(body), **overrides)
    assert type(caught.value) is kind
    return caught.value


def count(stats: dict[str, Any], action: str, outcome: str) -> int:
    value: int = stats["by_action"].get(action, {}).get(outcome, 0)
    return value


# -- success, what is sent, what is logged -------------------------------------------


def test_update_sends_exactly_the_body_and_logs_the_call() -> None:
    body = body_for(KEY, Identifier="slice_a", Duration=30)
    with emulator(latency_ms=5) as h, capture_logs() as logs:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)

        async def use(client: RtcClient) -> CallResult:
            return await client.update_segment(body, log_fields={"source": "a.yaml:1:1"})

        result = with_client(h.url, use)
        live = h.live(KEY)
    assert result.action == "UpdateSegment" and result.result == "ok"
    assert result.attempts == 1 and result.request_id and result.latency_ms >= 0
    assert live is not None
    assert live.last_bodies == (body,)
    assert (live.identifier, live.duration, live.timer_restarts) == ("slice_a", 30, 1)
    (event,) = [e for e in logs if e["event"] == "call.succeeded"]
    assert event["log_level"] == "debug", "task.synced says it at info"
    assert event["action"] == "UpdateSegment"
    assert event["request_id"] == result.request_id
    assert event["attempt"] == 1 and isinstance(event["latency_ms"], float)
    assert event["fields"] == body
    assert (event["app_id"], event["room_id"], event["task_id"]) == tuple(KEY)
    assert event["source"] == "a.yaml:1:1"


def test_body_is_compact_utf8_json() -> None:
    assert encode_body({"A": "é", "B": True, "C": 5}) == '{"A":"é","B":true,"C":5}'.encode()


def test_stats_and_observer_see_every_attempt() -> None:
    seen: list[CallEvent] = []
    with emulator() as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)

        async def use(client: RtcClient) -> RtcClient:
            await client.update_segment(body_for(KEY, Handle=False))
            with pytest.raises(NotRunningError):
                await client.update_segment(body_for(TaskKey("app1", "room1", "gone")))
            return client

        client = with_client(h.url, use, on_call=seen.append)
    assert [(e.outcome, e.final, e.code) for e in seen] == [
        ("ok", True, None),
        ("not_running", True, "InvalidParameter.ErrorActiveTaskNotFound"),
    ]
    assert client.stats.calls == {("UpdateSegment", "ok"): 1, ("UpdateSegment", "not_running"): 1}
    assert client.stats.requests[("UpdateSegment", "ok")] == 1
    assert client.stats.throttled == 0 and len(client.stats.latencies_ms) == 2


def test_get_segment_task_parses_the_task() -> None:
    with emulator() as h:
        h.start_task(
            app_id=KEY.app_id,
            room_id=KEY.room_id,
            task_id=KEY.task_id,
            identifier="slice_g",
            duration=45,
            handle=False,
        )

        async def use(client: RtcClient) -> CallResult:
            return await client.get_segment_task(
                app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id
            )

        result = with_client(h.url, use)
        with pytest.raises(NotRunningError):
            with_client(
                h.url,
                lambda c: c.get_segment_task(app_id="app1", room_id="room1", task_id="nope"),
            )
    task = result.result
    assert result.action == "GetSegmentTask"
    assert (task["Status"], task["EndTime"], task["StopReason"]) == (2, 0, "")
    assert (task["Identifier"], task["Duration"], task["Handle"]) == ("slice_g", 45, False)
    assert task["StartTime"] > 0


def test_session_token_is_sent_and_accepted() -> None:
    with emulator(session_tokens={AK: TOKEN}) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        result = with_client(
            h.url, update(body_for(KEY, Duration=10)), credentials=Credentials(AK, SK, TOKEN)
        )
        live = h.live(KEY)
    assert result.result == "ok" and live is not None and live.duration == 10


# -- retries ---------------------------------------------------------------------------


def test_throttled_call_pauses_senders_then_succeeds() -> None:
    keys = [TaskKey("app1", "room1", f"t{i}") for i in range(3)]
    with emulator(qps={"UpdateSegment": 2}) as h, capture_logs() as logs:
        for key in keys:
            h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def use(client: RtcClient) -> tuple[list[CallResult], RtcClient]:
            calls = [client.update_segment(body_for(k, Handle=False)) for k in keys]
            return list(await asyncio.gather(*calls)), client

        started = time.monotonic()
        # The client's own limit is set above the server's so the server throttles.
        results, client = with_client(h.url, use, limits=RateLimits(update=100))
        elapsed = time.monotonic() - started
        stats = h.stats_snapshot()
    assert sorted(r.attempts for r in results) == [1, 1, 2]
    assert stats["throttled"] == 1 and count(stats, "UpdateSegment", "ok") == 3
    assert client.stats.throttled == 1
    # The retry waited out the pause that lets the server's one-second window clear.
    assert elapsed >= 1.0
    (retried,) = [e for e in logs if e["event"] == "call.retried"]
    assert retried["code"] == "FlowLimitExceeded.QPSOverLimit"
    assert retried["http_status"] == 429 and retried["log_level"] == "warning"
    assert retried["attempt"] == 1 and "delay_s" in retried and retried["request_id"]


def test_server_error_is_retried_then_succeeds() -> None:
    with emulator(error_rate=1.0) as h, capture_logs() as logs:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)

        def heal(event: CallEvent) -> None:
            if event.outcome == "retried":
                h.set_faults(error_rate=0.0)

        result = with_client(h.url, update(body_for(KEY, Duration=7)), on_call=heal)
        live = h.live(KEY)
    assert result.attempts == 2
    assert live is not None and live.update_calls == 1  # the 5xx was not applied
    (retried,) = [e for e in logs if e["event"] == "call.retried"]
    assert (retried["code"], retried["http_status"]) == ("InternalError", 500)


def test_server_errors_exhaust_retries() -> None:
    with emulator(error_rate=1.0) as h, capture_logs() as logs:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        error = expect_error(h.url, body_for(KEY, Duration=7), RetryableError)
        stats = h.stats_snapshot()
    assert (error.code, error.http_status, error.attempts) == ("InternalError", 500, 3)
    assert error.request_id
    assert count(stats, "UpdateSegment", "InternalError") == 3
    calls = [e for e in logs if e["event"].startswith("call.")]
    assert [e["event"] for e in calls] == ["call.retried", "call.retried", "call.failed"]
    assert calls[-1]["outcome"] == "retries_exhausted" and calls[-1]["attempt"] == 3


def test_an_outcome_unknown_call_is_resent_once_at_most() -> None:
    # Each re-send of a Duration cuts the slice, so a call that may have been
    # applied is sent once more, not max_attempts times; later is the caller's.
    with emulator(drop_rate=1.0, drop_phase="after") as h, capture_logs() as logs:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        error = expect_error(h.url, body_for(KEY, Duration=9), OutcomeUnknownError)
        live = h.live(KEY)
    assert (error.code, error.attempts, error.request_id) == ("ConnectionDropped", 2, None)
    assert "may have been applied" in error.message
    # Each attempt was applied before the connection dropped: truly unknown to us.
    assert live is not None and live.update_calls == 2 and live.timer_restarts == 2
    unknown = [e for e in logs if e["event"] == "call.outcome_unknown"]
    assert [e["attempt"] for e in unknown] == [1, 2]
    assert all(e["log_level"] == "warning" and e["code"] == "ConnectionDropped" for e in unknown)


def test_dropped_connection_then_success() -> None:
    with emulator(drop_rate=1.0, drop_phase="before") as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)

        def heal(event: CallEvent) -> None:
            if event.outcome == "retried":
                h.set_faults(drop_rate=0.0)

        result = with_client(h.url, update(body_for(KEY, Duration=9)), on_call=heal)
        live = h.live(KEY)
    assert result.attempts == 2 and live is not None and live.update_calls == 1


def test_outcome_stays_unknown_when_a_later_attempt_fails_transiently() -> None:
    with emulator(drop_rate=1.0) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)

        def switch(event: CallEvent) -> None:
            if event.outcome == "retried":
                h.set_faults(drop_rate=0.0, error_rate=1.0)

        error = expect_error(h.url, body_for(KEY, Duration=9), OutcomeUnknownError, on_call=switch)
    # The last answer was a 500, but the first attempt may have been applied.
    assert (error.code, error.http_status, error.attempts) == ("InternalError", 500, 3)


def test_read_timeout_is_outcome_unknown() -> None:
    with emulator(latency_ms=300) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        error = expect_error(
            h.url, body_for(KEY, Duration=9), OutcomeUnknownError, timeout=0.1, max_attempts=1
        )
        time.sleep(0.3)  # let the emulator finish the slow request it already applied
        live = h.live(KEY)
    # One timeout is not a black hole yet (two in a row, with no answer between, are).
    assert not isinstance(error, UnresponsiveError)
    assert (error.code, error.attempts) == ("Timeout", 1)
    assert live is not None and live.update_calls == 1


def test_an_endpoint_that_answers_nothing_in_time_is_unresponsive() -> None:
    """A black hole, or a server far slower than --timeout: stop, say so once."""
    with emulator(latency_ms=800) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        started = time.monotonic()
        error = expect_error(
            h.url, body_for(KEY, Duration=9), UnresponsiveError, timeout=0.2, max_attempts=6
        )
        took = time.monotonic() - started
    assert isinstance(error, FatalError) and isinstance(error, UnreachableError)
    assert error.code == "Timeout" and error.attempts < 6, "no further sends once it is known"
    assert took < 2.0
    assert f"{h.url} accepts connections but answered none of" in str(error)
    assert "within --timeout 0.2 s" in str(error) and "raise it if so" in str(error)


def test_connection_refused_on_every_attempt_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    error = expect_error(url, body_for(KEY, Duration=9), UnreachableError)
    assert isinstance(error, FatalError), "every other call would fail alike: stop"
    assert (error.code, error.attempts, error.http_status) == ("ConnectError", 3, None)
    assert str(error) == f"cannot reach {url}: connection refused (after 3 attempts)"


# -- terminal answers ------------------------------------------------------------------


def test_not_running_is_not_retried() -> None:
    with emulator() as h:
        error = expect_error(h.url, body_for(KEY, Duration=9), NotRunningError)
        stats = h.stats_snapshot()
    assert error.code == "InvalidParameter.ErrorActiveTaskNotFound"
    assert error.attempts == 1 and error.http_status == 400 and error.request_id
    assert stats["total_requests"] == 1


def test_bad_input_carries_the_server_message() -> None:
    with emulator() as h:
        error = expect_error(
            h.url, {"AppId": "app1", "RoomId": "bad room", "TaskId": "t"}, BadInputError
        )
        stats = h.stats_snapshot()
    assert error.code == "InvalidParameter" and "RoomId" in error.message
    assert str(error).startswith("UpdateSegment failed: InvalidParameter: RoomId")
    assert f"RequestId {error.request_id}" in str(error)
    assert stats["total_requests"] == 1


def test_wrong_secret_is_fatal_at_once_and_never_shown() -> None:
    wrong = "d3Jvbmctc2VjcmV0LWtleS1uZXZlci1zaG93bg=="
    with emulator() as h, capture_logs() as logs:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        error = expect_error(
            h.url, body_for(KEY, Duration=9), FatalError, credentials=Credentials(AK, wrong)
        )
        stats = h.stats_snapshot()
    assert error.code == "SignatureDoesNotMatch" and error.http_status == 401
    assert stats["total_requests"] == 1 and error.attempts == 1
    assert str(error).startswith("UpdateSegment failed: SignatureDoesNotMatch: ")
    (failed,) = [e for e in logs if e["event"] == "call.failed"]
    assert failed["log_level"] == "error" and failed["outcome"] == "fatal"
    shown = [str(error), repr(error), repr(logs)]
    for secret in (wrong, SK):
        assert not any(secret in text for text in shown)


def test_wrong_session_token_is_fatal_and_never_shown() -> None:
    bad_token = "STS-wrong-dG9rZW4tbmV2ZXItc2hvd24="
    with emulator(session_tokens={AK: TOKEN}) as h, capture_logs() as logs:
        error = expect_error(
            h.url, body_for(KEY, Duration=9), FatalError, credentials=Credentials(AK, SK, bad_token)
        )
    assert error.code == "InvalidSecurityToken" and error.attempts == 1
    for text in (str(error), repr(error), repr(logs)):
        assert bad_token not in text and SK not in text and TOKEN not in text


# -- broken gateways (answers the emulator never gives) ---------------------------------


def gateway(status: int, content: bytes, *, counter: list[int]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        counter.append(1)
        return httpx.Response(status, content=content)

    return httpx.MockTransport(handle)


def call_through(transport: httpx.MockTransport, *, secret: str = SK) -> ApiError:
    async def main() -> None:
        async with RtcClient(
            Credentials(AK, secret), config=config("http://gateway.test"), transport=transport
        ) as client:
            await client.update_segment(body_for(KEY, Duration=9))

    with pytest.raises(ApiError) as caught:
        asyncio.run(main())
    return caught.value


def test_non_json_200_is_a_plain_api_error() -> None:
    sent: list[int] = []
    error = call_through(gateway(200, b"<html>maintenance</html>", counter=sent))
    assert type(error) is ApiError and error.code == "MalformedResponse"
    assert "maintenance" in error.message and len(sent) == 1


def test_result_other_than_ok_is_an_error() -> None:
    sent: list[int] = []
    body = b'{"ResponseMetadata":{"RequestId":"r1"},"Result":"pending"}'
    error = call_through(gateway(200, body, counter=sent))
    assert type(error) is ApiError and error.code == "UnexpectedResult"
    assert error.request_id == "r1" and "pending" in error.message and len(sent) == 1


def test_non_json_502_is_retried() -> None:
    sent: list[int] = []
    error = call_through(gateway(502, b"Bad Gateway", counter=sent))
    assert type(error) is RetryableError and error.http_status == 502 and len(sent) == 3


def test_server_text_echoing_the_secret_is_redacted() -> None:
    sent: list[int] = []
    body = (
        b'{"ResponseMetadata":{"RequestId":"r2","Error":{"Code":"SignatureDoesNotMatch",'
        b'"Message":"string to sign used ' + SK.encode() + b'"}}}'
    )
    error = call_through(gateway(401, body, counter=sent))
    assert isinstance(error, FatalError) and SK not in str(error) and "[redacted]" in str(error)


def test_request_is_signed_over_the_bytes_sent() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ResponseMetadata": {"RequestId": "r3"}, "Result": "ok"})

    async def main() -> CallResult:
        async with RtcClient(
            CREDS, config=config("http://gw.test:8080"), transport=httpx.MockTransport(handle)
        ) as client:
            return await client.update_segment(body_for(KEY, Identifier="é_not_ascii"))

    assert asyncio.run(main()).request_id == "r3"
    (request,) = seen
    assert request.content == encode_body(body_for(KEY, Identifier="é_not_ascii"))
    assert request.headers["X-Content-Sha256"] == sha256_hex(request.content)
    assert request.headers["Host"] == "gw.test:8080"
    assert "host" in request.headers["Authorization"].split("SignedHeaders=")[1]
    assert dict(request.url.params) == {"Action": "UpdateSegment", "Version": "2022-06-01"}


# -- the QPS budget ----------------------------------------------------------------------


def test_client_stays_within_the_server_qps_limit() -> None:
    keys = [TaskKey("app1", "room1", f"q{i}") for i in range(60)]
    with emulator(qps={"UpdateSegment": 20}, latency_ms=20) as h:
        for key in keys:
            h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def use(client: RtcClient) -> list[CallResult]:
            calls = [client.update_segment(body_for(k, Handle=False)) for k in keys]
            return list(await asyncio.gather(*calls))

        started = time.monotonic()
        results = with_client(h.url, use, limits=RateLimits(update=20))
        elapsed = time.monotonic() - started
        stats = h.stats_snapshot()
    assert all(r.attempts == 1 for r in results)
    assert stats["throttled"] == 0 and count(stats, "UpdateSegment", "ok") == 60
    # 20 at once, 20 a window later, 20 two windows later.
    assert 2.0 <= elapsed < 3.5


def busiest(times: list[float], span: float) -> int:
    """Most of ``times`` in any half-open interval of ``span`` seconds."""
    ordered = sorted(times)
    best = j = 0
    for i, start in enumerate(ordered):
        while j < len(ordered) and ordered[j] < start + span:
            j += 1
        best = max(best, j - i)
    return best


def test_in_flight_bound_holds_across_pools() -> None:
    keys = [TaskKey("app1", "room1", f"f{i}") for i in range(40)]
    with emulator(latency_ms=200) as h:
        for key in keys:
            h.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)

        async def use(client: RtcClient) -> None:
            await asyncio.gather(*(client.update_segment(body_for(k, Handle=True)) for k in keys))

        with_client(h.url, use, max_in_flight=20)
        arrivals: list[float] = []
        for key in keys:
            live = h.live(key)
            assert live is not None
            arrivals.extend(live.update_times)
    # Each answer takes 200 ms, so the requests arriving within 200 ms were in
    # flight together: never more than 20, and more than one pool of 10 carries.
    assert 11 <= busiest(arrivals, 0.2) <= 20


def test_pools_are_made_as_the_limit_grows_and_share_one_ssl_context() -> None:
    async def main() -> None:
        async with RtcClient(CREDS, config=ClientConfig(trust_env=False)) as client:
            # By default it starts at the ceiling: the QPS limiter bounds the rate.
            assert client.config.max_in_flight == client.in_flight_limit == 512
        config = ClientConfig(trust_env=False, initial_in_flight=64)
        async with RtcClient(CREDS, config=config) as client:
            # 4 pools of 16 carry the initial 64; the 28 others are not made yet.
            assert client.in_flight_limit == 64 and len(client._pools) == 4
            client._limit.observe("UpdateSegment", 2.0)
            assert client.in_flight_limit == 383
            assert len(client._pools) == 24 and sum(client._pool_sizes) >= 383
            client._limit.observe("UpdateSegment", 30.0)  # p90 of two samples: 30 s
            assert client.in_flight_limit == 512 and len(client._pools) == 32
            for _ in range(256):  # fast again: the limit falls, the pools stay (and idle)
                client._limit.observe("UpdateSegment", 0.001)
            assert client.in_flight_limit == 16 and len(client._pools) == 32
            contexts = {id(p._transport._pool._ssl_context) for p in client._pools}  # type: ignore[attr-defined]
            assert len(contexts) == 1

    asyncio.run(main())


def test_shard_sizes_split_evenly_and_add_up() -> None:
    assert _shard_sizes(1) == [1]
    assert _shard_sizes(16) == [16]
    assert _shard_sizes(20) == [10, 10]
    assert _shard_sizes(64) == [16, 16, 16, 16]
    assert _shard_sizes(65) == [13, 13, 13, 13, 13]
    for total in range(1, 200):
        sizes = _shard_sizes(total)
        assert sum(sizes) == total and max(sizes) <= 16 and max(sizes) - min(sizes) <= 1


# -- pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "InvalidParameter.ErrorActiveTaskNotFound", NotRunningError),
        (400, "InvalidParameter", BadInputError),
        (400, "InvalidParameter.IllegalRoomID", BadInputError),
        (400, "InvalidParameter.TaskAlreadyExists", BadInputError),
        (400, "MissingParameter", FatalError),
        (429, "FlowLimitExceeded.QPSOverLimit", RetryableError),
        (500, "InternalError", RetryableError),
        (500, "InternalError.Timeout", RetryableError),
        (503, "ServiceUnavailable", RetryableError),
        (401, "SignatureDoesNotMatch", FatalError),
        (401, "InvalidAccessKey", FatalError),
        (401, "MissingAuthenticationToken", FatalError),
        (401, "MissingSignature", FatalError),
        (400, "InvalidTimestamp", FatalError),
        (403, "AccessDenied", FatalError),
        (403, "AccessDenied.ServiceNotEnabled", FatalError),
        (404, "InvalidActionOrVersion", FatalError),
        (None, "ConnectError", RetryableError),
        (None, "Timeout", OutcomeUnknownError),
        (None, "ConnectionDropped", OutcomeUnknownError),
        (429, None, RetryableError),
        (502, "SomethingNew", RetryableError),
        (403, "SomethingNew", FatalError),
        (400, "SomethingNew", ApiError),
        (200, "SomethingNew", ApiError),
        (None, None, ApiError),
    ],
)
def test_classify(status: int | None, code: str | None, expected: type[ApiError]) -> None:
    assert classify(http_status=status, code=code) is expected


def test_error_text_repr_and_pickle() -> None:
    error = FatalError(
        action="UpdateSegment",
        code="SignatureDoesNotMatch",
        message="bad signature",
        request_id="rid1",
        http_status=401,
        attempts=2,
    )
    assert str(error) == (
        "UpdateSegment failed: SignatureDoesNotMatch: bad signature "
        "(RequestId rid1, HTTP 401, after 2 attempts)"
    )
    assert repr(error).startswith("FatalError(action='UpdateSegment', code='SignatureDoesNotMatch'")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is FatalError and repr(copy) == repr(error)
    bare = ApiError(action="GetSegmentTask", code="Timeout", message="no answer")
    assert str(bare) == "GetSegmentTask failed: Timeout: no answer"
    assert not bare.throttled
    throttled = RetryableError(
        action="UpdateSegment", code="FlowLimitExceeded.QPSOverLimit", message="x"
    )
    assert throttled.throttled


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        bound = min(1.0, 0.2 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, base=0.2, cap=1.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        # Full jitter spreads over the whole range, not just near the bound.
        assert min(delays) < 0.1 * bound and max(delays) > 0.9 * bound


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoint": "rtc.volcengineapi.com"},
        {"endpoint": "ftp://rtc.volcengineapi.com"},
        {"endpoint": "https://rtc.volcengineapi.com/v1"},
        {"max_attempts": 0},
        {"max_in_flight": 0},
        {"initial_in_flight": 0},
        {"min_in_flight": 0},
        {"timeout": 0},
    ],
)
def test_config_refuses_nonsense(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ClientConfig(**overrides)


def test_client_repr_shows_no_secret() -> None:
    async def main() -> str:
        async with RtcClient(Credentials(AK, SK, TOKEN)) as client:
            return repr(client)

    text = asyncio.run(main())
    assert AK in text and SK not in text and TOKEN not in text


# -- reads go through aiohttp: the same answers, errors and budget as httpx's POSTs ------


def read(key: TaskKey) -> Callable[[RtcClient], Awaitable[Any]]:
    async def use(client: RtcClient) -> Any:
        return await client.get_segment_task(
            app_id=key.app_id, room_id=key.room_id, task_id=key.task_id
        )

    return use


def test_reads_are_signed_and_parsed_like_any_call() -> None:
    with emulator() as h:
        h.start_task(app_id=KEY.app_id, room_id="office-hours@prof.lin", task_id=KEY.task_id)
        odd = TaskKey(KEY.app_id, "office-hours@prof.lin", KEY.task_id)  # '@' in the query
        res = with_client(h.url, read(odd))
        assert res.result["Status"] == 2 and res.result["Duration"] == 20
        assert count(h.stats_snapshot(), "GetSegmentTask", "ok") == 1
        with pytest.raises(NotRunningError):
            with_client(h.url, read(TaskKey(KEY.app_id, "nobody", "t")))


def test_a_read_of_an_endpoint_that_refuses_connections_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UnreachableError) as caught:
        with_client(url, read(KEY))
    assert str(caught.value) == f"cannot reach {url}: connection refused (after 3 attempts)"


def test_a_read_with_no_answer_in_time_is_a_timeout() -> None:
    with emulator(latency_ms=400) as h:
        h.start_task(app_id=KEY.app_id, room_id=KEY.room_id, task_id=KEY.task_id)
        with pytest.raises(OutcomeUnknownError) as caught:
            with_client(h.url, read(KEY), timeout=0.2, max_attempts=1)
    assert caught.value.code == "Timeout" and caught.value.attempts == 1
    assert not isinstance(caught.value, UnresponsiveError), "one timeout is not a black hole"


def test_a_read_answered_with_something_else_is_malformed() -> None:
    from aiohttp import web

    async def gateway(_: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway")

    async def main() -> ApiError:
        app = web.Application()
        app.router.add_get("/", gateway)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with RtcClient(CREDS, config=config(f"http://127.0.0.1:{port}")) as client:
                with pytest.raises(ApiError) as caught:
                    await read(KEY)(client)
                return caught.value
        finally:
            await runner.cleanup()

    error = asyncio.run(main())
    assert isinstance(error, RetryableError), "a 502 is transient"
    assert error.code == "MalformedResponse" and "bad gateway" in error.message
