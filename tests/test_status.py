"""``reconciler status`` tells the truth: the store read against the tree and the live tasks.

The CLI runs as a subprocess on real trees and real SQLite files, filled by
``apply`` and the daemon against the emulator on loopback or written with the
store's own writers. The pure core (:func:`build_report` and the table) is
also run on a real store's rows and observations with a fixed clock, so ages
can be checked to the second.
"""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from reconciler.cli.views.render import status_table
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import Source, TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.serve.status import build_report, report_statuses
from reconciler.store.base import Store
from tests.conftest import CliResult, run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
NOT_RUNNING = "InvalidParameter.ErrorActiveTaskNotFound"


def key(room: str) -> TaskKey:
    return TaskKey(APP, room, "seg")


def declare(root: Path, rel: str, room: str, *, duration: int = 30) -> TaskKey:
    write(root, rel, tasks_yaml(APP, [{"RoomId": room, "TaskId": "seg", "Duration": duration}]))
    return key(room)


def status(tmp_path: Path, *args: str) -> CliResult:
    return run_cli("status", *args, "--state", "state.db", cwd=tmp_path)


def tasks_of(r: CliResult) -> dict[tuple[str, str, str], dict[str, Any]]:
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    return {(t["app_id"], t["room_id"], t["task_id"]): t for t in doc["tasks"]}


def zero_counts(**counts: int) -> dict[str, int]:
    """Every status ``status`` counts (a status added later included), these set."""
    return {**dict.fromkeys(report_statuses(), 0), **counts}


def counted(**counts: int) -> str:
    """The table's ``N Status`` list, every status in order."""
    return ", ".join(f"{n} {s}" for s, n in zero_counts(**counts).items())


def summary_of(text: str) -> str:
    """The sync summary: the line above the live one, which ends the output."""
    return text.rstrip("\n").splitlines()[-2]


def live_summary_of(text: str) -> str:
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith("Live: "), text
    return last


def line_of(text: str, task: TaskKey) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{task} ")]
    return line


