"""The plan and apply operations called as functions, without the command line:
typed arguments in, report values out, refusals as exceptions (never an exit).

The emulator answers over loopback HTTP and the store is a real SQLite file; the
view records what the operation showed on the way, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from reconciler.api.client import ClientConfig
from reconciler.core.guard import FORGET_FLOOR, ForgetLimit
from reconciler.core.plan import Plan, Refresh
from reconciler.core.rollout import ChangeControl, Gate
from reconciler.core.task import SyncStatus, TaskKey
from reconciler.core.windows import load_windows_file
from reconciler.emulator import EmulatorHandle
from reconciler.engine import savedplan
from reconciler.engine.clock import Clock
from reconciler.engine.operations.apply import ApplyArgs, apply
from reconciler.engine.operations.common import (
    Guards,
    InvalidTree,
    MassForgetRefused,
    OperationError,
)
from reconciler.engine.operations.plan import PlanArgs, conclude, make_plan_report
from reconciler.engine.reconcile import Outcome, Result
from reconciler.store.base import Store, parse_location
from reconciler.tree.desired import DEFAULT_LIMITS, Problem
from tests.conftest import ACCESS_KEY, SECRET_KEY, tasks_yaml, write

APP = "661e4a7b9c0d1e2f"
ROOMS = [f"room-{i}" for i in range(4)]


class Display:
    """A progress display that keeps what it was told."""

    def __init__(self, shown: list[str]) -> None:
        self.shown = shown

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None:
        return None

    def read(self, state: str | None) -> None:
        self.shown.append(f"read {state}")

    def advance(self, result: Result) -> None:
        self.shown.append(f"result {result.outcome.name}")

    def note(self, text: str) -> None:
        self.shown.append(f"note {text}")


class RecordingView:
    """The apply view (and plan's notices) as a list of lines."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def warning(self, text: str) -> None:
        self.shown.append(f"warning {text}")

    def note(self, text: str) -> None:
        self.shown.append(f"note {text}")

    def say(self, text: str) -> None:
        self.shown.append(f"say {text}")

    def problems(self, root: str, problems: Sequence[Problem]) -> None:
        self.shown.append(f"problems {len(problems)}")

    def read_progress(self, total: int) -> Display:
        self.shown.append(f"reading {total}")
        return Display(self.shown)

    def basis(self, refresh: Refresh) -> None:
        self.shown.append(f"basis {refresh.mode}")

    def plan(self, plan: Plan, *, root: str, gate: Gate) -> None:
        self.shown.append(f"plan {len(plan.calls)} call(s), {len(gate.waiting)} waiting")

    def waiting(self, gate: Gate, *, used_up: bool) -> None:
        self.shown.append(f"waiting {len(gate.waiting)}")

    def applying(self, gate: Gate, *, qps: int) -> None:
        self.shown.append(f"applying {len(gate.send)} at {qps}/s")

    def apply_progress(self, total: int) -> Display:
        return Display(self.shown)


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("VOLC_SESSIONTOKEN", "VOLC_ACCESSKEY", "VOLC_SECRETKEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials file of the machine's user
    monkeypatch.setenv("VOLC_ACCESSKEY", ACCESS_KEY)
    monkeypatch.setenv("VOLC_SECRETKEY", SECRET_KEY)


def desired(tmp_path: Path, rooms: Sequence[str], *, duration: int = 30) -> Path:
    rows = [{"RoomId": r, "TaskId": "seg", "Duration": duration} for r in rooms]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    return tmp_path / "desired"


def duration(h: EmulatorHandle, room: str) -> int:
    live = h.live(TaskKey(APP, room, "seg"))
    assert live is not None
    return live.duration


def updates(h: EmulatorHandle) -> int:
    """UpdateSegment calls the emulator applied, all tasks together."""
    return sum(t.update_calls for t in h.tasks())


def apply_args(tmp_path: Path, h: EmulatorHandle, **given: object) -> ApplyArgs:
    values: dict[str, object] = {
        "target": str(tmp_path / "desired"),
        "state": parse_location(str(tmp_path / "state.db")),
        "guards": Guards(),
        "control": ChangeControl(),
        "client": ClientConfig(endpoint=h.url),
        "limits": DEFAULT_LIMITS,
    }
    values.update(given)
    return ApplyArgs(**values)  # type: ignore[arg-type]


def test_apply_returns_what_it_did_and_shows_the_steps_in_order(
    tmp_path: Path, emulator: EmulatorHandle, creds: None
) -> None:
    desired(tmp_path, ROOMS)
    for room in ROOMS:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    view = RecordingView()

    outcome = apply(apply_args(tmp_path, emulator), view=view)

    assert outcome.report is not None
    assert outcome.report.count(Outcome.SYNCED) == len(ROOMS)
    assert outcome.report.ok
    assert [k.room_id for k in sorted(c.key for c in outcome.plan.calls)] == ROOMS
    # The reads first (each task never confirmed), then the held calls, the start, the results.
    steps = [line.split(" ")[0] for line in view.shown]
    assert steps[:2] == ["say", "reading"]
    after_reads = steps[steps.index("waiting") :]
    assert after_reads == ["waiting", "applying", *["result"] * len(ROOMS)]
    assert f"applying {len(ROOMS)} at 150/s" in view.shown
    for room in ROOMS:
        assert duration(emulator, room) == 30

    again = RecordingView()
    second = apply(apply_args(tmp_path, emulator), view=again)
    assert second.report is None  # nothing to send: the plan is shown instead
    assert "plan 0 call(s), 0 waiting" in again.shown


def test_a_refusal_is_an_exception_and_nothing_is_sent(
    tmp_path: Path, emulator: EmulatorHandle, creds: None
) -> None:
    rooms = [f"room-{i}" for i in range(FORGET_FLOOR + 3)]
    desired(tmp_path, rooms)
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    apply(apply_args(tmp_path, emulator), view=RecordingView())
    calls = updates(emulator)
    desired(tmp_path, rooms[:1], duration=40)  # all but one forgotten, and that one changed
    guards = Guards(max_forget=ForgetLimit(0.1))

    with pytest.raises(MassForgetRefused) as refused:
        apply(apply_args(tmp_path, emulator, guards=guards), view=RecordingView())

    assert refused.value.refusal.forget == len(rooms) - 1
    assert "nothing was applied" in refused.value.message
    assert updates(emulator) == calls
    with Store.open(parse_location(str(tmp_path / "state.db")), create=False) as store:
        assert store.counts()[SyncStatus.SYNCED] == len(rooms)

    write(tmp_path, "desired/b.yaml", "tasks: [\n")
    with pytest.raises(InvalidTree) as invalid:
        apply(apply_args(tmp_path, emulator), view=RecordingView())
    assert invalid.value.problems and "nothing was planned" in invalid.value.message
    assert isinstance(invalid.value, OperationError)


def test_the_clock_is_an_argument_a_window_holds_calls_at_the_time_given(
    tmp_path: Path, emulator: EmulatorHandle, creds: None
) -> None:
    desired(tmp_path, ROOMS[:2])
    for room in ROOMS[:2]:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    (tmp_path / "w.yaml").write_text(
        'windows:\n  - name: freeze\n    kind: deny\n    schedule: "0 4 * * *"\n    duration: 1h\n'
    )
    control = ChangeControl(windows=load_windows_file(tmp_path / "w.yaml"))

    def at(hour: int) -> float:
        return datetime(2026, 12, 1, hour, 30, tzinfo=UTC).timestamp()

    view = RecordingView()
    held = apply(
        apply_args(tmp_path, emulator, control=control, clock=Clock(wall=lambda: at(4))), view=view
    )
    assert held.report is None
    assert "plan 2 call(s), 2 waiting" in view.shown
    assert updates(emulator) == 0

    sent = apply(
        apply_args(tmp_path, emulator, control=control, clock=Clock(wall=lambda: at(5))), view=view
    )
    assert sent.report is not None and sent.report.count(Outcome.SYNCED) == 2


def test_plan_reports_then_concludes_by_saving_what_apply_will_make(
    tmp_path: Path, emulator: EmulatorHandle, creds: None
) -> None:
    root = desired(tmp_path, ROOMS)
    for room in ROOMS:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    args = PlanArgs(
        directory=root,
        state=parse_location(str(tmp_path / "state.db")),
        save=tmp_path / "plan.json",
        guards=Guards(),
        control=ChangeControl(),
        client=ClientConfig(endpoint=emulator.url),
        limits=DEFAULT_LIMITS,
    )
    view = RecordingView()

    report = make_plan_report(args, notices=view)

    assert view.shown[0].startswith("note no state store at")
    assert len(report.plan.calls) == len(ROOMS)
    assert report.forget_refusal is None and report.gate.mass_change is None
    assert not (tmp_path / "plan.json").exists()  # saved only once the plan was shown
    saved = conclude(report, args, notices=view)
    assert saved.path == tmp_path / "plan.json"
    assert len(savedplan.load(tmp_path / "plan.json").plan["calls"]) == len(ROOMS)
    assert not (tmp_path / "state.db").exists()  # a dry run creates no store

    outcome = apply(apply_args(tmp_path, emulator, target=str(tmp_path / "plan.json")), view=view)
    assert outcome.report is not None and outcome.report.count(Outcome.SYNCED) == len(ROOMS)
    assert all(duration(emulator, room) == 30 for room in ROOMS)
