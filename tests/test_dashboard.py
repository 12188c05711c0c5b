"""The dashboard: the daemon as a subprocess against the emulator, its pages read over HTTP
and in a real headless browser (Debian's chromium, driven over the DevTools protocol).

One daemon serves the whole module (read-only pages cannot disturb each other):
a tree of a few hundred tasks where some apps do not exist (Failed), some
tasks were never started (NotRunning), one file is broken and the names of
files carry HTML. The pure parts (filters, paging merge, the events buffer,
stale reads) run on real stores and values with a fixed clock.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import Source, TaskKey
from reconciler.emulator import EmulatorConfig, EmulatorHandle, running_emulator
from reconciler.serve.dashboard import (
    TASK_ROUTINE_EVENTS,
    Filters,
    glob_match,
    merge_page,
    parse_filters,
    stale_tasks,
)
from reconciler.serve.recent_events import RecentEvents, activity_kind
from reconciler.store.base import Store, TaskQuery
from tests.conftest import ACCESS_KEY, SECRET_KEY, run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
#: Not among the emulator's AppIds: every call for it is refused (Failed).
GONE_APP = "0000deadbeef0000"
ROOMS = 240
#: Rooms declared but never started in the emulator: NotRunning.
UNSTARTED = range(230, 240)
SCRIPT = "<script>window.__xss=1</script>"
#: A file whose path is an HTML script element (its "/" makes a folder).
SCRIPT_FILE = f"{SCRIPT}.yaml"
BROKEN_FILE = 'broken/<img src=x onerror="window.__xss=2">.yaml'


def room(i: int) -> str:
    return f"room-{i:03d}"


@dataclass
class Site:
    url: str
    daemon: DaemonProcess
    emulator: EmulatorHandle

    def get(self, route: str, /, **params: Any) -> httpx.Response:
        return httpx.get(self.url + route, params=params, timeout=10)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dashboard")
    tree = tmp / "desired"
    rows = [{"RoomId": room(i), "TaskId": "seg", "Duration": 30 + i % 7} for i in range(ROOMS)]
    write(tree, "edu/lectures.yaml", tasks_yaml(APP, rows))
    write(
        tree,
        "gone/app.yaml",
        tasks_yaml(GONE_APP, [{"RoomId": "r1", "TaskId": "seg", "Duration": 9}]),
    )
    write(tree, SCRIPT_FILE, tasks_yaml(APP, [{"RoomId": "xss-1", "TaskId": "seg"}]))
    write(tree, BROKEN_FILE, f'AppId: "{APP}"\nRoomId: "<b>bold</b>"\nTaskId: "seg"\nDuraton: 5\n')
    config = EmulatorConfig(
        credentials={ACCESS_KEY: SECRET_KEY},
        app_ids=frozenset({APP}),
        qps={"GetSegmentTask": 0},  # reads unlimited: every task is read within a second
        seed=3,
    )
    with running_emulator(config) as emulator:
        for i in range(ROOMS):
            if i not in UNSTARTED:
                emulator.start_task(app_id=APP, room_id=room(i), task_id="seg")
        emulator.start_task(app_id=APP, room_id="xss-1", task_id="seg")
        args = (
            *("desired", "--endpoint", emulator.url, "--state", "state.db"),
            *("--resync", "3600", "--read-qps", "60"),
        )
        with DaemonProcess(tmp, *args, "--health-port", "0") as daemon:
            daemon.wait_ready()
            url = daemon.health_url
            site = Site(url, daemon, emulator)
            # The first pass is done; wait for its results to be readable too.
            wait_for(lambda: "NotExistAppId" in site.get("/").text)

            # The tasks whose live values the tests look at have been read (60 reads/s).
            # First contact read them before their call; wait for the read after it.
            def read(i: int) -> bool:
                page = site.get("/task", app=APP, room=room(i), task="seg").text
                d = 30 + i % 7
                return 'class="pill ok">running' in page and f"Duration {d} {d} {d}" in text_of(
                    page
                )

            for i in (3, 5):
                wait_for(lambda: read(i))  # noqa: B023 (called at once, in this iteration)
            yield site


def text_of(page: str) -> str:
    """The page's text, tags dropped and entities decoded, spaces folded."""
    body = page.split("</head>", 1)[-1]
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def test_overview_counts_attention_and_the_task_list(site: Site) -> None:
    r = site.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    body = r.text
    assert '<meta http-equiv="refresh" content="10">' in body
    assert "<script" not in body.lower().replace("&lt;script", "")
    text = text_of(body)
    # Synced: every started task but one at a time, exact counts by status.
    synced = ROOMS - len(UNSTARTED) + 1
    assert f"{synced} Synced" in text and "1 Failed" in text
    assert f"{len(UNSTARTED)} NotRunning" in text and "0 New" in text
    assert f"Sync status ({ROOMS + 2} tasks)" in text
    # Needs attention: the refused app with the server's reason, the not running
    # tasks, and the broken file with its problems, each with a since-time.
    attention = text.split("Needs attention", 1)[1].split("Tasks", 1)[0]
    assert f"Failed {GONE_APP}/r1/seg" in attention and "NotExistAppId" in attention
    assert f"NotRunning {APP}/{room(239)}/seg" in attention
    assert f"Invalid file {BROKEN_FILE}" in attention
    assert "unknown field 'Duraton'" in attention and "ago" in attention
    # Recent activity: the failures and holds of the first pass, each linked to its page.
    activity = text.split("Recent activity", 1)[1].split("Tasks", 1)[0]
    assert f"failure task.failed {GONE_APP}/r1/seg" in activity and "NotExistAppId" in activity
    assert f"failure task.not_running {APP}/{room(239)}/seg" in activity
    assert f"hold desired.invalid_file {BROKEN_FILE}" in activity
    assert f"{BROKEN_FILE}:2:9: RoomId: " in activity.split("hold desired.invalid_file", 1)[1]
    panel = body.split('<table class="activity">', 1)[1].split("</table>", 1)[0]
    assert f'href="/task?app={GONE_APP}&amp;room=r1&amp;task=seg"' in panel
    # The first page of the list: 50 rows in key order, and a pager.
    assert f"1–50 of {ROOMS + 2}" in text
    assert 'rel="next"' in body and 'rel="prev"' not in body
    in_table = body.split('<table class="tasks">', 1)[1]
    keys = re.findall(r'href="/task\?app=([^&]+)&amp;room=([^&]+)&amp;task=seg"', in_table)
    assert len(keys) == 50 and keys == sorted(keys)


