"""Webhook notifications: what needs a person, posted as Slack-compatible JSON.

``reconciler run --notify URL`` (repeatable) posts a message when a task is
refused as bad input (``task.failed`` with ``terminal: true``), when a restart
or drift was healed (``task.restarted`` or ``task.drifted`` with the heal
policy, then ``task.synced`` for the same task), when calls are paused by a
credentials error (the first ``daemon.paused`` of an outage: the growing
pauses that follow are one outage) and when they work again (the first
``call.succeeded`` after it: ``daemon.resumed`` only says a pause ran out), and
when the forget guard holds a mass forget and lets it go
(``plan.mass_forget_refused``, ``plan.mass_forget_cleared``), and when change
control stops changes: a mass change held and let go
(``plan.mass_change_held``, ``plan.mass_change_cleared``), a canary failed
(``rollout.canary_failed``).

The pipeline, each stage unable to slow the one before it:

1. **Events in.** :meth:`Notifier.on_event` is an event subscriber
   (:func:`reconciler.eventlog.setup.subscribe`): it runs on the thread that logged,
   turns the few events that matter into :class:`Notice` values
   (:class:`NoticeFilter`, pure) and appends each to every URL's bounded
   queue. That is a dict lookup and a deque append; when a queue is full the
   notice is dropped and counted (``reconciler_notifications_total{result="dropped"}``),
   and the sender logs ``notify.dropped`` later, never the subscriber itself.
2. **Coalescing.** One sender task per URL waits for a notice, gathers for
   ``gather_s`` more, and never posts more often than ``min_interval_s``: a
   burst of 37 failures becomes one message, "37 tasks failed ...: a, b, c
   and 34 more" (:func:`render`, pure).
3. **Delivery.** One POST per message with a per-request timeout; a 5xx,
   a 429 or a connection error is retried with capped exponential backoff,
   honouring ``Retry-After`` (:func:`retry_delay`, pure); any other answer,
   or the last attempt failing, gives the message up (``notify.failed``).
   Redirects are never followed: a 3xx is the webhook's answer, logged as
   such (``notify.failed`` with its status and the host it pointed to), so
   a message never goes to a host nobody configured.
   The sender runs on the daemon's event loop, but only ever awaits: a
   webhook that hangs or refuses costs the reconciler nothing but a socket.
4. **Shutdown.** :meth:`Notifier.close` stops taking events, sends what is
   queued at once (no gather, no rate limit) and gives the senders
   ``drain_s`` in all; whatever is still unsent then is counted as dropped.

A webhook URL usually *is* the credential (Slack's carries its token in the
path), so it is never written whole: events and errors name it by
:func:`redact_url` (scheme and host only), and its path and query are
registered as secrets so that they are redacted from any event they might
reach by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final, Literal
from urllib.parse import urljoin, urlsplit

import aiohttp
from prometheus_client import Counter

# The proxy the environment names for a URL, looked up once per URL (as the client
# does for reads): aiohttp's trust_env would look it up, and netrc, on every request.
from reconciler.api.client import _env_proxy
from reconciler.eventlog import setup as events

Kind = Literal[
    "failed",
    "healed",
    "paused",
    "resumed",
    "mass_forget",
    "mass_forget_cleared",
    "mass_change",
    "mass_change_cleared",
    "canary_failed",
]

#: Names listed per kind in one message; the rest are counted ("and 34 more").
SHOWN: Final = 3
#: Characters of an error message quoted in a notice.
DETAIL_CHARS: Final = 300
#: Tasks awaiting a heal that are remembered (a restart seen, its sync not yet).
PENDING_HEALS: Final = 10_000


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    #: Quiet time after the first notice of a burst before the message goes.
    gather_s: float = 1.0
    #: At most one message per URL this often; notices in between are coalesced.
    min_interval_s: float = 5.0
    #: Per POST, connecting included.
    timeout_s: float = 5.0
    attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    #: Notices waiting per URL; more are dropped and counted.
    queue_size: int = 1000
    #: How long :meth:`Notifier.close` lets the senders finish, in all.
    drain_s: float = 3.0


# --- URLs ------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``scheme://host[:port]``, with ``/…`` when a path or query is left out.

    What an event may say about a webhook: enough to tell two apart, nothing
    that authenticates (no user info, no path, no query).
    """
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):  # a port out of range: leave it out
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    hidden = (parts.path not in ("", "/")) or parts.query or parts.fragment
    return f"{parts.scheme}://{host}{'/…' if hidden else ''}"


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a webhook (``None``: it can); says nothing secret."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "the URL must start with https:// or http://"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _redirect_target(url: str, location: str | None) -> str:
    """Where a redirect pointed, as :func:`redact_url` shows a URL (a relative
    ``Location`` is resolved against ``url``): the host, never its path."""
    if not location:
        return "?"
    return redact_url(urljoin(url, location))


