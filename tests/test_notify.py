"""Webhook notifications: the pure parts as values, the sender against a real receiver.

The receiver is an aiohttp server on loopback in a thread of its own, so it
serves the daemon subprocess and in-process notifiers alike. What a path
does is in its first segment: ``/ok`` answers 200, ``/flaky`` answers 500 to
its first request, ``/busy`` 429 with ``Retry-After`` to its first, ``/moved``
307 to ``moved_to``, and ``/hang`` holds every request until the test
releases it.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pytest
from aiohttp import web
from click.testing import CliRunner

from reconciler.cli.app import main
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.engine.metrics import Metrics
from reconciler.eventlog import setup as events
from reconciler.serve.notify import (
    Notice,
    NoticeFilter,
    Notifier,
    NotifyConfig,
    check_url,
    parse_retry_after,
    redact_url,
    render,
    retry_delay,
)
from tests.conftest import tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
STRANGER = "ffff0000aaaa1111"  # an AppId the account does not own: bad input
TOKEN = "T0K3N-sEcReT-abcdef"


# --- the receiver ------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    body: dict[str, Any]
    received: float  # time.time()
    status: int | None = None  # None while held


class Receiver:
    """A webhook receiver on a free loopback port, recording every request."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0
        #: Where ``/moved`` sends its requests (a 307: the POST would be repeated there).
        self.moved_to = ""

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        hit = Hit(request.path, await request.json(), time.time())
        kind = request.path.split("/")[1]
        with self._lock:
            first = not any(h.path == request.path for h in self.hits)
            self.hits.append(hit)
        if kind == "hang":
            await self._release.wait()
        status, headers = 200, {}
        if kind == "flaky" and first:
            status = 500
        if kind == "busy" and first:
            status, headers = 429, {"Retry-After": "1"}
        if kind == "moved":
            status, headers = 307, {"Location": self.moved_to}
        hit.status = status
        return web.Response(status=status, text="ok" if status == 200 else "no", headers=headers)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, kind: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path.split("/")[1] == kind]

    def release(self) -> None:
        """Answer every held request, and every later one at once."""
        self._loop.call_soon_threadsafe(self._release.set)

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


# --- the pure parts ----------------------------------------------------------------------


def failed(i: int, *, app: str = STRANGER, terminal: bool = True) -> dict[str, Any]:
    return {
        "event": "task.failed",
        "app_id": app,
        "room_id": f"room-{i}",
        "task_id": "seg",
        "code": "InvalidParameter.NotExistAppId",
        "message": "the AppId does not exist",
        "terminal": terminal,
    }


def task(name: str, key: TaskKey, **fields: Any) -> dict[str, Any]:
    ids = {"app_id": key.app_id, "room_id": key.room_id, "task_id": key.task_id}
    return {"event": name, **ids, **fields}


def test_a_url_is_shown_by_scheme_and_host_only() -> None:
    assert redact_url("https://hooks.slack.com/services/T0/B0/XXXX") == "https://hooks.slack.com/…"
    assert redact_url("https://u:pw@chat.example.com:8443/h?token=1") == (
        "https://chat.example.com:8443/…"
    )
    assert redact_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert redact_url("http://[::1]:9000/x") == "http://[::1]:9000/…"
    assert check_url("https://hooks.slack.com/x") is None
    assert check_url("ftp://example.com/x") == "the URL must start with https:// or http://"
    assert check_url("https:///path-only") == "the URL has no host"


