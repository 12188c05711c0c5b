"""``reconciler run``: the daemon as a subprocess, real files, real watcher, real signals."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from tests.conftest import tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
R1 = (APP, "room-1", "seg")
R2 = (APP, "room-2", "seg")
FAST = ("--emulator-port", "0", "--health-port", "0", "--state", "state.db", "--resync", "3600")


def lectures(d1: int, d2: int, *, handle2: bool = True) -> str:
    return tasks_yaml(
        APP,
        [
            {"RoomId": "room-1", "TaskId": "seg", "Duration": d1},
            {"RoomId": "room-2", "TaskId": "seg", "Duration": d2, "Handle": handle2},
        ],
    )


def running_tree(h: EmulatorHandle, root: Path, count: int, *, duration: int) -> list[TaskKey]:
    """``count`` tasks running in the emulator and declared in ``root/a.yaml``."""
    keys = [TaskKey(APP, f"room-{i}", "seg") for i in range(count)]
    for k in keys:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    rows = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": duration} for k in keys]
    write(root, "a.yaml", tasks_yaml(APP, rows))
    return keys


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(cwd: Path, *args: str | Path, name: str = "daemon") -> DaemonProcess:
        d = DaemonProcess(cwd, *args, name=name)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def test_syncs_follows_edits_and_drains_on_sigterm(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40))
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()
    live = d.live_tasks()
    assert live[R1]["Duration"] == 30 and live[R2]["Duration"] == 40
    assert d.health("/healthz").status_code == 200
    assert d.metric("reconciler_tasks", 'status="Synced"') == 2
    # The embedded emulator started room-1 (first in key order) with the tree's values:
    # read first, it costs no call; room-2 ran with StartSegment's defaults.
    assert d.metric("reconciler_calls_total", 'action="UpdateSegment",outcome="ok"') == 1
    assert live[R1]["UpdateCalls"] == 0 and live[R2]["UpdateCalls"] == 1

    # Rewrite the file: only room-2's Handle changed, so only it is called, with Handle alone.
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40, handle2=False))
    wait_for(lambda: d.live_tasks()[R2]["Handle"] is False)
    live = d.live_tasks()
    assert live[R2]["LastBodies"][-1] == {
        "AppId": APP,
        "RoomId": "room-2",
        "TaskId": "seg",
        "Handle": False,
    }
    assert live[R2]["TimerRestarts"] == 1 and live[R1]["UpdateCalls"] == 0

    assert d.stop(signal.SIGTERM) == 0
    assert d.events("daemon.stopped")
    for e in d.events():
        assert {"event", "timestamp", "level"} <= e.keys()
        assert e["timestamp"].endswith("Z") or e["timestamp"].endswith("+00:00")


def test_invalid_file_holds_its_tasks_until_fixed(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40))
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()

    write(tmp_path / "desired", "edu/lectures.yaml", lectures(31, 41).replace('"room-1"', "0123"))
    (event,) = d.wait_event("desired.invalid_file")
    assert event["path"] == "edu/lectures.yaml" and event["held_tasks"] == 2
    assert any("quote" in p for p in event["problems"])
    assert d.metric("reconciler_invalid_files") == 1
    assert not d.events("task.forgotten"), "an invalid file never counts as its tasks removed"
    assert d.live_tasks()[R2]["Duration"] == 40, "no call for a held task"

    write(tmp_path / "desired", "edu/lectures.yaml", lectures(31, 41))
    d.wait_event("desired.file_fixed")
    wait_for(lambda: d.live_tasks()[R2]["Duration"] == 41)
    assert d.stop(signal.SIGINT) == 0


def test_removed_file_forgets_tasks_without_calls(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40))
    write(
        tmp_path / "desired",
        "edu/other.yaml",
        tasks_yaml(APP, [{"RoomId": "room-3", "TaskId": "seg", "Duration": 5}]),
    )
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()
    calls = d.metric("reconciler_calls_total", 'action="UpdateSegment",outcome="ok"')

    (tmp_path / "desired" / "edu" / "other.yaml").unlink()
    (forgotten,) = d.wait_event("task.forgotten")
    assert forgotten["room_id"] == "room-3"
    assert d.metric("reconciler_calls_total", 'action="UpdateSegment",outcome="ok"') == calls
    assert d.live_tasks()[(APP, "room-3", "seg")]["Running"], "no StopSegment either"
    assert d.stop() == 0


def test_git_sync_style_symlink_swap(tmp_path: Path, daemons: Callable[..., DaemonProcess]) -> None:
    rev1, rev2 = tmp_path / "revs" / "rev1", tmp_path / "revs" / "rev2"
    write(rev1, "edu/lectures.yaml", lectures(30, 40))
    write(rev1, ".git", "gitdir: elsewhere\n")  # hidden: ignored
    os.symlink(rev1, tmp_path / "desired")
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()

    write(rev2, "edu/lectures.yaml", lectures(30, 45))
    write(
        rev2,
        "edu/new.json",
        f'{{"AppId": "{APP}", "RoomId": "room-9", "TaskId": "seg", "Handle": false}}',
    )
    tmp_link = tmp_path / "desired.tmp"
    os.symlink(rev2, tmp_link)
    os.replace(tmp_link, tmp_path / "desired")  # atomic swap, as git-sync does

    d.wait_event("watch.root_swapped")
    wait_for(lambda: d.live_tasks()[R2]["Duration"] == 45)
    d.wait_event("task.not_running", lambda e: e["room_id"] == "room-9")
    assert d.live_tasks()[R1]["UpdateCalls"] == 0, "started matching, untouched by the swap"
    assert d.stop() == 0


def test_not_running_task_is_retried_until_it_runs(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], emulator: EmulatorHandle
) -> None:
    emulator.start_task(app_id=APP, room_id="room-1", task_id="seg")
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40))
    d = daemons(
        tmp_path,
        "desired",
        "--endpoint",
        emulator.url,
        "--health-port",
        "0",
        "--state",
        "state.db",
        "--retry-delay",
        "0.2",
    )
    d.wait_event("task.not_running", lambda e: e["room_id"] == "room-2", count=2)
    d.wait_ready()  # ready after the first pass, whatever its outcomes
    emulator.start_task(app_id=APP, room_id="room-2", task_id="seg")
    wait_for(lambda: (t := emulator.live(TaskKey(*R2))) is not None and t.duration == 40)
    delays = [e["after_s"] for e in d.events("task.requeued")]
    assert delays[:2] == [0.2, 0.4], "growing delay"
    assert d.stop() == 0


def test_sigint_lets_in_flight_calls_finish_and_records_them(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    h = make_emulator(latency_ms=1500)
    running_tree(h, tmp_path / "desired", 5, duration=77)
    d = daemons(
        tmp_path, "desired", "--endpoint", h.url, "--health-port", "0", "--state", "state.db"
    )
    # Five first-contact reads, then the five calls: all ten received, none answered yet.
    wait_for(lambda: h.stats_snapshot()["total_requests"] >= 10, timeout=15)
    assert d.stop(signal.SIGINT) == 0
    assert len(d.events("task.synced")) == 5, "in-flight calls finished and were recorded"
    assert d.events("daemon.stopped")[0]["abandoned_in_flight"] == 0


def test_kill_9_mid_rollout_then_restart_converges(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    make_emulator: Callable[..., EmulatorHandle],
) -> None:
    h = make_emulator(latency_ms=100)
    keys = running_tree(h, tmp_path / "desired", 80, duration=33)
    args = (
        "desired",
        "--endpoint",
        h.url,
        "--health-port",
        "0",
        "--state",
        "state.db",
        "--max-in-flight",
        "8",
        "--qps",
        "40",
    )
    first = daemons(tmp_path, *args, name="first")
    first.wait_event("task.synced", count=20)
    first.kill()  # SIGKILL: no drain, no goodbye
    assert 20 <= len(first.events("task.synced")) < 80

    second = daemons(tmp_path, *args, name="second")
    second.wait_ready()
    assert all((t := h.live(k)) is not None and t.duration == 33 for k in keys)
    sent = h.stats_snapshot()["by_action"]["UpdateSegment"]["ok"]
    assert 80 <= sent <= 80 + 8, f"re-sent at most the in-flight calls ({sent} sent)"
    assert second.stop() == 0


def test_wrong_secret_pauses_after_one_call_and_sigterm_ends_the_pause(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], emulator: EmulatorHandle
) -> None:
    running_tree(emulator, tmp_path / "desired", 20, duration=9)
    d = DaemonProcess(
        tmp_path,
        *("desired", "--endpoint", emulator.url, "--health-port", "0", "--state", "state.db"),
        env={"VOLC_SECRETKEY": "d3Jvbmc="},
    )
    try:
        (paused,) = d.wait_event("daemon.paused")
        assert paused["code"] == "SignatureDoesNotMatch"
        ready = d.health("/readyz")
        assert ready.status_code == 503 and "paused" in ready.text
        assert emulator.stats_snapshot()["total_requests"] == 1, "one refused call, not 20"
        started = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5, "the pause does not hold up shutdown"
    finally:
        d.close()
    assert emulator.stats_snapshot()["total_requests"] == 1, "nothing sent on the way out"


def test_root_that_vanishes_for_a_while_is_survived(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    rev1, rev2 = tmp_path / "revs" / "rev1", tmp_path / "revs" / "rev2"
    write(rev1, "edu/lectures.yaml", lectures(30, 40))
    write(rev2, "edu/lectures.yaml", lectures(30, 50))
    os.symlink(rev1, tmp_path / "desired")
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()

    def point(target: Path) -> None:
        tmp_link = tmp_path / "desired.tmp"
        os.symlink(target, tmp_link)
        os.replace(tmp_link, tmp_path / "desired")

    point(tmp_path / "nowhere")
    d.wait_event("desired.root_unavailable")
    assert not d.events("task.forgotten"), "a missing root is not an empty tree"
    point(rev2)
    wait_for(lambda: d.live_tasks()[R2]["Duration"] == 50)
    assert d.health("/healthz").status_code == 200
    assert d.stop() == 0


def test_a_folder_named_like_a_file_is_not_an_invalid_file(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    write(tmp_path / "desired", "edu/lectures.yaml", lectures(30, 40))
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()
    write(tmp_path / "desired", "more.yaml/rooms.yaml", lectures(30, 40).replace("room-", "hall-"))
    wait_for(lambda: (APP, "hall-1", "seg") in d.live_tasks() or d.events("task.not_running"))
    assert not d.events("desired.invalid_file")
    assert d.stop() == 0


def test_a_symlink_loop_is_logged_and_counted_like_any_invalid_file(
    tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    tree = tmp_path / "desired"
    write(tree, "edu/lectures.yaml", lectures(30, 40))
    os.symlink("loop-b.yaml", tree / "loop-a.yaml")
    os.symlink("loop-a.yaml", tree / "loop-b.yaml")
    d = daemons(tmp_path, "desired", "--emulator", *FAST)
    d.wait_ready()
    found = d.wait_event("desired.invalid_file", count=2)
    assert sorted(e["path"] for e in found) == ["loop-a.yaml", "loop-b.yaml"]
    assert all("symbolic links" in e["problems"][0] for e in found), found
    assert d.metric("reconciler_invalid_files") == 2
    assert "2 invalid files" in d.health("/readyz").text

    os.symlink("self.yaml", tree / "edu" / "self.yaml")  # one that appears while running
    (late,) = d.wait_event("desired.invalid_file", lambda e: e["path"] == "edu/self.yaml")
    assert "symbolic links" in late["problems"][0]
    wait_for(lambda: d.metric("reconciler_invalid_files") == 3)
    (tree / "edu" / "self.yaml").unlink()
    d.wait_event("desired.file_fixed", lambda e: e["path"] == "edu/self.yaml")
    assert d.stop() == 0
