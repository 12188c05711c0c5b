"""The emulator's admin API under ``/_emulator/``: unsigned, for loopback clients only.

Tests, demos and benches use it to arrange what the real service would do on
its own (start tasks, stop them) and to read what happened (live parameters,
per-task counters, request stats), and to change faults at run time. It is not
part of the emulated OpenAPI: no signature, no QPS limit, no injected faults,
not counted in the stats.

The ``/_emulator/tasks/<verb>`` routes act on one task named by ``AppId``,
``RoomId``, ``TaskId`` in a JSON body, like the service itself or another
client would: ``end`` it (``IdleTimeOut`` by default), ``restart`` it as a new
incarnation, ``set`` live fields as another client's UpdateSegment, ``age``
its StartTime. Each answers ``{"task": <row>}``, the row as
``GET /_emulator/tasks`` shows it after the change, so a test needs no second
read. The rules themselves are :class:`~reconciler.emulator.tasks.TaskTable`'s.

Every route goes through :func:`_admin`, which refuses before the handler
runs, so a new route cannot forget the checks: a client that is not on a
loopback address (HTTP 403); a request that a web page sent (a browser on
this machine is on loopback too): an ``Origin`` other than this server's own
loopback origin (403), and a ``POST`` that is not ``Content-Type:
application/json`` (415), which is what a page can send to another site
without asking first (``text/plain``, a form). Refusals are JSON
``{"error": "..."}``: 400 for a body that is not JSON, an unknown field or a
bad value, 404 for a task never started, 409 for a task that has ended where
a running one is needed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from reconciler.core.task import IDENTITY_FIELDS, TaskKey
from reconciler.emulator.config import FAULT_FIELDS
from reconciler.emulator.errors import ApiFault, invalid
from reconciler.emulator.params import JsonObject, parse_body, parse_key
from reconciler.emulator.tasks import (
    DEFAULT_STOP_REASON,
    LiveTask,
    TaskNotRunningError,
    UnknownTaskError,
)

if TYPE_CHECKING:
    from reconciler.emulator.server import Emulator

__all__ = ["add_routes", "is_loopback"]

_Handler = Callable[["Emulator", web.Request], Awaitable[web.Response]]


def is_loopback(remote: str | None) -> bool:
    """Whether a peer address is loopback (an IPv4-mapped ``::ffff:127.0.0.1`` too)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _loopback_name(host: str | None) -> bool:
    """Whether a host name is this machine's for certain: ``localhost`` or a
    loopback address (a name a page's site controls may point anywhere)."""
    if host is None:
        return False
    return host.lower().rstrip(".") == "localhost" or is_loopback(host)


