"""A file name cannot forge output: control characters are escaped in every text view.

A desired file named with a newline, a carriage return and ANSI escapes (cursor
up, erase line) would, printed as it is, start a line of its own, wipe the line
above and claim ``valid: 99 tasks``. Each command runs in a real
pseudo-terminal (:mod:`tests.terminal`) and what a person would see is the
screen a VT100 emulator draws from its bytes: the name shows escaped
(``\\n``, ``\\x1b``) inside its own line, and no line says what the name
pretends. JSON output keeps the name exactly, as JSON escapes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.core.printable import printable
from reconciler.emulator import EmulatorHandle
from tests.conftest import run_cli, tasks_yaml, write
from tests.terminal import TerminalRun

APP = "661e4a7b9c0d1e2f"
FORGED = "valid: 99 tasks in desired"
#: Up a line, erase it, back to column 1; a new line claiming the tree is fine; blink,
#: and a right-to-left override.
NAME = f"rooms\x1b[1A\x1b[2K\r\n{FORGED}\x1b[5m\u202e.yaml"
#: How a text view shows it.
SHOWN = f"rooms\\x1b[1A\\x1b[2K\\r\\n{FORGED}\\x1b[5m\\u202e.yaml"
#: How a console log line shows it: a value in JSON's escapes, the rest escaped after.
LOGGED = json.dumps(NAME, ensure_ascii=False).replace("\u202e", "\\u202e")


def screen_of(*args: str, cwd: Path, code: int) -> list[str]:
    with TerminalRun(*args, cwd=cwd, columns=250, rows=120) as term:
        assert term.finish() == code, term.text()
    rows = [row for row in term.screen() if row]
    assert not [row for row in rows if row.startswith(FORGED)], "\n".join(rows)
    # The name's own escapes (a progress bar erases lines too, but never moves up or blinks).
    assert b"\x1b[1A" not in term.output and b"\x1b[5m" not in term.output, term.output
    return rows


def test_a_file_name_cannot_forge_lines_in_plan_apply_validate_status_or_the_console(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    for room in ("hall-1", "hall-2"):
        emulator.start_task(app_id=APP, room_id=room, task_id="seg")
    tree = tmp_path / "desired"
    write(tree, "ok.yaml", tasks_yaml(APP, [{"RoomId": "hall-1", "TaskId": "seg", "Duration": 30}]))
    write(tree, NAME, tasks_yaml(APP, [{"RoomId": "hall-2", "TaskId": "seg", "Duration": 30}]))
    api = ("--state", "s.db", "--endpoint", emulator.url)

    plan = screen_of("plan", "desired", *api, cwd=tmp_path, code=0)
    assert any(f"(desired/{SHOWN}:4:5)" in row for row in plan), "\n".join(plan)
    assert run_cli("apply", "desired", *api, cwd=tmp_path).returncode == 0

    (tree / NAME).write_text("tasks: [oops\n", encoding="utf-8")  # now invalid: holds hall-2
    # apply's report of the problems, and its console line for the invalid file.
    applied = screen_of("--log-level", "warning", "apply", "desired", *api, cwd=tmp_path, code=1)
    assert any(row.startswith(f"desired/{SHOWN}:") for row in applied), "\n".join(applied)
    assert any(f"desired.invalid_file  path={LOGGED}" in row for row in applied), applied
    checked = screen_of("--log-level", "warning", "validate", "desired", cwd=tmp_path, code=1)
    assert any(row.startswith(f"desired/{SHOWN}:") for row in checked), "\n".join(checked)
    assert any(f"desired.invalid_file  path={LOGGED}" in row for row in checked), checked
    status = screen_of("status", "desired", "--state", "s.db", cwd=tmp_path, code=0)
    assert any(row.startswith(f"  desired/{SHOWN}:") for row in status), "\n".join(status)
    assert any(f"held: {SHOWN[:12]}" in row for row in status), "\n".join(status)

    as_json = run_cli("validate", "desired", "-o", "json", cwd=tmp_path)
    assert json.loads(as_json.stdout)["invalid_files"] == [f"desired/{NAME}"]


def test_printable_escapes_controls_and_reordering_marks_only() -> None:
    assert printable("a\tb\x00c\x7fd\x9be\u2028f\u202eg\u2066h") == (
        "a\\tb\\x00c\\x7fd\\x9be\\u2028f\\u202eg\\u2066h"
    )
    kept = "hall-b-0902 “quoted” → 中文 ✓ \\n"
    assert printable(kept) == kept, "printable text, and a backslash, as they are"
