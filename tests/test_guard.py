"""The forgetting guard: a recorded tree root, and no mass forget without being told.

The CLI and the daemon run as subprocesses against the emulator on loopback,
on real trees and real state stores; the pure checks are tested directly.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from reconciler.core.guard import ForgetLimit, check_forgets, parse_max_forget
from reconciler.core.plan import Forget, Plan
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.store.base import Store
from tests.conftest import run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"


def declare(root: Path, rel: str, rooms: list[str], *, duration: int = 30) -> list[TaskKey]:
    rows = [{"RoomId": r, "TaskId": "seg", "Duration": duration} for r in rooms]
    write(root, rel, tasks_yaml(APP, rows))
    return [TaskKey(APP, r, "seg") for r in rooms]


def start(h: EmulatorHandle, keys: list[TaskKey]) -> None:
    for k in keys:
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)


def recorded(tmp_path: Path) -> tuple[str | None, set[TaskKey]]:
    with Store.open(tmp_path / "state.db", create=False, read_only=True) as store:
        return store.tree_root(), set(store.applied())


def cli(tmp_path: Path, *args: str | Path, endpoint: str | None = None) -> tuple[int, str, str]:
    extra: tuple[str, ...] = ("--endpoint", endpoint) if endpoint else ()
    if not endpoint and args[0] == "plan":
        extra = ("--no-refresh",)  # these plans are about the store's records, not live
    r = run_cli(*args, "--state", "state.db", *extra, cwd=tmp_path)
    return r.returncode, r.stdout, r.stderr


# -- the tree root -------------------------------------------------------------------


def test_the_store_remembers_its_tree_and_refuses_another(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    desired = tmp_path / "desired"
    keys = declare(desired, "edu/a.yaml", ["e1", "e2", "e3"]) + declare(
        desired, "voice/b.yaml", ["v1", "v2", "v3"]
    )
    start(emulator, keys)
    assert cli(tmp_path, "plan", "desired")[0] == 0
    assert not (tmp_path / "state.db").exists(), "plan records nothing"
    code, _, err = cli(tmp_path, "apply", "desired", endpoint=emulator.url)
    assert code == 0, err
    assert recorded(tmp_path)[0] == str(desired), "apply records the root on first use"

    code, out, err = cli(tmp_path, "plan", "desired/edu")
    assert code == 1 and out == ""
    assert str(desired) in err and str(desired / "edu") in err and "state.db" in err
    assert "--allow-root-change" in err and "Traceback" not in err
    assert cli(tmp_path, "plan", "./desired", "--detailed-exitcode")[0] == 0, "same root"

    code, out, err = cli(tmp_path, "plan", "desired/edu", "--allow-root-change")
    assert code == 0, err
    assert "3 tasks forgotten" in out and "warning" in err
    assert recorded(tmp_path)[0] == str(desired), "plan stays read-only"

    calls = emulator.stats_snapshot()["total_requests"]
    write(
        desired, "edu/a.yaml", tasks_yaml(APP, [{"RoomId": "e1", "TaskId": "seg", "Duration": 9}])
    )
    code, _, err = cli(tmp_path, "apply", "desired/edu", endpoint=emulator.url)
    assert code == 1 and str(desired / "edu") in err
    code, _, err = cli(
        tmp_path,
        "run",
        "desired/edu",
        "--emulator",
        "--emulator-port",
        "0",
        "--health-port",
        "0",
    )
    assert code == 1 and str(desired) in err and str(desired / "edu") in err
    assert emulator.stats_snapshot()["total_requests"] == calls, "refused before any call"
    assert recorded(tmp_path) == (str(desired), set(keys))

    code, _, err = cli(
        tmp_path, "apply", "desired/edu", "--allow-root-change", endpoint=emulator.url
    )
    assert code == 0, err
    root, known = recorded(tmp_path)
    assert root == str(desired / "edu") and known == {TaskKey(APP, "e1", "seg")}
    assert cli(tmp_path, "plan", "desired")[0] == 1, "the old root is now the other one"


def test_a_git_sync_link_is_one_root_whatever_it_points_at(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rev1, rev2 = tmp_path / "revs" / "rev1", tmp_path / "revs" / "rev2"
    keys = declare(rev1, "a.yaml", ["r1", "r2"], duration=30)
    declare(rev2, "a.yaml", ["r1", "r2"], duration=31)
    start(emulator, keys)
    os.symlink(rev1, tmp_path / "desired")
    assert cli(tmp_path, "apply", "desired", endpoint=emulator.url)[0] == 0
    assert recorded(tmp_path)[0] == str(tmp_path / "desired"), "the link, not rev1"
    link = tmp_path / "desired.tmp"
    os.symlink(rev2, link)
    os.replace(link, tmp_path / "desired")
    code, out, err = cli(tmp_path, "plan", "desired", "--detailed-exitcode")
    assert code == 2, err
    assert "Duration = 30 → 31" in out


# -- mass forgets ----------------------------------------------------------------------


def test_plan_and_apply_refuse_a_mass_forget_until_told(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    desired = tmp_path / "desired"
    big = declare(desired, "big.yaml", [f"b{i}" for i in range(8)])
    keep = declare(desired, "keep.yaml", ["k1", "k2"])
    start(emulator, big + keep)
    assert cli(tmp_path, "apply", "desired", endpoint=emulator.url)[0] == 0

    (desired / "big.yaml").unlink()
    declare(desired, "keep.yaml", ["k1", "k2"], duration=45)
    code, out, err = cli(tmp_path, "plan", "desired", "--detailed-exitcode")
    assert code == 1, "an error, not 'calls pending'"
    assert "REFUSED" in out and "8 tasks forgotten (refused)" in out
    assert "refusing to forget 8 of 10 known tasks" in err and "--allow-mass-forget" in err
    code, out, _ = cli(tmp_path, "plan", "desired", "-o", "json")
    doc = json.loads(out)
    assert code == 1 and doc["summary"]["tasks_forgotten"] == 8
    assert doc["refusals"] == [
        {
            "code": "MassForget",
            "message": doc["refusals"][0]["message"],
            "forget": 8,
            "known": 10,
            "allowed": 5,
            "max_forget": "10%",
        }
    ]
    assert cli(tmp_path, "plan", "desired", "--max-forget", "80%")[0] == 0

    calls = emulator.stats_snapshot()["total_requests"]
    code, _, err = cli(tmp_path, "apply", "desired", endpoint=emulator.url)
    assert code == 1 and "nothing was applied" in err
    assert emulator.stats_snapshot()["total_requests"] == calls, "not even the other calls"
    assert recorded(tmp_path)[1] == set(big + keep)

    code, out, err = cli(tmp_path, "apply", "desired", "--allow-mass-forget", endpoint=emulator.url)
    assert code == 0, err
    assert recorded(tmp_path)[1] == set(keep)
    live = emulator.live(keep[0])
    assert live is not None and live.duration == 45


def test_max_forget_must_be_a_share(tmp_path: Path) -> None:
    declare(tmp_path / "desired", "a.yaml", ["r1"])
    for bad, says in (("25", "write 25% for a percentage"), ("ten", "not a percentage")):
        code, _, err = cli(tmp_path, "plan", "desired", "--max-forget", bad)
        assert code == 1 and says in err and "Traceback" not in err


def test_limits_fractions_and_the_floor() -> None:
    assert parse_max_forget("10%") == 0.1
    assert parse_max_forget(" 2.5 % ") == 0.025
    assert parse_max_forget("0.25") == 0.25
    assert parse_max_forget("100%") == 1.0
    for bad in ("101%", "1.5", "-1%", "", "10 percent"):
        with pytest.raises(ValueError):
            parse_max_forget(bad)
    limit = ForgetLimit()
    assert str(limit) == "10%"
    assert limit.allowed(3) == 5, "a small store may lose one task of three"
    assert limit.allowed(50) == 5 and limit.allowed(70) == 7 and limit.allowed(100_000) == 10_000

    def forgetting(n: int) -> Plan:
        return Plan(
            forgotten=tuple(Forget(TaskKey("a", f"r{i}", "t"), None, "x") for i in range(n))
        )

    assert check_forgets(forgetting(3), known=3, limit=limit) is None
    assert check_forgets(forgetting(7), known=70, limit=limit) is None
    refusal = check_forgets(forgetting(8), known=70, limit=limit)
    assert refusal is not None and (refusal.forget, refusal.known, refusal.allowed) == (8, 70, 7)
    assert "refusing to forget 8 of 70 known tasks (11%)" in str(refusal)
    assert check_forgets(forgetting(70), known=70, limit=ForgetLimit(1.0)) is None


def test_the_daemon_holds_a_mass_forget_and_keeps_reconciling(tmp_path: Path) -> None:
    desired = tmp_path / "desired"
    declare(desired, "big.yaml", [f"b{i}" for i in range(8)])
    declare(desired, "keep.yaml", ["k1", "k2"])
    big_text = (desired / "big.yaml").read_text()
    d = DaemonProcess(
        tmp_path,
        *("desired", "--emulator", "--emulator-port", "0", "--health-port", "0"),
        *("--state", "state.db", "--resync", "3600"),
    )
    with d:
        d.wait_ready()
        assert d.health("/readyz").text == "ready\n"

        (desired / "big.yaml").unlink()
        (refused,) = d.wait_event("plan.mass_forget_refused")
        assert (refused["forget"], refused["known"], refused["allowed"]) == (8, 10, 5)
        assert refused["level"] == "error" and refused["max_forget"] == "10%"
        ready = d.health("/readyz")
        assert ready.status_code == 200
        assert ready.text.startswith("ready, degraded: refusing to forget 8 of 10 known tasks")
        assert d.metric("reconciler_forget_refused_tasks") == 8

        declare(desired, "keep.yaml", ["k1", "k2"], duration=45)
        k1 = (APP, "k1", "seg")
        wait_for(lambda: d.live_tasks()[k1]["Duration"] == 45)

        write(desired, "big.yaml", big_text)
        d.wait_event("plan.mass_forget_cleared")
        assert d.health("/readyz").text == "ready\n"
        assert d.metric("reconciler_forget_refused_tasks") == 0
        assert not d.events("task.forgotten"), "nothing was forgotten meanwhile"
        assert len(d.events("plan.mass_forget_refused")) == 1, "one error, not one per event"
        assert d.stop(signal.SIGTERM) == 0
    root, known = recorded(tmp_path)
    assert root == str(desired), "run records the root on first use"
    assert len(known) == 10
