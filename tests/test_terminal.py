"""Output for people: console lines, reports without log noise, options, colour.

The console renderer is pure and tested on values; the rest runs the real CLI
in a real pseudo-terminal (:mod:`tests.terminal`), since what matters is what a
person sees there.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from reconciler.emulator import EmulatorHandle
from reconciler.eventlog.console import ConsoleRenderer
from tests.conftest import REPO, run_cli, tasks_yaml, write
from tests.terminal import TerminalRun

APP = "661e4a7b9c0d1e2f"
TASK = {"app_id": APP, "room_id": "hall-b-0902", "task_id": "asr-segment"}
BODY = {"AppId": APP, "RoomId": "hall-b-0902", "TaskId": "asr-segment", "BusinessId": "lecture"}


def render(width: int = 200, /, **event: object) -> str:
    """A console line at ``width`` columns (wide by default: a test of what it says)."""
    event.setdefault("timestamp", "2026-12-01T20:06:31.412883Z")
    event.setdefault("level", "info")
    return ConsoleRenderer(colors=False, width=lambda: width)(None, "info", dict(event))


def test_a_task_outcome_is_one_short_line_with_old_and_new() -> None:
    line = render(
        event="task.synced",
        **TASK,
        action="UpdateSegment",
        request_id="2026120120063100000008",
        attempt=1,
        latency_ms=31.8,
        fields={**BODY, "Duration": 90},
        changes={"Duration": {"old": 60, "new": 90}},
    )
    assert "\n" not in line
    assert line.endswith(f"✓ synced {APP}/hall-b-0902/asr-segment  Duration 60 → 90")
    assert "{" not in line and "latency" not in line and "request_id" not in line

    first = render(
        event="task.synced",
        **TASK,
        fields={**BODY, "Identifier": "edu-hall-b-0902", "Handle": True, "Duration": 60},
        changes={
            "Identifier": {"old": None, "new": "edu-hall-b-0902"},
            "Handle": {"old": None, "new": True},
            "Duration": {"old": None, "new": 60},
        },
    )
    assert first.endswith('Identifier="edu-hall-b-0902" Handle=true Duration=60')
    slow = render(event="task.synced", **TASK, latency_ms=2400.0, changes={})
    assert slow.endswith("(2.4 s)"), "a slow call says so"


def test_failures_say_what_and_what_next_and_are_never_cut() -> None:
    message = "Duration must be between 1 and 600 " * 5
    line = render(
        80,
        level="error",
        event="task.failed",
        **TASK,
        code="InvalidParameter",
        message=message,
        terminal=True,
    )
    rows = line.split("\n")
    assert all(len(row) <= 80 for row in rows) and len(rows) > 1, "wrapped, at word boundaries"
    whole = " ".join(row.strip() for row in rows)
    assert "✗ failed" in rows[0] and "InvalidParameter: " + message.strip() in whole
    assert whole.endswith("blocked until its spec changes")
    retry = render(event="task.failed", **TASK, code="InternalError", message="boom")
    assert retry.endswith("InternalError: boom; tried again later")


def test_change_control_leadership_and_notices_read_as_sentences() -> None:
    canaries = [f"{APP}/room-{i}/seg" for i in range(5)]
    lines = {
        "waiting": render(
            event="task.waiting", **TASK, reason="window", message="deny window freeze until 18:00"
        ),
        "override": render(event="window.overridden", **TASK, windows=["freeze"], sources=["x"]),
        "held": render(
            level="warning",
            event="plan.mass_change_held",
            root="desired",
            changes=400,
            known=1000,
            allowed=200,
            max_change="20%",
        ),
        "started": render(200, event="rollout.started", canaries=canaries, changes=40),
        "failed": render(
            level="error", event="rollout.canary_failed", canaries=canaries[:1], reason="x ended"
        ),
        "elected": render(event="leader.elected", holder="pod-a", epoch=7, previous="pod-b"),
        "lapsed": render(
            level="warning", event="leader.lapsed", holder="pod-a", why="the loop stood still"
        ),
        "renewed": render(event="leader.renewed", epoch=7, lapsed_s=0.4),
        "notice": render(event="notify.retried", url="https://hooks…", status=500, delay_s=2.0),
    }
    assert lines["waiting"].endswith(
        f"⏸ waiting {APP}/hall-b-0902/asr-segment  deny window freeze until 18:00"
    )
    assert lines["override"].endswith(
        "! override " + f"{APP}/hall-b-0902/asr-segment  sent inside freeze"
    )
    assert "400 changes to 1000 applied tasks, over --max-change 20% (200 allowed)" in lines["held"]
    assert lines["started"].endswith(
        f"40 changes; canaries first: {', '.join(canaries[:3])} and 2 more"
    )
    assert lines["failed"].endswith(
        "x ended; the rest of the rollout is held until the spec changes"
    )
    assert lines["elected"].endswith("pod-a leads (epoch 7), after pod-b")
    assert "pod-a holds its calls: the loop stood still; until a keepalive" in lines["lapsed"]
    assert lines["renewed"].endswith("lease renewed after 0.4 s: calls go again")
    assert "answered 500; retrying in 2.0 s" in lines["notice"]
    assert not any("=" in line.split("  ", 1)[1] for line in lines.values()), "no key=value"


def test_other_events_are_compact_pairs_wrapped_to_the_width() -> None:
    line = render(event="plan.odd", level="info", nested={"a": [1, 2]}, text="two words")
    assert line.endswith('info  plan.odd  nested={"a":[1,2]} text="two words"')
    for level in ("info", "warning"):
        long = render(60, level=level, event="plan.odd", blob="x" * 200)
        rows = long.split("\n")
        assert max(map(len, rows)) <= 60 and len(rows) > 3, long
        assert all(row.startswith(" " * 9) for row in rows[1:]), "indented under the mark"
        assert "".join(row.strip() for row in rows).endswith("blob=" + "x" * 200), "nothing cut"


def test_a_changed_value_is_never_cut_and_each_change_stays_whole() -> None:
    changes = {
        "Identifier": {"old": "ab2450de-e253-4db5-bd6a-de1245dc6010", "new": "edu-room-0903"},
        "Duration": {"old": 20, "new": 60},
    }
    for width in (80, 120):
        line = render(width, event="task.synced", **TASK, changes=changes)
        rows = line.split("\n")
        assert all(len(row) <= width for row in rows), line
        assert rows[0][9:].startswith("✓ synced ")
        assert f"{APP}/hall-b-0902/asr-segment" in rows[0], "the task first"
        assert any(row.rstrip().endswith("Duration 20 → 60") for row in rows), line
        assert any('"ab2450de-e253-4db5-bd6a-de1245dc6010" → "edu-room-0903",' in r for r in rows)
    # A key too long for the line: the change starts below it, whole.
    long = render(80, event="task.synced", **{**TASK, "room_id": "r" * 70}, changes=changes)
    assert long.split("\n")[1].strip().startswith("Identifier "), long
    wide = render(40, event="plan.odd", text="会议室" * 12)
    assert all(sum(2 for _ in row.strip()) <= 40 for row in wide.split("\n")[1:]), wide


def entries(text: str) -> list[str]:
    """Console lines with their wrapped continuations (indented under the mark) joined."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(" " * 9) and out:
            out[-1] += " " + line.strip()
        elif line.strip():
            out.append(line)
    return out


