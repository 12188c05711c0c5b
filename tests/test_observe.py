"""Closing the loop: the daemon reads live tasks and heals restarts and drift.

The read schedule is tested as a value; everything else runs the daemon as a
subprocess against the emulator on loopback, with restarts, drift and ended
tasks injected through the emulator's admin handle, as the service or another
client would cause them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.core.plan import SETTLE_S
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.engine.observe import ObserveSchedule, sweep_seconds
from tests.conftest import run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
KEYS = [TaskKey(APP, f"hall-{i}", "seg") for i in range(3)]
FAST = ("--health-port", "0", "--state", "state.db", "--observe-interval", "1")


# --- the schedule ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take_due(schedule: ObserveSchedule) -> list[TaskKey]:
    """Every key due now, in the order the schedule hands them out."""
    stop = asyncio.Event()

    async def drain() -> list[TaskKey]:
        out = []
        while (due := schedule.oldest_due()) is not None and due <= schedule._clock():
            key = await schedule.take(stop)
            assert key is not None
            out.append(key)
        return out

    return asyncio.run(drain())


def test_the_schedule_reads_oldest_first_and_never_twice_within_the_interval() -> None:
    clock = FakeClock()
    schedule = ObserveSchedule(interval=10.0, clock=clock)
    a, b, c = KEYS
    schedule.track([b], first_due=clock.now - 5)  # read 15 s ago: overdue by 5 s
    schedule.track([a, c])  # never read: due now
    assert take_due(schedule) == [b, a, c], "the oldest observation first"
    for key in (a, b, c):
        schedule.done(key)
    clock.now += 9.9
    assert take_due(schedule) == [], "not again within the interval"
    clock.now += 0.2
    assert set(take_due(schedule)) == {a, b, c}


def test_a_task_just_updated_is_read_soon_after() -> None:
    clock = FakeClock()
    schedule = ObserveSchedule(interval=10.0, clock=clock)
    a, b, _ = KEYS
    schedule.track([a, b])
    assert take_due(schedule) == [a, b]
    schedule.done(a)
    schedule.soon(b, 0.0)  # b is being read: its next read comes early
    schedule.done(b)
    clock.now += 1.0
    assert take_due(schedule) == [b]
    schedule.done(b)
    schedule.soon(a, 5.5)  # read-after-write, after the settle window
    clock.now += 5.6
    assert take_due(schedule) == [a]
    schedule.done(a)
    schedule.untrack([b])
    clock.now += 60
    assert take_due(schedule) == [a], "an untracked key is never read again"


def test_a_full_sweep_takes_the_interval_or_what_the_budget_allows() -> None:
    assert sweep_seconds(100, interval=10, read_qps=20) == 10
    assert sweep_seconds(1000, interval=10, read_qps=20) == 50
    assert sweep_seconds(1000, interval=10, read_qps=60) == pytest.approx(16.7, abs=0.1)


# --- the daemon against the emulator ---------------------------------------------------

WANTED: dict[str, object] = {"Identifier": "edu-hall", "Handle": True, "Duration": 20}


def tree(root: Path, *, duration: int = 20) -> None:
    rows = [
        {"RoomId": k.room_id, "TaskId": k.task_id, **WANTED, "Identifier": f"edu-{k.room_id}"}
        for k in KEYS
    ]
    rows[0]["Duration"] = duration
    write(root, "halls.yaml", tasks_yaml(APP, rows))


@pytest.fixture
def running(emulator: EmulatorHandle, tmp_path: Path) -> Iterator[EmulatorHandle]:
    for k in KEYS:
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    tree(tmp_path / "desired")
    yield emulator


def admin(h: EmulatorHandle, verb: str, key: TaskKey, **fields: object) -> dict[str, Any]:
    """``POST /_emulator/tasks/<verb>``: the emulator's admin API over real HTTP."""
    resp = httpx.post(f"{h.url}/_emulator/tasks/{verb}", json={**key.identity(), **fields})
    resp.raise_for_status()
    return dict(resp.json()["task"])


def synced_once(d: DaemonProcess, h: EmulatorHandle) -> None:
    d.wait_event("reconcile.completed")
    d.wait_event("task.synced", count=len(KEYS))
    assert all(t.update_calls == 1 for t in h.tasks())


def calls(h: EmulatorHandle) -> dict[TaskKey, int]:
    return {t.key: t.update_calls for t in h.tasks()}