def _secret_parts(url: str) -> list[str]:
    """The parts of ``url`` that may authenticate, long enough to redact safely."""
    parts = urlsplit(url)
    out = [url]
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    if len(tail) >= 8:  # "/" or "/hook" would redact harmless text everywhere
        out.append(tail)
    if parts.password:
        out.append(parts.password)
    return out


# --- events to notices -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing worth a message: ``subject`` is the task (``app/room/task``), if any."""

    kind: Kind
    subject: str | None = None
    #: A short reason: the error, the fields that healed, the refusal.
    detail: str = ""
    #: For ``healed``: what was healed, ``"restart"`` or ``"drift"``.
    cause: str = ""


def _task(event: Mapping[str, Any]) -> str:
    return f"{event.get('app_id')}/{event.get('room_id')}/{event.get('task_id')}"


def _cut(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _changes(changes: object) -> str:
    if not isinstance(changes, Mapping):
        return ""
    out = []
    for name, change in changes.items():
        if isinstance(change, Mapping):
            out.append(f"{name} {change.get('old')!r} → {change.get('new')!r}")
    return ", ".join(out)


class NoticeFilter:
    """Turns events into notices; remembers which tasks wait for a heal.

    A heal is a ``task.synced`` of a task whose restart or (healed) drift was
    logged before it: the daemon queues exactly that task for exactly that
    reason, so the next sync of it is the heal.
    """

    def __init__(self) -> None:
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._paused = False

    def feed(self, event: Mapping[str, Any]) -> Notice | None:
        name = event.get("event")
        if name == "task.failed":
            if event.get("terminal") is not True:
                return None  # retried later by itself
            code, message = event.get("code") or "", event.get("message") or ""
            detail = f"{code}: {message}" if code and message else str(code or message)
            return Notice("failed", _task(event), _cut(detail))
        if name in ("task.restarted", "task.drifted"):
            if name == "task.drifted" and event.get("policy") != "heal":
                return None  # reported, left as it is: OutOfSync, not a heal to come
            key = _task(event)
            self._pending[key] = "restart" if name == "task.restarted" else "drift"
            self._pending.move_to_end(key)
            while len(self._pending) > PENDING_HEALS:
                self._pending.popitem(last=False)
            return None
        if name == "task.synced":
            cause = self._pending.pop(_task(event), None)
            if cause is None:
                return None
            return Notice("healed", _task(event), _cut(_changes(event.get("changes"))), cause)
        if name == "call.succeeded" and self._paused:
            self._paused = False
            return Notice("resumed")
        if name == "daemon.paused":
            if self._paused:
                return None  # the same outage, paused again for longer
            self._paused = True
            retry = event.get("retry_in_s")
            detail = str(event.get("error") or event.get("code") or "")
            if isinstance(retry, int | float):
                detail += f" (next try in {retry:g} s)"
            return Notice("paused", None, _cut(detail))
        if name == "plan.mass_forget_refused":
            return Notice(
                "mass_forget",
                None,
                f"refusing to forget {event.get('forget')} of {event.get('known')} known tasks "
                f"(--max-forget {event.get('max_forget')} allows {event.get('allowed')} at once)",
            )
        if name == "plan.mass_forget_cleared":
            return Notice("mass_forget_cleared", None, f"{event.get('forget')} forgotten")
        if name == "plan.mass_change_held":
            return Notice(
                "mass_change",
                None,
                f"refusing to change {event.get('changes')} of {event.get('known')} applied "
                f"tasks (--max-change {event.get('max_change')} allows {event.get('allowed')} "
                "at once)",
            )
        if name == "plan.mass_change_cleared":
            return Notice("mass_change_cleared", None, f"{event.get('changes')} pending")
        if name == "rollout.canary_failed":
            canaries = event.get("canaries")
            names = ", ".join(map(str, canaries)) if isinstance(canaries, list) else None
            held = event.get("held")
            return Notice(
                "canary_failed",
                names or None,
                _cut(f"{event.get('reason') or 'no reason given'}; {held} change(s) held"),
            )
        return None


# --- notices to a message ----------------------------------------------------------------


def _escape(text: str) -> str:
    """Slack's three control characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _names(notices: Sequence[Notice], *, shown: int) -> str:
    def one(n: Notice) -> str:
        return f"`{_escape(n.subject or '')}`"

    names = [one(n) for n in notices[:shown]]
    more = len(notices) - shown
    if more > 0:
        return ", ".join(names) + f" and {more} more"
    if len(names) > 1:
        return ", ".join(names[:-1]) + " and " + names[-1]
    return names[0] if names else ""


def _line(kind: Kind, group: Sequence[Notice], *, shown: int) -> str:
    n, first, last = len(group), group[0], group[-1]
    if kind == "failed":
        if n == 1:
            return (
                f"Task {_names(group, shown=shown)} failed: {_escape(first.detail)}. "
                "It was refused as bad input and waits for a new spec: fix its desired file."
            )
        codes = sorted({g.detail.split(":", 1)[0] for g in group if g.detail})
        why = f" ({_escape(', '.join(codes[:shown]))})" if codes else ""
        return (
            f"{n} tasks failed{why}: {_names(group, shown=shown)}. Each was refused as bad "
            "input and waits for a new spec: `reconciler status --status Failed` lists them."
        )
    if kind == "healed":
        if n == 1:
            what = f": {_escape(first.detail)}" if first.detail else ""
            return f"Task {_names(group, shown=shown)} healed after a {first.cause}{what}."
        restarts = sum(1 for g in group if g.cause == "restart")
        causes = []
        if restarts:
            causes.append(f"{restarts} restart{'s' if restarts > 1 else ''}")
        if n - restarts:
            causes.append(f"{n - restarts} drift{'s' if n - restarts > 1 else ''}")
        return f"{n} tasks healed ({', '.join(causes)}): {_names(group, shown=shown)}."
    if kind == "paused":
        times = f" ({n} times)" if n > 1 else ""
        return (
            f"Calls paused{times} by a credentials or permission error: "
            f"{_escape(last.detail)}. Nothing is reconciled until the credentials work: "
            "check VOLC_ACCESSKEY/VOLC_SECRETKEY and the key's permissions (the daemon "
            "retries by itself and says when calls work again)."
        )
    if kind == "resumed":
        return "Calls resumed: the API accepts the credentials again."
    if kind == "mass_forget":
        return (
            f"Mass forget held: {_escape(last.detail)}; their records are kept and calls go "
            "on. Check the tree (an emptied folder, a wrong git revision); if it is meant, "
            "restart with --allow-mass-forget or a larger --max-forget."
        )
    if kind == "mass_change":
        return (
            f"Mass change held: {_escape(last.detail)}; the changes wait, heals and first "
            "syncs go on. Check the tree (a wrong git revision, a default changed for every "
            "task); if it is meant, restart with --allow-mass-change or a larger --max-change."
        )
    if kind == "mass_change_cleared":
        return (
            "Mass change cleared: the pending changes are within --max-change again "
            f"({_escape(last.detail)}); they go."
        )
    if kind == "canary_failed":
        canary = f" {_names([last], shown=1)}" if last.subject else ""
        return (
            f"Canary{canary} failed: {_escape(last.detail)}, not sent. Fix or revert the "
            "change in the tree: a new desired spec for the rollout's tasks lets them go."
        )
    return f"Mass forget cleared: the tree is within --max-forget again ({_escape(last.detail)})."


def render(notices: Sequence[Notice], *, source: str = "", shown: int = SHOWN) -> dict[str, str]:
    """The message for a batch of notices: ``{"text": ...}``, as Slack incoming webhooks
    (and Mattermost, Rocket.Chat, ...) take it.

    One line per kind, in the order each kind first appears; a kind's notices
    are counted and the first ``shown`` named. ``source`` (the host) heads it.
    """
    groups: dict[Kind, list[Notice]] = {}
    for n in notices:
        groups.setdefault(n.kind, []).append(n)
    head = f"*reconciler* on `{_escape(source)}`" if source else "*reconciler*"
    lines = [head] + [f"• {_line(k, g, shown=shown)}" for k, g in groups.items()]
    return {"text": "\n".join(lines)}


# --- retries -----------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if seconds >= 0 else None


def retry_delay(
    attempt: int, *, retry_after: float | None = None, base: float = 1.0, cap: float = 30.0
) -> float:
    """The wait before attempt ``attempt + 1``: ``base * 2^(attempt-1)``, or what
    ``Retry-After`` asks if longer; never more than ``cap``."""
    delay: float = base * 2.0 ** max(0, attempt - 1)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(cap, delay)


def retryable(status: int | None) -> bool:
    """Worth another attempt: no answer (``None``), a 5xx or 429."""
    return status is None or status == 429 or status >= 500


# --- the sender --------------------------------------------------------------------------


@dataclass(eq=False)
class _Channel:
    url: str
    shown_as: str
    proxy: str | None
    queue: deque[Notice] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0  # since last reported by notify.dropped
    sending: int = 0  # notices in the message being delivered now
    last_sent: float = float("-inf")


class Notifier:
    """Posts notices to every URL; see the module docstring for the stages."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        config: NotifyConfig = NotifyConfig(),
        counter: Counter | None = None,
        source: str | None = None,
    ) -> None:
        self.config = config
        self._counter = counter
        self.source = socket.gethostname() if source is None else source
        self._filter = NoticeFilter()
        self._lock = threading.Lock()  # the filter, when events come from several threads
        self._channels = [_Channel(u, redact_url(u), _env_proxy(u)) for u in urls]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._senders: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._closing = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self.log = events.get_logger()
        for url in urls:
            for secret in _secret_parts(url):
                events.register_secret(secret)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to events and start one sender per URL, on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s), trust_env=False
        )
        self._senders = [
            asyncio.create_task(self._send_loop(ch), name=f"notify {ch.shown_as}")
            for ch in self._channels
        ]
        self._unsubscribe = events.subscribe(self.on_event)
        self.log.info("notify.started", urls=[ch.shown_as for ch in self._channels])

    async def close(self) -> None:
        """Stop taking events, send what is queued within ``drain_s``, drop the rest."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._closing.set()
        for ch in self._channels:
            ch.wake.set()
        if self._senders:
            _, late = await asyncio.wait(self._senders, timeout=self.config.drain_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._senders, return_exceptions=True)
        for ch in self._channels:
            # Queued, or in a message cut short: the queue-full drops were counted already.
            lost = len(ch.queue) + ch.sending
            if lost:
                self._count("dropped", lost)
                self.log.warning("notify.dropped", url=ch.shown_as, notices=lost, reason="shutdown")
            ch.queue.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- events in (any thread; must not block) ----------------------------------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        with self._lock:
            notice = self._filter.feed(event)
        if notice is None or self._loop is None:
            return
        if threading.get_ident() == self._thread:
            self._enqueue(notice)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to send
                self._loop.call_soon_threadsafe(self._enqueue, notice)

    def _enqueue(self, notice: Notice) -> None:
        if self._closing.is_set():
            return
        for ch in self._channels:
            if len(ch.queue) >= self.config.queue_size:
                ch.dropped += 1
                self._count("dropped")
            else:
                ch.queue.append(notice)
            ch.wake.set()

    # --- sending -----------------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless shutdown comes first."""
        if seconds > 0 and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    async def _send_loop(self, ch: _Channel) -> None:
        cfg = self.config
        while True:
            await ch.wake.wait()
            # Coalesce: gather a burst, and keep to one message per min_interval_s.
            loop = asyncio.get_running_loop()
            await self._pause(max(cfg.gather_s, ch.last_sent + cfg.min_interval_s - loop.time()))
            ch.wake.clear()
            if ch.dropped:
                self.log.warning(
                    "notify.dropped", url=ch.shown_as, notices=ch.dropped, reason="queue_full"
                )
                ch.dropped = 0
            batch = list(ch.queue)
            ch.queue.clear()
            if batch:
                ch.sending = len(batch)  # left as it is if cancelled: close counts it dropped
                await self._deliver(ch, batch)
                ch.sending = 0
                ch.last_sent = loop.time()
            if self._closing.is_set() and not ch.queue:
                return

    async def _deliver(self, ch: _Channel, batch: list[Notice]) -> None:
        assert self._session is not None
        cfg = self.config
        payload = render(batch, source=self.source)
        status: int | None = None
        for attempt in range(1, cfg.attempts + 1):
            status, error, retry_after, moved = None, "", None, None
            started = time.monotonic()
            try:
                # Never redirected: a 307 would post the message (and whatever the
                # URL carries) to a host nobody configured; a 3xx is this URL's answer.
                async with self._session.post(
                    ch.url, json=payload, proxy=ch.proxy, allow_redirects=False
                ) as resp:
                    status = resp.status
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    if 300 <= status < 400:
                        error = "redirect not followed"
                        moved = _redirect_target(ch.url, resp.headers.get("Location"))
                    await resp.content.read(4096)  # a bounded look at the body, then close
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # The exception's type only: its text may quote the URL.
                error = "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            took_ms = round((time.monotonic() - started) * 1000, 1)
            if status is not None and 200 <= status < 300:
                self._count("sent", len(batch))
                self.log.info(
                    "notify.sent",
                    url=ch.shown_as,
                    notices=len(batch),
                    status=status,
                    attempt=attempt,
                    latency_ms=took_ms,
                )
                return
            last = attempt == cfg.attempts or not retryable(status) or self._closing.is_set()
            if last:
                break
            delay = retry_delay(
                attempt, retry_after=retry_after, base=cfg.backoff_base_s, cap=cfg.backoff_cap_s
            )
            self.log.warning(
                "notify.retried",
                url=ch.shown_as,
                status=status,
                error=error or None,
                attempt=attempt,
                delay_s=delay,
            )
            await self._pause(delay)
        self._count("failed", len(batch))
        self.log.warning(
            "notify.failed",
            url=ch.shown_as,
            notices=len(batch),
            status=status,
            error=error or None,
            attempt=attempt,
            **({"location": moved} if moved else {}),
        )

    def _count(self, result: str, n: int = 1) -> None:
        if self._counter is not None and n:
            self._counter.labels(result).inc(n)
