"""Faults that used to send a call twice: ambiguous outcomes, black holes, SIGHUP.

Every duplicate UpdateSegment that carries Duration cuts a live slice once
more. The CLI and the daemon run as subprocesses against the emulator (or a
real socket that never answers) on loopback, with a real SQLite store.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.core.task import Source, SyncStatus, TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.store.base import Store
from tests.conftest import cli_env, reconciler_cmd, run_cli, tasks_yaml, wait_for, write
from tests.harness import BlackHole, DaemonProcess

APP = "661e4a7b9c0d1e2f"


def keys(n: int) -> list[TaskKey]:
    return [TaskKey(APP, f"room-{i:03d}", "seg") for i in range(n)]


def declare(root: Path, tasks: list[TaskKey], *, duration: int) -> None:
    rows = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": duration} for k in tasks]
    write(root, "a.yaml", tasks_yaml(APP, rows))


def start_all(h: EmulatorHandle, tasks: list[TaskKey], *, duration: int = 20) -> None:
    for k in tasks:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id, duration=duration)


def updates(h: EmulatorHandle) -> int:
    return sum(t.update_calls for t in h.tasks())


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


# --- a black hole, or a server slower than --timeout -------------------------------------


def test_apply_stops_at_a_black_hole_within_two_timeouts(
    tmp_path: Path, black_hole: BlackHole
) -> None:
    declare(tmp_path / "desired", keys(50), duration=30)
    args = ("apply", "desired", "--state", "state.db", "--endpoint", black_hole.url)
    started = time.monotonic()
    r = run_cli(*args, "--timeout", "1", "--no-refresh", cwd=tmp_path)
    took = time.monotonic() - started
    assert r.returncode == 1
    assert took < 8, f"detected in {took:.1f} s, not after every task's retries"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert f"{black_hole.url} accepts connections but answered none of 2 requests" in errors[0]
    assert "within --timeout 1 s" in errors[0] and "raise it if so" in errors[0]
    assert "call(s) not made" in errors[0]
    assert black_hole.requests <= 2, "no further sends once it is known"
    assert len(r.stderr.splitlines()) < 20, "a few lines, not one per task"
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        pending = store.counts()[SyncStatus.PENDING]
    assert pending == 1, "the call in doubt stays Pending: the next run reads it first"

    # Reading first (the default) meets it the same way, before any call.
    r = run_cli(*args, "--timeout", "1", cwd=tmp_path)
    assert r.returncode == 1 and "error: cannot read live tasks: " in r.stderr
    assert "accepts connections but answered none" in r.stderr


def test_a_server_slower_than_the_timeout_gets_one_call_not_six_per_task(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(latency_ms=1500)
    tasks = keys(20)
    start_all(h, tasks)
    declare(tmp_path / "desired", tasks, duration=30)
    args = ("apply", "desired", "--state", "state.db", "--endpoint", h.url, "--timeout", "1")
    r = run_cli(*args, "--no-refresh", cwd=tmp_path)
    assert r.returncode == 1 and "raise it if so" in r.stderr
    time.sleep(2)  # whatever was sent has landed by now
    assert updates(h) <= 2, "stopped after two timeouts; nothing re-sent blindly"

    # With a timeout that fits, the next run reads the tasks in doubt first: none is
    # sent twice, and every task converges.
    r = run_cli(*args[:-1], "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(t.duration == 30 for t in h.tasks())
    assert all(t.update_calls == 1 for t in h.tasks()), "one call per task, in all"


def test_the_daemon_pauses_at_a_black_hole_and_says_why(
    tmp_path: Path, black_hole: BlackHole
) -> None:
    declare(tmp_path / "desired", keys(20), duration=30)
    args = ("desired", "--endpoint", black_hole.url, "--health-port", "0")
    with DaemonProcess(tmp_path, *args, "--state", "state.db", "--timeout", "1") as d:
        (paused,) = d.wait_event("daemon.paused", timeout=20)
        assert "accepts connections but answered none" in paused["error"]
        ready = d.health("/readyz")
        assert ready.status_code == 503 and "accepts connections but answered none" in ready.text
        time.sleep(2)
        assert black_hole.requests <= 2, "no request while paused"
        assert d.stop() == 0


# --- ambiguous outcomes and calls in doubt -----------------------------------------------


def test_a_task_left_pending_is_read_before_it_is_sent_again(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """A run stopped with calls in flight: the next one reads them, and sends what lacks."""
    landed, lost = keys(2)
    start_all(emulator, [landed, lost])
    emulator.set_task(landed, duration=30)  # the call in flight had landed
    declare(tmp_path / "desired", [landed, lost], duration=30)
    src = Source("a.yaml", 3, 5)
    with Store.open(tmp_path / "state.db", create=True) as store:
        for k in (landed, lost):
            store.record_success(
                k, fields={"Duration": 20}, business_id=None, request_id="r0", source=src
            )
            store.mark_pending(k, source=src, business_id=None)  # then the run was killed
    emulator.reset_stats()
    args = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url)
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reads = emulator.stats_snapshot()["by_action"]["GetSegmentTask"]
    assert sum(reads.values()) == 2, "both read before anything is sent"
    land, lose = emulator.live(landed), emulator.live(lost)
    assert land is not None and land.update_calls == 0, "it had landed: not sent again"
    assert lose is not None and lose.update_calls == 1 and lose.duration == 30
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        assert {store.get(k).status for k in (landed, lost)} == {SyncStatus.SYNCED}  # type: ignore[union-attr]


def test_a_failed_task_whose_live_values_match_becomes_synced(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(error_rate=1.0)
    (k,) = keys(1)
    start_all(h, [k])
    declare(tmp_path / "desired", [k], duration=30)
    args = ("apply", "desired", "--state", "state.db", "--endpoint", h.url)
    assert run_cli(*args, "--no-refresh", cwd=tmp_path).returncode == 1
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        assert store.get(k).status is SyncStatus.FAILED  # type: ignore[union-attr]
    h.set_faults(error_rate=0.0)
    h.set_task(k, duration=30)  # it reached the desired values another way
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    live = h.live(k)
    assert live is not None and live.update_calls == 0
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        assert store.get(k).status is SyncStatus.SYNCED  # type: ignore[union-attr]


# --- SIGHUP ------------------------------------------------------------------------------


def test_sighup_makes_run_reread_the_tree_and_apply_drain(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator()
    tasks = keys(3)
    start_all(h, tasks)
    declare(tmp_path / "desired", tasks, duration=30)
    args = ("desired", "--endpoint", h.url, "--health-port", "0", "--state", "state.db")
    with DaemonProcess(tmp_path, *args, "--resync", "3600") as d:
        d.wait_event("reconcile.completed")
        d.proc.send_signal(signal.SIGHUP)
        (reloaded,) = d.wait_event("daemon.reloaded")
        assert reloaded["files"] == 1
        assert d.proc.poll() is None, "SIGHUP reloads; it does not stop the daemon"
        assert d.health("/healthz").status_code == 200
        assert d.stop() == 0

    slow = make_emulator(latency_ms=400)
    many = keys(40)
    start_all(slow, many)
    declare(tmp_path / "other", many, duration=31)
    cmd = ("apply", "other", "--state", "s2.db", "--endpoint", slow.url, "--no-refresh")
    proc = subprocess.Popen(
        reconciler_cmd(*cmd, "--qps", "5"),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: updates(slow) >= 3, timeout=20)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "SIGHUP: no new calls" in err
    assert "every answer received was recorded" in err
    applied = updates(slow)
    with Store.open(tmp_path / "s2.db", create=False, read_only=True) as store:
        counts = store.counts()
    assert counts[SyncStatus.SYNCED] == applied and counts[SyncStatus.PENDING] == 0
    assert f"Apply: {applied} synced" in out, "the summary is printed"
