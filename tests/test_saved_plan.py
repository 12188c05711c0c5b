"""Saved plans: ``plan --save FILE``, then ``apply FILE`` makes exactly its calls or refuses.

The CLI runs as a subprocess against the emulator on loopback, with a real
SQLite store; the stale checks are the refusals users will meet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import SETTLE_S, compute_plan
from reconciler.core.task import DesiredTask, Source, TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.engine import savedplan
from reconciler.engine.savedplan import StoreStamp, TreeDigest
from reconciler.store.base import Store
from tests.conftest import run_cli, tasks_yaml, write

APP = "661e4a7b9c0d1e2f"
A = TaskKey(APP, "lecture-101", "seg-main")
B = TaskKey(APP, "lecture-102", "seg-main")
FILE = "edu/lectures.yaml"


def tree(tmp_path: Path, *, a: int, b: int) -> Path:
    root = tmp_path / "desired"
    tasks = [
        {"RoomId": A.room_id, "TaskId": A.task_id, "Duration": a},
        {"RoomId": B.room_id, "TaskId": B.task_id, "Duration": b},
    ]
    write(root, FILE, tasks_yaml(APP, tasks))
    return root


def cli(tmp_path: Path, h: EmulatorHandle, *args: str) -> tuple[int, str, str]:
    r = run_cli(*args, "--endpoint", h.url, cwd=tmp_path)
    return r.returncode, r.stdout, r.stderr


def updates(h: EmulatorHandle) -> int:
    """UpdateSegment requests the emulator saw, whatever their answer."""
    return sum(h.stats_snapshot()["by_action"].get("UpdateSegment", {}).values())


def started(h: EmulatorHandle) -> None:
    for k in (A, B):
        h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)


def test_apply_file_makes_exactly_the_saved_calls_then_the_plan_is_stale(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    started(emulator)
    tree(tmp_path, a=30, b=30)
    code, _, err = cli(tmp_path, emulator, "apply", "desired", "--state", "s.db")
    assert code == 0, err
    tree(tmp_path, a=45, b=30)
    code, out, err = cli(
        tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "p.json"
    )
    assert code == 0, err
    assert "Saved the plan to p.json" in err and "Duration" in out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["kind"] == "reconciler/saved-plan" and doc["root"] == "desired"
    assert list(doc["tree"]["files"]) == [FILE]
    assert doc["state"]["lineage"] and doc["state"]["generation"] > 0
    (call,) = doc["plan"]["calls"]
    assert call["body"] == {**A.identity(), "Duration": 45}
    before = emulator.stats_snapshot()["total_requests"]

    code, out, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 0, err
    assert "1 synced" in out
    assert emulator.stats_snapshot()["total_requests"] == before + 1, "exactly the saved call"
    live_a, live_b = emulator.live(A), emulator.live(B)
    assert live_a is not None and live_a.duration == 45
    assert live_b is not None and live_b.update_calls == 1, "B was in sync: only its first sync"

    # Applied once: the store moved on, so the same file is refused and sends nothing.
    code, out, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 1
    assert "plan p.json is stale: the state store s.db changed since: generation" in err
    assert "Nothing was applied" in err and "Traceback" not in err
    assert emulator.stats_snapshot()["total_requests"] == before + 1


def test_a_changed_tree_or_another_store_makes_the_plan_stale_and_says_which(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    started(emulator)
    root = tree(tmp_path, a=30, b=30)
    # No store yet: the first apply creates it, and the plan still holds.
    assert cli(tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "p.json")[0] == 0
    assert cli(tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "q.json")[0] == 0
    write(root, "edu/new.yaml", tasks_yaml(APP, [{"RoomId": "r9", "TaskId": "t9"}]))
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 1
    assert "the desired tree changed since: 1 added (edu/new.yaml)" in err
    assert updates(emulator) == 0, "plan read the two first-contact tasks, and nothing was sent"
    (root / "edu/new.yaml").unlink()
    code, out, err = cli(tmp_path, emulator, "apply", "q.json", "--state", "s.db")
    assert code == 0 and "2 synced" in out, err

    assert cli(tmp_path, emulator, "apply", "desired", "--state", "t.db")[0] == 0
    tree(tmp_path, a=50, b=30)
    assert cli(tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "p.json")[0] == 0
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "t.db")
    assert code == 1
    assert "the state store t.db is not the one it was made from" in err
    assert "(the plan used --state s.db)" in err
    tree(tmp_path, a=51, b=30)
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 1 and f"1 changed ({FILE})" in err


def test_an_edited_or_broken_plan_file_is_refused_clearly(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    started(emulator)
    tree(tmp_path, a=30, b=30)
    assert cli(tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "p.json")[0] == 0
    path = tmp_path / "p.json"
    doc = json.loads(path.read_text())
    doc["plan"]["calls"][0]["body"]["Duration"] = 7200  # not what was reviewed
    path.write_text(json.dumps(doc))
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 1 and "it no longer computes the same calls" in err
    assert '"Duration": 7200' in err

    path.write_text('{"kind": "reconciler/saved-plan",\n  "format_version": 1,,}')
    code, _, err = cli(tmp_path, emulator, "apply", "p.json")
    assert code == 1 and "p.json:2:23: not a saved plan: invalid JSON" in err
    path.write_text(json.dumps({"kind": "reconciler/saved-plan", "format_version": 1}))
    code, _, err = cli(tmp_path, emulator, "apply", "p.json")
    assert code == 1 and "p.json: a damaged saved plan: missing 'tree'" in err
    good = json.loads(json.dumps(doc))
    for damage, said in (
        ({"tree": {"files": [], "sha256": ""}}, "tree.files is list"),
        ({"plan": {"calls": None}}, "plan.calls is null"),
        ({"plan": {"calls": ["x"]}}, "plan.calls[0] is not an object"),
        ({"root": None}, "root is null"),
    ):
        path.write_text(json.dumps({**good, **damage}))
        code, _, err = cli(tmp_path, emulator, "apply", "p.json")
        assert code == 1 and f"p.json: a damaged saved plan: {said}" in err, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path.write_text(json.dumps(good))
    code, _, err = cli(elsewhere, emulator, "apply", str(path))
    assert code == 1 and "the tree of plan" in err and f"run it where plan ran ({tmp_path})" in err
    path.write_text("{}")
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--drift", "report")
    assert code == 1 and "--drift shapes a plan" in err
    code, _, err = cli(tmp_path, emulator, "plan", "desired", "--base", "desired", "--save", "x")
    assert code == 1 and "--base has none" in err
    assert updates(emulator) == 0


def test_a_refused_plan_is_not_saved(tmp_path: Path, emulator: EmulatorHandle) -> None:
    rooms = [f"room-{i}" for i in range(10)]
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    root = tmp_path / "desired"
    write(
        root,
        FILE,
        tasks_yaml(APP, [{"RoomId": r, "TaskId": "seg"} for r in rooms], {"Duration": 30}),
    )
    assert cli(tmp_path, emulator, "apply", "desired", "--state", "s.db")[0] == 0
    write(
        root,
        FILE,
        tasks_yaml(APP, [{"RoomId": r, "TaskId": "seg"} for r in rooms], {"Duration": 31}),
    )
    code, _, err = cli(tmp_path, emulator, "plan", "desired", "--state", "s.db", "--save", "p.json")
    assert code == 1 and "--allow-mass-change" in err
    assert not (tmp_path / "p.json").exists()
    code, _, err = cli(
        tmp_path,
        emulator,
        "plan",
        "desired",
        "--state",
        "s.db",
        "--save",
        "p.json",
        "--allow-mass-change",
    )
    assert code == 0 and (tmp_path / "p.json").exists(), err


def test_a_refreshed_plan_keeps_its_observations_and_heals_a_restart(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    started(emulator)
    tree(tmp_path, a=30, b=30)
    assert cli(tmp_path, emulator, "apply", "desired", "--state", "s.db")[0] == 0
    time.sleep(SETTLE_S)  # a read within the settle window after our call never counts
    emulator.restart_task(A)
    code, out, err = cli(
        tmp_path, emulator, "plan", "desired", "--state", "s.db", "--refresh", "--save", "p.json"
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "p.json").read_text())
    assert {o["task"]["RoomId"] for o in doc["observations"]} == {A.room_id, B.room_id}
    (call,) = doc["plan"]["calls"]
    assert call["task"]["RoomId"] == A.room_id and call["basis"] == "live"
    code, out, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 0 and "1 synced" in out, err
    live = emulator.live(A)
    assert live is not None and live.duration == 30


def test_a_saved_read_never_replaces_a_newer_one_in_the_store(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    started(emulator)
    tree(tmp_path, a=30, b=30)
    assert cli(tmp_path, emulator, "apply", "desired", "--state", "s.db")[0] == 0
    args = ("--state", "s.db", "--refresh")
    assert cli(tmp_path, emulator, "plan", "desired", *args, "--save", "p.json")[0] == 0
    assert cli(tmp_path, emulator, "apply", "desired", *args)[0] == 0  # reads again, sends nothing
    with Store.open(tmp_path / "s.db", read_only=True) as store:
        newer = store.observations()
    code, _, err = cli(tmp_path, emulator, "apply", "p.json", "--state", "s.db")
    assert code == 0, err
    with Store.open(tmp_path / "s.db", read_only=True) as store:
        assert store.observations() == newer
    saved = json.loads((tmp_path / "p.json").read_text())["observations"]
    assert all(o["observed_at"] < newer[A].observed_at for o in saved)


def test_round_trip_and_staleness_are_pure() -> None:
    task = DesiredTask(A, None, {"Duration": 45}, Source(FILE, 3, 5))
    obs = Observation(
        A, 1.5e9, LiveStatus.RUNNING, start_time_ms=7, status=2, fields={"Duration": 9}
    )
    plan = compute_plan({A: task}, {}, observations={A: obs})
    digest = TreeDigest({FILE: "ab" * 32})
    stamp = StoreStamp("s.db", "f" * 32, 4)
    saved = savedplan.make(
        plan, root="desired", tree=digest, store=stamp, drift="heal", observations={A: obs}
    )
    doc: dict[str, Any] = json.loads(json.dumps(saved.to_json()))
    again = savedplan._from_json(doc)
    assert again == saved
    assert savedplan.tree_staleness(saved, digest) == []
    assert savedplan.store_staleness(saved, stamp, store_is_new=False) == []
    assert savedplan.different_calls(saved, plan) == []
    moved = StoreStamp("s.db", "f" * 32, 5)
    (reason,) = savedplan.store_staleness(saved, moved, store_is_new=False)
    assert "generation 5, the plan was made at 4" in reason
    assert savedplan.different_calls(saved, compute_plan({}, {})) == [
        f"{A}: the saved call is no longer needed"
    ]