def test_a_restarted_task_gets_only_the_fields_it_lacks(
    tmp_path: Path, running: EmulatorHandle
) -> None:
    h = running
    key = KEYS[0]
    with DaemonProcess(tmp_path, "desired", "--endpoint", h.url, *FAST) as d:
        synced_once(d, h)
        d.wait_event("observe.started")
        # A new incarnation with StartSegment's defaults (a random Identifier, Duration 20),
        # through the emulator's admin API, as an application backend would restart it.
        fresh = admin(h, "restart", key)
        assert fresh["Identifier"] != "edu-hall-0" and fresh["Duration"] == 20
        (restarted,) = d.wait_event("task.restarted", timeout=15)
        assert restarted["new_start_time"] == fresh["StartTime"]
        assert restarted["live"]["Identifier"] == fresh["Identifier"]
        wait_for(lambda: calls(h)[key] == 2, timeout=15)
        live = h.live(key)
        assert live is not None and live.identifier == "edu-hall-0"
        body = live.last_bodies[-1]
        assert body["Identifier"] == "edu-hall-0" and "Duration" not in body, (
            "Duration 20 is what the new incarnation has: not sent, no slice cut"
        )
        time.sleep(2.5)  # two observe intervals after the settle window
        assert calls(h) == {key: 2, KEYS[1]: 1, KEYS[2]: 1}, "no call for unchanged tasks"
        assert len(d.events("task.restarted")) == 1


def test_drift_by_another_client_is_healed(tmp_path: Path, running: EmulatorHandle) -> None:
    h = running
    key = KEYS[1]
    with DaemonProcess(tmp_path, "desired", "--endpoint", h.url, *FAST) as d:
        synced_once(d, h)
        admin(h, "set", key, Duration=45)  # as another client would
        (drift,) = d.wait_event("task.drifted", timeout=15)
        assert drift["policy"] == "heal"
        assert drift["fields"] == {"Duration": {"last_applied": 20, "live": 45}}
        wait_for(lambda: (t := h.live(key)) is not None and t.duration == 20, timeout=15)
        assert h.live(key).last_bodies[-1] == {  # type: ignore[union-attr]
            "AppId": APP,
            "RoomId": key.room_id,
            "TaskId": key.task_id,
            "Duration": 20,
        }
        time.sleep(SETTLE_S + 2.0)  # the read-after-write counts by now
        assert calls(h)[key] == 2, "healed once; the read after our call does not re-trigger"


def test_drift_is_only_reported_when_asked(tmp_path: Path, running: EmulatorHandle) -> None:
    h = running
    key = KEYS[2]
    args = ("desired", "--endpoint", h.url, *FAST, "--drift", "report")
    with DaemonProcess(tmp_path, *args) as d:
        synced_once(d, h)
        h.set_task(key, handle=False)
        (drift,) = d.wait_event("task.drifted", timeout=15)
        assert drift["policy"] == "report" and drift["desired"] == {"Handle": True}
        time.sleep(2.5)
        assert calls(h)[key] == 1, "reported, not healed"
        status = run_cli("status", "desired", "--state", "state.db", "-o", "json", cwd=tmp_path)
        rows = {t["room_id"]: t for t in json.loads(status.stdout)["tasks"]}
        assert rows[key.room_id]["status"] == "OutOfSync", status.stdout
        assert "another client" in rows[key.room_id]["last_error"]
        # Put back by hand: the task is Synced again without a call.
        h.set_task(key, handle=True)
        wait_for(
            lambda: (
                json.loads(
                    run_cli(
                        "status", "desired", "--state", "state.db", "-o", "json", cwd=tmp_path
                    ).stdout
                )["tasks"][2]["status"]
                == "Synced"
            ),
            timeout=15,
        )
        assert calls(h)[key] == 1


def test_an_ended_task_costs_no_calls_and_a_new_incarnation_is_applied_at_once(
    tmp_path: Path, running: EmulatorHandle
) -> None:
    h = running
    key = KEYS[0]
    with DaemonProcess(tmp_path, "desired", "--endpoint", h.url, *FAST) as d:
        synced_once(d, h)
        admin(h, "end", key)  # IdleTimeOut, as the service would end it
        (ended,) = d.wait_event(
            "task.not_running", lambda e: e.get("source") == "observation", timeout=15
        )
        assert ended["stop_reason"] == "IdleTimeOut" and ended["end_time"]
        tree(tmp_path / "desired", duration=33)  # a change while it is not running
        d.wait_event("desired.changed")
        time.sleep(2.0)
        assert calls(h)[key] == 1, "no UpdateSegment is spent on a task that is not running"
        h.restart_task(key)
        wait_for(lambda: calls(h)[key] == 2, timeout=15)
        live = h.live(key)
        assert live is not None and live.duration == 33 and live.identifier == "edu-hall-0"