def test_filters_and_paging(site: Site) -> None:
    r = site.get("/", status="NotRunning", per_page="4", page="2")
    text = text_of(r.text)
    assert f"5–8 of {len(UNSTARTED)} · page 2 of 3" in text
    table = text.split("Last error", 2)[-1]
    assert [f"{APP}/{room(i)}/seg" in table for i in UNSTARTED] == [
        i in (234, 235, 236, 237) for i in UNSTARTED
    ]
    # Links keep the filters: the next page is page 3 of the same list.
    assert 'href="/?status=NotRunning&amp;page=3&amp;per_page=4"' in r.text
    # A page beyond the end shows the last one.
    assert "9–10 of 10 · page 3 of 3" in text_of(
        site.get("/", status="NotRunning", per_page="4", page="99").text
    )
    # Free text (case-insensitive), path glob, AppId, live state.
    assert "1–1 of 1" in text_of(site.get("/", q="ROOM-007").text)
    assert "1–1 of 1" in text_of(site.get("/", q="notexistappid").text)
    assert f"1–50 of {ROOMS}" in text_of(site.get("/", path="edu/*").text)
    assert "1–1 of 1" in text_of(site.get("/", app=GONE_APP).text)
    assert "no task matches" in text_of(site.get("/", path="nowhere/*").text)
    both = text_of(site.get("/", status=["Failed", "NotRunning"], live="unknown").text)
    assert f"1–11 of {len(UNSTARTED) + 1}" in both  # a task never seen running is unknown
    assert site.get("/", status="Bogus").status_code == 400
    assert site.get("/", per_page="0").status_code == 400
    # Paused: no refresh, and every link keeps it paused.
    paused = site.get("/", refresh="0").text
    assert 'http-equiv="refresh"' not in paused
    assert 'href="/task?app=' in paused and "refresh=0" in paused.split('<table class="tasks">')[1]


