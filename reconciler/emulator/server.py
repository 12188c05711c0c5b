"""A local stand-in for the RTC audio-segment OpenAPI, for tests, demos and benches.

It serves StartSegment, UpdateSegment, StopSegment and GetSegmentTask the way
``reference/rtc-segment-openapi.md`` describes them, so the client and the
daemon can be exercised end to end without the real service.

Design:

* **Functional core.** Checking a request is a chain of plain functions that
  either return a value or raise :class:`ApiError` (code, message, HTTP status):
  :func:`verify_signature` re-derives the V4 signature with
  :func:`reconciler.signing.compute_signature` (the very kernel the client
  signs with), :func:`parse_body` / :func:`parse_start` / :func:`parse_update`
  validate and normalise parameters, :class:`SlidingWindowLimiter` decides QPS
  admission from an explicit ``now``, and :class:`TaskTable` holds the segment
  tasks and applies Start/Update/Stop with the server's rules. None of them do
  I/O, so each is tested directly.
* **Imperative shell.** :class:`Emulator` wires these into an ``aiohttp.web``
  application, draws faults from a seeded RNG, sleeps the injected latency and
  keeps :class:`EmulatorStats`. Every request is handled synchronously between
  awaits on one event loop, so the state needs no locks.
  :func:`running_emulator` runs one on its own loop in a thread for sync tests
  and for async clients living on another loop; :func:`serve` runs one until
  cancelled (CLI and daemon).

Request pipeline on ``/`` (the order matters for what a client observes):
route (``Action``/``Version``, method) → signature → QPS admission (a rejected
request does not count) → fault draw → apply → latency → answer. An injected
5xx is decided *before* applying, so the task is untouched. A dropped request
is closed without any response, either before applying (``drop_phase
"before"``) or after (``"after"``, the default, so the outcome truly is unknown
to the client). Latency is added to every answer on ``/``; faults only hit
requests that reached a segment action, never the admin API.

Choices where the reference is silent: per-task counters (``timer_restarts``,
``update_calls``, ``last_bodies`` with their wall-clock ``update_times``) count
*applied* UpdateSegment calls and live as long as the task key, across
restarts; a session-token mismatch answers
``InvalidSecurityToken`` (401); a wrong HTTP method answers
``InvalidActionOrVersion``; an unknown task in GetSegmentTask answers
``InvalidParameter.ErrorActiveTaskNotFound``. Error messages never echo the
secret key, the session token or the canonical request (which would carry the
token).

The admin API under ``/_emulator/`` is unsigned and answers loopback clients
only: list/seed/stop tasks, read/reset counters, change faults at run time.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import random
import re
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar

from aiohttp import web

from reconciler import signing
from reconciler.events import get_logger
from reconciler.task import DURATION_MAX, DURATION_MIN, TaskKey

__all__ = [
    "ACTIONS",
    "DEFAULT_QPS",
    "VERSIONS",
    "ApiError",
    "Emulator",
    "EmulatorConfig",
    "EmulatorHandle",
    "EmulatorStats",
    "LiveTask",
    "SlidingWindowLimiter",
    "StartParams",
    "TaskTable",
    "UpdateParams",
    "normalise_duration",
    "normalise_max_idle_time",
    "parse_authorization",
    "parse_body",
    "parse_key",
    "parse_start",
    "parse_update",
    "running_emulator",
    "serve",
    "verify_signature",
]

log = get_logger()

VERSIONS: Final = frozenset({"2020-12-01", "2022-06-01", "2023-11-01"})
#: Action → the HTTP method it is served over.
ACTIONS: Final[Mapping[str, str]] = {
    "StartSegment": "POST",
    "UpdateSegment": "POST",
    "StopSegment": "POST",
    "GetSegmentTask": "GET",
}
DEFAULT_QPS: Final[Mapping[str, int]] = {
    "StartSegment": 60,
    "UpdateSegment": 150,
    "StopSegment": 150,
    "GetSegmentTask": 60,
}
#: Versions on which StartSegment of a running TaskId succeeds and changes nothing.
_IDEMPOTENT_START_VERSIONS: Final = frozenset({"2023-11-01"})

DURATION_DEFAULT: Final = 20
MAX_IDLE_MIN: Final = 1
MAX_IDLE_MAX: Final = 86400
MAX_IDLE_DEFAULT: Final = 180
MAX_TARGET_STREAMS: Final = 17
#: How many applied UpdateSegment bodies each task remembers.
LAST_BODIES: Final = 8
#: X-Date may be this far from the server's clock either way.
CLOCK_SKEW: Final = timedelta(minutes=15)

_ID_RE: Final = re.compile(r"[a-zA-Z0-9_@\-.]{1,128}")
_UINT32_MAX: Final = 2**32 - 1
_AUTH_RE: Final = re.compile(
    r"^HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<names>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-fA-F]+)\s*$"
)

DropPhase = Literal["before", "after"]
JsonObject = dict[str, Any]


class ApiError(Exception):
    """A request the server refuses: answered with ``ResponseMetadata.Error``."""

    def __init__(self, code: str, message: str, *, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def _invalid(message: str) -> ApiError:
    return ApiError("InvalidParameter", message, status=400)


def _not_running(key: TaskKey) -> ApiError:
    return ApiError(
        "InvalidParameter.ErrorActiveTaskNotFound",
        f"task {key} does not exist or has already stopped",
        status=400,
    )


# --------------------------------------------------------------------------- config


@dataclass
class EmulatorConfig:
    """What the emulator accepts and how badly it behaves.

    ``qps`` maps an action to its limit over any one-second window (0 means
    unlimited; an action left out keeps its :data:`DEFAULT_QPS`).
    ``error_rate`` and ``drop_rate`` are fractions of segment-action requests.
    """

    credentials: dict[str, str]
    region: str = "cn-north-1"
    service: str = "rtc"
    qps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QPS))
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    drop_rate: float = 0.0
    drop_phase: str = "after"
    seed: int | None = None
    #: AK → the session token a temporary credential must present.
    session_tokens: dict[str, str] = field(default_factory=dict)
    #: The AppIds the account owns; any other answers
    #: ``InvalidParameter.NotExistAppId`` (``None``: every AppId exists).
    app_ids: frozenset[str] | None = None

    def __repr__(self) -> str:
        # Secret keys and tokens stay out of reprs (and so out of tracebacks).
        return (
            f"EmulatorConfig(access_keys={sorted(self.credentials)!r}, region={self.region!r}, "
            f"service={self.service!r}, qps={self.qps!r}, latency_ms={self.latency_ms}, "
            f"jitter_ms={self.jitter_ms}, error_rate={self.error_rate}, "
            f"drop_rate={self.drop_rate}, drop_phase={self.drop_phase!r}, seed={self.seed})"
        )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` for a setting the emulator cannot honour."""
        for name in ("error_rate", "drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        for name in ("latency_ms", "jitter_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.drop_phase not in ("before", "after"):
            raise ValueError(f"drop_phase must be 'before' or 'after', got {self.drop_phase!r}")
        for action, limit in self.qps.items():
            if action not in ACTIONS:
                raise ValueError(f"qps names unknown action {action!r}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"qps[{action!r}] must be a non-negative integer")
        unknown = set(self.session_tokens) - set(self.credentials)
        if unknown:
            raise ValueError(f"session tokens for unknown access keys: {sorted(unknown)}")


# --------------------------------------------------------------------------- signature


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization`` header."""

    access_key: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Authorization:
    """Split ``HMAC-SHA256 Credential=AK/scope, SignedHeaders=..., Signature=...``."""
    if "Signature=" not in value:
        raise ApiError("MissingSignature", "The request is missing signature.", status=401)
    match = _AUTH_RE.match(value.strip())
    if match is None:
        raise ApiError(
            "MissingRequestInfo",
            "The Authorization header is malformed (expected HMAC-SHA256 "
            "Credential=AK/date/region/service/request, SignedHeaders=..., Signature=...).",
            status=400,
        )
    parts = match["cred"].split("/")
    if len(parts) != 5 or not all(parts):
        raise ApiError(
            "MissingRequestInfo",
            "The credential must be AK/date/region/service/request.",
            status=400,
        )
    names = tuple(match["names"].lower().split(";"))
    return Authorization(
        access_key=parts[0],
        date=parts[1],
        region=parts[2],
        service=parts[3],
        terminator=parts[4],
        signed_headers=names,
        signature=match["sig"].lower(),
    )


def _signature_mismatch(detail: str) -> ApiError:
    return ApiError(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        f"Check your Secret Access Key and signing method. ({detail})",
        status=401,
    )


def verify_signature(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    credentials: Mapping[str, str],
    session_tokens: Mapping[str, str],
    region: str,
    service: str,
    now: datetime,
) -> str:
    """Check a request's V4 signature; return its access key or raise :class:`ApiError`.

    ``headers`` is looked up case-insensitively (pass the request's own
    multidict or a lower-cased dict); ``Host`` is taken as signed, without a
    default port.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw = lowered.get("authorization")
    if not raw:
        raise ApiError(
            "MissingAuthenticationToken", "Request is missing Authentication Token.", status=401
        )
    auth = parse_authorization(raw)
    secret = credentials.get(auth.access_key)
    if secret is None:
        raise ApiError(
            "InvalidAccessKey",
            f"The accesskey [{auth.access_key}] included in the request is invalid.",
            status=401,
        )
    stamp = lowered.get("x-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise ApiError(
            "InvalidTimestamp", "X-Date is missing or not YYYYMMDD'T'HHMMSS'Z'.", status=400
        ) from None
    if abs(now - signed_at) > CLOCK_SKEW:
        raise ApiError("InvalidTimestamp", "The signature of the request is expired.", status=400)
    scope = (auth.date, auth.region, auth.service, auth.terminator)
    if scope != (stamp[:8], region, service, "request"):
        raise _signature_mismatch(
            f"credential scope {'/'.join(scope)} should be {stamp[:8]}/{region}/{service}/request"
        )
    token = session_tokens.get(auth.access_key)
    if token is not None:
        sent = lowered.get("x-security-token", "")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise ApiError(
                "InvalidSecurityToken",
                "The security token included in the request is missing or invalid.",
                status=401,
            )
        if "x-security-token" not in auth.signed_headers:
            raise _signature_mismatch("X-Security-Token must be signed")
    if "x-date" not in auth.signed_headers:
        raise _signature_mismatch("X-Date must be signed")
    body_hash = signing.sha256_hex(body)
    claimed = lowered.get("x-content-sha256")
    if claimed is not None and claimed.strip().lower() != body_hash:
        raise _signature_mismatch("X-Content-Sha256 does not match the body")
    to_sign: dict[str, str] = {}
    for name in auth.signed_headers:
        if name not in lowered:
            raise _signature_mismatch(f"signed header {name!r} is not in the request")
        to_sign[name] = signing.signed_host(lowered[name]) if name == "host" else lowered[name]
    _, expected = signing.compute_signature(
        secret_key=secret,
        region=region,
        service=service,
        method=method,
        path=path,
        query=query,
        headers=to_sign,
        body_hash=body_hash,
        date=stamp,
    )
    if not hmac.compare_digest(expected, auth.signature):
        raise _signature_mismatch("signature differs")
    return auth.access_key


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class StartParams:
    """A validated, normalised StartSegment request (also the admin's seed form)."""

    key: TaskKey
    business_id: str | None
    identifier: str | None
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject


@dataclass(frozen=True, slots=True)
class UpdateParams:
    """A validated UpdateSegment request: only the fields it carries are set."""

    key: TaskKey
    identifier: str | None
    handle: bool | None
    duration: int | None


def parse_body(raw: bytes) -> JsonObject:
    """The JSON object of a POST body, or the server's body errors."""
    if not raw.strip():
        raise ApiError("InvalidParameter.BodyIsEmpty", "Request content is empty.", status=400)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            "InvalidParameter.Unmarshal", "Request parsing failed: body is not JSON.", status=400
        ) from None
    if not isinstance(doc, dict):
        raise ApiError(
            "InvalidParameter.Unmarshal",
            "Request parsing failed: body is not a JSON object.",
            status=400,
        )
    return doc


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _id(params: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = params.get(name)
    # Like the Go server, an absent, null or empty string field is "not set".
    if value is None or value == "":
        if required:
            raise _invalid(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string, got {_short(value)}")
    if not _ID_RE.fullmatch(value):
        raise _invalid(f"{name} {_short(value)} does not match [a-zA-Z0-9_@\\-\\.]{{1,128}}")
    return value


def parse_key(params: Mapping[str, Any]) -> TaskKey:
    """The task identity; every part is required and id-shaped."""
    app, room, task = (_id(params, n, required=True) for n in ("AppId", "RoomId", "TaskId"))
    assert app is not None and room is not None and task is not None
    return TaskKey(app, room, task)


def _uint32(params: Mapping[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise _invalid(f"{name} must be an unsigned 32-bit integer, got {_short(value)}")
    return value


def _bool(params: Mapping[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be a bool, got {_short(value)}")
    return value


def _object(params: Mapping[str, Any], name: str) -> JsonObject | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{name} must be an object, got {_short(value)}")
    return dict(value)


def normalise_duration(value: int | None) -> int:
    """Out of [1, 600] (or absent) silently becomes 20, as the server does."""
    if value is None or not DURATION_MIN <= value <= DURATION_MAX:
        return DURATION_DEFAULT
    return value


def normalise_max_idle_time(value: int | None) -> int:
    """Out of [1, 86400] (or absent) silently becomes 180, as the server does."""
    if value is None or not MAX_IDLE_MIN <= value <= MAX_IDLE_MAX:
        return MAX_IDLE_DEFAULT
    return value


def parse_start(params: Mapping[str, Any]) -> StartParams:
    """Validate and normalise a StartSegment body; unknown fields are ignored."""
    key = parse_key(params)
    streams = _object(params, "TargetStreams") or {}
    stream_list = streams.get("StreamList", [])
    if not isinstance(stream_list, list) or not all(isinstance(s, dict) for s in stream_list):
        raise _invalid("TargetStreams.StreamList must be a list of objects")
    if len(stream_list) > MAX_TARGET_STREAMS:
        raise _invalid(f"TargetStreams.StreamList holds at most {MAX_TARGET_STREAMS} streams")
    handle = _bool(params, "Handle")
    return StartParams(
        key=key,
        business_id=_id(params, "BusinessId", required=False),
        identifier=_id(params, "Identifier", required=False),
        handle=True if handle is None else handle,
        duration=normalise_duration(_uint32(params, "Duration")),
        max_idle_time=normalise_max_idle_time(_uint32(params, "MaxIdleTime")),
        target_streams={**streams, "StreamList": list(stream_list)},
        control=_object(params, "Control") or {},
    )


def parse_update(params: Mapping[str, Any]) -> UpdateParams:
    """Validate an UpdateSegment body.

    Only Identifier, Handle and Duration are read; StartSegment-only fields
    such as MaxIdleTime and TargetStreams are ignored like the real server
    ignores them. BusinessId is checked for shape but cannot change anything.
    """
    key = parse_key(params)
    _id(params, "BusinessId", required=False)
    duration = _uint32(params, "Duration")
    return UpdateParams(
        key=key,
        identifier=_id(params, "Identifier", required=False),
        handle=_bool(params, "Handle"),
        duration=None if duration is None else normalise_duration(duration),
    )


# --------------------------------------------------------------------------- QPS


class SlidingWindowLimiter:
    """At most ``limit`` admissions in any window of ``window`` seconds.

    A log of admitted arrival times, not fixed buckets: a burst split across a
    second boundary is limited like any other. A refused request is not logged,
    so it does not use up budget. ``limit`` 0 admits everything.
    """

    def __init__(self, limit: int, *, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> bool:
        if self.limit == 0:
            return True
        horizon = now - self.window
        while self._admitted and self._admitted[0] <= horizon:
            self._admitted.popleft()
        if len(self._admitted) >= self.limit:
            return False
        self._admitted.append(now)
        return True


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True, slots=True)
class LiveTask:
    """A snapshot of one task as the emulated server holds it."""

    key: TaskKey
    business_id: str | None
    running: bool
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    #: Applied UpdateSegment calls that carried Duration (each cuts the slice).
    timer_restarts: int
    #: Applied UpdateSegment calls.
    update_calls: int
    #: The last few applied UpdateSegment bodies, oldest first, as received.
    last_bodies: tuple[JsonObject, ...]
    #: When each of ``last_bodies`` was applied (wall clock, ``time.time()``
    #: seconds), so a bench can time an edit to its call at the server.
    update_times: tuple[float, ...]
    start_time_ms: int
    end_time_ms: int
    stop_reason: str

    def admin_view(self) -> JsonObject:
        """The row ``GET /_emulator/tasks`` returns."""
        return {
            "AppId": self.key.app_id,
            "RoomId": self.key.room_id,
            "TaskId": self.key.task_id,
            "BusinessId": self.business_id,
            "Identifier": self.identifier,
            "Handle": self.handle,
            "Duration": self.duration,
            "MaxIdleTime": self.max_idle_time,
            "Running": self.running,
            "TimerRestarts": self.timer_restarts,
            "UpdateCalls": self.update_calls,
            "LastBodies": list(self.last_bodies),
            "UpdateTimes": list(self.update_times),
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "StopReason": self.stop_reason,
        }


@dataclass(slots=True)
class _TaskState:
    key: TaskKey
    business_id: str | None
    identifier: str
    handle: bool
    duration: int
    max_idle_time: int
    target_streams: JsonObject
    control: JsonObject
    start_time_ms: int
    running: bool = True
    end_time_ms: int = 0
    stop_reason: str = ""
    timer_restarts: int = 0
    update_calls: int = 0
    last_bodies: deque[JsonObject] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))
    update_times: deque[float] = field(default_factory=lambda: deque(maxlen=LAST_BODIES))

    def snapshot(self) -> LiveTask:
        return LiveTask(
            key=self.key,
            business_id=self.business_id,
            running=self.running,
            identifier=self.identifier,
            handle=self.handle,
            duration=self.duration,
            max_idle_time=self.max_idle_time,
            timer_restarts=self.timer_restarts,
            update_calls=self.update_calls,
            last_bodies=tuple(json.loads(json.dumps(b)) for b in self.last_bodies),
            update_times=tuple(self.update_times),
            start_time_ms=self.start_time_ms,
            end_time_ms=self.end_time_ms,
            stop_reason=self.stop_reason,
        )

    def segment_task(self) -> JsonObject:
        """``Result.SegmentTask`` of GetSegmentTask."""
        return {
            "StartTime": self.start_time_ms,
            "EndTime": self.end_time_ms,
            "Status": 2 if self.running else 3,
            "StopReason": self.stop_reason,
            "MaxIdleTime": self.max_idle_time,
            "TargetStreams": self.target_streams,
            "Duration": self.duration,
            "Identifier": self.identifier,
            "Handle": self.handle,
            "StorageConfig": {},
            "Control": self.control,
        }


class TaskTable:
    """Segment tasks by identity, with the server's Start/Update/Stop rules.

    ``new_identifier`` supplies the default Identifier (a random UUID on the
    server); time is passed in, in milliseconds.
    """

    def __init__(self, *, new_identifier: Callable[[], str]) -> None:
        self._tasks: dict[TaskKey, _TaskState] = {}
        self._new_identifier = new_identifier

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, params: StartParams, *, version: str | None, now_ms: int) -> None:
        """Start a task, or restart it as a new incarnation when not running.

        ``version`` None is the admin's seeding: a running task is replaced.
        """
        old = self._tasks.get(params.key)
        if old is not None and old.running and version is not None:
            if version in _IDEMPOTENT_START_VERSIONS:
                return
            raise ApiError(
                "InvalidParameter.TaskAlreadyExists",
                f"task {params.key} is already running",
                status=400,
            )
        state = _TaskState(
            key=params.key,
            business_id=params.business_id,
            identifier=params.identifier or self._new_identifier(),
            handle=params.handle,
            duration=params.duration,
            max_idle_time=params.max_idle_time,
            target_streams=params.target_streams,
            control=params.control,
            start_time_ms=now_ms,
        )
        if old is not None:
            # Counters belong to the key, so a test sees every call it made.
            state.timer_restarts, state.update_calls = old.timer_restarts, old.update_calls
            state.last_bodies, state.update_times = old.last_bodies, old.update_times
        self._tasks[params.key] = state

    def update(self, params: UpdateParams, *, body: JsonObject, now: float) -> None:
        """Apply an UpdateSegment; ``now`` is the wall-clock time in seconds."""
        state = self._tasks.get(params.key)
        if state is None or not state.running:
            raise _not_running(params.key)
        if params.identifier is not None:
            state.identifier = params.identifier
        if params.handle is not None:
            state.handle = params.handle
        if params.duration is not None:
            state.duration = params.duration
            state.timer_restarts += 1
        state.update_calls += 1
        state.last_bodies.append(body)
        state.update_times.append(now)

    def stop(self, key: TaskKey, *, now_ms: int, reason: str = "StopByAPI") -> None:
        state = self._tasks.get(key)
        if state is None or not state.running:
            raise _not_running(key)
        state.running = False
        state.end_time_ms = now_ms
        state.stop_reason = reason

    def segment_task(self, key: TaskKey) -> JsonObject:
        state = self._tasks.get(key)
        if state is None:
            raise _not_running(key)
        return state.segment_task()

    def live(self, key: TaskKey) -> LiveTask | None:
        state = self._tasks.get(key)
        return None if state is None else state.snapshot()

    def select(
        self, *, app_id: str | None = None, room_id: str | None = None, task_id: str | None = None
    ) -> list[LiveTask]:
        """Snapshots of the tasks matching every given id part, sorted by key."""
        return [
            state.snapshot()
            for key, state in sorted(self._tasks.items())
            if (app_id is None or key.app_id == app_id)
            and (room_id is None or key.room_id == room_id)
            and (task_id is None or key.task_id == task_id)
        ]


# --------------------------------------------------------------------------- stats


@dataclass
class EmulatorStats:
    """Counters for tests and benches.

    ``by_action[action][outcome]``: outcome is ``"ok"``, an error code
    (``"FlowLimitExceeded.QPSOverLimit"``, ``"InternalError"``, ...) or
    ``"Dropped"``. ``action`` is the request's Action as sent ("" if none).
    """

    total_requests: int = 0
    throttled: int = 0
    dropped: int = 0
    by_action: dict[str, Counter[str]] = field(default_factory=dict)

    def record(self, action: str, outcome: str) -> None:
        self.by_action.setdefault(action, Counter())[outcome] += 1

    def count(self, action: str, outcome: str) -> int:
        return self.by_action.get(action, Counter())[outcome]

    def reset(self) -> None:
        self.total_requests = self.throttled = self.dropped = 0
        self.by_action = {}

    def snapshot(self) -> JsonObject:
        """A JSON-ready copy (what ``GET /_emulator/stats`` returns)."""
        return {
            "total_requests": self.total_requests,
            "throttled": self.throttled,
            "dropped": self.dropped,
            "by_action": {a: dict(c) for a, c in sorted(self.by_action.items())},
        }


# --------------------------------------------------------------------------- shell


_FAULT_FIELDS: Final = ("latency_ms", "jitter_ms", "error_rate", "drop_rate", "drop_phase")


class _Dropped(Exception):
    """The connection is to be closed without an answer."""


class Emulator:
    """The emulated service: an aiohttp application plus its in-memory state."""

    def __init__(self, config: EmulatorConfig) -> None:
        config.validate()
        # A private copy: faults changed at run time don't reach the caller's object.
        self._config = replace(
            config,
            credentials=dict(config.credentials),
            qps=dict(config.qps),
            session_tokens=dict(config.session_tokens),
        )
        self._rng = random.Random(config.seed)
        id_rng = random.Random(config.seed)
        self._tasks = TaskTable(
            new_identifier=lambda: str(uuid.UUID(int=id_rng.getrandbits(128), version=4))
        )
        self._limiters = {
            action: SlidingWindowLimiter(self._config.qps.get(action, DEFAULT_QPS[action]))
            for action in ACTIONS
        }
        self.stats = EmulatorStats()
        self._request_counter = 0
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # ---- in-process API (call on the emulator's event loop thread)

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_route("GET", "/", self._handle_api)
        application.router.add_route("POST", "/", self._handle_api)
        application.router.add_get("/_emulator/tasks", self._admin_list)
        application.router.add_post("/_emulator/tasks", self._admin_seed)
        application.router.add_delete("/_emulator/tasks", self._admin_stop)
        application.router.add_get("/_emulator/stats", self._admin_stats)
        application.router.add_post("/_emulator/reset-stats", self._admin_reset_stats)
        application.router.add_post("/_emulator/faults", self._admin_faults)
        return application

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("emulator already started")
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        log.info("emulator.started", url=self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

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
        """Put a task in the running state directly (no QPS limit, no signing).

        Raises :class:`ValueError` for a parameter StartSegment would refuse.
        """
        body: JsonObject = {
            "AppId": app_id,
            "RoomId": room_id,
            "TaskId": task_id,
            "BusinessId": business_id,
            "Identifier": identifier,
            "Handle": handle,
            "Duration": duration,
            "MaxIdleTime": max_idle_time,
        }
        try:
            params = parse_start(body)
        except ApiError as exc:
            raise ValueError(exc.message) from None
        self._tasks.start(params, version=None, now_ms=_now_ms())

    def stop_task(self, key: TaskKey) -> bool:
        """Stop a running task as StopSegment would; False if it was not running."""
        try:
            self._tasks.stop(key, now_ms=_now_ms())
        except ApiError:
            return False
        return True

    def live(self, key: TaskKey) -> LiveTask | None:
        return self._tasks.live(key)

    def tasks(self) -> list[LiveTask]:
        return self._tasks.select()

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
        """Change faults (and QPS limits) at run time; return the faults now in force.

        Raises :class:`ValueError` and changes nothing if a value is invalid.
        """
        changes: JsonObject = {
            name: value
            for name, value in (
                ("latency_ms", latency_ms),
                ("jitter_ms", jitter_ms),
                ("error_rate", error_rate),
                ("drop_rate", drop_rate),
                ("drop_phase", drop_phase),
            )
            if value is not None
        }
        if qps is not None:
            changes["qps"] = {**self._config.qps, **qps}
        candidate = replace(self._config, **changes)  # runs validate()
        self._config = candidate
        for action, limiter in self._limiters.items():
            limiter.limit = candidate.qps.get(action, DEFAULT_QPS[action])
        return self.faults()

    def faults(self) -> JsonObject:
        faults: JsonObject = {name: getattr(self._config, name) for name in _FAULT_FIELDS}
        faults["qps"] = {a: lim.limit for a, lim in self._limiters.items()}
        return faults

    # ---- the API endpoint

    def _request_id(self) -> str:
        # Shaped like the real ones: UTC timestamp then hex; the counter keeps it unique.
        self._request_counter += 1
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        return f"{stamp}{self._request_counter & 0xFFFFFFFF:08X}{secrets.token_hex(6).upper()}"

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        self.stats.total_requests += 1
        query = request.rel_url.query
        action, version = query.get("Action", ""), query.get("Version", "")
        request_id = self._request_id()
        meta: JsonObject = {
            "RequestId": request_id,
            "Action": action,
            "Version": version,
            "Service": self._config.service,
            "Region": self._config.region,
        }
        drop: DropPhase | None = None
        try:
            self._route(action, version, request.method)
            body = await request.read()
            verify_signature(
                method=request.method,
                path=request.rel_url.path,
                query=list(query.items()),
                headers=request.headers,
                body=body,
                credentials=self._config.credentials,
                session_tokens=self._config.session_tokens,
                region=self._config.region,
                service=self._config.service,
                now=datetime.now(UTC),
            )
            if not self._limiters[action].admit(arrived):
                self.stats.throttled += 1
                raise ApiError(
                    "FlowLimitExceeded.QPSOverLimit",
                    f"QPS of {action} exceeded the limit of {self._limiters[action].limit}.",
                    status=429,
                )
            drop = self._draw_faults()
            if drop == "before":
                raise _Dropped
            result = self._apply(action, version, body=body, query=query)
            status, payload, outcome = 200, {"ResponseMetadata": meta, "Result": result}, "ok"
        except ApiError as exc:
            meta["Error"] = {"Code": exc.code, "Message": exc.message}
            status, payload, outcome = exc.status, {"ResponseMetadata": meta}, exc.code
        except _Dropped:
            status, payload, outcome = 0, {}, "Dropped"  # answer replaced below
        await self._delay()
        if drop is not None:
            # With drop_phase "after" the change above stands; only the answer is lost.
            outcome, status = "Dropped", 0
            self.stats.dropped += 1
        self.stats.record(action, outcome)
        log.debug(
            "emulator.request",
            action=action,
            version=version,
            result=outcome,
            status=status,
            drop_phase=drop,
            request_id=request_id,
            latency_ms=round((time.monotonic() - arrived) * 1000, 3),
        )
        if drop is not None:
            if request.transport is not None:
                request.transport.close()
            # Nothing can be written to a closed transport; aiohttp ignores this one.
            return web.Response(status=500)
        return web.json_response(payload, status=status)

    def _route(self, action: str, version: str, method: str) -> None:
        if not action or not version:
            missing = "Action" if not action else "Version"
            raise ApiError(
                "MissingParameter", f"The request is missing {missing} parameter.", status=400
            )
        if action not in ACTIONS or version not in VERSIONS:
            raise ApiError(
                "InvalidActionOrVersion",
                f"Could not find operation {action} for version {version}.",
                status=404,
            )
        if method != ACTIONS[action]:
            raise ApiError(
                "InvalidActionOrVersion",
                f"Operation {action} is served over {ACTIONS[action]}, not {method}.",
                status=404,
            )

    def _draw_faults(self) -> DropPhase | None:
        """Draw this request's fate; raise the injected 5xx, or return the drop phase."""
        cfg = self._config
        # Always two draws per request, so one fault's rate does not shift the other's.
        drop_roll, error_roll = self._rng.random(), self._rng.random()
        if drop_roll < cfg.drop_rate:
            return "before" if cfg.drop_phase == "before" else "after"
        if error_roll < cfg.error_rate:
            raise ApiError(
                "InternalError",
                "The service encountered an internal error; the request was not applied.",
                status=500,
            )
        return None

    async def _delay(self) -> None:
        cfg = self._config
        delay = cfg.latency_ms
        if cfg.jitter_ms:
            delay += self._rng.uniform(0.0, cfg.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)

    def _apply(
        self, action: str, version: str, *, body: bytes, query: Mapping[str, str]
    ) -> str | JsonObject:
        if action == "GetSegmentTask":
            self._check_app(parse_key(query))
            return {"SegmentTask": self._tasks.segment_task(parse_key(query))}
        params = parse_body(body)
        self._check_app(parse_key(params))
        if action == "StartSegment":
            self._tasks.start(parse_start(params), version=version, now_ms=_now_ms())
        elif action == "UpdateSegment":
            self._tasks.update(parse_update(params), body=params, now=time.time())
        else:
            self._tasks.stop(parse_key(params), now_ms=_now_ms())
        return "ok"

    def _check_app(self, key: TaskKey) -> None:
        apps = self._config.app_ids
        if apps is not None and key.app_id not in apps:
            raise ApiError(
                "InvalidParameter.NotExistAppId",
                f"AppId {key.app_id} does not exist in this account",
                status=400,
            )

    # ---- the admin API

    @staticmethod
    def _loopback_only(request: web.Request) -> None:
        try:
            loopback = ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise web.HTTPForbidden(text="the emulator admin API answers loopback clients only")

    @staticmethod
    def _admin_error(message: str, *, status: int = 400) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def _admin_list(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        q = request.rel_url.query
        rows = self._tasks.select(
            app_id=q.get("AppId"), room_id=q.get("RoomId"), task_id=q.get("TaskId")
        )
        return web.json_response({"tasks": [row.admin_view() for row in rows]})

    async def _admin_seed(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        try:
            doc = parse_body(await request.read())
            rows = doc.get("tasks")
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise _invalid("'tasks' must be a list of objects")
            # Validate all first so a bad row starts nothing.
            params = [parse_start(row) for row in rows]
        except ApiError as exc:
            return self._admin_error(exc.message)
        now = _now_ms()
        for p in params:
            self._tasks.start(p, version=None, now_ms=now)
        return web.json_response({"started": len(params)})

    async def _admin_stop(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        try:
            key = parse_key(request.rel_url.query)
        except ApiError as exc:
            return self._admin_error(exc.message)
        if not self.stop_task(key):
            return self._admin_error(f"task {key} is not running", status=404)
        return web.json_response({"stopped": 1})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        return web.json_response(self.stats.snapshot())

    async def _admin_reset_stats(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        self.stats.reset()
        return web.json_response(self.stats.snapshot())

    async def _admin_faults(self, request: web.Request) -> web.Response:
        self._loopback_only(request)
        try:
            doc = parse_body(await request.read())
        except ApiError as exc:
            return self._admin_error(exc.message)
        unknown = set(doc) - {*_FAULT_FIELDS, "qps"}
        if unknown:
            return self._admin_error(f"unknown fault settings: {sorted(unknown)}")
        try:
            faults = self.set_faults(**doc)
        except (TypeError, ValueError) as exc:
            return self._admin_error(str(exc))
        return web.json_response(faults)


def _now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- runners

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

    def live(self, key: TaskKey) -> LiveTask | None:
        return self._call(lambda: self.emulator.live(key))

    def tasks(self) -> list[LiveTask]:
        return self._call(self.emulator.tasks)

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
    config: EmulatorConfig, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[EmulatorHandle]:
    """Run an emulator on a private event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="rtc-emulator", daemon=True)
    thread.start()
    emulator = Emulator(config)
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
