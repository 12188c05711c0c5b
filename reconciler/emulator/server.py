"""The emulated service: an ``aiohttp`` application over the pure parts of this package.

:class:`Emulator` is the imperative shell. The rules live in plain functions
and values elsewhere in the package (:mod:`.auth` checks signatures,
:mod:`.params` validates bodies, :mod:`.qps` admits requests, :mod:`.faults`
draws fates, :mod:`.tasks` holds the tasks); this module wires them into HTTP,
keeps the clock, the RNG and :class:`~reconciler.emulator.stats.EmulatorStats`.
Every request is handled synchronously between awaits on one event loop, so
the state needs no locks; :mod:`.runner` gives other threads a safe way in.

Request pipeline on ``/`` (the order matters for what a client observes):
route (``Action``/``Version``, method) → signature → QPS admission (a rejected
request does not count) → fault draw → apply → latency → answer. An injected
5xx is decided *before* applying, so the task is untouched. A dropped request
is closed without any response, either before applying (``drop_phase
"before"``) or after (``"after"``, the default, so the outcome truly is unknown
to the client). Latency is added to every answer on ``/``; faults only hit
requests that reached a segment action, never the admin API (:mod:`.admin`).

Choices where the API's documentation is silent: a session-token mismatch answers
``InvalidSecurityToken`` (401); a wrong HTTP method answers
``InvalidActionOrVersion``; an AppId outside ``EmulatorConfig.app_ids``
answers ``InvalidParameter.NotExistAppId``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar

from aiohttp import web

from reconciler.core.task import TaskKey
from reconciler.emulator import admin, faults
from reconciler.emulator.auth import verify_signature
from reconciler.emulator.config import ACTIONS, FAULT_FIELDS, VERSIONS, EmulatorConfig
from reconciler.emulator.errors import ApiFault
from reconciler.emulator.params import (
    DURATION_DEFAULT,
    MAX_IDLE_DEFAULT,
    JsonObject,
    parse_body,
    parse_key,
    parse_start,
    parse_update,
)
from reconciler.emulator.qps import SlidingWindowLimiter
from reconciler.emulator.stats import EmulatorStats
from reconciler.emulator.tasks import DEFAULT_STOP_REASON, LiveTask, TaskTable, UnknownTaskError
from reconciler.eventlog.setup import get_logger

__all__ = ["Emulator"]

log = get_logger()


class _Dropped(Exception):
    """The connection is to be closed without an answer."""


def _now_ms() -> int:
    return int(time.time() * 1000)


_P = TypeVar("_P")


def _checked(parse: Callable[[JsonObject], _P], body: JsonObject) -> _P:
    """``parse(body)``; the server's refusal becomes a :class:`ValueError` for in-process use."""
    try:
        return parse(body)
    except ApiFault as exc:
        raise ValueError(exc.message) from None