def test_status_shows_new_held_and_removed_tasks(tmp_path: Path, emulator: EmulatorHandle) -> None:
    desired = tmp_path / "desired"
    synced = declare(desired, "a.yaml", "r1")
    stopped = declare(desired, "b.yaml", "r2")  # not running on the server
    removed = declare(desired, "c.yaml", "r3")
    held = declare(desired, "d.yaml", "r5")
    for k in (synced, removed, held):
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    # Not read (the LIVE column stays empty, so each row's notes fit the table).
    args = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url, "--no-refresh")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    (desired / "c.yaml").unlink()
    write(desired, "d.yaml", f'AppId: "{APP}"\nRoomId: 0123\nTaskId: "seg"\n')
    new = declare(desired, "e.yaml", "r4", duration=20)

    r = status(tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "Synced" in line_of(text, synced) and "in tree" in line_of(text, synced)
    assert "New" in line_of(text, new) and "first call: Duration" in line_of(text, new)
    assert "not in tree: to forget" in line_of(text, removed)
    assert "held: d.yaml" in line_of(text, held)
    row = line_of(text, stopped)
    assert "NotRunning" in row and "first call: Duration" in row
    assert "ErrorActiveTaskNotFound: " in row, "the code's last part, then the message"
    assert "desired/d.yaml:2:9: RoomId:" in text and "holds 1 recorded task" in text
    assert summary_of(text) == (
        f"5 tasks: {counted(Synced=3, NotRunning=1, New=1)}; 1 held, 1 not in tree."
    )

    r = status(tmp_path, "-o", "json")
    doc = json.loads(r.stdout)
    assert doc["format_version"] == 5
    assert doc["leader"] is None  # a SQLite store: one replica, no election
    assert doc["tree"]["root"] == str(desired) and doc["tree"]["root_matches"] is True
    (invalid,) = doc["tree"]["invalid_files"]
    assert invalid["path"] == "d.yaml" and invalid["held_tasks"] == 1
    assert invalid["first_problem"]["source"] == "d.yaml:2:9"
    assert doc["counts"] == zero_counts(Synced=3, NotRunning=1, New=1)
    assert doc["tree_counts"] == {"in_tree": 3, "held": 1, "not_in_tree": 1}
    rows = tasks_of(r)
    fresh = rows[new]
    assert (fresh["status"], fresh["tree"], fresh["next_action"]) == ("New", "in_tree", "call")
    assert fresh["next_call"] == [{"field": "Duration", "old": None, "new": 20}]
    assert fresh["fields"] is None and fresh["updated_at"] is None
    assert fresh["source"] == "e.yaml:4:5" and fresh["desired_fields"] == {"Duration": 20}
    assert (rows[removed]["tree"], rows[removed]["next_action"]) == ("not_in_tree", "forget")
    assert rows[removed]["source_path"] == "c.yaml"
    assert (rows[held]["tree"], rows[held]["held_by"]) == ("held", "d.yaml")
    assert rows[synced]["next_action"] == "none" and rows[synced]["status_since"]
    assert rows[stopped]["status"] == "NotRunning" and rows[stopped]["status_since"]
    assert rows[stopped]["next_retry_at"] is None, "apply schedules no retry"


def test_filters_by_status_and_app(tmp_path: Path) -> None:
    desired = tmp_path / "desired"
    declare(desired, "a.yaml", "r1")
    write(
        desired,
        "other.yaml",
        tasks_yaml("otherapp", [{"RoomId": "r9", "TaskId": "seg", "Duration": 30}]),
    )
    src = Source("a.yaml", 3, 5)
    with Store.open(tmp_path / "state.db") as store:
        store.record_success(
            key("r1"), fields={"Duration": 30}, business_id=None, request_id="q", source=src
        )
        store.record_failure(
            key("r2"), message="boom", code="InternalError", request_id=None, source=src,
            failed_spec=None,
        )  # fmt: skip
    every = tasks_of(status(tmp_path, "-o", "json"))
    assert set(every) == {key("r1"), key("r2"), ("otherapp", "r9", "seg")}

    for args in (("--status", "failed,NEW"), ("--status", "Failed", "--status", "new")):
        r = status(tmp_path, *args, "-o", "json")
        assert set(tasks_of(r)) == {key("r2"), ("otherapp", "r9", "seg")}
        doc = json.loads(r.stdout)
        assert doc["filters"]["status"] == ["Failed", "New"] and doc["total"] == 3
        assert doc["counts"]["Failed"] == 1 and doc["counts"]["Synced"] == 0
    assert set(tasks_of(status(tmp_path, "--app", APP, "-o", "json"))) == {key("r1"), key("r2")}
    r = status(tmp_path, "--status", "failed", "--app", "otherapp")
    assert r.returncode == 0 and "No tasks." in r.stdout and "0 tasks shown of 3" in r.stdout

    r = status(tmp_path, "--status", "Broken")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    valid = ", ".join(report_statuses())
    assert valid.startswith("Synced, ") and valid.endswith(", Failed, New")
    assert f"unknown status 'Broken'; valid: {valid}" in r.stderr


def test_the_table_fits_120_columns_with_long_ids(tmp_path: Path) -> None:
    app = "app" + "a" * 60
    rooms = [f"room-{'x' * 110}-{n:04d}" for n in (1, 2)]
    task = "task-" + "t" * 100
    desired = tmp_path / "desired"
    rows = [{"RoomId": r, "TaskId": task, "Duration": 30} for r in rooms]
    write(desired, "long/" + "n" * 90 + ".yaml", tasks_yaml(app, rows))
    with Store.open(tmp_path / "state.db") as store:
        store.record_not_running(
            TaskKey(app, rooms[0], task),
            message="the task is not running: " + "detail " * 40,
            code=NOT_RUNNING,
            request_id="req",
            source=Source("long/x.yaml", 1, 1),
            next_retry_at=datetime.now(UTC) + timedelta(minutes=5),
        )
        store.record_observation(
            Observation(
                TaskKey(app, rooms[0], task),
                time.time() - 150,
                LiveStatus.ENDED,
                start_time_ms=int((time.time() - 7200) * 1000),
                end_time_ms=int((time.time() - 600) * 1000),
                stop_reason="UnknownStopReason",
                status=3,
            )
        )
    r = status(tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 120, "\n".join(ln for ln in lines if len(ln) > 120)
    assert lines[0].split()[1:4] == ["SYNC", "SINCE", "LIVE"] and "READ" in lines[0]
    task_rows = [ln for ln in lines if ln.startswith("appaaa")]
    assert len(task_rows) == 2
    for n, row in zip(("0001", "0002"), task_rows, strict=True):
        shown = row.split()[0]
        assert "…" in shown and f"-{n}/" in shown, "each id keeps its start and its end"
        assert shown.startswith("appaaa") and shown.endswith("ttt")
    assert "in 4m" in task_rows[0] or "in 5m" in task_rows[0]
    # The live state stays whole however narrow: its detail goes first, not the state.
    assert re.search(r"  Ended\S*( \S+)*  +[23]m  ", task_rows[0]), "the state, and the read's age"
    assert " Unknown" in task_rows[1]
    full = tasks_of(status(tmp_path, "-o", "json"))
    assert set(full) == {(app, r, task) for r in rooms}, "full values in JSON"


def test_a_missing_store_or_tree_is_said_plainly(tmp_path: Path) -> None:
    for args in ((), ("-o", "json")):
        r = status(tmp_path, *args)
        assert r.returncode == 1 and r.stdout == ""
        assert "state store state.db does not exist" in r.stderr
    with Store.open(tmp_path / "state.db") as store:
        store.record_in_sync(key("r1"), business_id=None, source=Source("a.yaml", 1, 1), fields={})
        store.record_tree_root(str(tmp_path / "elsewhere"))

    r = status(tmp_path, "nowhere")
    assert r.returncode == 1 and "desired tree nowhere does not exist" in r.stderr
    r = status(tmp_path)  # the default tree, absent: the store alone, said so
    assert r.returncode == 0, r.stderr
    assert "no desired tree at desired: showing the state store alone" in r.stderr
    assert "TREE" not in r.stdout and "Synced" in line_of(r.stdout, key("r1"))
    doc = json.loads(status(tmp_path, "-o", "json").stdout)
    assert doc["tree"]["read"] is False and doc["tasks"][0]["tree"] is None

    declare(tmp_path / "desired", "a.yaml", "r1", duration=30)
    r = status(tmp_path)
    assert r.returncode == 0
    assert f"the state store was applied from {tmp_path / 'elsewhere'}, not" in r.stderr


def test_the_daemon_records_its_next_retry_and_reports_held_tasks(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    desired = tmp_path / "desired"
    running = declare(desired, "a.yaml", "r1")
    stopped = declare(desired, "b.yaml", "r2")
    declare(desired, "c.yaml", "r3")
    for k in (running, key("r3")):
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    d = DaemonProcess(
        tmp_path,
        *("desired", "--endpoint", emulator.url, "--health-port", "0"),
        *("--state", "state.db", "--retry-delay", "30", "--resync", "3600"),
    )
    with d:
        d.wait_ready()
        assert d.health("/readyz").text == "ready\n"
        rows = tasks_of(status(tmp_path, "-o", "json"))
        assert rows[stopped]["status"] == "NotRunning"
        retry = datetime.fromisoformat(rows[stopped]["next_retry_at"])
        ahead = (retry - datetime.now(UTC)).total_seconds()
        assert 15 < ahead <= 30, ahead
        assert rows[running]["next_retry_at"] is None
        assert "in " in line_of(status(tmp_path).stdout, stopped)

        write(desired, "c.yaml", f'AppId: "{APP}"\nRoomId: 0123\nTaskId: "seg"\n')
        d.wait_event("desired.invalid_file")
        ready = d.health("/readyz")
        assert ready.status_code == 200
        assert ready.text == "ready, degraded: 1 invalid file holding 1 task\n"
        assert d.metric("reconciler_held_tasks") == 1
        assert d.stop(signal.SIGTERM) == 0


# --- the live axis ----------------------------------------------------------------

#: A fixed clock for the pure core, so every age is exact.
NOW = datetime(2026, 12, 1, 20, 0, 0, tzinfo=UTC)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def observed_store(path: Path, now: datetime) -> dict[str, TaskKey]:
    """A real store with one task in each live state, read at known times before ``now``."""
    src = Source("a.yaml", 3, 5)
    tasks = {
        name: key(room)
        for name, room in (
            ("running", "r1"),
            ("ended", "r2"),
            ("gone", "r3"),
            ("hidden", "r4"),
            ("drifted", "r5"),
            ("never", "r6"),
        )
    }

    def ago(**before: float) -> float:
        return (now - timedelta(**before)).timestamp()

    with Store.open(path) as store:
        for k in tasks.values():
            store.record_success(
                k, fields={"Duration": 30}, business_id=None, request_id="q", source=src,
                at=now - timedelta(hours=7),
            )  # fmt: skip
        store.record_not_running(
            tasks["ended"], message="the task ended: IdleTimeOut", code="IdleTimeOut",
            request_id=None, source=src, at=now - timedelta(minutes=3),
        )  # fmt: skip
        store.record_out_of_sync(
            tasks["drifted"], message="live values changed by another client: Duration 30 → 45",
            source=src, at=now - timedelta(seconds=12),
        )  # fmt: skip
        store.record_observation(
            Observation(
                tasks["running"], ago(seconds=8), LiveStatus.RUNNING,
                start_time_ms=_ms(now - timedelta(hours=5)), status=2,
                fields={"Identifier": "edu-r1", "Handle": True, "Duration": 30},
            )
        )  # fmt: skip
        store.record_observation(
            Observation(
                tasks["ended"], ago(minutes=3), LiveStatus.ENDED,
                start_time_ms=_ms(now - timedelta(hours=6)),
                end_time_ms=_ms(now - timedelta(hours=1)),
                stop_reason="IdleTimeOut", status=3, fields={"Duration": 30},
            )
        )  # fmt: skip
        store.record_observation(
            Observation(
                tasks["gone"], ago(hours=2), LiveStatus.NOT_FOUND,
                start_time_ms=_ms(now - timedelta(hours=9)),
            )
        )  # fmt: skip
        store.record_observation(Observation(tasks["hidden"], ago(seconds=40), LiveStatus.UNKNOWN))
        store.record_observation(
            Observation(
                tasks["drifted"], ago(seconds=12), LiveStatus.RUNNING,
                start_time_ms=_ms(now - timedelta(hours=5)), status=2, fields={"Duration": 45},
            )
        )  # fmt: skip
    return tasks


def report_of(path: Path, now: datetime, **filters: Any) -> Any:
    """The pure core on a real store's rows and observations, read as ``status`` reads them."""
    with Store.open(path, create=False, read_only=True) as store:
        rows, observations = store.all(), store.observations()
    return build_report(rows, index=None, now=now, observations=observations, **filters)


NEVER_READ_JSON = {
    "state": "unknown",
    "observed_at": None,
    "age_s": None,
    "start_time": None,
    "end_time": None,
    "stop_reason": None,
    "status": None,
    "fields": None,
}


def test_the_json_live_object_for_each_state(tmp_path: Path) -> None:
    tasks = observed_store(tmp_path / "state.db", NOW)
    doc = report_of(tmp_path / "state.db", NOW).to_json()
    assert doc["format_version"] == 5
    live = {t["room_id"]: t["live"] for t in doc["tasks"]}
    assert live[tasks["running"].room_id] == {
        "state": "running",
        "observed_at": "2026-12-01T19:59:52.000000Z",
        "age_s": 8.0,
        "start_time": "2026-12-01T15:00:00.000000Z",
        "end_time": None,
        "stop_reason": None,
        "status": 2,
        "fields": {"Identifier": "edu-r1", "Handle": True, "Duration": 30},
    }
    assert live[tasks["ended"].room_id] == {
        "state": "ended",
        "observed_at": "2026-12-01T19:57:00.000000Z",
        "age_s": 180.0,
        "start_time": "2026-12-01T14:00:00.000000Z",
        "end_time": "2026-12-01T19:00:00.000000Z",
        "stop_reason": "IdleTimeOut",
        "status": 3,
        "fields": {"Duration": 30},
    }
    gone = live[tasks["gone"].room_id]
    assert (gone["state"], gone["age_s"], gone["fields"]) == ("not_found", 7200.0, {})
    assert gone["start_time"] == "2026-12-01T11:00:00.000000Z", "the incarnation last seen"
    assert live[tasks["hidden"].room_id]["state"] == "unknown"
    assert live[tasks["hidden"].room_id]["observed_at"] == "2026-12-01T19:59:20.000000Z"
    assert live[tasks["never"].room_id] == NEVER_READ_JSON, "never read: not assumed running"
    assert doc["live_counts"] == {"running": 2, "ended": 1, "not_found": 1, "unknown": 2}
    assert doc["counts"] == zero_counts(Synced=4, OutOfSync=1, NotRunning=1)

    # Ages come from the clock handed in, not from the wall clock.
    later = report_of(tmp_path / "state.db", NOW + timedelta(minutes=1)).to_json()
    ages = {t["room_id"]: t["live"]["age_s"] for t in later["tasks"]}
    assert ages[tasks["running"].room_id] == 68.0 and ages[tasks["never"].room_id] is None

    picked = report_of(
        tmp_path / "state.db", NOW, lives={LiveStatus.ENDED, LiveStatus.NOT_FOUND}
    ).to_json()
    assert {t["room_id"] for t in picked["tasks"]} == {"r2", "r3"}
    assert picked["filters"]["live"] == ["ended", "not_found"] and picked["total"] == 6
    assert picked["live_counts"] == {"running": 0, "ended": 1, "not_found": 1, "unknown": 0}


def test_the_table_shows_live_state_and_read_age_within_120_columns(tmp_path: Path) -> None:
    tasks = observed_store(tmp_path / "state.db", NOW)
    text = click.unstyle(status_table(report_of(tmp_path / "state.db", NOW)))
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 120, "\n".join(ln for ln in lines if len(ln) > 120)
    assert lines[0].split()[:6] == ["TASK", "SYNC", "SINCE", "LIVE", "READ", "CALLED"]
    expected = {
        "running": ("Synced", "Running since 12-01 15:00Z", "8s"),
        "ended": ("NotRunning", "Ended: IdleTimeOut at 12-01 19:00Z", "3m"),
        "gone": ("Synced", "Not found", "2h"),
        "hidden": ("Synced", "Unknown: not visible", "40s"),
        "drifted": ("OutOfSync", "Running since 12-01 15:00Z", "12s"),
        "never": ("Synced", "Unknown", "never"),
    }
    for name, (sync, live, read) in expected.items():
        cells = re.split(r"\s{2,}", line_of(text, tasks[name]))
        assert (cells[1], cells[3], cells[4]) == (sync, live, read), (name, cells)
    assert lines[0].endswith("LAST ERROR"), "room enough for both axes and the error"
    assert "  Drift: live values" in line_of(text, tasks["drifted"])

    # Narrower, the live detail gives way, never the state itself.
    narrow = click.unstyle(status_table(report_of(tmp_path / "state.db", NOW), width=72))
    table = narrow.split("\n\n")[0].splitlines()
    assert len(table) == 7 and max(len(ln) for ln in table) <= 72, narrow
    states = {"running": "Running", "ended": "Ended", "gone": "Not found", "hidden": "Unknown"}
    for name, state in states.items():
        assert re.search(rf"  {state}\b", line_of(narrow, tasks[name])), (name, narrow)
    assert summary_of(text) == f"6 tasks: {counted(Synced=4, OutOfSync=1, NotRunning=1)}."
    assert live_summary_of(text) == (
        "Live: 2 running, 1 ended, 1 not found, 2 unknown (1 never read); oldest read 2h ago."
    )


def test_the_last_heal_of_each_task_with_its_reason_latest_first(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    src = Source("a.yaml", 3, 5)
    uuid = "0b9f3c52-6f1e-4d5e-9a43-0c1d2e3f4a5b"
    healed = {
        key("r1"): (NOW - timedelta(minutes=2), "drift: Duration 45 → 30"),
        key("r2"): (
            NOW - timedelta(seconds=40),
            f'restart: Identifier "{uuid}" → "edu-a-very-long-identifier-of-hall-0902", '
            "Handle false → true, Duration 20 → 30",
        ),
    }
    with Store.open(db) as store:
        for k in (key("r0"), *healed):
            store.record_success(
                k, fields={"Duration": 30}, business_id=None, request_id="q", source=src,
                at=NOW - timedelta(hours=1),
            )  # fmt: skip
        for k, (at, why) in healed.items():
            store.record_success(
                k, fields={"Duration": 30}, business_id=None, request_id="h", source=src,
                heal=why, at=at,
            )  # fmt: skip
    report = report_of(db, NOW)
    rows = {t["room_id"]: t for t in report.to_json()["tasks"]}
    assert (rows["r0"]["last_heal_at"], rows["r0"]["last_heal_reason"]) == (None, None)
    assert rows["r1"]["last_heal_at"] == "2026-12-01T19:58:00.000000Z"
    assert rows["r1"]["last_heal_reason"] == "drift: Duration 45 → 30"
    assert rows["r2"]["last_heal_reason"] == healed[key("r2")][1]
    assert [t.key for t in report.healed()] == [key("r2"), key("r1")]

    text = click.unstyle(status_table(report))
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 120
    first = lines.index("Last healed (a call set back a restart or drift), latest first:") + 1
    # A reason too long for one line gets lines of its own, whole.
    assert lines[first : first + 4] == [
        f"  {key('r2')}  40s ago",
        f'    restart: Identifier "{uuid}" → "edu-a-very-long-identifier-of-hall-0902", Handle '
        "false",
        "      → true, Duration 20 → 30",
        f"  {key('r1')}  2m ago  drift: Duration 45 → 30",
    ]
    assert summary_of(text) == f"3 tasks: {counted(Synced=3)}.", "the summary still ends it"
    # Nothing healed, nothing said.
    assert "Last healed" not in status_table(report_of(db, NOW, apps={"nobody"}))


def test_status_cli_reads_observations_and_filters_on_both_axes(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    tasks = observed_store(tmp_path / "state.db", now)
    for k in tasks.values():
        declare(tmp_path / "desired", f"{k.room_id}.yaml", k.room_id)
    new = declare(tmp_path / "desired", "r7.yaml", "r7")

    r = status(tmp_path)
    assert r.returncode == 0, r.stderr
    assert max(len(ln) for ln in r.stdout.splitlines()) <= 120
    # Which form of LIVE fits depends on the other columns; the state and StartTime always do.
    start = (now - timedelta(hours=5)).strftime("%m-%d %H:%MZ")
    assert re.search(rf"  Running (since )?{start}  ", line_of(r.stdout, tasks["running"]))
    assert "  Ended: IdleTimeOut" in line_of(r.stdout, tasks["ended"])
    assert re.search(r"  Unknown +never  ", line_of(r.stdout, new)), "a New task was never read"
    assert "1 OutOfSync" in summary_of(r.stdout)
    assert live_summary_of(r.stdout).startswith("Live: 2 running, 1 ended, 1 not found, 3 unknown")

    doc = json.loads(status(tmp_path, "-o", "json").stdout)
    assert doc["format_version"] == 5
    rows = {t["room_id"]: t for t in doc["tasks"]}
    assert rows["r7"]["status"] == "New" and rows["r7"]["live"] == NEVER_READ_JSON
    running = rows["r1"]["live"]
    assert running["state"] == "running" and 7 <= running["age_s"] < 60
    assert datetime.fromisoformat(running["observed_at"]) < datetime.now(UTC)

    r = status(tmp_path, "--status", "outofsync", "-o", "json")
    assert set(tasks_of(r)) == {tasks["drifted"]}
    assert json.loads(r.stdout)["counts"]["OutOfSync"] == 1
    r = status(tmp_path, "--live", "ended,Not-Found", "--live", "not_found", "-o", "json")
    assert set(tasks_of(r)) == {tasks["ended"], tasks["gone"]}
    r = status(tmp_path, "--live", "unknown", "--status", "new")
    assert r.returncode == 0 and summary_of(r.stdout).startswith("1 tasks shown of 7:")
    r = status(tmp_path, "--live", "stopped")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown live state 'stopped'; valid: running, ended, not-found, unknown" in r.stderr


def test_the_daemon_observations_show_as_the_live_axis(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    desired = tmp_path / "desired"
    running, ended, drifted = (declare(desired, f"{r}.yaml", r) for r in ("r1", "r2", "r3"))
    for k in (running, ended, drifted):
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    d = DaemonProcess(
        tmp_path,
        *("desired", "--endpoint", emulator.url, "--health-port", "0", "--state", "state.db"),
        *("--observe-interval", "1", "--drift", "report", "--resync", "3600"),
    )
    with d:
        d.wait_ready()
        emulator.end_task(ended)
        d.wait_event(
            "task.not_running", lambda e: (e["room_id"], e.get("source")) == ("r2", "observation")
        )
        emulator.set_task(drifted, duration=45)
        d.wait_event("task.drifted", lambda e: e["room_id"] == "r3")

        def settled() -> dict[tuple[str, str, str], dict[str, Any]] | None:
            rows = tasks_of(status(tmp_path, "-o", "json"))
            r1, r2, r3 = rows[running], rows[ended], rows[drifted]
            done = (
                r1["live"]["state"] == "running"
                and r1["live"]["fields"].get("Duration") == 30  # read after our own call
                and r2["status"] == "NotRunning"
                and r3["status"] == "OutOfSync"
            )
            return rows if done else None

        rows = wait_for(settled)
        assert d.stop(signal.SIGTERM) == 0

    live_r1 = emulator.live(running)
    assert live_r1 is not None
    r1 = rows[running]
    assert r1["status"] == "Synced" and r1["live"]["status"] == 2
    start = datetime.fromisoformat(r1["live"]["start_time"])
    assert int(start.timestamp() * 1000) == live_r1.start_time_ms, "the emulator's StartTime"
    assert r1["live"]["fields"]["Duration"] == 30 and r1["live"]["age_s"] < 30

    live_r2 = emulator.live(ended)
    assert live_r2 is not None
    r2 = rows[ended]
    assert (r2["status"], r2["live"]["state"]) == ("NotRunning", "ended")
    assert r2["live"]["stop_reason"] == "IdleTimeOut"
    end = datetime.fromisoformat(r2["live"]["end_time"])
    assert int(end.timestamp() * 1000) == live_r2.end_time_ms

    r3 = rows[drifted]
    assert (r3["status"], r3["live"]["state"]) == ("OutOfSync", "running")
    assert r3["live"]["fields"]["Duration"] == 45 and r3["fields"]["Duration"] == 30

    text = status(tmp_path).stdout
    at = datetime.fromtimestamp(live_r1.start_time_ms / 1000, UTC).strftime("%m-%d %H:%MZ")
    assert re.search(rf"  Running (since )?{at}  ", line_of(text, running))
    assert "  Ended: IdleTimeOut" in line_of(text, ended)
    assert "OutOfSync" in line_of(text, drifted)
    assert summary_of(text).startswith(f"3 tasks: {counted(Synced=1, OutOfSync=1, NotRunning=1)}")
    assert live_summary_of(text).startswith("Live: 2 running, 1 ended, 0 not found, 0 unknown;")
