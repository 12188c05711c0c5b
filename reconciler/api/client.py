"""Async client for the RTC segment OpenAPI: signed, paced, retried, observed.

An :class:`RtcClient` keeps its connections open and reuses them (HTTP/1.1).
Each call goes through the same pipeline, attempt by attempt::

    per-action QPS limiter -> in-flight limit -> sign -> send -> interpret

* The QPS slot is marked *sent* from an httpcore trace hook once the request is
  written, so the limiter paces what the server will see arrive, not when the
  client meant to send (see :mod:`reconciler.api.ratelimit`).
* POSTs (UpdateSegment, ...) go through httpx; GETs (GetSegmentTask, the
  daemon's constant live reads) through one ``aiohttp.ClientSession``, whose
  request path costs a fraction of the CPU. Both share the slots, the signer
  and :meth:`RtcClient._interpret`; a GET's slot is marked when its answer
  arrives, which is never before the request could have (so never too early).
* The in-flight limit is an :class:`~reconciler.api.concurrency.AdaptiveLimit`:
  it follows the observed latency (Little's law: the QPS budget times the
  latency, with headroom), from the ceiling before any answer (the QPS
  limiter bounds the rate; a lower start would cost a slow server's first
  round trips), between a floor and
  ``max_in_flight``, so the budget is used against a server answering in
  10 ms or in 2 s alike. A seat is taken only once the QPS slot is granted:
  reads waiting for their small budget must not sit on seats that updates
  need (60 readers on 5/s would otherwise hold every seat for seconds).
* Connections are split over ``httpx.AsyncClient`` pools of at most
  :data:`POOL_SHARD_SIZE` each. httpcore's pool does work quadratic in its
  connection count on every request (encode/httpx#3215, encode/httpcore#1035);
  at 64 connections that alone capped a loopback run below the 150/s budget,
  while 4 pools of 16 do the same work for a sixteenth of the CPU. The limit
  bounds the total, and a request takes the least busy pool, so no request
  ever queues inside a pool. Pools are made as the limit first grows past
  their capacity (32 pools of 16 at a ceiling of 512, only 4 until the limit
  passes 64), and they share one SSL context: each would otherwise load the
  CA bundle again, tens of milliseconds and most of a megabyte apiece.

* The body is serialised once per call (compact UTF-8 JSON) and signed on every
  attempt with a fresh ``X-Date``; the bytes signed are the bytes sent, and the
  signed ``Host`` is read back from the built request, so the two never differ.
* Interpreting an answer is pure: the HTTP status and the parsed envelope map to
  success or to an :mod:`reconciler.core.errors` class via :func:`~reconciler.core.errors.classify`.
* Transient failures are retried with capped exponential backoff and full
  jitter. A throttled answer also pauses every sender of that action (the
  limiter's penalty), so one 429 does not turn into a storm of them.
* A failure after the request went out (read timeout, dropped connection) is
  *outcome unknown*: the request may have been applied. It is logged as
  ``call.outcome_unknown``; a read is retried, an UpdateSegment is sent again
  at most once, or never with ``resend_unknown=False`` (the reconciler reads
  the task back instead), and then the call raises
  :class:`~reconciler.core.errors.OutcomeUnknownError`.
* Two attempts in a row that time out with no answer for two timeouts make
  the endpoint *unresponsive* (a black hole, or a server slower than the
  timeout): :class:`~reconciler.core.errors.UnresponsiveError`, fatal like an
  unreachable endpoint, so nothing more is sent to it.

Events (``call.succeeded``, ``call.retried``, ``call.outcome_unknown``,
``call.failed``) carry ``action``, ``request_id``, ``attempt``, ``latency_ms``,
the ``body`` (or ``query``) sent, and ``app_id``/``room_id``/``task_id`` when the
call names a task. Every attempt is also reported as a :class:`CallEvent` to
:attr:`RtcClient.stats` and to an optional ``on_call`` observer (metrics).
``client.in_flight_limit`` (debug) says when the in-flight limit moved by a
quarter or more, with the latency estimates it was computed from.

Secrets: headers are never logged or put into errors, and any server text that
echoes the secret key or session token is redacted before it goes anywhere.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import socket
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, Self
from urllib.parse import urlsplit

import aiohttp
import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from reconciler.api.concurrency import DEFAULT_FLOOR, AdaptiveLimit
from reconciler.api.credentials import Credentials
from reconciler.api.ratelimit import RateLimiter, RateLimits, Slot
from reconciler.api.signing import sign
from reconciler.core import errors
from reconciler.core.errors import (
    ApiError,
    BadInputError,
    CallWithdrawn,
    FatalError,
    NotRunningError,
    OutcomeUnknownError,
    RetryableError,
    UnreachableError,
    UnresponsiveError,
    classify,
)
from reconciler.eventlog.setup import get_logger, register_secret

USER_AGENT: Final = "reconciler/0.1.0"
#: Most connections per httpx pool; see the module docstring.
POOL_SHARD_SIZE: Final = 16
_REDACTED: Final = "[redacted]"
_SNIPPET_CHARS: Final = 200
_TASK_FIELDS: Final = (("AppId", "app_id"), ("RoomId", "room_id"), ("TaskId", "task_id"))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where and how to call; defaults are the production endpoint and limits."""

    endpoint: str = "https://rtc.volcengineapi.com"
    region: str = "cn-north-1"
    service: str = "rtc"
    version: str = "2022-06-01"
    #: Seconds to wait for each read/write; an answer slower than this is a
    #: timeout with an unknown outcome.
    timeout: float = 10.0
    connect_timeout: float = 5.0
    #: Most requests in flight: the ceiling of the adaptive limit. 150/s at
    #: 2 s latency keeps 300 in flight; 512 leaves headroom (and GetSegmentTask reads).
    max_in_flight: int = 512
    #: The in-flight limit before any answer has told the latency (``None``: the
    #: ceiling; the QPS limiter bounds the rate anyway, and a lower start costs a
    #: slow server's first seconds, 64 in flight carrying 32/s at 2 s), and its floor.
    initial_in_flight: int | None = None
    min_in_flight: int = DEFAULT_FLOOR
    #: Attempts per call, the first included.
    max_attempts: int = 6
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    #: How long every sender of an action pauses after a throttled answer.
    throttle_pause: float = 1.0
    limits: RateLimits = field(default_factory=RateLimits)
    #: Honour proxy settings from the environment (HTTPS_PROXY, NO_PROXY, ...).
    trust_env: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint must be an http(s) URL, not {self.endpoint!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"endpoint must not have a path or query: {self.endpoint!r}")
        if min(self.max_attempts, self.max_in_flight) < 1:
            raise ValueError("max_attempts and max_in_flight must be at least 1")
        if (
            min(1 if self.initial_in_flight is None else self.initial_in_flight, self.min_in_flight)
            < 1
        ):
            raise ValueError("initial_in_flight and min_in_flight must be at least 1")
        if min(self.timeout, self.connect_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.throttle_pause < 0:
            raise ValueError("backoff and pause durations must not be negative")


@dataclass(frozen=True, slots=True)
class CallResult:
    """A successful call. ``result`` is ``"ok"`` for the POST actions and the
    ``SegmentTask`` mapping for GetSegmentTask; ``latency_ms`` is the successful
    attempt's round trip."""

    action: str
    request_id: str
    attempts: int
    latency_ms: float
    result: Any


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One attempt, as observers see it.

    ``outcome`` is ``"ok"`` or ``"retried"`` for attempts that did not end the
    call; on the last attempt (``final``) it is ``"ok"`` or one of
    ``not_running``, ``bad_input``, ``fatal``, ``outcome_unknown``,
    ``retries_exhausted``, ``error``. ``code`` is the error code, if any.
    """

    action: str
    attempt: int
    outcome: str
    final: bool
    code: str | None
    latency_ms: float
    http_status: int | None
    request_id: str | None

    @property
    def throttled(self) -> bool:
        return self.http_status == 429 or (
            self.code is not None and self.code.startswith(errors.THROTTLED_PREFIX)
        )


class ClientStats:
    """Counters a metrics exporter reads.

    ``calls``: finished calls by ``(action, outcome)``. ``requests``: attempts by
    ``(action, code)`` with ``"ok"`` for success. ``throttled``: answers that
    said we went over the QPS limit. ``latencies_ms``: recent attempt round
    trips (bounded), for summaries; use ``on_call`` for full histograms.
    """

    def __init__(self, *, keep_latencies: int = 4096) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.throttled = 0
        self.latencies_ms: deque[float] = deque(maxlen=keep_latencies)

    def record(self, event: CallEvent) -> None:
        self.requests[(event.action, event.code or "ok")] += 1
        if event.final:
            self.calls[(event.action, event.outcome)] += 1
        if event.throttled:
            self.throttled += 1
        self.latencies_ms.append(event.latency_ms)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ErrorBody(_Model):
    Code: str
    Message: str = ""
    CodeN: int | None = None


class Metadata(_Model):
    RequestId: str | None = None
    Action: str | None = None
    Version: str | None = None
    Service: str | None = None
    Region: str | None = None
    Error: ErrorBody | None = None


class Envelope(_Model):
    ResponseMetadata: Metadata
    Result: Any = None


class SegmentTask(BaseModel):
    """``Result.SegmentTask`` of GetSegmentTask; unknown keys are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    StartTime: int
    EndTime: int
    Status: int
    StopReason: str = ""
    MaxIdleTime: int | None = None
    TargetStreams: dict[str, Any] | None = None
    Duration: int | None = None
    Identifier: str | None = None
    Handle: bool | None = None
    StorageConfig: dict[str, Any] | None = None
    Control: dict[str, Any] | None = None


class _SegmentTaskResult(_Model):
    SegmentTask: SegmentTask


@dataclass(frozen=True, slots=True)
class _Success:
    request_id: str
    result: Any
    http_status: int


@dataclass(frozen=True, slots=True)
class _Attempt:
    answer: _Success | ApiError
    latency_ms: float
    #: Seconds the server asked us to wait (``Retry-After``), if it did.
    retry_after: float | None = None


def encode_body(body: Mapping[str, object]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, UTF-8, no ASCII escaping."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter backoff after failed attempt number ``attempt`` (1-based)."""
    return rng.uniform(0.0, min(cap, base * 2 ** (attempt - 1)))


def _shard_sizes(total: int) -> list[int]:
    """Split ``total`` connections into pools of at most :data:`POOL_SHARD_SIZE`."""
    count = -(-total // POOL_SHARD_SIZE)
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _mark_when_sent(
    slot: Slot, gate: Callable[[], None] | None = None
) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An httpcore trace hook that marks ``slot`` once the request is written, and
    runs ``gate`` (which raises to withdraw it) right before its headers are written
    and again right before its body is: the two are written apart, and the server
    acts on a request only once its last byte came (cut after the headers, the
    connection is closed and the server drops the request)."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if gate is not None and event.endswith(
            ("send_request_headers.started", "send_request_body.started")
        ):
            gate()
        if event.endswith("send_request_body.complete"):
            slot.mark()

    return trace


def _outcome_name(error: ApiError) -> str:
    if isinstance(error, NotRunningError):
        return "not_running"
    if isinstance(error, BadInputError):
        return "bad_input"
    if isinstance(error, FatalError):
        return "fatal"
    if isinstance(error, OutcomeUnknownError):
        return "outcome_unknown"
    if isinstance(error, RetryableError):
        return "retries_exhausted"
    return "error"


#: Codes of attempts that never reached the server: no answer, nothing applied.
_NOT_CONNECTED: Final = frozenset({errors.CONNECT_ERROR, errors.CONNECT_TIMEOUT})
#: Attempts timed out in a row, with no answer for two timeouts, that make an
#: endpoint unresponsive (:class:`~reconciler.core.errors.UnresponsiveError`).
SILENT_TIMEOUTS: Final = 2
_NOT_SENT: Final = "; the request was not sent"

_ERRNO_TEXT: Final = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connection timed out",
}


def _connect_failure(exc: BaseException, detail: str) -> str:
    """Why a connection failed, in words: the OS error under httpx's and anyio's wrappers.

    httpx often says only "All connection attempts failed"; the errno beneath
    says refused, unreachable or unknown host.
    """
    seen: BaseException | None = exc
    for _ in range(10):  # the chain is short; bounded against cycles
        if seen is None:
            break
        if isinstance(seen, socket.gaierror):
            return f"host name not found ({seen.strerror or seen})"
        if isinstance(seen, OSError) and seen.errno in _ERRNO_TEXT:
            return _ERRNO_TEXT[seen.errno]
        seen = seen.__cause__ or seen.__context__
    return f"could not connect ({detail})"


class _Response(Protocol):
    """What interpreting an answer needs; an ``httpx.Response`` is one."""

    @property
    def status_code(self) -> int: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class _Answer:
    """An aiohttp answer, read whole, in the shape :class:`_Response` asks for."""

    status_code: int
    content: bytes
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _env_proxy(endpoint: str) -> str | None:
    """The proxy the environment names for ``endpoint`` (HTTPS_PROXY, NO_PROXY ...), if any."""
    parts = urlsplit(endpoint)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _signed_host(scheme: str, netloc: str) -> str:
    """The Host as sent: a default port is left out (and signed without, as the SDK does)."""
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def _retry_after(response: _Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None  # the HTTP-date form is not worth the complexity here
    return seconds if seconds >= 0 else None


class RtcClient:
    """Calls the segment actions; see the module docstring for the pipeline."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
        log: Any = None,
        on_call: Callable[[CallEvent], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.stats = ClientStats()
        self.limiter = limiter or RateLimiter(self.config.limits)
        self._credentials = credentials
        self._secrets = tuple(s for s in (credentials.secret_key, credentials.session_token) if s)
        for secret in self._secrets:
            register_secret(secret)
        self._log = log if log is not None else get_logger()
        self._on_call = on_call
        self._rng = rng or random.Random()
        cfg = self.config
        # Black-hole detection: when the endpoint last answered anything (or the
        # client started), and the attempts that timed out since.
        self._last_answer = time.monotonic()
        self._silent_timeouts = 0
        self._transport = transport
        self._ssl = None if transport else httpx.create_ssl_context(trust_env=cfg.trust_env)
        # A given transport is one pool already; otherwise shard (see module docs).
        self._shard_plan = [cfg.max_in_flight] if transport else _shard_sizes(cfg.max_in_flight)
        self._pools: list[httpx.AsyncClient] = []
        self._pool_sizes: list[int] = []
        self._pool_load: list[int] = []
        self._limit = AdaptiveLimit(
            budget=self.limiter.limits.for_action,
            ceiling=cfg.max_in_flight,
            floor=cfg.min_in_flight,
            initial=min(cfg.max_in_flight, cfg.initial_in_flight or cfg.max_in_flight),
            on_change=self._limit_changed,
        )
        self._logged_limit = self._limit.limit
        self._grow_pools(self._limit.limit)
        # GETs (GetSegmentTask, the live reads) go through aiohttp: a read costs
        # about a fifth of httpx's CPU, and a daemon reads all the time. Made on
        # first use, inside the event loop. A given httpx transport (tests)
        # takes every request.
        self._reader: aiohttp.ClientSession | None = None
        self._read_proxy: str | None = None
        #: Asked at the last moment before each request is written, on every
        #: attempt of every action, reads included; ``False`` withdraws it unsent
        #: (:class:`~reconciler.core.errors.CallWithdrawn`). A daemon replica sends
        #: nothing on a lease that may have lapsed. ``None``: always send.
        self.gate: Callable[[], bool] | None = None

    def _check_gate(self, action: str) -> None:
        if self.gate is not None and not self.gate():
            raise CallWithdrawn(action)

    def _gate_for(self, action: str) -> Callable[[], None] | None:
        return None if self.gate is None else lambda: self._check_gate(action)

    async def _gate_read(self, _session: Any, _ctx: Any, params: Any) -> None:
        # aiohttp runs this right before it writes a request's headers.
        self._check_gate(str(params.url.query.get("Action", "GET")))

    def _grow_pools(self, limit: int) -> None:
        """Make pools until they can carry ``limit`` connections (never fewer pools)."""
        while sum(self._pool_sizes) < limit and len(self._pools) < len(self._shard_plan):
            size = self._shard_plan[len(self._pools)]
            self._pools.append(self._new_pool(size))
            self._pool_sizes.append(size)
            self._pool_load.append(0)

    def _new_pool(self, size: int) -> httpx.AsyncClient:
        cfg = self.config
        return httpx.AsyncClient(
            base_url=cfg.endpoint,
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            http1=True,
            http2=False,
            verify=self._ssl if self._ssl is not None else True,
            transport=self._transport,
            trust_env=cfg.trust_env,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )

    def _limit_changed(self, old: int, new: int) -> None:
        # Every limit ever set stays within the pools, so a seat always finds a connection.
        self._grow_pools(new)
        if abs(new - self._logged_limit) >= max(8, self._logged_limit // 4):
            self._log.debug(
                "client.in_flight_limit",
                limit=new,
                previous=self._logged_limit,
                in_flight=self._limit.in_use,
                waiting=self._limit.waiting,
                latency_ms=self.latency_estimates_ms,
            )
            self._logged_limit = new

    @property
    def in_flight_limit(self) -> int:
        """Requests allowed in flight now (see :mod:`reconciler.api.concurrency`)."""
        return self._limit.limit

    @property
    def in_flight(self) -> int:
        """Requests holding a seat now: granted their QPS slot, being sent or on the wire."""
        return self._limit.in_use

    @property
    def latency_estimates_ms(self) -> dict[str, float]:
        """The latency the limit is computed from, per action, in milliseconds."""
        return {a: round(s * 1000, 1) for a, s in self._limit.latencies().items()}

    def __repr__(self) -> str:
        ak = self._credentials.access_key
        return f"RtcClient(endpoint={self.config.endpoint!r}, access_key={ak!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
        if self._reader is not None:
            await self._reader.close()

    def _read_trace(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(self._gate_read)
        return trace

    def _read_session(self) -> aiohttp.ClientSession:
        if self._reader is None:
            cfg = self.config
            self._reader = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=cfg.max_in_flight, ssl=self._ssl if self._ssl is not None else True
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.timeout
                ),
                headers={"User-Agent": USER_AGENT},
                trace_configs=[self._read_trace()],
                # With trust_env aiohttp looks up netrc and the proxy in a thread on
                # every request; the proxy is looked up once instead (netrc never
                # applies: requests carry their own signed Authorization).
                trust_env=False,
            )
            self._read_proxy = _env_proxy(cfg.endpoint) if cfg.trust_env else None
        return self._reader

    # -- the actions ---------------------------------------------------------

    async def update_segment(
        self,
        body: Mapping[str, object],
        *,
        log_fields: Mapping[str, object] | None = None,
        attempts: int | None = None,
        before_send: Callable[[], bool] | None = None,
        abort: asyncio.Event | None = None,
        resend_unknown: bool = True,
    ) -> CallResult:
        """Override Identifier / Handle / Duration of a running task.

        ``resend_unknown=False``: an attempt whose outcome is unknown is not sent
        again; :class:`~reconciler.core.errors.OutcomeUnknownError` is raised at once, for
        the caller to read the task back before it sends anything more.
        """
        return await self.call(
            "UpdateSegment",
            body=body,
            log_fields=log_fields,
            attempts=attempts,
            before_send=before_send,
            abort=abort,
            resend_unknown=resend_unknown,
        )

    async def start_segment(
        self, body: Mapping[str, object], *, log_fields: Mapping[str, object] | None = None
    ) -> CallResult:
        return await self.call("StartSegment", body=body, log_fields=log_fields)

    async def stop_segment(
        self, body: Mapping[str, object], *, log_fields: Mapping[str, object] | None = None
    ) -> CallResult:
        return await self.call("StopSegment", body=body, log_fields=log_fields)

    async def get_segment_task(
        self, *, app_id: str, room_id: str, task_id: str, attempts: int | None = None
    ) -> CallResult:
        """Read one task; ``result`` is the ``SegmentTask`` mapping, validated."""
        return await self.call(
            "GetSegmentTask",
            query={"AppId": app_id, "RoomId": room_id, "TaskId": task_id},
            attempts=attempts,
        )

    async def call(
        self,
        action: str,
        *,
        body: Mapping[str, object] | None = None,
        query: Mapping[str, str] | None = None,
        log_fields: Mapping[str, object] | None = None,
        attempts: int | None = None,
        before_send: Callable[[], bool] | None = None,
        abort: asyncio.Event | None = None,
        resend_unknown: bool = True,
    ) -> CallResult:
        """Call ``action``: a POST with a JSON ``body``, or a GET with ``query``.

        Returns on success; raises the :mod:`reconciler.core.errors` class that says
        what to do otherwise (transient failures only after ``attempts``,
        default ``max_attempts``). When no attempt could even connect, that is
        :class:`~reconciler.core.errors.UnreachableError`.

        ``before_send`` runs once, when the first attempt holds its in-flight and
        QPS slots and is about to go out: it may record that the call is being
        made, or return ``False`` to withdraw it unsent
        (:class:`~reconciler.core.errors.CallWithdrawn`): a run that is stopping
        drops calls still waiting for a slot instead of sending them. ``abort``
        set while the first attempt waits for its QPS slot withdraws it at once.
        ``resend_unknown=False``: no blind re-send after an outcome unknown (see
        :meth:`update_segment`).
        """
        cfg = self.config
        max_attempts = attempts or cfg.max_attempts
        answered = False
        method = "GET" if body is None else "POST"
        payload = b"" if body is None else encode_body(body)
        params = {**(query or {}), "Action": action, "Version": cfg.version}
        log = self._log.bind(**{**self._event_fields(body, query, log_fields), "action": action})
        maybe_applied = False
        resend_spent = False
        attempt = 0
        while True:
            attempt += 1
            tried = await self._attempt(
                action,
                method=method,
                params=params,
                payload=payload,
                before_send=before_send if attempt == 1 else None,
                abort=abort if attempt == 1 else None,
            )
            answer, latency = tried.answer, round(tried.latency_ms, 1)
            if isinstance(answer, _Success) or answer.http_status is not None:
                self._last_answer, self._silent_timeouts = time.monotonic(), 0
            if isinstance(answer, _Success):
                self._observe(
                    CallEvent(
                        action=action,
                        attempt=attempt,
                        outcome="ok",
                        final=True,
                        code=None,
                        latency_ms=latency,
                        http_status=answer.http_status,
                        request_id=answer.request_id,
                    )
                )
                log.debug(  # the task's own line (task.synced, a read's outcome) says it
                    "call.succeeded",
                    request_id=answer.request_id,
                    attempt=attempt,
                    latency_ms=latency,
                )
                return CallResult(action, answer.request_id, attempt, latency, answer.result)
            error = answer
            if isinstance(error, OutcomeUnknownError):
                # A call that may have been applied is sent once more at most
                # here; re-sending Duration cuts the slice each time, so any
                # further retry is the caller's, later (at-least-once).
                resend_spent = maybe_applied
                maybe_applied = True
                log.warning(
                    "call.outcome_unknown",
                    request_id=error.request_id,
                    attempt=attempt,
                    latency_ms=latency,
                    code=error.code,
                    message=error.message,
                )
            answered = answered or error.code not in _NOT_CONNECTED
            if error.code == errors.TIMEOUT:
                self._silent_timeouts += 1
            if self._unresponsive(error):
                break
            if not isinstance(error, RetryableError) or attempt >= max_attempts:
                break
            if isinstance(error, OutcomeUnknownError) and (resend_spent or not resend_unknown):
                break
            delay = backoff_delay(
                attempt, base=cfg.backoff_base, cap=cfg.backoff_cap, rng=self._rng
            )
            if tried.retry_after is not None:
                delay = max(delay, min(cfg.backoff_cap, tried.retry_after))
            if error.throttled:
                self.limiter.penalize(action, cfg.throttle_pause)
            self._observe(
                CallEvent(
                    action=action,
                    attempt=attempt,
                    outcome="retried",
                    final=False,
                    code=error.code,
                    latency_ms=latency,
                    http_status=error.http_status,
                    request_id=error.request_id,
                )
            )
            log.warning(
                "call.retried",
                request_id=error.request_id,
                attempt=attempt,
                latency_ms=latency,
                code=error.code,
                http_status=error.http_status,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)
        final = self._final_error(
            error, attempts=attempt, maybe_applied=maybe_applied, connected=answered
        )
        outcome = _outcome_name(final)
        self._observe(
            CallEvent(
                action=action,
                attempt=attempt,
                outcome=outcome,
                final=True,
                code=final.code,
                latency_ms=latency,
                http_status=final.http_status,
                request_id=final.request_id,
            )
        )
        emit = log.error if isinstance(final, FatalError) else log.warning
        emit(
            "call.failed",
            request_id=final.request_id,
            attempt=attempt,
            latency_ms=latency,
            code=final.code,
            http_status=final.http_status,
            outcome=outcome,
            message=final.message,
        )
        raise final

    # -- one attempt ---------------------------------------------------------

    async def _attempt(
        self,
        action: str,
        *,
        method: str,
        params: Mapping[str, str],
        payload: bytes,
        before_send: Callable[[], bool] | None = None,
        abort: asyncio.Event | None = None,
    ) -> _Attempt:
        if method == "GET" and self._transport is None:
            return await self._read_attempt(action, params=params)
        headers = {"Content-Type": "application/json"} if method == "POST" else {}
        slot = await self._reserve(action, abort)
        try:
            # The seat after the QPS slot: a caller waiting for its action's budget
            # holds no seat that a call of another action could use.
            async with self._limit:
                # The limit bounds the total, so some pool always has a free connection.
                shard = max(
                    range(len(self._pools)),
                    key=lambda i: self._pool_sizes[i] - self._pool_load[i],
                )
                http = self._pools[shard]
                self._pool_load[shard] += 1
                try:
                    if before_send is not None and not before_send():
                        raise CallWithdrawn(action)
                    request = http.build_request(
                        method,
                        "/",
                        params=params,
                        content=payload or None,
                        headers=headers,
                        extensions={"trace": _mark_when_sent(slot, self._gate_for(action))},
                    )
                    request.headers.update(
                        sign(
                            credentials=self._credentials,
                            region=self.config.region,
                            service=self.config.service,
                            method=method,
                            host=request.headers["Host"],
                            path=request.url.path or "/",
                            query=params,
                            headers=headers,
                            body=payload,
                        )
                    )
                    started = time.perf_counter()
                    try:
                        # Only the wire time is a latency sample; no answer, no sample.
                        with self._limit.measure(action):
                            response = await http.send(request)
                    except httpx.RequestError as exc:
                        latency = (time.perf_counter() - started) * 1000
                        return _Attempt(self._transport_error(action, exc), latency)
                    latency = (time.perf_counter() - started) * 1000
                finally:
                    self._pool_load[shard] -= 1
        finally:
            # Not written at all, or through a transport that does not trace:
            # count it from now, which is never before it could have arrived.
            slot.mark()
        return _Attempt(self._interpret(action, method, response), latency, _retry_after(response))

    async def _reserve(self, action: str, abort: asyncio.Event | None) -> Slot:
        """The action's QPS slot, unless ``abort`` is set first (:class:`CallWithdrawn`).

        A stopping run has hundreds of calls queued for slots; each would
        otherwise wait its turn only to decline it, at the budget's pace.
        """
        if abort is None:
            return await self.limiter.reserve(action)
        if abort.is_set():
            raise CallWithdrawn(action)
        reserving = asyncio.ensure_future(self.limiter.reserve(action))
        stopping = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait([reserving, stopping], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            reserving.cancel()
            raise
        finally:
            stopping.cancel()
        if not reserving.done():
            reserving.cancel()  # the limiter gives a cancelled waiter's place up
            try:
                await reserving  # settles; it may have been granted in the meantime
            except asyncio.CancelledError:
                raise CallWithdrawn(action) from None
        slot = reserving.result()
        if abort.is_set():
            slot.mark()  # granted, never used: it counts as sent, which is safe
            raise CallWithdrawn(action)
        return slot

    async def _read_attempt(self, action: str, *, params: Mapping[str, str]) -> _Attempt:
        """One GET through aiohttp; the same slots, signing and interpretation as a POST."""
        cfg = self.config
        slot = await self.limiter.reserve(action)
        try:
            async with self._limit:
                endpoint = urlsplit(cfg.endpoint)
                host = endpoint.netloc
                headers = sign(
                    credentials=self._credentials,
                    region=cfg.region,
                    service=cfg.service,
                    method="GET",
                    host=_signed_host(endpoint.scheme, host),
                    path="/",
                    query=params,
                    headers={},
                    body=b"",
                )
                self._check_gate(action)
                started = time.perf_counter()
                try:
                    with self._limit.measure(action):
                        async with self._read_session().get(
                            f"{endpoint.scheme}://{host}/",
                            params=params,
                            headers=headers,
                            proxy=self._read_proxy,
                        ) as resp:
                            answer = _Answer(resp.status, await resp.read(), resp.headers)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    latency = (time.perf_counter() - started) * 1000
                    return _Attempt(self._read_error(action, exc), latency)
                latency = (time.perf_counter() - started) * 1000
        finally:
            slot.mark()  # after the answer: never before it could have arrived
        return _Attempt(self._interpret(action, "GET", answer), latency, _retry_after(answer))

    def _read_error(self, action: str, exc: BaseException) -> ApiError:
        """An aiohttp failure, classified as :meth:`_transport_error` does httpx's."""
        detail = self._scrub(str(exc)) or type(exc).__name__
        if isinstance(exc, aiohttp.ClientConnectorError):
            return RetryableError(
                action=action,
                code=errors.CONNECT_ERROR,
                message=_connect_failure(exc.os_error, detail) + _NOT_SENT,
            )
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return RetryableError(
                action=action,
                code=errors.CONNECT_TIMEOUT,
                message=f"no connection within {self.config.connect_timeout:g} s" + _NOT_SENT,
            )
        if isinstance(exc, TimeoutError):
            return OutcomeUnknownError(
                action=action,
                code=errors.TIMEOUT,
                message=f"no answer in time ({type(exc).__name__})",
            )
        return OutcomeUnknownError(
            action=action,
            code=errors.CONNECTION_DROPPED,
            message=f"connection lost ({type(exc).__name__}: {detail})",
        )

    def _interpret(self, action: str, method: str, response: _Response) -> _Success | ApiError:
        status = response.status_code
        try:
            envelope = Envelope.model_validate_json(response.content)
        except ValidationError:
            cls = classify(http_status=status, code=None)
            return cls(
                action=action,
                code=errors.MALFORMED_RESPONSE,
                message=f"HTTP {status} with a body that is not an OpenAPI response: "
                f"{self._snippet(response.text)!r}",
                http_status=status,
            )
        meta = envelope.ResponseMetadata
        if meta.Error is not None:
            cls = classify(http_status=status, code=meta.Error.Code)
            return cls(
                action=action,
                code=meta.Error.Code,
                message=self._scrub(meta.Error.Message),
                request_id=meta.RequestId,
                http_status=status,
            )
        if not 200 <= status < 300:
            cls = classify(http_status=status, code=None)
            return cls(
                action=action,
                code=errors.MALFORMED_RESPONSE,
                message=f"HTTP {status} without an Error in ResponseMetadata",
                request_id=meta.RequestId,
                http_status=status,
            )
        request_id = meta.RequestId or ""
        if method == "POST":
            if envelope.Result == "ok":
                return _Success(request_id, "ok", status)
            return ApiError(
                action=action,
                code=errors.UNEXPECTED_RESULT,
                message=f"Result is {self._snippet(repr(envelope.Result))}, not 'ok'",
                request_id=meta.RequestId,
                http_status=status,
            )
        if action == "GetSegmentTask":
            try:
                parsed = _SegmentTaskResult.model_validate(envelope.Result)
            except ValidationError as exc:
                fields = sorted({".".join(map(str, e["loc"])) for e in exc.errors()})
                return ApiError(
                    action=action,
                    code=errors.MALFORMED_RESPONSE,
                    message=f"Result.SegmentTask is missing or malformed at {', '.join(fields)}",
                    request_id=meta.RequestId,
                    http_status=status,
                )
            return _Success(request_id, parsed.SegmentTask.model_dump(), status)
        return _Success(request_id, envelope.Result, status)

    def _transport_error(self, action: str, exc: httpx.RequestError) -> ApiError:
        kind = type(exc).__name__
        detail = self._scrub(str(exc)) or kind
        code: str
        cls: type[ApiError]
        if isinstance(exc, httpx.ConnectError | httpx.ProxyError):
            code, cls = errors.CONNECT_ERROR, RetryableError
            message = _connect_failure(exc, detail) + _NOT_SENT
        elif isinstance(exc, httpx.ConnectTimeout):
            code, cls = errors.CONNECT_TIMEOUT, RetryableError
            message = f"no connection within {self.config.connect_timeout:g} s" + _NOT_SENT
        elif isinstance(exc, httpx.PoolTimeout):
            code, cls = errors.CONNECT_TIMEOUT, RetryableError
            message = f"no connection within the timeout ({kind})" + _NOT_SENT
        elif isinstance(exc, httpx.UnsupportedProtocol):
            code, cls = errors.UNSUPPORTED_PROTOCOL, FatalError
            message = detail
        elif isinstance(exc, httpx.LocalProtocolError):
            code, cls = errors.LOCAL_PROTOCOL_ERROR, ApiError
            message = detail
        elif isinstance(exc, httpx.TimeoutException):
            code, cls = errors.TIMEOUT, OutcomeUnknownError
            message = f"no answer in time ({kind}); the request may have been applied"
        else:
            code, cls = errors.CONNECTION_DROPPED, OutcomeUnknownError
            message = f"connection lost ({kind}: {detail}); the request may have been applied"
        return cls(action=action, code=code, message=message)

    def _final_error(
        self, error: ApiError, *, attempts: int, maybe_applied: bool, connected: bool
    ) -> ApiError:
        # An earlier attempt may have been applied even if the last one was
        # merely throttled: the caller must know the outcome is unknown.
        cls: type[ApiError] = type(error)
        message = error.message
        if maybe_applied and cls is RetryableError:
            cls = OutcomeUnknownError
        if not connected and not maybe_applied and error.code in _NOT_CONNECTED:
            cls = UnreachableError
            message = (
                f"cannot reach {self.config.endpoint}: {error.message.removesuffix(_NOT_SENT)}"
            )
        elif self._unresponsive(error):
            cls = UnresponsiveError
            silent = time.monotonic() - self._last_answer
            message = (
                f"{self.config.endpoint} accepts connections but answered none of "
                f"{self._silent_timeouts} requests within --timeout {self.config.timeout:g} s "
                f"({silent:.0f} s without an answer): a black hole, or a server slower than "
                "--timeout (raise it if so)"
            )
        return cls(
            action=error.action,
            code=error.code,
            message=message,
            request_id=error.request_id,
            http_status=error.http_status,
            attempts=attempts,
        )

    def _unresponsive(self, error: ApiError) -> bool:
        """Whether timeouts say the endpoint answers nothing (a black hole).

        Counted per attempt that timed out after it was sent, across calls;
        any answer resets it. Unresponsive once :data:`SILENT_TIMEOUTS` of them
        came in a row and nothing was answered for two timeouts: every further
        request would only wait as long, and each UpdateSegment may land late.
        """
        if error.code != errors.TIMEOUT:
            return False
        silent = time.monotonic() - self._last_answer
        return self._silent_timeouts >= SILENT_TIMEOUTS and silent >= 2 * self.config.timeout

    # -- events and redaction --------------------------------------------------

    def _observe(self, event: CallEvent) -> None:
        self.stats.record(event)
        if self._on_call is not None:
            self._on_call(event)

    @staticmethod
    def _event_fields(
        body: Mapping[str, object] | None,
        query: Mapping[str, str] | None,
        log_fields: Mapping[str, object] | None,
    ) -> dict[str, object]:
        sent: Mapping[str, object] = body if body is not None else (query or {})
        fields: dict[str, object] = {name: sent[key] for key, name in _TASK_FIELDS if key in sent}
        fields["fields" if body is not None else "query"] = dict(sent)
        fields.update(log_fields or {})
        return fields

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    def _snippet(self, text: str) -> str:
        flat = self._scrub(" ".join(text.split()))
        if len(flat) > _SNIPPET_CHARS:
            flat = flat[:_SNIPPET_CHARS] + "…"
        return flat
