"""``plan --output markdown``: the plan as a pull-request comment.

The shape is tested on plans the planner makes from real trees: a headline
of counts, one table row per call with ``old → new`` and the slice-cutting
mark, held and forgotten tasks listed, long sections folded, and a size
that fits GitHub's 65,536-character limit with the rows left out counted.
"""

from __future__ import annotations

import re
from pathlib import Path

from reconciler.cli.views.render import MARKDOWN_FOLD_ROWS, MARKDOWN_LIMIT, md, plan_markdown
from reconciler.core.plan import compute_plan, records_from_tree
from reconciler.tree.desired import load_tree
from tests.conftest import run_cli, tasks_yaml, write

APP = "661e4a7b9c0d1e2f"


def rows(n: int, **fields: object) -> list[dict[str, object]]:
    return [{"RoomId": f"room-{i:04d}", "TaskId": "seg", **fields} for i in range(n)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each table row below a header (the ``|---|`` line)."""
    out = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ✂ | Task"):
            out.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return out


def test_counts_then_a_row_per_call_with_held_and_forgotten_listed(tmp_path: Path) -> None:
    base, head = tmp_path / "base", tmp_path / "head"
    write(base, "a.yaml", tasks_yaml(APP, rows(3, Duration=20, Handle=True)))
    write(base, "gone.yaml", tasks_yaml(APP, [{"RoomId": "gone", "TaskId": "seg"}]))
    write(base, "held.yaml", tasks_yaml(APP, [{"RoomId": "held", "TaskId": "seg"}]))
    changed = rows(3, Duration=20, Handle=True)
    changed[0]["Duration"] = 60  # cuts a slice
    changed[1]["Handle"] = False  # does not
    write(head, "a.yaml", tasks_yaml(APP, changed))
    write(head, "held.yaml", 'AppId: "x"\nRoomId: held\nTaskId: seg\nDuraton: 5\n')  # invalid
    index = load_tree(head)
    plan = compute_plan(
        index.tasks,
        records_from_tree(load_tree(base).tasks),
        held_files=index.invalid_files,
    )
    text = plan_markdown(plan, root="head", refusals=["too many forgets"])
    lines = text.splitlines()
    assert lines[0] == "### reconciler plan"
    assert lines[2] == "**2** to update (**1** cut a slice ✂), 1 in sync, 1 held, 1 forgotten."
    assert "> **Refused:** too many forgets" in text
    calls = table_rows(text)
    assert len(calls) == 2
    by_room = {row[1].split("/")[1]: row for row in calls}
    assert by_room["room-0000"][0] == "✂" and by_room["room-0000"][2] == "Duration 20 → 60"
    assert by_room["room-0001"][0] == "" and by_room["room-0001"][2] == "Handle true → false"
    assert by_room["room-0000"][3] == "head/a.yaml:4:5"
    assert re.search(
        r"\*\*Held: .* \(1\)\*\*\n\n- 661e4a7b9c0d1e2f/held/seg \(head/held.yaml\)", text
    )
    assert re.search(
        r"\*\*Forgotten: .* \(1\)\*\*\n\n- 661e4a7b9c0d1e2f/gone/seg \(gone.yaml\)", text
    )
    assert "<details>" not in text, "short sections are not folded"
    assert text.rstrip().endswith("✂ the call carries Duration, which cuts the task's live slice.")


def test_a_large_plan_folds_and_fits_a_comment_saying_what_it_left_out(tmp_path: Path) -> None:
    write(tmp_path / "base", "a.yaml", tasks_yaml(APP, rows(3000, Duration=20)))
    write(tmp_path / "desired", "a.yaml", tasks_yaml(APP, rows(3000, Duration=30)))
    args = ("plan", "desired", "--base", "base", "-o", "markdown", "--allow-mass-change")
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert len(text) <= MARKDOWN_LIMIT < 65_536
    assert "**3000** to update (**3000** cut a slice ✂), 0 in sync." in text
    assert "<details><summary>Calls (3000)</summary>" in text and "</details>" in text
    shown = table_rows(text)
    assert MARKDOWN_FOLD_ROWS < len(shown) < 3000
    left = 3000 - len(shown)
    assert f"_…and {left} more not shown here._" in text
    assert f"**{left} rows were left out** to fit a pull-request comment" in text
    assert all(row[2] == "Duration 20 → 30" for row in shown)
    assert text.index("</details>") < text.index("rows were left out")

    small = run_cli("plan", "desired", "--base", "desired", "-o", "markdown", cwd=tmp_path)
    assert small.returncode == 0 and "No UpdateSegment calls" in small.stdout
    assert "|" not in small.stdout


def test_what_comes_from_files_cannot_add_markup() -> None:
    assert md("a|b") == "a\\|b", "no extra cell"
    assert md("<img src=x onerror=alert(1)>") == "\\<img src=x onerror=alert(1)\\>"
    assert md("[link](http://x) *b* `c`") == "\\[link\\](http://x) \\*b\\* \\`c\\`"
    assert md("line\nbreak") == "line\\\\nbreak", "a newline is escaped, then its backslash"