def test_plan_refresh_plans_against_live_and_plain_plan_says_what_it_compared(
    tmp_path: Path, running: EmulatorHandle
) -> None:
    h = running
    applied = run_cli("apply", "desired", "--state", "state.db", "--endpoint", h.url, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    after_apply = time.monotonic()
    args = ("plan", "desired", "--state", "state.db", "--endpoint", h.url, "--refresh")
    soon = run_cli(*args, "--detailed-exitcode", cwd=tmp_path)
    assert soon.returncode == 0, soon.stderr
    # Only a plan that surely read within the settle window can say so: on a
    # loaded machine the second CLI may start too late for that.
    if time.monotonic() - after_apply < SETTLE_S - 1.5:
        assert "3 were read within 5 s of our own call to them" in soon.stdout
    plain = run_cli("plan", "desired", "--state", "state.db", "--detailed-exitcode", cwd=tmp_path)
    assert plain.returncode == 0
    assert "matches the last-applied state" in plain.stdout
    assert "Live tasks match" not in plain.stdout, "never claimed without reading them"
    time.sleep(SETTLE_S)  # reads now show our calls: they count
    fresh = run_cli(*args, "--detailed-exitcode", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "Live tasks match the desired tree (3 read just now)" in fresh.stdout

    h.restart_task(KEYS[0])
    h.set_task(KEYS[1], duration=50)
    again = run_cli(*args, "--detailed-exitcode", cwd=tmp_path)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "restarted" in again.stdout and "drift" in again.stdout
    doc = json.loads(run_cli(*args, "-o", "json", cwd=tmp_path).stdout)
    assert doc["refreshed"] is True and doc["observed"] == 3
    bodies = {c["task"]["RoomId"]: c["body"] for c in doc["calls"]}
    assert bodies[KEYS[0].room_id] == {
        "AppId": APP,
        "RoomId": KEYS[0].room_id,
        "TaskId": "seg",
        "Identifier": "edu-hall-0",
    }
    assert bodies[KEYS[1].room_id]["Duration"] == 20
    assert [d["fields"] for d in doc["drifts"]] == [
        [{"field": "Duration", "last_applied": 20, "live": 50}]
    ]
    assert calls(h) == {k: 1 for k in KEYS}, "plan --refresh only reads"


def test_apply_refresh_heals_and_records_what_it_read(
    tmp_path: Path, running: EmulatorHandle
) -> None:
    h = running
    base = ("apply", "desired", "--state", "state.db", "--endpoint", h.url)
    assert run_cli(*base, cwd=tmp_path).returncode == 0
    time.sleep(SETTLE_S)  # so that reads after the restart count
    h.restart_task(KEYS[2])
    blind = run_cli(*base, cwd=tmp_path)
    assert blind.returncode == 0 and calls(h)[KEYS[2]] == 1, "without --refresh: memory only"
    healed = run_cli(*base, "--refresh", cwd=tmp_path)
    assert healed.returncode == 0, healed.stderr
    assert calls(h) == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 2}
    assert h.live(KEYS[2]).identifier == "edu-hall-2"  # type: ignore[union-attr]
    nothing = run_cli(*base, "--refresh", cwd=tmp_path)
    assert "Live tasks match the desired tree" in nothing.stdout
    assert calls(h)[KEYS[2]] == 2


def test_the_read_budget_holds_and_reads_are_never_throttled(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator()
    keys = [TaskKey(APP, f"room-{i:03d}", "seg") for i in range(60)]
    for k in keys:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id, duration=30)
    rows = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": 30} for k in keys]
    write(tmp_path / "desired", "many.yaml", tasks_yaml(APP, rows))
    args = ("desired", "--endpoint", h.url, *FAST, "--read-qps", "10")
    with DaemonProcess(tmp_path, *args) as d:
        (started,) = d.wait_event("observe.started")
        assert started["level"] == "warning" and started["sweep_s"] == 6.0
        assert "longer than --observe-interval" in started["message"]
        d.wait_event("reconcile.completed")  # first contact: read, and live matches
        h.reset_stats()
        time.sleep(3.0)
        by_action = h.stats_snapshot()["by_action"]
    reads = by_action.get("GetSegmentTask", {})
    assert 20 <= reads.get("ok", 0) <= 31, reads  # 10/s over ~3 s, a window's burst at most
    assert "FlowLimitExceeded.QPSOverLimit" not in reads
    assert "UpdateSegment" not in by_action, "in sync: reads only, no UpdateSegment"
    assert calls(h) == {k: 0 for k in keys}, "live already had the values: no slice cut"
