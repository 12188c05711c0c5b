"""The daemon's change control, driven directly: :class:`Admission` on a clock the test moves.

Real parts: plans from the planner (``compute_plan``) over desired tasks and
the records of a real SQLite store (the daemon's :class:`Recorder`), the
events read from structlog as the daemon emits them. The clock is two
numbers the test advances, so windows opening, the cap's next token and the
settle window cost no sleep. What the daemon's queue would be asked to do
is kept in lists (the callbacks the daemon hands in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reconciler.core.errors import BadInputError
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import Plan, compute_plan
from reconciler.core.rollout import ChangeControl, ChangeLimit, Reason
from reconciler.core.task import DesiredTask, Source, TaskKey
from reconciler.core.windows import SyncWindow, SyncWindows
from reconciler.engine.admission import Admission
from reconciler.engine.clock import Clock, Moment
from reconciler.engine.reconcile import Outcome, Result
from reconciler.eventlog import setup as events
from reconciler.store.base import Store
from reconciler.store.recorder import Recorder

APP = "661e4a7b9c0d1e2f"
SETTLE_S = 2.0
#: A Tuesday, 11:00 in Shanghai; 03:00 UTC.
T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def key(room: str) -> TaskKey:
    return TaskKey(APP, room, "seg")


def task(room: str, duration: int, *, path: str = "prod/a.yaml") -> DesiredTask:
    return DesiredTask(key(room), None, {"Duration": duration}, Source(path, 1, 1))


@dataclass
class FakeClock:
    """Both clocks, moved by the test."""

    wall: float = T0.timestamp()
    monotonic: float = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds

    @property
    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall, monotonic=lambda: self.monotonic)

    def now(self) -> Moment:
        return self.clock.now()


@dataclass
class Bench:
    """An :class:`Admission` over a real store, and what it asked of the queue."""

    recorder: Recorder
    control: ChangeControl
    desired: dict[TaskKey, DesiredTask] = field(default_factory=dict)
    clock: FakeClock = field(default_factory=FakeClock)
    woken: list[TaskKey] = field(default_factory=list)
    woken_after: list[tuple[TaskKey, float]] = field(default_factory=list)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(
            control=self.control,
            desired=lambda: self.desired,
            records=self.recorder,
            log=events.get_logger(),
            wake=self.woken.extend,
            wake_after=lambda k, after: self.woken_after.append((k, after)),
            settle_s=SETTLE_S,
            root="desired",
        )

    def declare(self, *tasks: DesiredTask) -> None:
        self.desired.update({t.key: t for t in tasks})

    def applied(self, *tasks: DesiredTask) -> None:
        """``tasks`` as the server confirmed them (and the desired tree says)."""
        self.declare(*tasks)
        for t in tasks:
            self.recorder.success(t, request_id=f"req-{t.key.room_id}")

    def plan(self, keys: Iterable[TaskKey] | None = None) -> Plan:
        # Planned from the records alone (no first read before a first sync): the
        # canary's reads reach Admission through the recorder, as the daemon's do.
        return compute_plan(self.desired, self.recorder.applied, only=keys, settle_s=SETTLE_S)

    def note_all(self) -> None:
        self.admission.replanning()
        asyncio.run(self.admission.note_all(self.plan(), None, clock=self.clock.now))

    def admit(self, room: str) -> Any:
        """What a worker does with ``room``: plan it, note it, ask to send its call."""
        plan = self.plan([key(room)])
        now = self.clock.now()
        self.admission.note(plan, [key(room)], now)
        assert plan.calls, f"{room} has nothing to send"
        return self.admission.admit(plan, now)

    def sent(self, room: str, outcome: Outcome = Outcome.SYNCED) -> None:
        """``room``'s call was answered: recorded, reported, noted (nothing left to send)."""
        t = self.desired[key(room)]
        error = None
        if outcome is Outcome.SYNCED:
            self.recorder.success(t, request_id="req")
        else:
            error = BadInputError(
                action="UpdateSegment", code="InvalidParameter", message="refused", request_id="req"
            )
            self.recorder.failure(t, error, terminal=True)
        now = self.clock.now()
        self.admission.after_call(Result(t.key, outcome, error=error), now)
        self.admission.note(self.plan([t.key]), [t.key], now)

    def read(self, room: str, *, live: dict[str, Any] | None = None) -> None:
        """A read of ``room`` after its settle window, showing ``live`` (default: desired)."""
        t = self.desired[key(room)]
        record = self.recorder.applied[t.key]
        assert record.applied_at is not None
        obs = Observation(
            t.key,
            observed_at=record.applied_at + SETTLE_S + 1.0,
            state=LiveStatus.RUNNING,
            start_time_ms=1,
            status=1,
            fields=dict(t.fields) if live is None else live,
        )
        self.recorder.observed(obs)
        now = self.clock.now()
        self.admission.note(self.plan([t.key]), [t.key], now)
        self.admission.after_read(t.key, now)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state.db", create=True) as s:
        yield s


