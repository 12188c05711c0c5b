"""Change control: sync windows, mass changes, the rate cap and canaries.

The decisions are pure (``reconciler.core.windows``, ``reconciler.core.rollout``) and
tested with an injected "now", properties included. End to end: the CLI as a
subprocess against the emulator on loopback, the daemon as a subprocess with
a deny window open for a few seconds from now, and the daemon in-process
(real client, real emulator over HTTP, real SQLite store) with a short settle
window for the canary and mass-change holds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.api.client import ClientConfig, RtcClient
from reconciler.api.credentials import Credentials
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import compute_plan
from reconciler.core.rollout import (
    CanaryState,
    ChangeControl,
    ChangeKind,
    ChangeLimit,
    Reason,
    TokenBucket,
    check_canary,
    choose_canaries,
    gate_plan,
)
from reconciler.core.task import AppliedRecord, DesiredTask, Source, TaskKey
from reconciler.core.windows import (
    SyncWindow,
    SyncWindows,
    WindowConfigError,
    load_windows,
    load_windows_file,
)
from reconciler.emulator import EmulatorHandle
from reconciler.engine.daemon import Daemon, DaemonConfig
from reconciler.engine.metrics import Metrics
from reconciler.engine.reconcile import TaskReconciler
from reconciler.store.base import Store
from reconciler.store.recorder import Recorder
from tests.conftest import (
    ACCESS_KEY,
    REPO,
    SECRET_KEY,
    cli_env,
    run_cli,
    tasks_yaml,
    wait_for,
    write,
)
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"
T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # a Tuesday, 11:00 in Shanghai


def window(**kw: object) -> SyncWindow:
    base: dict[str, object] = {"kind": "deny", "schedule": "0 9 * * 1-5"}
    base.update(kw)
    base.setdefault("duration", timedelta(hours=9))
    return SyncWindow(**base)  # type: ignore[arg-type]


def verdict(windows: list[SyncWindow], *, now: datetime, heal: bool = False, path: str = "a.yaml"):  # type: ignore[no-untyped-def]
    return SyncWindows(tuple(windows)).verdict(app_id=APP, path=path, heal=heal, now=now)


# --- sync windows: pure ---------------------------------------------------------------


def test_deny_holds_changes_while_open_and_says_until_when_in_its_zone() -> None:
    freeze = window(name="business-hours", timezone="Asia/Shanghai")
    held = verdict([freeze], now=T0)
    assert not held.allowed and held.until == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert "deny window 'business-hours' is open" in held.describe()
    assert "2026-12-01 18:00 Asia/Shanghai" in held.describe()
    assert verdict([freeze], now=T0, heal=True).allowed, "heals pass by default"
    assert not verdict([window(timezone="Asia/Shanghai", heals="deny")], now=T0, heal=True).allowed
    assert verdict([freeze], now=T0 + timedelta(hours=7)).allowed, "closed at 18:00 local"
    assert verdict([window(timezone="UTC")], now=T0).allowed, "09:00 UTC is not open yet"


def test_allow_windows_gate_matching_tasks_and_deny_wins() -> None:
    nightly = window(kind="allow", schedule="0 2 * * *", duration=timedelta(hours=1))
    assert verdict([nightly], now=T0 - timedelta(minutes=30)).allowed  # 02:30 UTC
    shut = verdict([nightly], now=T0)
    assert not shut.allowed and "allow window" in shut.describe() and "is closed" in shut.describe()
    assert shut.until == datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    deny = window(schedule="0 2 * * *", duration=timedelta(minutes=30))
    both = verdict([nightly, deny], now=T0 - timedelta(minutes=50))
    assert not both.allowed and both.until == datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    later = verdict([nightly, deny], now=T0)
    assert later.until == datetime(2026, 12, 2, 2, 30, tzinfo=UTC), "past tomorrow's deny"
    prod = window(
        kind="allow",
        schedule="30 2 * * *",
        duration=timedelta(minutes=20),
        paths=("prod/**",),
        apps=("661e*",),
    )
    assert verdict([prod], now=T0, path="dev/a.yaml").allowed, "windows gate only what they match"
    assert not verdict([prod], now=T0, path="prod/x/a.yaml").allowed


def test_daylight_saving_time_is_the_zone_s() -> None:
    berlin = window(schedule="0 9 * * *", duration=timedelta(hours=1), timezone="Europe/Berlin")
    # 29 March 2026: clocks go forward; 09:00 CEST is 07:00 UTC, the day before 08:00 UTC.
    assert not verdict([berlin], now=datetime(2026, 3, 29, 7, 30, tzinfo=UTC)).allowed
    assert verdict([berlin], now=datetime(2026, 3, 28, 7, 30, tzinfo=UTC)).allowed
    assert not verdict([berlin], now=datetime(2026, 3, 28, 8, 30, tzinfo=UTC)).allowed


@settings(max_examples=150, deadline=None)
@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    minutes=st.integers(1, 24 * 60 - 1),
    offset=st.integers(0, 7 * 24 * 3600),
    zone=st.sampled_from(["UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York"]),
)
def test_an_open_deny_window_never_lets_a_change_through(
    minute: int, hour: int, minutes: int, offset: int, zone: str
) -> None:
    w = window(
        schedule=f"{minute} {hour} * * *", duration=timedelta(minutes=minutes), timezone=zone
    )
    now = datetime(2026, 3, 25, tzinfo=UTC) + timedelta(seconds=offset)
    v = verdict([w], now=now)
    assert v.allowed == (w.opened_at(now) is None)
    if not v.allowed:
        assert v.until is not None and v.until > now
        assert w.opened_at(v.until - timedelta(seconds=1)) is not None, "held to the end"
        assert verdict([w], now=v.until).allowed, "and let go when it closes"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("windows:\n  - kind: deny\n    schedul: '0 9 * * *'\n", 3, "did you mean 'schedule'"),
        ("windows:\n  - kind: deny\n    schedule: '0 25 * * *'\n    duration: 1h\n", 3, "cron"),
        ("windows:\n  - kind: deny\n    schedule: '0 9 * *'\n    duration: 1h\n", 3, "5-field"),
        ("windows:\n  - kind: deny\n    schedule: '0 9 * * *'\n    duration: 9 hours\n", 4, "s, m"),
        (
            "windows:\n  - kind: deny\n    schedule: '0 9 * * *'\n    duration: 1h\n"
            "    timezone: Asia/Shangai\n",
            5,
            "IANA",
        ),
        ("windows:\n  - kind: maybe\n    schedule: '0 9 * * *'\n    duration: 1h\n", 2, "allow or"),
        ("windows:\n  - kind: deny\n    duration: 1h\n", 2, "no 'schedule'"),
        ("window:\n  - kind: deny\n", 1, "unknown key 'window'"),
        (
            "windows:\n  - kind: deny\n    schedule: '0 9 * * *'\n    duration: 99999999999d\n",
            4,
            "is longer than 366d",
        ),
    ],
)
def test_a_bad_windows_file_names_the_line_and_the_problem(
    text: str, line: int, words: str
) -> None:
    with pytest.raises(WindowConfigError) as caught:
        load_windows(text, path="w.yaml")
    assert caught.value.line == line and words in str(caught.value)
    assert str(caught.value).startswith(f"w.yaml:{line}: ")


def test_a_run_of_touching_occurrences_ends_where_the_last_one_closes() -> None:
    monday = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    weekdays = window(schedule="* * * * 1-5", duration=timedelta(minutes=1))
    held = verdict([weekdays], now=monday)
    assert held.until == datetime(2026, 12, 12, tzinfo=UTC), "Saturday, 7,000 openings on"
    assert "may go at 2026-12-12 00:00 UTC" in held.describe()
    berlin = window(schedule="* * * * 1-5", duration=timedelta(minutes=1), timezone="Europe/Berlin")
    assert verdict([berlin], now=monday).until == datetime(2026, 12, 11, 23, 0, tzinfo=UTC)
    nightly = window(kind="allow", schedule="0 2 * * *", duration=timedelta(hours=1))
    both = verdict([weekdays, nightly], now=monday)
    assert both.until == datetime(2026, 12, 12, 2, 0, tzinfo=UTC), "the first night it is off"
    # Sundays in Berlin, the day clocks go forward (23 h): it ends at local midnight.
    sundays = window(schedule="* * * * 0", duration=timedelta(minutes=1), timezone="Europe/Berlin")
    spring = verdict([sundays], now=datetime(2026, 3, 29, 10, 0, tzinfo=UTC))
    assert spring.until == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)
    always = window(schedule="* * * * *", duration=timedelta(minutes=1), timezone="Europe/Berlin")
    never = verdict([always], now=monday)
    assert never.until is None and "no opening within 400 days" in never.describe()


def test_the_example_windows_file_loads() -> None:
    windows = load_windows_file(REPO / "deploy" / "sync-windows.example.yaml")
    assert [w.name for w in windows.windows] == [
        "business-hours",
        "voice-chat-nightly",
        "year-end-freeze",
    ]


# --- rollout: pure ---------------------------------------------------------------------


def desired(room: str, duration: int, path: str = "a.yaml") -> DesiredTask:
    return DesiredTask(TaskKey(APP, room, "seg"), None, {"Duration": duration}, Source(path, 1, 1))


def applied(room: str, duration: int | None, **kw: object) -> AppliedRecord:
    fields = None if duration is None else {"Duration": duration}
    return AppliedRecord(TaskKey(APP, room, "seg"), None, fields, source="a.yaml", **kw)  # type: ignore[arg-type]


def test_kinds_mass_change_and_windows_in_one_gate() -> None:
    tasks = {t.key: t for t in (desired(f"r{i}", 60) for i in range(12))}
    records = {k: applied(k.room_id, 30) for k in list(tasks)[:10]}
    plan = compute_plan(tasks, records)
    gate = gate_plan(plan, applied=records, control=ChangeControl(), now=T0)
    kinds = list(gate.kinds.values())
    assert kinds.count(ChangeKind.CHANGE) == 10 and kinds.count(ChangeKind.FIRST) == 2
    assert gate.mass_change is not None and gate.mass_change.allowed == 5
    assert str(gate.mass_change).startswith("refusing to change 10 of 10 applied tasks")
    assert {w.reason for w in gate.waiting} == {Reason.MASS_CHANGE}
    assert len(gate.send) == 2, "first syncs still go"
    allowed = ChangeControl(max_change=ChangeLimit(1.0), canary=3)
    gate = gate_plan(plan, applied=records, control=allowed, now=T0)
    assert gate.mass_change is None and len(gate.send) == 12
    assert gate.canaries == tuple(sorted(tasks)[:3]) and len(gate.after_canaries) == 9
    deny = SyncWindows((window(timezone="Asia/Shanghai"),))
    gate = gate_plan(plan, applied=records, control=ChangeControl(windows=deny), now=T0)
    assert not gate.send and {w.reason for w in gate.waiting} == {Reason.WINDOW}
    forced = ChangeControl(windows=deny, override_window=True, allow_mass_change=True)
    assert len(gate_plan(plan, applied=records, control=forced, now=T0).overridden) == 12


def test_the_token_bucket_spaces_changes_evenly() -> None:
    bucket, now = TokenBucket(10), 0.0
    sent: list[float] = []
    while len(sent) < 5:
        bucket, wait = bucket.take(now)
        if wait:
            now += wait
        else:
            sent.append(now)
    assert sent == pytest.approx([0.0, 6.0, 12.0, 18.0, 24.0])


def test_canaries_pass_only_when_read_back_after_the_settle_window() -> None:
    task = desired("c", 90)
    spec = task.spec_hash()
    record = applied("c", 90, applied_at=100.0)

    def obs(at: float, duration: int = 90, state: LiveStatus = LiveStatus.RUNNING) -> Observation:
        return Observation(task.key, at, state, start_time_ms=1, fields={"Duration": duration})

    def check(**kw: object) -> CanaryState:
        args: dict[str, object] = {"task": task, "record": record, "observation": obs(106.0)}
        args.update(kw)
        return check_canary(task.key, spec, settle_s=5.0, **args).state  # type: ignore[arg-type]

    assert check() is CanaryState.PASSED
    assert check(observation=obs(103.0)) is CanaryState.PENDING, "within the settle window"
    assert check(observation=obs(106.0, duration=30)) is CanaryState.FAILED
    assert check(observation=obs(106.0, state=LiveStatus.ENDED)) is CanaryState.FAILED
    assert check(failure="its call ended failed") is CanaryState.FAILED
    assert check(task=desired("c", 91)) is CanaryState.CHANGED
    assert check(record=applied("c", 60, applied_at=100.0)) is CanaryState.PENDING
    seen = {task.key: obs(1.0)}
    assert choose_canaries([TaskKey(APP, "a", "seg"), task.key], k=1, observations=seen) == (
        task.key,
    ), "a task seen running goes first: it can be read back"


# --- end to end: the CLI ----------------------------------------------------------------


def open_now_for(seconds: float, **extra: str) -> str:
    """A deny window open from the start of this minute until ``seconds`` from now."""
    now = datetime.now(UTC)
    start = now.replace(second=0, microsecond=0)
    length = int((now - start).total_seconds() + seconds) + 1
    lines = [
        "windows:",
        "  - name: freeze",
        "    kind: deny",
        f'    schedule: "{start.minute} {start.hour} * * *"',
        f"    duration: {length}s",
    ]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_plan_shows_waiting_calls_and_refuses_a_mass_change(tmp_path: Path) -> None:
    rooms = [{"RoomId": f"r{i}", "TaskId": "seg", "Duration": 30} for i in range(10)]
    write(tmp_path, "base/a.yaml", tasks_yaml(APP, rooms))
    changed = [{**r, "Duration": 60} for r in rooms]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, changed))
    (tmp_path / "w.yaml").write_text(open_now_for(3600))
    args = ("plan", "desired", "--base", "base", "--sync-windows", "w.yaml")
    r = run_cli(*args, "-o", "json", cwd=tmp_path)
    assert r.returncode == 1 and "refusing to change 10 of 10 applied tasks" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["format_version"] == 4
    assert doc["refresh"]["mode"] == "none" and "--base" in doc["refresh"]["reason"]
    assert [x["code"] for x in doc["refusals"]] == ["MassChange"]
    assert {c["waiting"] for c in doc["calls"]} == {"window"}
    first = doc["waiting"][0]
    assert first["reason"] == "window" and first["windows"][0]["name"] == "freeze"
    assert first["until"].endswith("Z")
    r = run_cli(*args, "--allow-mass-change", "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "⏸ waiting for window: deny window 'freeze' is open" in r.stdout
    assert "(10 waiting)" in r.stdout
    (tmp_path / "bad.yaml").write_text("windows:\n  - kind: deny\n    schedule: '0 9 * * *'\n")
    r = run_cli("plan", "desired", "--sync-windows", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "bad.yaml:2: the window has no 'duration'" in r.stderr
    r = run_cli("plan", "desired", "--sync-windows", "nope.yaml", cwd=tmp_path)
    assert r.returncode == 1 and "nope.yaml: cannot read it" in r.stderr, r.stderr


def test_apply_holds_calls_for_a_window_until_overridden(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    names = ["w0", "w1"]
    rows = [{"RoomId": n, "TaskId": "seg", "Duration": 30} for n in names]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    for n in names:
        emulator.start_task(app_id=APP, room_id=n, task_id="seg")
    (tmp_path / "w.yaml").write_text(open_now_for(3600))
    args = ("apply", "desired", "--state", "s.db", "--endpoint", emulator.url)
    r = run_cli(*args, "--sync-windows", "w.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 call(s) not made now" in r.stderr
    assert "UpdateSegment" not in emulator.stats_snapshot()["by_action"], "read, not called"
    r = run_cli(*args, "--sync-windows", "w.yaml", "--override-window", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    overridden = [e for e in r.events() if e["event"] == "window.overridden"]
    assert len(overridden) == 2 and overridden[0]["windows"] == ["freeze"]
    assert overridden[0]["level"] == "warning"
    assert [t.duration for t in emulator.tasks()] == [30, 30]


def test_apply_stops_a_rollout_whose_canary_is_not_running(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    names = ["c0", "c1", "c2", "c3"]
    rows = [{"RoomId": n, "TaskId": "seg", "Duration": 30} for n in names]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    for n in names[1:]:  # c0, the first canary, is not running
        emulator.start_task(app_id=APP, room_id=n, task_id="seg")
    # Without reads, so that c0 is picked (first in order): a read would show it is not
    # running, and the canary would be picked among the running tasks.
    r = run_cli(
        *("apply", "desired", "--state", "s.db", "--endpoint", emulator.url, "--canary", "1"),
        "--no-refresh",
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "canary failed" in r.stderr and "3 change(s) held, not sent" in r.stderr
    (failed,) = [e for e in r.events() if e["event"] == "rollout.canary_failed"]
    assert failed["held"] == 3 and "not_running" in failed["reason"]
    assert all(t.update_calls == 0 for t in emulator.tasks())


# --- end to end: the daemon -------------------------------------------------------------


def run_daemon(
    tmp_path: Path,
    emulator: EmulatorHandle,
    control: ChangeControl,
    scenario: Callable[[Daemon], object],
) -> None:
    """The daemon in-process against the emulator over loopback, with a short settle window."""

    async def main() -> None:
        with Store.open(tmp_path / "s.db", create=True) as store:
            recorder = Recorder(store)
            config = ClientConfig(endpoint=emulator.url, trust_env=False)
            async with RtcClient(Credentials(ACCESS_KEY, SECRET_KEY), config=config) as client:
                stop = asyncio.Event()
                daemon = Daemon(
                    config=DaemonConfig(
                        root=tmp_path / "desired",
                        workers=8,
                        resync_interval=3600,
                        observe_interval=1.0,
                        settle_s=0.3,
                        control=control,
                    ),
                    reconciler=TaskReconciler(client=client, recorder=recorder, stop=stop),
                    recorder=recorder,
                    metrics=Metrics(),
                )
                running = asyncio.create_task(daemon.run(stop))
                try:
                    await asyncio.to_thread(scenario, daemon)
                finally:
                    stop.set()
                    await running

    asyncio.run(main())


def durations(emulator: EmulatorHandle) -> dict[str, int]:
    return {t.key.room_id: t.duration for t in emulator.tasks()}


def test_the_daemon_sends_a_change_when_its_deny_window_closes(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    emulator.start_task(app_id=APP, room_id="d1", task_id="seg")
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, [{"RoomId": "d1", "TaskId": "seg"}]))
    rows = [{"RoomId": "d1", "TaskId": "seg", "Duration": 45}]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    windows = load_windows(open_now_for(2), path="w.yaml")

    def scenario(d: Daemon) -> None:
        wait_for(lambda: d.admission.waiting_counts()["window"] == 1, timeout=5)
        (held,) = d.admission.waiting.values()
        assert held.reason is Reason.WINDOW and held.until is not None
        assert 'reconciler_waiting_tasks{reason="window"} 1.0' in d.metrics.render().decode()
        assert durations(emulator)["d1"] != 45
        wait_for(lambda: durations(emulator)["d1"] == 45, timeout=10)
        assert datetime.now(UTC) >= held.until, "sent once the window closed, not before"
        assert d.admission.waiting_counts()["window"] == 0

    run_daemon(tmp_path, emulator, ChangeControl(windows=windows), scenario)


def test_the_daemon_canaries_a_rollout_and_holds_it_when_a_canary_fails(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rooms = [f"k{i}" for i in range(4)]
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")

    def declare(duration: int) -> None:
        rows = [{"RoomId": r, "TaskId": "seg", "Duration": duration} for r in rooms]
        write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))

    declare(30)

    def scenario(d: Daemon) -> None:
        wait_for(lambda: set(durations(emulator).values()) == {30}, timeout=10)
        wait_for(lambda: d.admission.rollout is None and not d.admission.waiting, timeout=10)
        declare(45)
        wait_for(lambda: durations(emulator)["k0"] == 45, timeout=10)
        assert durations(emulator)["k1"] == 30, "the rest wait for the canary's read-back"
        wait_for(lambda: set(durations(emulator).values()) == {45}, timeout=10)
        # The canary ends before its next change: the rest are held.
        emulator.end_task(TaskKey(APP, "k0", "seg"))
        declare(50)
        wait_for(
            lambda: d.admission.rollout is not None and d.admission.rollout.failed is not None,
            timeout=10,
        )
        assert "not_running" in (d.admission.rollout.failed or "") if d.admission.rollout else False
        assert any("canary failed" in r for r in d.degraded())
        assert d.admission.waiting_counts()["canary_failed"] == 3
        time.sleep(0.5)
        assert durations(emulator)["k1"] == 45, "held, not sent"

    control = ChangeControl(canary=1, max_change=ChangeLimit(1.0))
    run_daemon(tmp_path, emulator, control, scenario)


def test_the_daemon_holds_a_mass_change_and_lets_it_go_once_within_the_limit(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rooms = [f"m{i}" for i in range(10)]
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")

    def declare(changed: int) -> None:
        rows = [
            {"RoomId": r, "TaskId": "seg", "Duration": 45 if i < changed else 30}
            for i, r in enumerate(rooms)
        ]
        write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))

    declare(0)

    def scenario(d: Daemon) -> None:
        wait_for(lambda: set(durations(emulator).values()) == {30}, timeout=10)
        declare(8)
        wait_for(lambda: d.admission.mass is not None, timeout=10)
        assert any("refusing to change 8 of 10" in r for r in d.degraded())
        wait_for(lambda: d.admission.waiting_counts()["mass_change"] == 8, timeout=10)
        assert set(durations(emulator).values()) == {30}
        declare(3)
        wait_for(lambda: sorted(durations(emulator).values()) == [30] * 7 + [45] * 3, timeout=10)
        assert d.admission.mass is None and d.admission.waiting_counts()["mass_change"] == 0

    run_daemon(tmp_path, emulator, ChangeControl(), scenario)


# --- change control as each call's turn comes ---------------------------------------------

#: The CLI with apply's change-control clock set by a file: ``before`` until ``flag`` exists.
CLOCKED_CLI = """
import os, sys
from datetime import datetime
import reconciler.cli.apply as apply_command
from reconciler.cli.app import entry_point
flag, before, after = sys.argv[1:4]
from reconciler.engine.clock import Clock
apply_command.REAL_CLOCK = Clock(
    wall=lambda: datetime.fromisoformat(after if os.path.exists(flag) else before).timestamp()
)
sys.argv = ["reconciler", *sys.argv[4:]]
entry_point()
"""


def test_a_paced_apply_holds_the_calls_a_window_opening_mid_apply_catches(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    names = ["p0", "p1", "p2"]
    rows = [{"RoomId": n, "TaskId": "seg", "Duration": 30} for n in names]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    for n in names:
        emulator.start_task(app_id=APP, room_id=n, task_id="seg")
    (tmp_path / "w.yaml").write_text(
        'windows:\n  - name: freeze\n    kind: deny\n    schedule: "0 4 * * *"\n    duration: 1h\n'
    )
    flag = tmp_path / "opened"
    clock = (str(flag), "2026-12-01T03:59:00+00:00", "2026-12-01T04:00:00+00:00")
    args = ("apply", "desired", "--state", "s.db", "--endpoint", emulator.url)
    paced = ("--sync-windows", "w.yaml", "--max-changes-per-minute", "40")
    proc = subprocess.Popen(
        [sys.executable, "-c", CLOCKED_CLI, *clock, *args, *paced],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def sent() -> int:
        return sum(t.update_calls for t in emulator.tasks())

    try:
        wait_for(lambda: sent() >= 1, timeout=15)
        flag.touch()  # the window opens 1.5 s before the next token
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert sent() == 1, "nothing sent once the window opened"
    assert "2 call(s) not made now: held when their turn came" in err
    assert "waiting for window: deny window 'freeze' is open; may go at 2026-12-01 05:00" in err
    assert "Apply: 1 synced" in out


def test_apply_stops_a_rollout_whose_canary_call_fails(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(app_ids=frozenset({APP}))
    bad = "000bad0000000000"  # sorts first, so it is the canary; the account does not own it
    canary = [{"RoomId": "c0", "TaskId": "seg", "Duration": 30}]
    write(tmp_path, "desired/bad.yaml", tasks_yaml(bad, canary))
    names = ["c1", "c2", "c3"]
    rows = [{"RoomId": n, "TaskId": "seg", "Duration": 30} for n in names]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    for n in names:
        h.start_task(app_id=APP, room_id=n, task_id="seg")
    args = ("apply", "desired", "--state", "s.db", "--endpoint", h.url, "--canary", "1")
    # Without reads: a first-contact read would be refused already, and no call made.
    r = run_cli(*args, "--no-refresh", cwd=tmp_path)
    assert r.returncode == 1
    assert (
        f"Applying 4 call(s) at up to 150/s: 1 first (canary {bad}/c0/seg), 3 once the "
        "canaries are observed Synced" in r.stdout
    )
    (failed,) = [e for e in r.events() if e["event"] == "rollout.canary_failed"]
    assert failed["held"] == 3 and "its call ended failed" in failed["reason"]
    assert "canary failed: " in r.stderr and "3 change(s) held, not sent" in r.stderr
    assert all(t.update_calls == 0 for t in h.tasks()), "the rest were not sent"


def test_the_daemon_picks_canaries_among_the_calls_that_may_go(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    # held/ is frozen all test long; its task sorts first, so it would have been the canary.
    for room in ("a0", "b0", "b1"):
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    row = {"TaskId": "seg", "Duration": 30}
    write(tmp_path, "desired/held/a.yaml", tasks_yaml(APP, [{"RoomId": "a0", **row}]))
    free = [{"RoomId": r, **row} for r in ("b0", "b1")]
    write(tmp_path, "desired/free/b.yaml", tasks_yaml(APP, free))
    windows = load_windows(open_now_for(3600, paths='["held/**"]'), path="w.yaml")

    def scenario(d: Daemon) -> None:
        wait_for(lambda: durations(emulator)["b0"] == durations(emulator)["b1"] == 30, timeout=10)
        assert d.admission.waiting_counts()["window"] == 1 and durations(emulator)["a0"] != 30
        assert d.admission.waiting_counts()["canary"] == 0

    run_daemon(tmp_path, emulator, ChangeControl(windows=windows, canary=1), scenario)


def test_first_syncs_go_while_a_mass_change_is_held_even_with_a_canary(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rooms = [f"m{i}" for i in range(6)]
    for room in [*rooms, "n0", "n1"]:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")

    def declare(rows: list[str], duration: int) -> None:
        tasks = [{"RoomId": r, "TaskId": "seg", "Duration": duration} for r in rows]
        write(tmp_path, "desired/a.yaml", tasks_yaml(APP, tasks))

    declare(rooms, 30)

    def scenario(d: Daemon) -> None:
        wait_for(lambda: {durations(emulator)[r] for r in rooms} == {30}, timeout=10)
        wait_for(lambda: d.admission.rollout is None and not d.admission.waiting, timeout=10)
        declare([*rooms, "n0", "n1"], 45)  # 6 of 6 applied tasks change: held
        wait_for(lambda: durations(emulator)["n0"] == durations(emulator)["n1"] == 45, timeout=10)
        assert d.admission.mass is not None and d.admission.waiting_counts()["mass_change"] == 6
        assert {durations(emulator)[r] for r in rooms} == {30}

    run_daemon(tmp_path, emulator, ChangeControl(canary=1), scenario)


def test_the_daemon_and_plan_count_a_mass_change_of_the_confirmed_tasks(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(app_ids=frozenset({APP}))
    rooms = [f"q{i}" for i in range(4)]
    for room in rooms:
        h.start_task(app_id=APP, room_id=room, task_id="seg")
    stranger = "ffff0000aaaa1111"  # refused as bad input: recorded, never confirmed
    refused = [{"RoomId": f"s{i}", "TaskId": "seg", "Duration": 30} for i in range(4)]
    write(tmp_path, "desired/strangers.yaml", tasks_yaml(stranger, refused))

    def declare(changed: int) -> None:
        rows = [
            {"RoomId": r, "TaskId": "seg", "Duration": 45 if i < changed else 30}
            for i, r in enumerate(rooms)
        ]
        write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))

    declare(0)
    limit = ChangeLimit(0.5, floor=1)

    def scenario(d: Daemon) -> None:
        wait_for(lambda: set(durations(h).values()) == {30}, timeout=10)
        wait_for(lambda: len(d.recorder.applied) == 8, timeout=10)
        declare(3)  # 3 of 4 confirmed tasks (8 records): over 50 %
        wait_for(lambda: d.admission.mass is not None, timeout=10)
        assert str(d.admission.mass).startswith("refusing to change 3 of 4 applied tasks")
        plan = compute_plan(d.index.tasks, d.recorder.applied)
        control = ChangeControl(max_change=limit)
        gate = gate_plan(plan, applied=d.recorder.applied, control=control, now=T0)
        assert gate.mass_change == d.admission.mass, "plan/apply and the daemon judge alike"

    run_daemon(tmp_path, h, ChangeControl(max_change=limit), scenario)


def test_run_holds_a_change_while_a_deny_window_is_open(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    emulator.start_task(app_id=APP, room_id="r0", task_id="seg")
    rows = [{"RoomId": "r0", "TaskId": "seg", "Duration": 45}]
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows))
    (tmp_path / "w.yaml").write_text(open_now_for(3600))  # open all test long
    args = ("--endpoint", emulator.url, "--state", "s.db", "--sync-windows", "w.yaml")
    with DaemonProcess(tmp_path, "desired", *args, "--health-port", "0") as d:
        (held,) = d.wait_event("task.waiting")
        assert held["reason"] == "window" and held["windows"] == ["freeze"]
        assert held["until"] is not None and held["room_id"] == "r0"
        d.wait_event("reconcile.completed")
        assert "UpdateSegment" not in emulator.stats_snapshot()["by_action"]
        assert d.stop(timeout=10) == 0
