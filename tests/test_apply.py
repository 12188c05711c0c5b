"""``reconciler apply`` end to end: the CLI as a subprocess, the emulator on loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from tests.conftest import (
    SECRET_KEY,
    cli_env,
    reconciler_cmd,
    run_cli,
    tasks_yaml,
    wait_for,
    write,
)

APP = "661e4a7b9c0d1e2f"
A = TaskKey(APP, "lecture-101", "seg-main")
B = TaskKey(APP, "lecture-102", "seg-main")


def tree(tmp_path: Path, *, a: dict[str, object], b: dict[str, object]) -> Path:
    root = tmp_path / "desired"
    write(
        root,
        "edu/lectures.yaml",
        tasks_yaml(
            APP,
            [
                {"RoomId": A.room_id, "TaskId": A.task_id, **a},
                {"RoomId": B.room_id, "TaskId": B.task_id, **b},
            ],
        ),
    )
    return root


def start(h: EmulatorHandle, *keys: TaskKey) -> None:
    for k in keys:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)


def apply(tmp_path: Path, h: EmulatorHandle, *extra: str, **env: str) -> tuple[int, str, str]:
    r = run_cli(
        "apply",
        "desired",
        "--state",
        "state.db",
        "--endpoint",
        h.url,
        *extra,
        cwd=tmp_path,
        env=env,
    )
    return r.returncode, r.stdout, r.stderr


def status(tmp_path: Path) -> dict[tuple[str, str, str], dict[str, object]]:
    r = run_cli("status", "--state", "state.db", "--output", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    return {(t["app_id"], t["room_id"], t["task_id"]): t for t in doc["tasks"]}


def test_only_changed_fields_reach_the_server(tmp_path: Path, emulator: EmulatorHandle) -> None:
    start(emulator, A, B)
    tree(tmp_path, a={"Duration": 30, "Handle": True}, b={"Identifier": "lec102"})
    code, out, err = apply(tmp_path, emulator)
    assert code == 0, err
    assert "2 synced" in out
    live_a = emulator.live(A)
    assert live_a is not None and live_a.duration == 30 and live_a.timer_restarts == 1
    assert status(tmp_path)[A]["status"] == "Synced"

    # Change only Handle of A: the body carries Handle alone, the slice timer is untouched.
    tree(tmp_path, a={"Duration": 30, "Handle": False}, b={"Identifier": "lec102"})
    code, out, err = apply(tmp_path, emulator)
    assert code == 0, err
    live_a = emulator.live(A)
    assert live_a is not None
    assert live_a.last_bodies[-1] == {**A.identity(), "Handle": False}
    assert live_a.timer_restarts == 1, "an unchanged Duration must never restart the timer"
    live_b = emulator.live(B)
    assert live_b is not None and live_b.update_calls == 1, "B was in sync: no call"

    # Nothing changed: no call at all.
    before = emulator.stats_snapshot()["total_requests"]
    code, out, _ = apply(tmp_path, emulator)
    assert code == 0 and "No changes" in out
    assert emulator.stats_snapshot()["total_requests"] == before


def test_not_running_task_is_reported_and_retried_later(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    start(emulator, A)  # B was never started
    tree(tmp_path, a={"Duration": 45}, b={"Duration": 45})
    code, out, _ = apply(tmp_path, emulator)
    assert code == 0, "not running is not an error"
    assert "1 not running" in out
    rows = status(tmp_path)
    assert rows[B]["status"] == "NotRunning" and rows[B]["fields"] is None
    assert rows[B]["last_error_code"] == "InvalidParameter.ErrorActiveTaskNotFound"

    start(emulator, B)
    code, out, _ = apply(tmp_path, emulator)
    assert code == 0 and "1 synced" in out, "tried again on the next run"
    assert status(tmp_path)[B]["status"] == "Synced"


def test_transient_faults_are_retried_until_synced(tmp_path: Path, make_emulator: object) -> None:
    h = make_emulator(error_rate=0.3, drop_rate=0.1, seed=3)  # type: ignore[operator]
    start(h, A, B)
    tree(tmp_path, a={"Duration": 31}, b={"Duration": 32})
    code, out, err = apply(tmp_path, h, "--timeout", "2")
    assert code == 0, out + err
    assert {r["status"] for r in status(tmp_path).values()} == {"Synced"}


def test_wrong_secret_stops_the_run_at_once_and_never_leaks(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    keys = [TaskKey(APP, f"room-{i}", "seg") for i in range(120)]
    start(emulator, *keys)
    write(
        tmp_path / "desired",
        "many.yaml",
        tasks_yaml(APP, [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": 9} for k in keys]),
    )
    wrong = "d3Jvbmctc2VjcmV0LWtleS1mb3ItdGhpcy10ZXN0"
    code, out, err = apply(tmp_path, emulator, VOLC_SECRETKEY=wrong)
    assert code == 1
    assert "SignatureDoesNotMatch" in err
    assert err.count("error: ") == 1, "one clear message"
    sent = emulator.stats_snapshot()["total_requests"]
    assert sent == 1, f"stopped at once, not after burning through tasks ({sent} sent)"
    for text in (out, err, (tmp_path / "state.db").read_bytes().decode("latin-1")):
        assert wrong not in text and SECRET_KEY not in text


def test_missing_credentials_is_a_clear_error_before_any_call(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    tree(tmp_path, a={"Duration": 30}, b={})
    code, _, err = apply(
        tmp_path, emulator, VOLC_ACCESSKEY="", VOLC_SECRETKEY="", HOME=str(tmp_path)
    )
    assert code == 1
    assert "VOLC_ACCESSKEY" in err and "credentials" in err
    assert emulator.stats_snapshot()["total_requests"] == 0


def single(key: TaskKey, duration: int) -> str:
    ids = f'AppId: "{key.app_id}"\nRoomId: "{key.room_id}"\nTaskId: "{key.task_id}"\n'
    return ids + f"Duration: {duration}\n"


def test_bad_input_fails_and_waits_for_a_new_spec(tmp_path: Path, make_emulator: object) -> None:
    h = make_emulator(app_ids=frozenset({APP}))  # type: ignore[operator]
    stranger = TaskKey("ffff0000aaaa1111", "room-x", "seg")
    start(h, A)
    write(
        tmp_path / "desired",
        "a.yaml",
        tasks_yaml(APP, [{"RoomId": A.room_id, "TaskId": A.task_id, "Duration": 40}]),
    )
    write(
        tmp_path / "desired",
        "stranger.yaml",
        single(stranger, 40),
    )
    code, out, err = apply(tmp_path, h)
    assert code == 1, "a refused first-contact read fails the run, as a refused call would"
    assert f"refused: {stranger}: InvalidParameter.NotExistAppId" in err and "1 synced" in out
    refused = h.stats_snapshot()["by_action"]
    assert "InvalidParameter.NotExistAppId" not in refused["UpdateSegment"], "no call sent"
    assert refused["GetSegmentTask"]["InvalidParameter.NotExistAppId"] == 1
    row = status(tmp_path)[stranger]
    assert row["status"] == "Failed" and row["failed_spec"]

    # Same spec: blocked, no call; the plan says why.
    sent = h.stats_snapshot()["total_requests"]
    plan = run_cli("plan", "desired", "--state", "state.db", cwd=tmp_path)
    assert "blocked" in plan.stdout and "bad input" in plan.stdout
    code, out, _ = apply(tmp_path, h)
    assert h.stats_snapshot()["total_requests"] == sent

    # A new spec is tried again.
    write(
        tmp_path / "desired",
        "stranger.yaml",
        single(stranger, 41),
    )
    apply(tmp_path, h)
    assert h.stats_snapshot()["total_requests"] == sent + 1


def test_a_call_in_doubt_is_read_back_not_sent_again(tmp_path: Path, make_emulator: object) -> None:
    """The connection drops after the server applied the call: read it, send nothing more."""
    h = make_emulator(drop_rate=1.0, drop_phase="after")  # type: ignore[operator]
    start(h, A)
    write(
        tmp_path / "desired",
        "a.yaml",
        tasks_yaml(APP, [{"RoomId": A.room_id, "TaskId": A.task_id, "Duration": 44}]),
    )
    proc = subprocess.Popen(
        # --no-refresh: every request is dropped, and this is about the call, not a read.
        reconciler_cmd(
            "apply", "desired", "--state", "state.db", "--endpoint", h.url, "--no-refresh"
        ),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The call is applied and its answer lost (and maybe a read back's). Then it heals.
    wait_for(lambda: h.stats_snapshot()["dropped"] >= 2, timeout=20, interval=0.005)
    h.set_faults(drop_rate=0.0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "1 synced" in out
    live = h.live(A)
    assert live is not None and live.duration == 44
    assert live.update_calls == 1 and live.timer_restarts == 1, "never sent twice"
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    unknown = [e["action"] for e in events if e["event"] == "call.outcome_unknown"]
    assert unknown.count("UpdateSegment") == 1 and unknown[0] == "UpdateSegment", unknown
    (back,) = [e for e in events if e["event"] == "call.read_back"]
    assert back["outcome"] == "confirmed"
    (synced,) = [e for e in events if e["event"] == "task.synced"]
    assert synced["confirmed_by_read"] is True
    assert status(tmp_path)[A]["status"] == "Synced"