def test_task_page_values_events_and_404(site: Site) -> None:
    r = site.get("/task", app=APP, room=room(3), task="seg")
    assert r.status_code == 200
    text = text_of(r.text)
    assert "Synced" in text and "running" in text and "edu/lectures.yaml:" in text, text
    assert "Duration 33 33 33" in text  # desired, last applied, live
    assert "task.synced" in text  # its own events, from the daemon's memory
    failed = text_of(site.get("/task", app=GONE_APP, room="r1", task="seg").text)
    assert "Failed" in failed and "NotExistAppId" in failed and "gone/app.yaml:" in failed
    assert "task.failed" in failed or "call.failed" in failed
    assert site.get("/task", app=APP, room="nope", task="seg").status_code == 404
    assert site.get("/task", app=APP).status_code == 400
    # Read-only: no route takes a POST.
    assert httpx.post(site.url + "/", timeout=5).status_code == 405


def test_everything_is_escaped_and_no_secret_shows(site: Site) -> None:
    pages = [
        site.get("/").text,
        site.get("/", q="xss").text,
        site.get("/", path=SCRIPT_FILE).text,
        site.get("/", q=SCRIPT).text,
        site.get("/task", app=APP, room="xss-1", task="seg").text,
        site.get("/task", app=APP, room=SCRIPT, task="seg").text,  # the 404 page
        site.get("/", status=SCRIPT).text,  # the 400 page
    ]
    for page in pages:
        assert "<script" not in page and "<img" not in page and "<b>bold" not in page
        assert SECRET_KEY not in page
    assert html.escape(SCRIPT_FILE, quote=False) in pages[2]
    assert "1–1 of 1" in text_of(pages[2])  # the glob of a name with HTML in it
    assert "&#39;&lt;b&gt;bold&lt;/b&gt;&#39; is not a valid id" in pages[0]
    assert SECRET_KEY not in site.get("/metrics").text


# --------------------------------------------------------------------------- the browser


class DevTools:
    """A page of a headless chromium, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive(timeout=10)).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def until(self, expression: str, *, within: float = 10.0) -> Any:
        deadline = time.monotonic() + within
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within}s: {expression}")
            await asyncio.sleep(0.05)

    async def open(self, url: str) -> str:
        """Navigate, wait for the document, return the rendered DOM (as --dump-dom would)."""
        await self.call("Page.navigate", url=url)
        await self.until(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        )
        return str(await self.eval("document.documentElement.outerHTML"))


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(
            "chromium is not installed and `make test` could not install it here (it needs "
            "root and apt-get): apt-get install --no-install-recommends chromium"
        )
    return path


def test_in_a_real_browser(site: Site, tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=20)
        port = int(port_file.read_text().split()[0])
        asyncio.run(_drive(site.url, port))
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(10)


async def _drive(base: str, port: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = DevTools(ws)
            await tab.call("Page.enable")
            dom = await tab.open(f"{base}/?refresh=0")
            assert "Needs attention" in dom and f"{GONE_APP}/r1/seg" in dom
            # Nothing from a file name or a value became an element, nor ran.
            assert await tab.eval("document.querySelectorAll('script, img').length") == 0
            assert await tab.eval(
                "[...document.querySelectorAll('b')].every(b => b.closest('.count'))"
            )
            assert await tab.eval("window.__xss === undefined") is True
            assert await tab.eval("document.querySelectorAll('table.tasks tbody tr').length") == 50

            task = f"{base}/task?app={APP}&room={room(5)}&task=seg&refresh=0"
            dom = await tab.open(task)
            cells = await tab.eval(
                "[...document.querySelectorAll('table.values tr')]"
                ".map(r => r.innerText.replace(/\\s+/g, ' ').trim())"
            )
            assert "Duration 35 35 35" in cells

            # The filter form, as a person uses it: type into the text box, press Enter.
            await tab.open(f"{base}/?refresh=0")
            await tab.eval("document.querySelector('input[name=q]').focus()")
            await tab.call("Input.insertText", text="room-00")
            for kind in ("keyDown", "keyUp"):
                await tab.call(
                    "Input.dispatchKeyEvent",
                    type=kind,
                    key="Enter",
                    code="Enter",
                    windowsVirtualKeyCode=13,
                    text="\r",
                )
            await tab.until("location.search.includes('q=room-00')")
            await tab.until("document.readyState === 'complete'")
            shown = await tab.eval(
                "[...document.querySelectorAll('table.tasks tbody tr td:first-child')]"
                ".map(td => td.innerText)"
            )
            assert shown == [f"{APP}/{room(i)}/seg" for i in range(10)]
            assert await tab.eval("document.querySelector('input[name=q]').value") == "room-00"


# --------------------------------------------------------------------------- heals stay visible


def _section(page: str, heading: str) -> str:
    """The page's text from ``heading`` up to the next heading."""
    after = page.split(f">{heading}</h2>", 1)[1]
    return text_of(after.split("<h2", 1)[0])