def _foreign_origin(request: web.Request) -> bool:
    """Whether the request came from a web page of another origin than this
    server's own loopback one (no ``Origin``: not sent by a page's script or form)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        parts = urlsplit(origin)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return True
    served = request.url
    return not (
        _loopback_name(parts.hostname)
        and _loopback_name(served.host)
        and parts.scheme == served.scheme
        and port == served.port
    )


def _error(message: str, *, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _admin(
    emulator: Emulator, handler: _Handler
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def guarded(request: web.Request) -> web.Response:
        if not is_loopback(request.remote):
            return _error("the emulator admin API answers loopback clients only", status=403)
        if _foreign_origin(request):
            return _error(
                "the emulator admin API refuses requests from web pages of other origins",
                status=403,
            )
        if request.method == "POST" and request.content_type != "application/json":
            return _error(
                "the emulator admin API takes JSON: send Content-Type: application/json",
                status=415,
            )
        return await handler(emulator, request)

    return guarded


def add_routes(app: web.Application, emulator: Emulator) -> None:
    """Mount the admin API for ``emulator`` on ``app``."""
    routes: list[tuple[str, str, _Handler]] = [
        ("GET", "/_emulator/tasks", _list),
        ("POST", "/_emulator/tasks", _seed),
        ("DELETE", "/_emulator/tasks", _stop),
        ("GET", "/_emulator/stats", _stats),
        ("POST", "/_emulator/reset-stats", _reset_stats),
        ("POST", "/_emulator/faults", _faults),
        ("POST", "/_emulator/tasks/end", _end),
        ("POST", "/_emulator/tasks/restart", _restart),
        ("POST", "/_emulator/tasks/set", _set),
        ("POST", "/_emulator/tasks/age", _age),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _admin(emulator, handler))


async def _list(emulator: Emulator, request: web.Request) -> web.Response:
    q = request.rel_url.query
    rows = emulator.tasks(app_id=q.get("AppId"), room_id=q.get("RoomId"), task_id=q.get("TaskId"))
    return web.json_response({"tasks": [row.admin_view() for row in rows]})


async def _seed(emulator: Emulator, request: web.Request) -> web.Response:
    try:
        doc = parse_body(await request.read())
        rows = doc.get("tasks")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise invalid("'tasks' must be a list of objects")
        started = emulator.seed_tasks(rows)
    except ApiFault as exc:
        return _error(exc.message)
    return web.json_response({"started": started})


async def _stop(emulator: Emulator, request: web.Request) -> web.Response:
    try:
        key = parse_key(request.rel_url.query)
    except ApiFault as exc:
        return _error(exc.message)
    if not emulator.stop_task(key):
        return _error(f"task {key} is not running", status=404)
    return web.json_response({"stopped": 1})


async def _stats(emulator: Emulator, request: web.Request) -> web.Response:
    return web.json_response(emulator.stats.snapshot())


async def _reset_stats(emulator: Emulator, request: web.Request) -> web.Response:
    emulator.stats.reset()
    return web.json_response(emulator.stats.snapshot())


async def _faults(emulator: Emulator, request: web.Request) -> web.Response:
    try:
        doc = parse_body(await request.read())
    except ApiFault as exc:
        return _error(exc.message)
    unknown = set(doc) - {*FAULT_FIELDS, "qps"}
    if unknown:
        return _error(f"unknown fault settings: {sorted(unknown)}")
    try:
        current = emulator.set_faults(**doc)
    except (TypeError, ValueError) as exc:
        return _error(str(exc))
    return web.json_response(current)


# ---- acting on one task


async def _task_op(
    request: web.Request,
    *,
    fields: frozenset[str],
    op: Callable[[TaskKey, JsonObject], LiveTask],
) -> web.Response:
    """Read ``{AppId, RoomId, TaskId, <fields>...}``, run ``op``, answer the task's row.

    Field values go to ``op`` unchecked: the emulator's own parsers refuse a
    wrong type with the message StartSegment or UpdateSegment would give.
    """
    try:
        doc = parse_body(await request.read())
        unknown = set(doc) - set(IDENTITY_FIELDS) - fields
        if unknown:
            raise invalid(f"unknown fields {sorted(unknown)}; this route takes {sorted(fields)}")
        key = parse_key(doc)
    except ApiFault as exc:
        return _error(exc.message)
    try:
        live = op(key, doc)
    except ValueError as exc:
        return _error(str(exc))
    except UnknownTaskError as exc:
        return _error(str(exc), status=404)
    except TaskNotRunningError as exc:
        return _error(str(exc), status=409)
    return web.json_response({"task": live.admin_view()})


async def _end(emulator: Emulator, request: web.Request) -> web.Response:
    return await _task_op(
        request,
        fields=frozenset({"StopReason"}),
        op=lambda key, doc: emulator.end_task(
            key, stop_reason=doc.get("StopReason", DEFAULT_STOP_REASON)
        ),
    )


async def _restart(emulator: Emulator, request: web.Request) -> web.Response:
    return await _task_op(
        request,
        fields=frozenset({"Identifier", "Handle", "Duration", "MaxIdleTime"}),
        op=lambda key, doc: emulator.restart_task(
            key,
            identifier=doc.get("Identifier"),
            handle=doc.get("Handle"),
            duration=doc.get("Duration"),
            max_idle_time=doc.get("MaxIdleTime"),
        ),
    )


async def _set(emulator: Emulator, request: web.Request) -> web.Response:
    return await _task_op(
        request,
        fields=frozenset({"Identifier", "Handle", "Duration"}),
        op=lambda key, doc: emulator.set_task(
            key,
            identifier=doc.get("Identifier"),
            handle=doc.get("Handle"),
            duration=doc.get("Duration"),
        ),
    )


async def _age(emulator: Emulator, request: web.Request) -> web.Response:
    def age(key: TaskKey, doc: JsonObject) -> LiveTask:
        if "StartedSecondsAgo" not in doc:
            raise ValueError("StartedSecondsAgo is required")
        return emulator.age_task(key, started_seconds_ago=doc["StartedSecondsAgo"])

    return await _task_op(request, fields=frozenset({"StartedSecondsAgo"}), op=age)
