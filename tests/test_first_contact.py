"""First contact: a running fleet met with an empty (or restored) store cuts no slice.

Every call that carries Duration cuts the live slice, so a task the store knows
nothing of is read (GetSegmentTask) before its first call, and gets only the
managed fields live lacks, or no call. The CLI and the daemon run as
subprocesses against the emulator on loopback, with a real SQLite store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.emulator.tasks import LiveTask
from tests.conftest import run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
DAEMON = ("--health-port", "0", "--state", "state.db", "--observe-interval", "1")
#: StartSegment's default Duration, which the tree never asks for here.
DEFAULT_DURATION = 20
#: Past GetSegmentTask's 72 h window.
LONG_AGO_S = 73 * 3600


# Each read's call.succeeded is a debug event.
DEBUG = {"RECONCILER_LOG_LEVEL": "debug"}


def key(room: str) -> TaskKey:
    return TaskKey(APP, room, "seg")


def row(k: TaskKey, **fields: Any) -> dict[str, Any]:
    return {"RoomId": k.room_id, "TaskId": k.task_id, **fields}


def identity(k: TaskKey) -> dict[str, str]:
    return k.identity()


class Fleet:
    """Tasks already running: some with the tree's values, some with one field off.

    ``same``: live holds exactly the tree's values. ``duration``: live's Duration
    differs (its call must carry Duration alone). ``identifier``: live's
    Identifier differs and Duration matches (its call must not carry Duration:
    no slice is cut). ``aged``: started more than 72 h ago, so GetSegmentTask
    cannot see it: its one call carries every managed field, and says why.
    """

    def __init__(self, h: EmulatorHandle, root: Path, *, same: int, off: int) -> None:
        self.h = h
        self.same = [key(f"same-{i:03d}") for i in range(same)]
        self.duration = [key(f"dur-{i:03d}") for i in range(off)]
        self.identifier = [key(f"ident-{i:03d}") for i in range(off)]
        self.aged = key("aged-000")
        for k in [*self.same, *self.identifier, self.aged]:
            live_id = f"old-{k.room_id}" if k in self.identifier else f"id-{k.room_id}"
            start(h, k, identifier=live_id, duration=30)
        for k in self.duration:
            start(h, k, identifier=f"id-{k.room_id}", duration=DEFAULT_DURATION)
        h.age_task(self.aged, started_seconds_ago=LONG_AGO_S)
        rows = [row(k, Identifier=f"id-{k.room_id}", Duration=30) for k in self.keys]
        write(root, "fleet.yaml", tasks_yaml(APP, rows))

    @property
    def keys(self) -> list[TaskKey]:
        return [*self.same, *self.duration, *self.identifier, self.aged]

    def live(self, k: TaskKey) -> LiveTask:
        task = self.h.live(k)
        assert task is not None
        return task

    def converged(self) -> bool:
        return all(self.live(k).identifier == f"id-{k.room_id}" for k in self.identifier) and all(
            self.live(k).duration == 30 for k in self.duration
        )

    def check_calls(self) -> None:
        """Exactly one call per task live differed on, each with only what differed."""
        for k in self.same:
            t = self.live(k)
            assert (t.update_calls, t.timer_restarts) == (0, 0), f"{k}: live already matched"
        for k in self.duration:
            t = self.live(k)
            assert t.update_calls == 1 and t.timer_restarts == 1, k
            assert t.last_bodies[-1] == {**identity(k), "Duration": 30}
        for k in self.identifier:
            t = self.live(k)
            assert t.update_calls == 1 and t.timer_restarts == 0, f"{k}: no slice cut"
            assert t.last_bodies[-1] == {**identity(k), "Identifier": f"id-{k.room_id}"}
        aged = self.live(self.aged)
        assert aged.update_calls == 1, "out of GetSegmentTask's sight: every field, once"
        assert aged.last_bodies[-1] == {
            **identity(self.aged),
            "Identifier": f"id-{self.aged.room_id}",
            "Duration": 30,
        }

    @property
    def calls(self) -> int:
        return len(self.duration) + len(self.identifier) + 1


def start(
    h: EmulatorHandle, k: TaskKey, *, identifier: str, duration: int, handle: bool = True
) -> None:
    """Start ``k`` as an application backend would, with these values."""
    h.start_task(
        app_id=k.app_id,
        room_id=k.room_id,
        task_id=k.task_id,
        identifier=identifier,
        duration=duration,
        handle=handle,
    )


def by_action(h: EmulatorHandle, action: str) -> dict[str, int]:
    return dict(h.stats_snapshot()["by_action"].get(action, {}))


def events(text: str, name: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [e for e in found if e["event"] == name]


# --- apply ---------------------------------------------------------------------------


def test_apply_on_an_empty_store_calls_only_where_live_differs(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=12, off=4)
    args = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url)
    r = run_cli(*args, "--read-qps", "60", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"Reading {len(fleet.keys)} live task(s) (the tasks a call would go to)" in r.stderr
    assert f"Applying {fleet.calls} call(s)" in r.stdout
    fleet.check_calls()
    assert by_action(emulator, "UpdateSegment") == {"ok": fleet.calls}
    assert sum(by_action(emulator, "GetSegmentTask").values()) == len(fleet.keys)

    synced = {(e["room_id"]): e for e in events(r.stderr, "task.synced")}
    aged = synced[fleet.aged.room_id]
    assert (aged["basis"], aged["cause"], aged["unread"]) == ("none", "first", "unreadable")
    assert "GetSegmentTask cannot see this task" in aged["note"]
    moved = synced[fleet.duration[0].room_id]
    assert (moved["basis"], moved["cause"]) == ("live", "first") and "unread" not in moved
    assert moved["changes"] == {"Duration": {"old": DEFAULT_DURATION, "new": 30}}

    # Recorded: the next apply reads nothing, calls nothing.
    emulator.reset_stats()
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "Plan: 0 to update" in again.stdout, again.stderr
    assert emulator.stats_snapshot()["total_requests"] == 0


def test_apply_without_reads_sends_every_field_and_says_so(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=2, off=1)
    args = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url)
    r = run_cli(*args, "--no-refresh", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "live tasks were not read (--no-refresh)" in r.stderr
    assert "GetSegmentTask" not in emulator.stats_snapshot()["by_action"]
    for k in fleet.same:
        assert fleet.live(k).timer_restarts == 1, "asked for: every field, Duration too"
    (first, *_) = events(r.stderr, "task.synced")
    assert first["unread"] == "not_read" and "live was not read" in first["note"]


# --- plan: targeted, full and no refresh ------------------------------------------------


def test_plan_reads_only_what_it_would_call_unless_told(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=3, off=1)
    apply = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url)
    assert run_cli(*apply, cwd=tmp_path).returncode == 0
    drifted = fleet.same[0]
    emulator.set_task(drifted, duration=45)  # another client, unseen by a targeted plan
    changed = fleet.same[1]
    rows = [
        row(k, Identifier=f"id-{k.room_id}", Duration=50 if k == changed else 30)
        for k in fleet.keys
    ]
    write(tmp_path / "desired", "fleet.yaml", tasks_yaml(APP, rows))
    plan = ("plan", "desired", "--state", "state.db", "--endpoint", emulator.url, "-o", "json")

    emulator.reset_stats()
    targeted = json.loads(run_cli(*plan, cwd=tmp_path).stdout)
    assert targeted["refresh"] == {"mode": "targeted", "read": 1, "failed": 0, "reason": None}
    assert by_action(emulator, "GetSegmentTask") == {"ok": 1}, "only the task it would call"
    (call,) = targeted["calls"]
    assert call["body"] == {**identity(changed), "Duration": 50} and call["basis"] == "live"

    emulator.reset_stats()
    full = json.loads(run_cli(*plan, "--refresh", cwd=tmp_path).stdout)
    assert full["refresh"]["mode"] == "full" and full["refresh"]["read"] == len(fleet.keys)
    assert sum(by_action(emulator, "GetSegmentTask").values()) == len(fleet.keys)
    bodies = {c["task"]["RoomId"]: c["body"] for c in full["calls"]}
    assert bodies[drifted.room_id] == {**identity(drifted), "Duration": 30}, "drift found"
    assert full["drifts"][0]["task"] == identity(drifted)

    emulator.reset_stats()
    none = run_cli(*plan, "--no-refresh", cwd=tmp_path)
    assert json.loads(none.stdout)["refresh"]["reason"] == "--no-refresh"
    assert emulator.stats_snapshot()["total_requests"] == 0
    text = run_cli(*plan[:-2], "--no-refresh", cwd=tmp_path).stdout
    assert "Planned against the last-applied state; live tasks were not read" in text

    # Offline, as a CI job without credentials plans a pull request: it says why.
    offline = run_cli(*plan, cwd=tmp_path, env={"VOLC_ACCESSKEY": "", "VOLC_SECRETKEY": ""})
    doc = json.loads(offline.stdout)
    assert offline.returncode == 0 and doc["refresh"]["mode"] == "none"
    assert "no credentials" in doc["refresh"]["reason"]
    assert emulator.stats_snapshot()["total_requests"] == 0


def test_a_saved_plan_keeps_its_reads_and_apply_file_reads_nothing_more(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=2, off=1)
    args = ("--state", "state.db", "--endpoint", emulator.url)
    r = run_cli("plan", "desired", *args, "--save", "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["plan"]["refresh"]["mode"] == "targeted"
    assert len(saved["observations"]) == len(fleet.keys)
    reads = sum(by_action(emulator, "GetSegmentTask").values())
    applied = run_cli("apply", "p.json", *args, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert sum(by_action(emulator, "GetSegmentTask").values()) == reads, "the plan's reads"
    fleet.check_calls()


# --- the daemon ----------------------------------------------------------------------


def test_the_daemon_reads_a_running_fleet_before_its_first_calls(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=12, off=4)
    with DaemonProcess(tmp_path, "desired", "--endpoint", emulator.url, *DAEMON, env=DEBUG) as d:
        (done,) = d.wait_event("reconcile.completed")
        assert done["read_first"] == len(fleet.keys)
        assert done["already_matching"] == len(fleet.same)
        wait_for(fleet.converged)
        fleet.check_calls()
        assert by_action(emulator, "UpdateSegment") == {"ok": fleet.calls}
        (started,) = d.events("reconcile.started")
        assert (started["calls"], started["unread"]) == (0, len(fleet.keys))
        # Each call came after a read of its task.
        read_at: dict[str, str] = {}
        for e in d.events():  # a read that is answered "not found" is a failed call
            if e["event"] in ("call.succeeded", "call.failed") and e["action"] == "GetSegmentTask":
                read_at.setdefault(e["room_id"], e["timestamp"])
        for e in d.events("task.synced"):
            assert read_at[e["room_id"]] < e["timestamp"], e["room_id"]
        (aged,) = [e for e in d.events("task.synced") if e["room_id"] == fleet.aged.room_id]
        assert aged["unread"] == "unreadable" and "every managed field" in aged["note"]

        # A task added to the tree while it already runs: read, and called only if it differs.
        joined, odd = key("joined-0"), key("joined-1")
        start(emulator, joined, identifier="id-joined-0", duration=30)
        start(emulator, odd, identifier="id-joined-1", duration=30, handle=True)
        write(
            tmp_path / "desired",
            "joined.yaml",
            tasks_yaml(
                APP,
                [
                    row(joined, Identifier="id-joined-0", Duration=30),
                    row(odd, Identifier="id-joined-1", Duration=30, Handle=False),
                ],
            ),
        )
        wait_for(lambda: fleet.live(odd).handle is False)
        wait_for(lambda: d.metric("reconciler_tasks", 'status="Synced"') == len(fleet.keys) + 2)
        assert fleet.live(odd).last_bodies[-1] == {**identity(odd), "Handle": False}
        assert fleet.live(odd).timer_restarts == 0
        assert fleet.live(joined).update_calls == 0, "already running with its values"
        assert d.stop() == 0


def test_the_daemon_on_a_restored_store_adopts_a_synced_fleet_without_a_call(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    fleet = Fleet(emulator, tmp_path / "desired", same=6, off=2)
    with DaemonProcess(tmp_path, "desired", "--endpoint", emulator.url, *DAEMON) as d:
        wait_for(fleet.converged)
        d.wait_event("reconcile.completed")
        assert d.stop() == 0
    calls = {k: fleet.live(k).update_calls for k in fleet.keys}
    (tmp_path / "state.db").unlink()  # lost, or restored from before the fleet ran
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"state.db{suffix}").unlink(missing_ok=True)
    with DaemonProcess(tmp_path, "desired", "--endpoint", emulator.url, *DAEMON) as d:
        (done,) = d.wait_event("reconcile.completed")
        # The aged task cannot be read: it is sent its fields once more, and says why.
        assert done["already_matching"] == len(fleet.keys) - 1
        assert d.stop() == 0
    after = {k: fleet.live(k).update_calls for k in fleet.keys}
    assert {k: after[k] - calls[k] for k in fleet.keys if after[k] != calls[k]} == {fleet.aged: 1}


def test_a_restart_during_a_hold_is_healed_from_live_once_the_hold_lifts(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(seed=11)
    k = key("held-0")
    start(h, k, identifier="edu-held-0", duration=30)
    tree = tmp_path / "desired"
    good = tasks_yaml(APP, [row(k, Identifier="edu-held-0", Duration=30)])
    write(tree, "held.yaml", good)
    with DaemonProcess(tmp_path, "desired", "--endpoint", h.url, *DAEMON) as d:
        d.wait_event("reconcile.completed")
        assert (h.live(k) or _missing()).update_calls == 0
        write(tree, "held.yaml", good.replace('"held-0"', "0123"))  # invalid: held
        d.wait_event("desired.invalid_file")
        restarted = h.restart_task(k)  # StartSegment's defaults: a random Identifier
        assert restarted.identifier != "edu-held-0" and restarted.duration == DEFAULT_DURATION
        # Held tasks keep being read: status shows the new incarnation during the hold.
        new_start = restarted.start_time_ms

        def status_live() -> dict[str, Any]:
            r = run_cli("status", "desired", "--state", "state.db", "-o", "json", cwd=tmp_path)
            (task,) = json.loads(r.stdout)["tasks"]
            return dict(task["live"])

        wait_for(lambda: (status_live()["fields"] or {}).get("Duration") == DEFAULT_DURATION)
        assert status_live()["start_time"] is not None
        assert not d.events("task.synced"), "nothing is sent while the file is invalid"

        write(tree, "held.yaml", good.replace("Duration: 30", "Duration: 45"))
        wait_for(lambda: (h.live(k) or _missing()).duration == 45)
        time.sleep(1.5)  # a second call, if any, would come within a read or two
        live = h.live(k) or _missing()
        assert live.update_calls == 1 and live.identifier == "edu-held-0"
        assert live.last_bodies[-1] == {**identity(k), "Identifier": "edu-held-0", "Duration": 45}
        (synced,) = d.events("task.synced")
        assert synced["changes"] == {
            "Identifier": {"old": restarted.identifier, "new": "edu-held-0"},
            "Duration": {"old": DEFAULT_DURATION, "new": 45},
        }, "live old → new, not last-applied old → new"
        assert synced["basis"] == "live" and synced["cause"] == "restart"
        assert not d.events("task.drifted"), "a restart, not another client's change"
        assert new_start is not None
        assert d.stop() == 0


def _missing() -> LiveTask:
    raise AssertionError("the task is gone from the emulator")