def test_events_become_notices_and_a_burst_one_message() -> None:
    f = NoticeFilter()
    key = TaskKey(APP, "hall-0", "seg")
    notices = [f.feed(failed(i)) for i in range(37)]
    assert f.feed(failed(99, terminal=False)) is None, "retried by itself: no message"
    assert f.feed(task("task.synced", key)) is None, "a first sync is no heal"
    assert f.feed(task("task.restarted", key)) is None
    healed = f.feed(
        task("task.synced", key, changes={"Identifier": {"old": "x", "new": "edu-hall-0"}})
    )
    assert healed == Notice(
        "healed", f"{APP}/hall-0/seg", "Identifier 'x' → 'edu-hall-0'", "restart"
    )
    assert f.feed(task("task.synced", key)) is None, "healed once"
    assert f.feed(task("task.drifted", key, policy="report")) is None
    assert f.feed(task("task.synced", key)) is None, "a reported drift is not healed"
    paused = f.feed({"event": "daemon.paused", "error": "InvalidAccessKey", "retry_in_s": 30.0})
    # One outage is one notice: pauses that grow, and the timer running out, say nothing.
    assert f.feed({"event": "daemon.resumed"}) is None
    assert f.feed({"event": "daemon.paused", "error": "InvalidAccessKey"}) is None
    resumed = f.feed({"event": "call.succeeded", "action": "GetSegmentTask"})
    assert f.feed({"event": "call.succeeded", "action": "UpdateSegment"}) is None
    refused = f.feed(
        {"event": "plan.mass_forget_refused", "forget": 8, "known": 10, "allowed": 1,
         "max_forget": "10%"}
    )  # fmt: skip
    batch = [n for n in [*notices, healed, paused, resumed, refused] if n]
    lines = render(batch, source="pod-1")["text"].splitlines()
    assert lines == [
        "*reconciler* on `pod-1`",
        f"• 37 tasks failed (InvalidParameter.NotExistAppId): `{STRANGER}/room-0/seg`, "
        f"`{STRANGER}/room-1/seg`, `{STRANGER}/room-2/seg` and 34 more. Each was refused as "
        "bad input and waits for a new spec: `reconciler status --status Failed` lists them.",
        f"• Task `{APP}/hall-0/seg` healed after a restart: Identifier 'x' → 'edu-hall-0'.",
        "• Calls paused by a credentials or permission error: InvalidAccessKey (next try in "
        "30 s). Nothing is reconciled until the credentials work: check "
        "VOLC_ACCESSKEY/VOLC_SECRETKEY and the key's permissions (the daemon retries by itself "
        "and says when calls work again).",
        "• Calls resumed: the API accepts the credentials again.",
        "• Mass forget held: refusing to forget 8 of 10 known tasks (--max-forget 10% allows 1 "
        "at once); their records are kept and calls go on. Check the tree (an emptied folder, "
        "a wrong git revision); if it is meant, restart with --allow-mass-forget or a larger "
        "--max-forget.",
    ]
    one = render([Notice("failed", "a/<r>/t", "Bad & wrong")])["text"]
    assert "Task `a/&lt;r&gt;/t` failed: Bad &amp; wrong." in one, "Slack's control characters"


def test_change_control_stops_are_notices() -> None:
    f = NoticeFilter()
    held = f.feed(
        {"event": "plan.mass_change_held", "root": "desired", "changes": 8, "known": 10,
         "allowed": 5, "max_change": "20%"}
    )  # fmt: skip
    cleared = f.feed({"event": "plan.mass_change_cleared", "changes": 3})
    canary = f.feed(
        {"event": "rollout.canary_failed", "canaries": [f"{APP}/k0/seg"], "held": 3,
         "reason": f"{APP}/k0/seg: the task is not running (ended: <stopped>)"}
    )  # fmt: skip
    assert f.feed({"event": "rollout.promoted", "canaries": [], "changes": 3}) is None
    assert held == Notice(
        "mass_change",
        None,
        "refusing to change 8 of 10 applied tasks (--max-change 20% allows 5 at once)",
    )
    assert canary is not None and canary.subject == f"{APP}/k0/seg"
    lines = render([n for n in (held, cleared, canary) if n])["text"].splitlines()
    assert lines[1:] == [
        "• Mass change held: refusing to change 8 of 10 applied tasks (--max-change 20% allows "
        "5 at once); the changes wait, heals and first syncs go on. Check the tree (a wrong git "
        "revision, a default changed for every task); if it is meant, restart with "
        "--allow-mass-change or a larger --max-change.",
        "• Mass change cleared: the pending changes are within --max-change again (3 pending); "
        "they go.",
        f"• Canary `{APP}/k0/seg` failed: {APP}/k0/seg: the task is not running (ended: "
        "&lt;stopped&gt;); 3 change(s) held, not sent. Fix or revert the change in the tree: a "
        "new desired spec for the rollout's tasks lets them go.",
    ]


