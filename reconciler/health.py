"""The daemon's HTTP side: ``/healthz``, ``/readyz`` and ``/metrics``.

``/healthz`` answers 200 while the event loop is turning (a wedged loop cannot
answer at all) and the daemon's watcher and resync loops are alive, 503 if one
of them died, so a supervisor restarts the process. ``/readyz`` answers 200
once the first full reconcile is done, 503 before that or while calls are
paused by a credentials error, with the reason in the body. Ready is not the
same as whole: while invalid files hold tasks or the forget guard keeps
records, ``/readyz`` still answers 200 (restarting or unrouting the pod would
not help, and calls go on) with ``ready, degraded: ...`` saying what is held.
A warm standby replica answers 200 ``standby: leader is ...`` (503 while it
cannot reach the shared store).
``/metrics`` is Prometheus' text format. The read-only dashboard
(:mod:`reconciler.dashboard`), when given, serves ``/`` and ``/task`` beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from reconciler.metrics import Metrics

if TYPE_CHECKING:
    from reconciler.dashboard import Dashboard


class HealthServer:
    def __init__(
        self,
        *,
        metrics: Metrics,
        readiness: Callable[[], str | None],
        liveness: Callable[[], str | None] = lambda: None,
        degraded: Callable[[], Sequence[str]] = lambda: (),
        standby: Callable[[], str | None] = lambda: None,
        dashboard: Dashboard | None = None,
    ) -> None:
        """``readiness`` and ``liveness`` return ``None`` when fine, else why not;
        ``degraded`` says what a ready daemon is holding back (empty: nothing);
        ``standby`` who leads while another replica does (``None``: this one)."""
        self._metrics = metrics
        self._readiness = readiness
        self._liveness = liveness
        self._degraded = degraded
        self._standby = standby
        self._dashboard = dashboard
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        if self._dashboard is not None:
            self._dashboard.add_routes(app)
        return app

    async def start(self, *, host: str, port: int) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        reason = self._liveness()
        if reason is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"unhealthy: {reason}\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        reason = self._readiness()
        if reason is not None:
            return web.Response(status=503, text=f"not ready: {reason}\n")
        if (standby := self._standby()) is not None:
            # Ready to take over: a warm standby. Nothing routes traffic to a replica,
            # and an unready one would stall a RollingUpdate and every node drain.
            return web.Response(text=f"{standby}\n")
        degraded = self._degraded()
        if degraded:
            return web.Response(text=f"ready, degraded: {'; '.join(degraded)}\n")
        return web.Response(text="ready\n")

    async def _metrics_page(self, _: web.Request) -> web.Response:
        body = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
