"""``reconciler status`` tells the truth: the store read against the tree.

The CLI runs as a subprocess on real trees and real SQLite files, filled by
``apply`` and the daemon against the emulator on loopback or written with the
store's own writers.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler.emulator import EmulatorHandle
from reconciler.state import StateStore
from reconciler.status import report_statuses
from reconciler.task import Source, TaskKey
from tests.conftest import CliResult, run_cli, tasks_yaml, write
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
    return text.rstrip("\n").splitlines()[-1]


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
    r = run_cli("apply", "desired", "--state", "state.db", "--endpoint", emulator.url, cwd=tmp_path)
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
    assert doc["format_version"] == 2
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
    with StateStore.open(tmp_path / "state.db") as store:
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
    with StateStore.open(tmp_path / "state.db") as store:
        store.record_not_running(
            TaskKey(app, rooms[0], task),
            message="the task is not running: " + "detail " * 40,
            code=NOT_RUNNING,
            request_id="req",
            source=Source("long/x.yaml", 1, 1),
            next_retry_at=datetime.now(UTC) + timedelta(minutes=5),
        )
    r = status(tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 120, "\n".join(ln for ln in lines if len(ln) > 120)
    task_rows = [ln for ln in lines if ln.startswith("appaaa")]
    assert len(task_rows) == 2
    for n, row in zip(("0001", "0002"), task_rows, strict=True):
        shown = row.split()[0]
        assert "…" in shown and f"-{n}/" in shown, "each id keeps its start and its end"
        assert shown.startswith("appaaa") and shown.endswith("ttt")
    assert "in 4m" in task_rows[0] or "in 5m" in task_rows[0]
    full = tasks_of(status(tmp_path, "-o", "json"))
    assert set(full) == {(app, r, task) for r in rooms}, "full values in JSON"


def test_a_missing_store_or_tree_is_said_plainly(tmp_path: Path) -> None:
    for args in ((), ("-o", "json")):
        r = status(tmp_path, *args)
        assert r.returncode == 1 and r.stdout == ""
        assert "state store state.db does not exist" in r.stderr
    with StateStore.open(tmp_path / "state.db") as store:
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