def test_retries_back_off_up_to_a_cap_and_honour_retry_after() -> None:
    assert [retry_delay(a, base=1.0, cap=30.0) for a in (1, 2, 3, 5, 9)] == [1, 2, 4, 16, 30]
    assert retry_delay(1, retry_after=7.0) == 7.0
    assert retry_delay(4, retry_after=2.0) == 8.0, "Retry-After is a floor, not a ceiling"
    assert retry_delay(1, retry_after=3600.0, cap=30.0) == 30.0
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412500.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- the sender, in process ----------------------------------------------------------------


def test_drops_are_counted_and_a_hanging_webhook_cannot_hold_the_exit(
    receiver: Receiver,
) -> None:
    """A queue of 20 per URL: 30 failures are one message of 20, 10 dropped, per URL."""
    metrics = Metrics()
    config = NotifyConfig(
        gather_s=0.05, min_interval_s=0.1, backoff_base_s=0.05, queue_size=20, drain_s=0.3
    )
    urls = [receiver.url(f"/busy/{TOKEN}"), receiver.url(f"/hang/{TOKEN}")]

    async def scenario() -> float:
        notifier = Notifier(urls, config=config, counter=metrics.notifications, source="t")
        await notifier.start()
        for i in range(30):
            notifier.on_event(failed(i))
        await asyncio.to_thread(
            wait_for, lambda: len(receiver.to("busy")) >= 2 and receiver.to("hang")
        )
        started = time.monotonic()
        await notifier.close()
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert took < 0.3 + 0.5, f"close took {took:.2f} s, drain_s is 0.3"
    busy = receiver.to("busy")
    assert [h.status for h in busy] == [429, 200]
    assert busy[1].received - busy[0].received >= 0.95, "Retry-After: 1 was honoured"
    assert busy[0].body == busy[1].body and "20 tasks failed" in busy[0].body["text"]
    count = {r: metrics.notifications.labels(r)._value.get() for r in ("sent", "failed", "dropped")}
    assert count == {"sent": 20, "failed": 0, "dropped": 10 + 10 + 20}, "20 held at close"


def test_a_redirect_is_not_followed_and_is_logged_as_the_answer(receiver: Receiver) -> None:
    """A webhook answering 307 to another host: nothing reaches that host, and the
    log says 307 and where it pointed (its host only), not the other host's 200."""
    metrics = Metrics()
    config = NotifyConfig(gather_s=0.05, min_interval_s=0.1, backoff_base_s=0.05, drain_s=1.0)
    seen: list[Mapping[str, Any]] = []
    out = io.StringIO()
    with Receiver() as elsewhere:
        receiver.moved_to = f"http://localhost:{elsewhere.port}/ok/stolen-{TOKEN}"

        async def scenario() -> None:
            notifier = Notifier(
                [receiver.url(f"/moved/{TOKEN}")],
                config=config,
                counter=metrics.notifications,
                source="t",
            )
            await notifier.start()
            notifier.on_event(failed(1))
            await asyncio.to_thread(wait_for, lambda: [e for e in seen if "notify" in e["event"]])
            await notifier.close()

        events.configure(fmt="json", level="info", stream=out)
        unsubscribe = events.subscribe(seen.append)
        try:
            asyncio.run(scenario())
        finally:
            unsubscribe()
            events.configure(fmt="json", level="info")
        assert not elsewhere.hits, "the message went to the host the redirect named"
    assert [h.status for h in receiver.to("moved")] == [307], "tried once, not retried"
    (outcome,) = [e for e in seen if e["event"] in ("notify.sent", "notify.failed")]
    assert outcome["event"] == "notify.failed" and outcome["status"] == 307
    assert outcome["error"] == "redirect not followed"
    assert outcome["location"] == f"http://localhost:{elsewhere.port}/…"
    assert outcome["url"] == f"http://127.0.0.1:{receiver.port}/…"
    assert metrics.notifications.labels("failed")._value.get() == 1
    assert TOKEN not in out.getvalue()


