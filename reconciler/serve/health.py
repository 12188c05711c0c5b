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
(:mod:`reconciler.serve.dashboard`), when given, serves ``/`` and ``/task`` beside them.

Access (:class:`HealthAccess`). ``/healthz`` and ``/readyz`` answer anyone,
as probes need. Every other route (the dashboard, ``/metrics``) checks first:

- the ``Host`` header, against DNS rebinding (a page of another site whose
  name is made to resolve to this machine, reading the dashboard from a
  browser here): the name must be the address the server is bound to,
  ``localhost`` (or a ``*.localhost`` name), an IP address (a rebinding needs
  a name) or one of :attr:`HealthAccess.allowed_hosts` (``*``: any); else 403.
- credentials, when configured: a bearer token (``Authorization: Bearer``,
  as Prometheus' ``authorization.credentials_file`` sends) or a user and
  password (HTTP basic auth, which a browser asks for); else 401.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from aiohttp import BasicAuth, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from reconciler.engine.metrics import Metrics

if TYPE_CHECKING:
    from reconciler.serve.dashboard import Dashboard


#: Routes every probe may use: no Host check, no credentials.
PROBES: Final = frozenset({"/healthz", "/readyz"})
#: The realm a browser names when it asks for the dashboard's password.
REALM: Final = "reconciler"


@dataclass(frozen=True)
class HealthAccess:
    """Who may read the dashboard and ``/metrics`` (see the module docstring).

    ``allowed_hosts``: host names the ``Host`` header may carry besides the bound
    address, ``localhost`` and IP addresses (lowercase; ``*`` any). ``tokens``:
    accepted bearer tokens; ``users``: accepted basic-auth users and their
    passwords. Neither given: no credentials asked. ``repr`` shows no secret.
    """

    allowed_hosts: frozenset[str] = frozenset()
    tokens: tuple[str, ...] = field(default=(), repr=False)
    users: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def protected(self) -> bool:
        return bool(self.tokens or self.users)

    def host_allowed(self, host: str | None, *, bound: str) -> bool:
        """Whether a ``Host`` header may reach the dashboard (``None``: no header,
        which no browser sends)."""
        if host is None:
            return True
        name = _host_name(host)
        if "*" in self.allowed_hosts or name in self.allowed_hosts:
            return True
        if name == bound.lower().strip("[]") or name == "localhost":
            return True
        if name.endswith(".localhost"):  # RFC 6761: loopback, never looked up
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries accepted credentials."""
        if not self.protected:
            return True
        if header is None:
            return False
        scheme, _, rest = header.partition(" ")
        if scheme.lower() == "bearer":
            given = rest.strip().encode()
            return any(hmac.compare_digest(given, t.encode()) for t in self.tokens)
        if scheme.lower() == "basic" and self.users:
            try:
                auth = BasicAuth.decode(header)
            except ValueError:
                return False
            expected = self.users.get(auth.login)
            return expected is not None and hmac.compare_digest(
                auth.password.encode(), expected.encode()
            )
        return False

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` of a 401: basic auth when a browser can use it."""
        return f'Basic realm="{REALM}"' if self.users else f'Bearer realm="{REALM}"'


def read_token_file(path: Path) -> str:
    """The bearer token a file holds (its text, white space around it dropped).
    :class:`ValueError` names the file and what is wrong, never its content."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: holds no token (one word, no white space inside)")
    return token


def read_users_file(path: Path) -> dict[str, str]:
    """Basic-auth users from a file of ``user:password`` lines (``#`` comments and
    blank lines skipped). :class:`ValueError` names the file and the line number,
    never a password."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"{path}:{number}: not a user:password line")
        users[user] = password
    if not users:
        raise ValueError(f"{path}: holds no user:password line")
    return users


def _host_name(host: str) -> str:
    """The name of a ``Host`` header: no port, no brackets, lowercase, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


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
        access: HealthAccess = HealthAccess(),
    ) -> None:
        """``readiness`` and ``liveness`` return ``None`` when fine, else why not;
        ``degraded`` says what a ready daemon is holding back (empty: nothing);
        ``standby`` who leads while another replica does (``None``: this one);
        ``access`` who may read the dashboard and ``/metrics``."""
        self._access = access
        self._bound = "127.0.0.1"
        self._metrics = metrics
        self._readiness = readiness
        self._liveness = liveness
        self._degraded = degraded
        self._standby = standby
        self._dashboard = dashboard
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        if self._dashboard is not None:
            self._dashboard.add_routes(app)
        return app

    async def start(self, *, host: str, port: int) -> str:
        self._bound = host
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

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The Host check and credentials of every route but the probes'."""
        if request.path in PROBES:
            return await handler(request)
        if not self._access.host_allowed(request.headers.get(hdrs.HOST), bound=self._bound):
            return web.Response(
                status=403,
                text="forbidden: this Host is not the address the dashboard is served on; "
                "add the name to --health-allowed-host to use it\n",
            )
        if not self._access.authorized(request.headers.get(hdrs.AUTHORIZATION)):
            return web.Response(
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: self._access.challenge()},
                text="unauthorized: the dashboard and /metrics need the token of "
                "--health-token-file or a user of --health-basic-auth-file\n",
            )
        return await handler(request)

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