def test_a_heal_stays_visible_in_the_panel_on_its_page_and_in_status(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """A task restarted in the emulator is healed; the overview's recent activity
    lists it with a link to the task, the task page still shows it after more routine
    reads than the page keeps, and ``status`` says when and why, from the store."""
    restarted, drifted = TaskKey(APP, "heal-1", "seg"), TaskKey(APP, "heal-2", "seg")
    rows = [
        {"RoomId": k.room_id, "TaskId": "seg", "Identifier": f"edu-{k.room_id}", "Duration": 60}
        for k in (restarted, drifted)
    ]
    write(tmp_path / "desired", "edu/heals.yaml", tasks_yaml(APP, rows))
    for k in (restarted, drifted):
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    args = ("desired", "--endpoint", emulator.url, "--state", "state.db", "--health-port", "0")
    debug = {"RECONCILER_LOG_LEVEL": "debug"}  # each read's call.succeeded, waited for below
    every = ("--observe-interval", "1", "--resync", "3600")
    with DaemonProcess(tmp_path, *args, *every, env=debug) as d:
        d.wait_ready()
        d.wait_event("task.synced", count=2)
        incarnation = emulator.restart_task(restarted)  # StartSegment's defaults
        emulator.set_task(drifted, duration=45)  # another client
        (heal,) = d.wait_event(
            "task.synced", lambda e: (e["room_id"], e.get("cause")) == ("heal-1", "restart")
        )
        d.wait_event("task.synced", lambda e: (e["room_id"], e.get("cause")) == ("heal-2", "drift"))
        why = f'restart: Identifier "{incarnation.identifier}" → "edu-heal-1", Duration 20 → 60'
        site = Site(d.health_url, d, emulator)

        # The overview: newest first, each with its time and a link to its task.
        def panel() -> str | None:
            page = site.get("/").text
            shown = _section(page, "Recent activity")
            return page if "drift: Duration 45 → 60" in shown and why in shown else None

        page = wait_for(panel)
        shown = _section(page, "Recent activity")
        assert shown.index("heal task.synced") < shown.index("restart task.restarted")
        assert f"heal task.synced {restarted} {why}" in shown
        assert f"drift task.drifted {drifted} changed by another client: Duration 60 → 45" in shown
        assert re.search(r"\d+ s ago (heal|drift|restart) ", shown), "each with its time"
        table = page.split('<table class="activity">', 1)[1].split("</table>", 1)[0]
        assert 'href="/task?app=661e4a7b9c0d1e2f&amp;room=heal-1&amp;task=seg"' in table

        # Routine reads go on; more of them than a task page keeps go by after the heal.
        d.wait_event(
            "call.succeeded",
            lambda e: (
                e.get("action") == "GetSegmentTask"
                and e.get("room_id") == "heal-1"
                and e["timestamp"] > heal["timestamp"]
            ),
            count=TASK_ROUTINE_EVENTS + 2,
            timeout=40,
        )
        task_page = site.get("/task", app=APP, room="heal-1", task="seg").text
        routine = _section(task_page, "Latest reads and other routine events")
        assert routine.count("call.succeeded") == TASK_ROUTINE_EVENTS, routine
        changes = _section(task_page, "Last changes")
        assert "task.synced" in changes and "cause=restart" in changes
        assert "task.restarted" in changes
        assert changes.count("task.synced") == 2, "the first sync (to live values) too"
        assert "call.succeeded" not in changes
        assert re.search(rf"Last healed \d+ s ago: {re.escape(why)}", text_of(task_page))
        pages = page + task_page

        # status, from the store: when and why, in JSON and in the table.
        r = run_cli("status", "desired", "--state", "state.db", "-o", "json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        tasks = {t["room_id"]: t for t in json.loads(r.stdout)["tasks"]}
        assert tasks["heal-1"]["last_heal_reason"] == why
        assert tasks["heal-2"]["last_heal_reason"] == "drift: Duration 45 → 60"
        healed_at = datetime.fromisoformat(tasks["heal-1"]["last_heal_at"])
        assert abs(healed_at - datetime.fromisoformat(heal["timestamp"])) < timedelta(seconds=2)
        text = run_cli("status", "desired", "--state", "state.db", cwd=tmp_path)
        assert text.returncode == 0, text.stderr
        listed = text.stdout.split("Last healed (a call set back a restart or drift)", 1)[1]
        assert f"{restarted}  " in listed and why in " ".join(listed.split())
        assert f"{drifted}  " in listed and "drift: Duration 45 → 60" in listed
        assert d.stop() == 0
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    for out in (pages, r.stdout, text.stdout, stored.decode("latin-1")):
        assert SECRET_KEY not in out


# --------------------------------------------------------------------------- pure parts


def test_recent_events_stay_bounded_and_keep_each_tasks_notable_events() -> None:
    recent = RecentEvents(size=100, activity_size=50, notable_size=50, changes_size=60, per_task=5)
    failed = TaskKey(APP, "r-failed", "seg")
    recent({"event": "task.failed", "level": "error", "timestamp": "t0", **_fields(failed)})
    for i in range(10_000):
        k = TaskKey(APP, f"r{i}", "seg")
        recent({"event": "task.synced", "level": "info", "timestamp": f"t{i}", **_fields(k)})
    assert recent.stats() == {
        "events": 100,
        "activity": 1,
        "notable": 0,
        "changes": 60,
        "tasks": 101,
    }
    # Its routine events are long gone, its failure is still there.
    assert [e["event"] for e in recent.changes_of(failed)] == ["task.failed"]
    assert [e["event"] for e in recent.for_task(failed)] == ["task.failed"]
    busy = TaskKey(APP, "r9999", "seg")
    for i in range(20):
        recent({"event": "task.queued", "level": "info", "n": i, **_fields(busy)})
    assert [e.get("n") for e in recent.routine_of(busy, limit=3)] == [19, 18, 17]
    assert [e["event"] for e in recent.changes_of(busy)] == ["task.synced"]
    recent({"event": "desired.invalid_file", "level": "error", "path": "a.yaml", "timestamp": "T"})
    recent({"event": "desired.invalid_file", "level": "error", "path": "a.yaml", "timestamp": "U"})
    assert recent.invalid_since("a.yaml") == "T"
    recent({"event": "desired.file_fixed", "level": "info", "path": "a.yaml"})
    assert recent.invalid_since("a.yaml") is None


def test_routine_reads_never_push_out_a_tasks_last_changes() -> None:
    """Hours of reads (a GetSegmentTask is a call.succeeded, a failed one observe.failed)
    leave a task's heal, restart and drift where they were, and in the activity panel."""
    recent = RecentEvents(size=100, activity_size=50, notable_size=50, changes_size=50, per_task=5)
    task = TaskKey(APP, "r1", "seg")
    other = TaskKey(APP, "r2", "seg")
    at = {**_fields(task), "timestamp": "2026-12-01T20:00:00Z"}
    recent({"event": "task.synced", "level": "info", "cause": "first", **at})
    recent({"event": "task.restarted", "level": "warning", "new_start_time": 2, **at})
    recent({"event": "task.queued", "level": "info", "reason": "restarted", **at})
    recent(
        {
            "event": "task.synced",
            "level": "info",
            "cause": "restart",
            "changes": {"Duration": {"old": 20, "new": 60}},
            **at,
        }
    )
    recent({"event": "task.drifted", "level": "warning", "policy": "heal", **_fields(other)})
    for i in range(5_000):
        for k in (task, other):
            read = {"action": "GetSegmentTask", "n": i, **_fields(k)}
            recent({"event": "call.succeeded", "level": "info", **read})
            if i % 10 == 0:
                recent({"event": "observe.failed", "level": "warning", "code": "X", **read})
                recent({"event": "call.retried", "level": "warning", **read})
    assert [(e["event"], e.get("cause")) for e in recent.changes_of(task)] == [
        ("task.synced", "restart"),
        ("task.restarted", None),
        ("task.synced", "first"),
    ]
    assert [e["event"] for e in recent.routine_of(task)][:2] == ["call.succeeded", "call.succeeded"]
    assert recent.routine_of(task)[0]["n"] == 4999
    # The panel: heals, restarts, drift, failures and holds only, newest first.
    kinds = [(activity_kind(e), e["room_id"]) for e in recent.activity()]
    assert kinds == [("drift", "r2"), ("heal", "r1"), ("restart", "r1")]
    assert recent.stats()["activity"] == 3 and recent.stats()["notable"] == 0

    # Bounded: the panel holds the last activity_size entries, each task its last per_task.
    for i in range(200):
        k = TaskKey(APP, f"f{i % 3}", "seg")
        recent({"event": "task.failed", "level": "error", "code": f"E{i}", **_fields(k)})
    assert len(recent.activity(limit=1000)) == 50
    assert len(recent.changes_of(TaskKey(APP, "f0", "seg"), limit=1000)) == 5
    # A retry that fails as the last one did is not news for the panel; the task page keeps it.
    again = TaskKey(APP, "again", "seg")
    for _ in range(3):
        recent({"event": "task.not_running", "level": "warning", "code": "Gone", **_fields(again)})
    assert [activity_kind(e) for e in recent.activity(limit=1)] == ["failure"]
    assert sum(e.get("room_id") == "again" for e in recent.activity(limit=1000)) == 1
    assert len(recent.changes_of(again)) == 3


def _fields(key: TaskKey) -> dict[str, str]:
    return {"app_id": key.app_id, "room_id": key.room_id, "task_id": key.task_id}


def test_merge_page_interleaves_new_tasks_by_key(tmp_path: Path) -> None:
    """Every page of (rows ∪ New keys), at any size, is that slice of the sorted union."""
    recorded = [TaskKey(APP, f"r{i:03d}", "seg") for i in range(0, 120, 2)]
    new = [TaskKey(APP, f"r{i:03d}", "seg") for i in range(1, 130, 4)]
    with Store.open(tmp_path / "s.db") as store, store.bulk():
        for k in recorded:
            store.record_in_sync(k, business_id=None, source=Source("a.yaml", 1, 1), fields={})
    union = sorted({*recorded, *new})
    with Store.open(tmp_path / "s.db", read_only=True) as store:
        for limit in (1, 7, 50):
            for offset in range(0, len(union) + 3, limit):
                rows, fresh = merge_page(store, TaskQuery(), new, offset=offset, limit=limit)
                got = sorted([*(r.key for r in rows), *fresh])
                assert got == union[offset : offset + limit], (offset, limit)
        assert merge_page(store, None, new, offset=5, limit=3) == ([], new[5:8])


def test_glob_is_sqlites_glob_for_new_tasks_too() -> None:
    db = sqlite3.connect(":memory:")
    paths = ["edu/a.yaml", "edu/sub/b.yml", "Edu/c.json", "x[1].yaml", SCRIPT_FILE]
    for pattern in ["edu/*", "*.yaml", "edu/?.yaml", "[eE]du/*", "[^e]*", "*<script>*", "EDU/*"]:
        for path in paths:
            (want,) = db.execute("SELECT ? GLOB ?", (path, pattern)).fetchone()
            assert glob_match(path, pattern) == bool(want), (path, pattern)


def test_stale_reads_and_filter_parameters() -> None:
    keys = [TaskKey(APP, f"r{i}", "seg") for i in range(5)]
    obs = {k: Observation(k, 1000.0 - i * 100, LiveStatus.RUNNING) for i, k in enumerate(keys[:4])}
    count, oldest = stale_tasks(keys, obs, now=1000.0, started=900.0, after_s=150, limit=2)
    assert count == 2 and [(s.key.room_id, s.age_s) for s in oldest] == [("r3", 300), ("r2", 200)]
    # The one never read counts from the daemon's start: stale only after the limit.
    count, _ = stale_tasks(keys, obs, now=1000.0, started=800.0, after_s=150, limit=9)
    assert count == 3
    f = parse_filters({"status": ["failed,notrunning"], "live": ["not-found"], "app": ["a, b"]})
    assert f.statuses == {"Failed", "NotRunning"} and f.lives == {LiveStatus.NOT_FOUND}
    assert f.apps == {"a", "b"} and f.refresh
    assert f.href(page=2) == "/?status=Failed&status=NotRunning&live=not_found&app=a%2Cb&page=2"
    assert Filters(refresh=False).href() == "/?refresh=0"
    with pytest.raises(ValueError, match="per_page must be 1 to 500"):
        parse_filters({"per_page": ["501"]})