def sample_tree(tmp_path: Path) -> Path:
    root = tmp_path / "desired"
    shutil.copytree(REPO / "desired", root)
    return root


def test_the_demo_prints_one_line_per_task_within_120_columns(tmp_path: Path) -> None:
    sample_tree(tmp_path)
    args = ("run", "desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    with TerminalRun(*args, "--state", "s.db", cwd=tmp_path, columns=120) as term:
        term.wait_for(lambda out: b"every task handled" in out)
        term.press("\x03")  # a real Ctrl-C from the terminal
        assert term.finish(30) == 0
    lines = [line for line in term.text().splitlines() if line.strip()]
    synced = [line for line in entries(term.text()) if "✓ synced" in line]
    # The embedded emulator starts some tasks with the tree's values: read first, they
    # cost no call; every other task gets one, with live old → new.
    assert "with 10 tasks running, 4 with the tree's values" in term.text()
    done = re.search(r"10 tasks, (\d+) of 10 read first already matched live", term.text())
    assert done is not None and int(done[1]) >= 4, "\n".join(lines)
    assert len(synced) == 10 - int(done[1]), "\n".join(lines)
    assert "start: 0 calls to make, 10 to read first (first contact)" in term.text()
    assert any("hall-b-0902/asr-segment" in s and "Identifier" in s for s in synced)
    assert not [line for line in lines if len(line) > 120], "every line fits 120 columns"
    for noise in ("call.succeeded", "task.queued", "{'AppId'"):
        assert noise not in term.text()
    assert any("SIGINT received" in line for line in lines)


def edited_tree(tmp_path: Path) -> None:
    """The sample tree as ``desired`` and a ``base`` that differs in one Duration and one
    Identifier, so a plan has changes to show."""
    root = sample_tree(tmp_path)
    shutil.copytree(root, tmp_path / "base")
    lectures = root / "edu-live" / "lectures.yaml"
    text = lectures.read_text()
    assert "Duration: 60" in text
    lectures.write_text(text.replace("Duration: 60", "Duration: 90", 1))


def test_plan_redirected_in_a_terminal_keeps_console_events(tmp_path: Path) -> None:
    """Events go to stderr: ``plan > plan.txt`` leaves them on the terminal, as console
    lines, and the file gets the plan alone; ``run > log`` (events on stdout) gets JSON."""
    edited_tree(tmp_path)
    args = ("plan", "desired", "--base", "base", "--log-level", "info")
    with TerminalRun(*args, cwd=tmp_path, columns=80, stdout_to_pty=False) as term:
        assert term.finish() == 0
        assert term.proc.stdout is not None
        plan_text = term.proc.stdout.read().decode()
    shown = [row for row in term.screen() if row]
    assert any(" info  plan.computed  1 call to make" in row for row in shown), shown
    assert not [row for row in shown if row.lstrip().startswith("{")], "no JSON on the screen"
    assert re.search(r"Duration += 60 → 90", plan_text) and "plan.computed" not in plan_text

    run = ("run", "desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    with TerminalRun(*run, "--state", "s.db", cwd=tmp_path, stdout_to_pty=False) as term:
        assert term.proc.stdout is not None
        names = []  # the daemon's events, written to a pipe, are JSON
        while "reconcile.completed" not in names:
            names.append(json.loads(term.proc.stdout.readline())["event"])
        term.press("\x03")
        assert term.finish(30) == 0
    assert "daemon.started" in names


def test_the_demo_reads_whole_at_80_columns(tmp_path: Path) -> None:
    """At 80 columns a change's old and new values are on the screen, wrapped under
    the task line rather than cut, and no row is broken by the terminal mid-word."""
    sample_tree(tmp_path)
    args = ("run", "desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    for columns in (80, 120):
        with TerminalRun(*args, "--state", f"s{columns}.db", cwd=tmp_path, columns=columns) as t:
            t.wait_for(lambda out: b"every task handled" in out)
            t.press("\x03")
            assert t.finish(30) == 0
        rows = [row for row in t.screen() if row]
        assert "…" not in "\n".join(rows)
        # Every line the program wrote fits: the terminal wrapped none of them.
        assert not [line for line in t.text().splitlines() if len(line) > columns]
        # On the screen: each task line, its changes whole beside it or on the rows below.
        synced = [e for e in entries("\n".join(rows)) if "✓ synced" in e and "Identifier" in e]
        assert synced, rows
        for entry in synced:
            assert re.search(r'Identifier "[^"]+" → "[^"]+"', entry), entry
        if columns == 80:
            assert any(row.startswith(" " * 9) for row in rows), "something was wrapped"


@pytest.mark.parametrize(
    "args",
    [
        ("validate", "desired"),
        ("plan", "desired", "--no-refresh", "--state", "plan.db"),
        ("emulator", "--port", "0"),
        ("run", "desired", "--emulator", "--emulator-port", "0", "--health-port", "0"),
    ],
    ids=lambda args: args[0],
)
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A real Ctrl-C (the terminal's SIGINT) from the first instant to well into the
    command: never a traceback; one line and 130, or the command's own ending (the
    emulator and the daemon stop on SIGINT and exit 0; a quick command may be done)."""
    sample_tree(tmp_path)
    interrupted = 0
    for delay in (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.5):
        with TerminalRun(*args, cwd=tmp_path, columns=80) as term:
            time.sleep(delay)
            term.press("\x03")
            status = term.finish(30)
        text = term.text()
        said = [line for line in text.splitlines() if line.strip() not in ("", "^C")]
        if "Traceback" in text and not re.search(r'File "[^"]*/reconciler/', text):
            # Within the interpreter's own start-up (site, before any reconciler code
            # runs), which no program can intercept; rare, and not ours to hide.
            continue
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, (delay, text)
        assert "Exception ignored" not in text, (delay, text)
        if status == 130:
            interrupted += 1
            assert said[-1:] == ["Interrupted."], (delay, text)
            assert [line for line in said if "Interrupted" in line] == ["Interrupted."]
        else:
            # Done, or stopped as the command does on SIGINT; or killed by the signal
            # itself before Python set its handler up or after it took it down at exit.
            assert status in (0, -signal.SIGINT), (delay, status, text)
            assert "Interrupted" not in text
    assert interrupted >= 2, "some of the presses landed while the command was starting"


def test_validate_and_plan_in_a_terminal_print_the_report_only(tmp_path: Path) -> None:
    root = sample_tree(tmp_path)
    with TerminalRun("validate", "desired", cwd=tmp_path) as term:
        assert term.finish() == 0
    assert "valid:" in term.text() and "desired.loaded" not in term.text()

    write(root, "broken.yaml", 'AppId: "a"\nRoomId: 0903\nTaskId: "t"\n')
    with TerminalRun("validate", "desired", cwd=tmp_path) as term:
        assert term.finish() == 1
    text = term.text()
    assert text.count("broken.yaml:2:9") == 1, text
    assert "desired.invalid_file" not in text and "desired.loaded" not in text

    (root / "broken.yaml").unlink()
    base = tmp_path / "base"
    shutil.copytree(root, base)
    lectures = root / "edu-live" / "lectures.yaml"
    lectures.write_text(lectures.read_text().replace('"lecture"', '"seminar"', 1))
    with TerminalRun("plan", "desired", "--base", "base", cwd=tmp_path) as term:
        assert term.finish() == 0
    text = term.text()
    assert text.count("BusinessId") >= 1 and "plan.warning" not in text
    assert "plan.computed" not in text, "the plan is the report; no log line repeats it"

    with TerminalRun("plan", "desired", "--base", "base", "--log-level", "info", cwd=tmp_path) as t:
        assert t.finish() == 0
    assert "plan.computed" in t.text(), "an explicit level shows the events too"


def test_global_options_work_after_the_command_too(tmp_path: Path) -> None:
    sample_tree(tmp_path)
    before = run_cli("--log-level", "error", "plan", "desired", "--no-refresh", cwd=tmp_path)
    after = run_cli("plan", "desired", "--no-refresh", "--log-level", "error", cwd=tmp_path)
    assert before.returncode == after.returncode == 0
    assert before.events() == after.events() == []
    verbose = run_cli(
        "--log-level", "error", "plan", "desired", "--no-refresh", "--log-level", "debug",
        cwd=tmp_path,
    )  # fmt: skip
    assert "desired.loaded" in {e["event"] for e in verbose.events()}, "the later one wins"
    quiet = run_cli("plan", "desired", "--no-refresh", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.events() == [] and "Plan:" in quiet.stdout
    console = run_cli(
        "validate", "desired", "--log-format", "console", "--log-level", "info", cwd=tmp_path
    )
    assert console.events() == [] and "desired.loaded" in console.stderr
    for line in console.stderr.splitlines():
        assert not line.startswith("{"), line
    bad = run_cli("plan", "desired", "--log-level", "loud", cwd=tmp_path)
    assert bad.returncode == 1 and "loud" in bad.stderr


def test_no_color_turns_colour_off(tmp_path: Path) -> None:
    root = sample_tree(tmp_path)
    write(root, "broken.yaml", 'AppId: "a"\nRoomId: 0903\nTaskId: "t"\n')
    with TerminalRun("validate", "desired", cwd=tmp_path) as term:
        term.finish()
    assert b"\x1b[" in term.output, "colour on a terminal by default"
    with TerminalRun("validate", "desired", cwd=tmp_path, env={"NO_COLOR": "1"}) as term:
        term.finish()
    assert b"\x1b[" not in term.output and b"broken.yaml:2:9" in term.output
    args = ("run", "desired", "--emulator", "--emulator-port", "0", "--health-port", "0")
    with TerminalRun(*args, "--state", "s.db", cwd=tmp_path, env={"NO_COLOR": "1"}) as term:
        term.wait_for(lambda out: b"every task handled" in out)
        term.press("\x03")
        term.finish(30)
    assert b"\x1b[" not in term.output and "✓ synced".encode() in term.output


def test_json_events_keep_every_field(tmp_path: Path) -> None:
    """The console is for people; JSON lines (not a terminal) stay complete."""
    sample_tree(tmp_path)
    r = run_cli("--log-level", "debug", "plan", "desired", cwd=tmp_path)
    (loaded,) = [e for e in r.events() if e["event"] == "desired.loaded"]
    assert {"root", "files", "tasks", "problems", "timestamp", "level"} <= set(loaded)
    json.dumps(loaded)


def test_apply_progress_moves_as_results_land_with_log_lines_above_it(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rooms = [f"room-{i:02d}" for i in range(30)]
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    rows = [{"RoomId": room, "TaskId": "seg", "Duration": 8} for room in rooms]
    write(tmp_path / "desired", "many.yaml", tasks_yaml(APP, rows))
    args = ("apply", "desired", "--state", "state.db", "--endpoint", emulator.url, "--qps", "5")
    mid_run = re.compile(r"calls.*\b([1-9]|1[0-9]|2[0-8])/30\b")
    with TerminalRun(*args, cwd=tmp_path, rows=80) as term:
        # On the text without escape codes: with colour, each number is styled apart.
        term.wait_for(lambda _: mid_run.search(term.text()) is not None)
        assert term.proc.poll() is None, "the bar moved while calls were still being made"
        during = [row for row in term.screen() if row]
        assert term.finish() == 0
    assert "calls" in during[-1] and "/30" in during[-1], "the bar stays at the bottom"
    assert any("✓ synced" in row for row in during[:-1]), "task lines print above the bar"
    after = [row for row in term.screen() if row]
    bars = [row for row in after if re.search(r"calls.*\d+/30", row)]
    assert len(bars) == 1, "one bar, redrawn in place, never scrolled"
    assert "30/30" in bars[0] and "30 synced" in bars[0], "per-outcome counts"
    synced = [row for row in after if "✓ synced" in row]
    assert len(synced) == 30 and not [row for row in synced if "/30" in row]
    assert after[-1].startswith("Apply: 30 synced"), "the summary last"
    assert "call.succeeded" not in term.text()

    again = run_cli(
        "apply", "desired", "--state", "s2.db", "--endpoint", emulator.url, cwd=tmp_path
    )
    assert again.returncode == 0
    assert "━" not in again.stderr and "\x1b[" not in again.stderr, "no bar off a terminal"
    # A new store, the same fleet: read first, every task already matches; no call.
    assert "Live already matches the desired tree for the 30 task(s) read" in again.stdout
    assert "Plan: 0 to update, 30 in sync" in again.stdout


def test_plan_refresh_shows_its_reads_moving_on_a_terminal(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    rooms = [f"room-{i:02d}" for i in range(10)]
    for room in rooms:
        emulator.start_task(app_id=APP, room_id=room, task_id="seg", duration=8)
    rows = [{"RoomId": room, "TaskId": "seg", "Duration": 8} for room in rooms]
    write(tmp_path / "desired", "many.yaml", tasks_yaml(APP, rows))
    args = ("plan", "desired", "--refresh", "--endpoint", emulator.url, "--read-qps", "4")
    mid_run = re.compile(r"reads.*\b[1-9]/10\b")
    with TerminalRun(*args, cwd=tmp_path) as term:
        term.wait_for(lambda _: mid_run.search(term.text()) is not None)
        assert term.proc.poll() is None, "the bar moved while reads were still being made"
        assert term.finish() == 0
    screen = [row for row in term.screen() if row]
    (bar,) = [row for row in screen if re.search(r"reads.*10/10", row)]
    assert "10 running" in bar
    assert any("Live tasks match the desired tree (10 read just now)" in row for row in screen)