# --- the daemon ----------------------------------------------------------------------------


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_run_refuses_a_notify_url_that_is_no_webhook_without_echoing_it(tmp_path: Path) -> None:
    (tmp_path / "desired").mkdir()
    url = f"ftp://chat.example.com/{TOKEN}"
    res = CliRunner().invoke(main, ["run", str(tmp_path / "desired"), "--notify", url])
    assert res.exit_code == 2, "a usage error (the console script exits 1 for it)"
    assert "ftp://chat.example.com/…: the URL must start with https://" in res.output
    assert TOKEN not in res.output


def test_the_daemon_tells_failures_and_heals_without_waiting_for_webhooks(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle], receiver: Receiver
) -> None:
    h = make_emulator(app_ids=frozenset({APP}))
    halls = [TaskKey(APP, f"hall-{i}", "seg") for i in range(3)]
    for k in halls:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    rows = [{"RoomId": k.room_id, "TaskId": "seg", "Identifier": f"edu-{k.room_id}"} for k in halls]
    write(tmp_path / "desired", "halls.yaml", tasks_yaml(APP, rows))
    strangers = [{"RoomId": f"room-{i}", "TaskId": "seg", "Duration": 30} for i in range(5)]
    write(tmp_path / "desired", "strangers.yaml", tasks_yaml(STRANGER, strangers))
    flaky, hang = receiver.url(f"/flaky/{TOKEN}"), receiver.url(f"/hang/{TOKEN}")
    args = ("--endpoint", h.url, "--health-port", "0", "--state", "state.db")
    env = {"RECONCILER_NOTIFY": f"{flaky} {hang}"}  # the variable takes URLs separated by spaces
    with DaemonProcess(tmp_path, "desired", *args, "--observe-interval", "1", env=env) as d:
        (started,) = d.wait_event("notify.started")
        assert started["urls"] == [redact_url(flaky), redact_url(hang)]
        d.wait_event("reconcile.completed")
        # Restarted as an application backend would: the daemon heals it after its next read.
        httpx.post(f"{h.url}/_emulator/tasks/restart", json=halls[0].identity()).raise_for_status()

        # The five refusals (of their first-contact reads) are one message; its 500 is
        # retried with the same message.
        wait_for(lambda: len(hits := receiver.to("flaky")) >= 2 and hits[1].status)
        first, again = receiver.to("flaky")[:2]
        assert (first.status, again.status) == (500, 200) and first.body == again.body
        assert set(first.body) == {"text"}
        text = first.body["text"]
        assert "5 tasks failed (InvalidParameter.NotExistAppId): " in text
        assert f"`{STRANGER}/room-0/seg`" in text and " and 2 more." in text
        (retried, *_) = d.wait_event("notify.retried", lambda e: e["status"] == 500)
        assert retried["status"] == 500 and retried["url"] == f"http://127.0.0.1:{receiver.port}/…"

        healed = f"Task `{APP}/hall-0/seg` healed after a restart: Identifier "
        wait_for(
            lambda: any(healed in hit.body["text"] for hit in receiver.to("flaky")), timeout=20
        )
        (restarted,) = d.events("task.restarted")
        (synced,) = [
            e for e in d.events("task.synced") if e["room_id"] == "hall-0" and ts(e) > ts(restarted)
        ]
        # All the while the other webhook held its requests unanswered: the heal was not slowed.
        held = receiver.to("hang")
        assert held and all(hit.status is None for hit in held)
        assert held[0].received < ts(restarted)
        assert ts(synced) - ts(restarted) < 1.0, "healed at once after the read that saw it"
        by_action = h.stats_snapshot()["by_action"]
        assert by_action["UpdateSegment"] == {"ok": 4}, "a refused read costs no call"
        assert by_action["GetSegmentTask"]["InvalidParameter.NotExistAppId"] >= 5
        wait_for(lambda: d.metric("reconciler_notifications_total", 'result="sent"') == 6)

        receiver.release()
        assert d.stop(timeout=10) == 0
    log = d.log_path.read_text()
    assert TOKEN not in log, "a webhook's path never reaches the log"
    assert TOKEN not in json.dumps([hit.body for hit in receiver.hits])
