"""Stopping ``apply`` early loses nothing: signals drain, an unreachable endpoint stops at once.

The CLI runs as a subprocess with real signals against the emulator on
loopback; "accepted" is what the emulator applied, "recorded" is what the
SQLite store says, and the two must be equal however the run was stopped.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from reconciler.core.task import SyncStatus, TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.store.base import Store
from tests.conftest import cli_env, reconciler_cmd, run_cli, tasks_yaml, wait_for, write

APP = "661e4a7b9c0d1e2f"


def running_tasks(h: EmulatorHandle | None, root: Path, count: int) -> list[TaskKey]:
    keys = [TaskKey(APP, f"room-{i:04d}", "seg") for i in range(count)]
    if h is not None:
        for k in keys:
            h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    rows = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": 33} for k in keys]
    write(root, "many.yaml", tasks_yaml(APP, rows))
    return keys


def start_apply(tmp_path: Path, endpoint: str, *extra: str) -> subprocess.Popen[bytes]:
    # Files, not pipes: hundreds of JSON events would fill a pipe nobody reads yet.
    return subprocess.Popen(
        reconciler_cmd("apply", "desired", "--state", "state.db", "--endpoint", endpoint, *extra),
        cwd=tmp_path,
        env=cli_env(),
        stdout=(tmp_path / "out.txt").open("wb"),
        stderr=(tmp_path / "err.txt").open("wb"),
    )


def applied(h: EmulatorHandle) -> int:
    return sum(t.update_calls for t in h.tasks())


def recorded(tmp_path: Path) -> dict[SyncStatus, int]:
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        return store.counts()


def events(tmp_path: Path) -> list[dict[str, object]]:
    text = (tmp_path / "err.txt").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_ctrl_c_drains_and_every_accepted_call_is_recorded(
    tmp_path: Path, make_emulator: object
) -> None:
    h: EmulatorHandle = make_emulator(latency_ms=250)  # type: ignore[operator]
    running_tasks(h, tmp_path / "desired", 500)
    # Without reads first: 500 of them at 250 ms would take most of the test's time.
    proc = start_apply(tmp_path, h.url, "--no-refresh", "--log-level", "debug")  # call.succeeded
    wait_for(lambda: applied(h) >= 100, timeout=30, interval=0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 1, "interrupted: not every call was made"
    accepted = applied(h)
    counts = recorded(tmp_path)
    assert 100 <= accepted < 500
    assert counts[SyncStatus.SYNCED] == accepted, "every call the server accepted is recorded"
    assert counts[SyncStatus.PENDING] == 0, "no call was left in flight"
    synced = [e for e in events(tmp_path) if e["event"] == "task.synced"]
    assert len(synced) == accepted
    answered = {e["request_id"]: e for e in events(tmp_path) if e["event"] == "call.succeeded"}
    for e in synced:  # one request, one latency, whichever event says it
        assert e["latency_ms"] == answered[e["request_id"]]["latency_ms"]
    err = (tmp_path / "err.txt").read_text()
    assert "SIGINT: no new calls" in err and "Press Ctrl-C again" in err
    assert f"Interrupted: {500 - accepted} call(s) not made" in err
    assert f"{accepted} synced" in (tmp_path / "out.txt").read_text(), "the summary is printed"

    # The next run makes exactly the calls that were not made.
    args = ("apply", "desired", "--state", "state.db", "--endpoint", h.url, "--no-refresh")
    rest = run_cli(*args, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert applied(h) == 500 and all(t.update_calls == 1 for t in h.tasks())


def test_sigterm_then_a_second_interrupt_aborts_at_once(
    tmp_path: Path, make_emulator: object
) -> None:
    h: EmulatorHandle = make_emulator(latency_ms=6000)  # type: ignore[operator]
    running_tasks(h, tmp_path / "desired", 20)
    proc = start_apply(tmp_path, h.url)
    # The first call proves the credentials (6 s); then the rest go out together.
    wait_for(lambda: applied(h) >= 5, timeout=20, interval=0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None, "the first signal waits for the calls in flight"
    aborted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 1
    assert time.monotonic() - aborted < 3, "the second interrupt does not wait for answers"
    err = (tmp_path / "err.txt").read_text()
    assert "aborted by a second interrupt" in err and "stay Pending" in err
    counts = recorded(tmp_path)
    assert counts[SyncStatus.PENDING] >= 1, "calls cut off in flight stay Pending"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_endpoint_during_the_reads_stops_after_one_probe(tmp_path: Path) -> None:
    """The reads before the first calls find it: one probe, one line, nothing planned."""
    running_tasks(None, tmp_path / "desired", 102)
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = start_apply(tmp_path, url)
    assert proc.wait(30) == 1
    assert time.monotonic() - started < 10, "no retries task after task"
    err = (tmp_path / "err.txt").read_text()
    failed = [e for e in events(tmp_path) if e["event"] == "call.failed"]
    assert [e["action"] for e in failed] == ["GetSegmentTask"], "one probe read, no call"
    reason = f"cannot reach {url}: connection refused (after 2 attempts)"
    assert f"error: cannot read live tasks: {reason}; nothing was planned or sent" in err
    assert "--no-refresh" in err, "says how to plan without reading"
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        assert store.counts()[SyncStatus.PENDING] == 0 and not store.applied()
    plan = run_cli("plan", "desired", "--state", "state.db", "--endpoint", url, cwd=tmp_path)
    assert plan.returncode == 1 and f"cannot read live tasks: {reason}" in plan.stderr
    assert plan.stdout == "", "never a plan silently made from memory"


def test_an_unreachable_endpoint_stops_after_one_probe(tmp_path: Path) -> None:
    running_tasks(None, tmp_path / "desired", 102)
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = start_apply(tmp_path, url, "--no-refresh")
    assert proc.wait(30) == 1
    assert time.monotonic() - started < 10, "no retries task after task"
    err = (tmp_path / "err.txt").read_text()
    failed = [e for e in events(tmp_path) if e["event"] == "call.failed"]
    assert len(failed) == 1, "one probe, not one failure per task"
    assert len([e for e in events(tmp_path) if e["event"] == "call.retried"]) <= 1
    reason = f"cannot reach {url}: connection refused (after 2 attempts)"
    assert f"error: {reason}; stopped the run: 102 call(s) not made" in err
    assert err.count("cannot reach") == 1 + len(failed), "the message once, plus its event"