def bench(store: Store, control: ChangeControl) -> Bench:
    return Bench(recorder=Recorder(store), control=control)


def named(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- sync windows -------------------------------------------------------------------------


def test_a_deny_window_holds_a_change_until_it_closes_told_once(store: Store) -> None:
    freeze = SyncWindow(
        kind="deny",
        schedule="0 9 * * 1-5",
        duration=timedelta(hours=9),
        timezone="Asia/Shanghai",
        paths=("prod/**",),
        name="business-hours",
    )
    b = bench(store, ChangeControl(windows=SyncWindows((freeze,))))
    b.applied(task("r1", 30), task("r2", 30, path="dev/a.yaml"))
    b.declare(task("r1", 60), task("r2", 60, path="dev/a.yaml"), task("new", 60))
    closes = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # 18:00 in Shanghai
    with capture_logs() as logs:
        wait = b.admit("r1")
        again = b.admit("r1")
    assert wait is not None and wait.reason is Reason.WINDOW and wait.until == closes
    assert again == wait and b.admission.waiting_counts()["window"] == 1
    (told,) = named(logs, "task.waiting")  # once per window opening, not per try
    assert told["reason"] == "window" and told["windows"] == ["business-hours"]
    assert told["until"] == closes.isoformat() and told["room_id"] == "r1"
    # Woken just after the window closes, by the queue's timer: 7 h from now.
    woken, after = b.woken_after[-1]
    assert woken == key("r1") and after == pytest.approx(7 * 3600 + 0.05)
    assert b.admit("r2") is None, "the window covers prod/** only"
    assert b.admit("new").reason is Reason.WINDOW, "a first sync is a change for windows"

    b.clock.advance(7 * 3600 + 1)
    assert b.admit("r1") is None
    assert b.admission.waiting_counts()["window"] == 1, "only 'new' still waits (not asked again)"
    assert key("r1") not in b.admission.waiting


# --- the mass-change gate -------------------------------------------------------------


def test_a_mass_change_holds_every_change_until_fewer_are_pending(store: Store) -> None:
    b = bench(store, ChangeControl(max_change=ChangeLimit(fraction=0.2, floor=5)))
    rooms = [f"r{i}" for i in range(10)]
    b.applied(*(task(r, 30) for r in rooms))
    b.declare(*(task(r, 60) for r in rooms[:6]))  # 6 of 10: over the floor of 5
    with capture_logs() as logs:
        b.note_all()
    (held,) = named(logs, "plan.mass_change_held")
    assert held["changes"] == 6 and held["known"] == 10 and held["allowed"] == 5
    assert held["root"] == "desired"
    assert b.admission.mass is not None and b.admission.mass_change_held() == 6
    assert any(d.startswith("refusing to change 6 of 10") for d in b.admission.degraded())
    for r in rooms[:6]:
        assert b.admit(r).reason is Reason.MASS_CHANGE
    assert b.admission.waiting_counts()["mass_change"] == 6 and not b.woken_after

    b.declare(task("r5", 30))  # one reverted: 5 pending, within the limit
    with capture_logs() as logs:
        b.admission.note(b.plan([key("r5")]), [key("r5")], b.clock.now())
    (cleared,) = named(logs, "plan.mass_change_cleared")
    assert cleared["changes"] == 5 and b.admission.mass is None
    assert sorted(b.woken) == [key(r) for r in rooms[:5]], "the held changes are queued again"
    assert b.admission.degraded() == [] and b.admission.mass_change_held() == 0
    assert all(b.admit(r) is None for r in rooms[:5])
    assert b.admission.waiting_counts()["mass_change"] == 0


def test_a_whole_replan_keeps_the_newer_note_a_worker_made_meanwhile(store: Store) -> None:
    b = bench(store, ChangeControl(max_change=ChangeLimit(fraction=0.2, floor=5)))
    rooms = [f"r{i}" for i in range(10)]
    b.applied(*(task(r, 30) for r in rooms))
    b.declare(*(task(r, 60) for r in rooms[:6]))
    b.admission.replanning()
    stale = b.plan()  # 6 changes, computed before two of them were reverted
    b.declare(task("r4", 30), task("r5", 30))
    fresh = b.plan([key("r4"), key("r5")])
    b.admission.note(fresh, [key("r4"), key("r5")], b.clock.now())  # a worker, meanwhile
    asyncio.run(b.admission.note_all(stale, None, clock=b.clock.now))
    assert b.admission.mass is None, "4 pending: the stale plan's r4 and r5 are not noted"
    b.admission.replanning()
    asyncio.run(b.admission.note_all(stale, None, clock=b.clock.now))
    assert b.admission.mass is not None, "the same plan, with no newer note, is 6 changes"


# --- the rate cap -----------------------------------------------------------------------


def test_the_rate_cap_spaces_changes_by_the_monotonic_clock(store: Store) -> None:
    b = bench(store, ChangeControl(max_changes_per_minute=2))
    b.applied(task("a", 30), task("b", 30), task("c", 30))
    b.declare(task("a", 60), task("b", 60), task("c", 60))
    assert b.admit("a") is None
    wait = b.admit("b")
    assert wait is not None and wait.reason is Reason.CAP
    assert wait.until == b.clock.now().wall + timedelta(seconds=30)
    third = b.admit("c")
    assert third.until == b.clock.now().wall + timedelta(seconds=60), "behind the one waiting"
    b.clock.advance(30)
    assert b.admit("b") is None and b.admit("c").reason is Reason.CAP
    b.clock.advance(30)
    assert b.admit("c") is None and b.admission.waiting_counts()["cap"] == 0


# --- the canary -------------------------------------------------------------------------


def canary_bench(store: Store) -> tuple[Bench, str, list[str]]:
    """Three applied tasks changed, one canary; the canary and the others' rooms."""
    b = bench(store, ChangeControl(canary=1))
    rooms = ["a", "b", "c"]
    b.applied(*(task(r, 30) for r in rooms))
    b.declare(*(task(r, 60) for r in rooms))
    b.note_all()
    with capture_logs() as logs:
        first = b.admit("a")
    (started,) = named(logs, "rollout.started")
    assert started["changes"] == 3 and len(started["canaries"]) == 1
    rollout = b.admission.rollout
    assert rollout is not None
    (canary,) = [k.room_id for k in rollout.canaries]
    others = [r for r in rooms if r != canary]
    assert (first is None) == (canary == "a")
    for r in others:
        wait = b.admit(r)
        assert wait.reason is Reason.CANARY and "to be observed Synced" in wait.message
    if canary != "a":
        assert b.admit(canary) is None
    return b, canary, others


def test_the_rest_go_once_the_canary_is_observed_synced(store: Store) -> None:
    b, canary, others = canary_bench(store)
    b.sent(canary)
    assert b.admission.rollout is not None and not b.admission.rollout.promoted
    assert not b.woken, "a call that succeeded is not yet a canary that passed"
    with capture_logs() as logs:
        b.read(canary)
    (promoted,) = named(logs, "rollout.promoted")
    assert promoted["canaries"] == [str(key(canary))] and promoted["changes"] == 2
    assert sorted(b.woken) == sorted(key(r) for r in others), "the held changes are queued"
    assert all(b.admit(r) is None for r in others)
    with capture_logs() as logs:
        for r in others:
            b.sent(r)
    assert [e["event"] for e in logs if e["event"].startswith("rollout.")] == ["rollout.completed"]
    assert b.admission.rollout is None and not b.admission.waiting


def test_a_canary_that_fails_holds_the_rest_until_the_spec_changes(store: Store) -> None:
    b, canary, others = canary_bench(store)
    with capture_logs() as logs:
        b.sent(canary, Outcome.FAILED)
    (failed,) = named(logs, "rollout.canary_failed")
    assert failed["held"] == 2 and "its call ended failed" in failed["reason"]
    assert b.admission.canary_failed()
    assert b.admission.waiting_counts()["canary_failed"] == 2
    assert any(
        d.startswith("rollout stopped: canary failed") and "2 changes held" in d
        for d in b.admission.degraded()
    )
    for r in others:
        assert b.admit(r).reason is Reason.CANARY_FAILED, "still held, asked again"
    assert not b.woken

    b.declare(task(canary, 90))  # the fix: the desired spec changes
    with capture_logs() as logs:
        b.admission.note(b.plan([key(canary)]), [key(canary)], b.clock.now())
    assert [e["event"] for e in logs if e["event"].startswith("rollout.")] == ["rollout.cleared"]
    assert b.admission.rollout is None and not b.admission.canary_failed()
    assert sorted(set(b.woken)) == sorted(key(r) for r in others), "queued again"


def test_a_canary_read_showing_other_values_fails_the_rollout(store: Store) -> None:
    b, canary, _ = canary_bench(store)
    b.sent(canary)
    with capture_logs() as logs:
        b.read(canary, live={"Duration": 45})
    (failed,) = named(logs, "rollout.canary_failed")
    assert "live values differ: Duration 45 (desired 60)" in failed["reason"]
    assert b.admission.rollout is not None and b.admission.rollout.failed is not None


def test_a_rollout_of_one_change_ends_with_its_canary_s_read(store: Store) -> None:
    b = bench(store, ChangeControl(canary=1))
    b.applied(task("a", 30))
    b.declare(task("a", 60))
    assert b.admit("a") is None
    b.sent("a")
    with capture_logs() as logs:
        b.read("a")
    assert [e["event"] for e in logs if e["event"].startswith("rollout.")] == [
        "rollout.promoted",
        "rollout.completed",
    ], "nothing else pending: the read that promotes it also ends it"
    assert b.admission.rollout is None