class Emulator:
    """The emulated service: an aiohttp application plus its in-memory state."""

    def __init__(
        self, config: EmulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``clock``: the seconds the QPS windows are counted in (a test may step it)."""
        config.validate()
        self._clock = clock
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
            action: SlidingWindowLimiter(self._config.limit_for(action)) for action in ACTIONS
        }
        self.stats = EmulatorStats()
        self._request_counter = 0
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # ---- lifecycle

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_route("GET", "/", self._handle_api)
        application.router.add_route("POST", "/", self._handle_api)
        admin.add_routes(application, self)
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

    # ---- in-process API (call on the emulator's event loop thread)

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
        self._tasks.start(_checked(parse_start, body), version=None, now_ms=_now_ms())

    def seed_tasks(self, rows: list[JsonObject]) -> int:
        """Start tasks from StartSegment bodies, all or none; return how many.

        Raises :class:`ApiFault` (nothing started) if any row is refused.
        """
        # Validate all first so a bad row starts nothing.
        params = [parse_start(row) for row in rows]
        now = _now_ms()
        for p in params:
            self._tasks.start(p, version=None, now_ms=now)
        return len(params)

    def stop_task(self, key: TaskKey) -> bool:
        """Stop a running task as StopSegment would; False if it was not running."""
        try:
            self._tasks.stop(key, now_ms=_now_ms())
        except ApiFault:
            return False
        return True

    def end_task(self, key: TaskKey, *, stop_reason: str = DEFAULT_STOP_REASON) -> LiveTask:
        """End a running task as the service would: Status 3 (4 for ``StartTaskFailed``).

        Raises :class:`ValueError` for an undocumented reason,
        :class:`UnknownTaskError` or :class:`TaskNotRunningError`.
        """
        self._tasks.end(key, now_ms=_now_ms(), reason=stop_reason)
        return self._snapshot(key)

    def restart_task(
        self,
        key: TaskKey,
        *,
        identifier: str | None = None,
        handle: bool | None = None,
        duration: int | None = None,
        max_idle_time: int | None = None,
    ) -> LiveTask:
        """Start a task again as a new incarnation, with StartSegment's defaults
        (random UUID Identifier, Handle true, Duration 20, MaxIdleTime 180) for
        what is not given; a running task is ended first.

        Raises :class:`ValueError` for a value StartSegment would refuse,
        :class:`UnknownTaskError` for a task never started.
        """
        body: JsonObject = {
            **key.identity(),
            "Identifier": identifier,
            "Handle": handle,
            "Duration": duration,
            "MaxIdleTime": max_idle_time,
        }
        self._tasks.restart(_checked(parse_start, body), now_ms=_now_ms())
        return self._snapshot(key)

    def set_task(
        self,
        key: TaskKey,
        *,
        identifier: str | None = None,
        handle: bool | None = None,
        duration: int | None = None,
    ) -> LiveTask:
        """Change live fields as another client's UpdateSegment would (not counted as ours).

        Raises :class:`ValueError` for a value UpdateSegment would refuse or
        when nothing is given, :class:`UnknownTaskError` or :class:`TaskNotRunningError`.
        """
        body: JsonObject = {
            **key.identity(),
            "Identifier": identifier,
            "Handle": handle,
            "Duration": duration,
        }
        self._tasks.set_fields(_checked(parse_update, body))
        return self._snapshot(key)

    def age_task(self, key: TaskKey, *, started_seconds_ago: float) -> LiveTask:
        """Set a task's StartTime that far in the past (over 72 h hides it from GetSegmentTask).

        Raises :class:`ValueError` for a negative or non-finite age (or one that
        would put an ended task's start after its end), :class:`UnknownTaskError`.
        """
        ago, now_ms = started_seconds_ago, _now_ms()
        # Not before the epoch: StartTime is unsigned milliseconds on the wire.
        if (
            isinstance(ago, bool)
            or not isinstance(ago, int | float)
            or not 0 <= ago * 1000 <= now_ms
        ):
            raise ValueError(
                "StartedSecondsAgo must be a number of seconds from 0 to now since the epoch, "
                f"got {ago!r}"
            )
        self._tasks.set_start_time(key, start_time_ms=now_ms - round(ago * 1000))
        return self._snapshot(key)

    def live(self, key: TaskKey) -> LiveTask | None:
        return self._tasks.live(key, now_ms=_now_ms())

    def tasks(
        self, *, app_id: str | None = None, room_id: str | None = None, task_id: str | None = None
    ) -> list[LiveTask]:
        """Snapshots of the tasks matching every given id part, sorted by key."""
        return self._tasks.select(now_ms=_now_ms(), app_id=app_id, room_id=room_id, task_id=task_id)

    def _snapshot(self, key: TaskKey) -> LiveTask:
        live = self._tasks.live(key, now_ms=_now_ms())
        if live is None:  # every caller has just found or created it
            raise UnknownTaskError(key)
        return live

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
            limiter.limit = candidate.limit_for(action)
        return self.faults()

    def faults(self) -> JsonObject:
        current: JsonObject = {name: getattr(self._config, name) for name in FAULT_FIELDS}
        current["qps"] = {a: lim.limit for a, lim in self._limiters.items()}
        return current

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
        fate = faults.Fate.ANSWER
        try:
            self._route(action, version, request.method)
            body = await request.read()
            access_key = verify_signature(
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
            self.stats.record_key(access_key, action, time.time())
            if not self._limiters[action].admit(self._clock()):
                self.stats.throttled += 1
                raise ApiFault(
                    "FlowLimitExceeded.QPSOverLimit",
                    f"QPS of {action} exceeded the limit of {self._limiters[action].limit}.",
                    status=429,
                )
            fate = faults.draw_fate(self._rng, self._config)
            if fate is faults.Fate.ERROR:
                raise faults.injected_error()
            if fate is faults.Fate.DROP_BEFORE:
                raise _Dropped
            result = self._apply(action, version, body=body, query=query)
            status, payload, outcome = 200, {"ResponseMetadata": meta, "Result": result}, "ok"
        except ApiFault as exc:
            meta["Error"] = {"Code": exc.code, "Message": exc.message}
            status, payload, outcome = exc.status, {"ResponseMetadata": meta}, exc.code
        except _Dropped:
            status, payload, outcome = 0, {}, "Dropped"  # answer replaced below
        delay = faults.draw_delay(self._rng, self._config)
        if delay > 0:
            await asyncio.sleep(delay)
        if fate.dropped:
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
            drop_phase=fate.value if fate.dropped else None,
            request_id=request_id,
            latency_ms=round((time.monotonic() - arrived) * 1000, 3),
        )
        if fate.dropped:
            if request.transport is not None:
                request.transport.close()
            # Nothing can be written to a closed transport; aiohttp ignores this one.
            return web.Response(status=500)
        return web.json_response(payload, status=status)

    @staticmethod
    def _route(action: str, version: str, method: str) -> None:
        if not action or not version:
            missing = "Action" if not action else "Version"
            raise ApiFault(
                "MissingParameter", f"The request is missing {missing} parameter.", status=400
            )
        if action not in ACTIONS or version not in VERSIONS:
            raise ApiFault(
                "InvalidActionOrVersion",
                f"Could not find operation {action} for version {version}.",
                status=404,
            )
        if method != ACTIONS[action]:
            raise ApiFault(
                "InvalidActionOrVersion",
                f"Operation {action} is served over {ACTIONS[action]}, not {method}.",
                status=404,
            )

    def _apply(
        self, action: str, version: str, *, body: bytes, query: Mapping[str, str]
    ) -> str | JsonObject:
        if action == "GetSegmentTask":
            self._check_app(parse_key(query))
            return {"SegmentTask": self._tasks.segment_task(parse_key(query), now_ms=_now_ms())}
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
            raise ApiFault(
                "InvalidParameter.NotExistAppId",
                f"AppId {key.app_id} does not exist in this account",
                status=400,
            )
