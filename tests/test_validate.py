"""``reconciler validate`` as a new user meets it: a tree or one file, text or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write

RULE = "ids are 1 to 128 characters from a-z A-Z 0-9 _ @ - ."

TWO_TASKS = """
defaults:
  AppId: "app"
  TaskId: "seg"
tasks:
  - RoomId: "r1"
    Identifier: "lec-1"
  - RoomId: "r2"
"""


def test_the_messages_a_new_user_meets_first(tmp_path: Path) -> None:
    root = tmp_path / "desired"
    write(root, "tabs.yaml", 'tasks:\n  - AppId: "a"\n\t  RoomId: "r"\n')
    write(root, "comma.json", '{"AppId": "a", "RoomId": "r", "TaskId": "t",}\n')
    write(root, "null.yaml", 'AppId: "a"\nRoomId: "r"\nTaskId: "t"\nIdentifier: ~\n')
    r = run_cli("validate", "desired", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-4:] == [
        "desired/comma.json:1:44: invalid JSON: trailing comma before '}'; JSON allows none, "
        "remove it",
        "desired/null.yaml:4:13: Identifier: has no value (YAML reads ~ as null); remove the key "
        f"to leave Identifier unmanaged, or write the id as a quoted string ({RULE})",
        "desired/tabs.yaml:3:1: YAML forbids tabs for indentation: replace the tab here with "
        "spaces",
        "error: desired tree desired is invalid: 3 problem(s) in 3 file(s)",
    ]


def test_validate_one_file_by_its_own_rules(tmp_path: Path) -> None:
    root = tmp_path / "desired"
    write(root, "team/a.yaml", TWO_TASKS)
    # Another file of the tree declares one of a.yaml's tasks again: a tree conflict ...
    write(root, "b.yaml", 'AppId: "app"\nRoomId: "r1"\nTaskId: "seg"\n')
    r = run_cli("validate", "desired", cwd=tmp_path)
    assert r.returncode == 1 and "declared more than once" in r.stderr

    # ... that checking a.yaml on its own does not look for.
    r = run_cli("validate", "desired/team/a.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "valid: 2 tasks in desired/team/a.yaml\n"

    # Within the file the tree's rules hold, and paths stay as the user wrote them.
    write(root, "team/a.yaml", TWO_TASKS + '  - RoomId: "r1"\n    Identifier: "lec-1"\n')
    r = run_cli("validate", "./desired/../desired/team/a.yaml", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-5:] == [
        "./desired/../desired/team/a.yaml:5:5: task app/r1/seg is declared more than once; "
        "also at ./desired/../desired/team/a.yaml:8:5",
        "./desired/../desired/team/a.yaml:5:5: Identifier: 'lec-1' is used by more than one "
        "task, so their slice files would overwrite each other; also used by app/r1/seg at "
        "./desired/../desired/team/a.yaml:8:5",
        "./desired/../desired/team/a.yaml:8:5: task app/r1/seg is declared more than once; "
        "also at ./desired/../desired/team/a.yaml:5:5",
        "./desired/../desired/team/a.yaml:8:5: Identifier: 'lec-1' is used by more than one "
        "task, so their slice files would overwrite each other; also used by app/r1/seg at "
        "./desired/../desired/team/a.yaml:5:5",
        "error: desired file ./desired/../desired/team/a.yaml is invalid: 4 problem(s)",
    ]

    # An absolute path, a .json file, a file outside any tree: all just files.
    write(tmp_path, "one.json", '{"AppId": "a", "RoomId": "r", "TaskId": "t"}')
    r = run_cli("validate", tmp_path / "one.json", cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"valid: 1 tasks in {tmp_path / 'one.json'}\n"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "nowhere",
            "nowhere does not exist: give a desired tree (a directory) or a desired file",
        ),
        (
            "missing.yaml",
            "missing.yaml does not exist: give a desired tree (a directory) or a desired file",
        ),
        (
            "notes.txt",
            "notes.txt is not a desired file: only files ending in .yaml, .yml or .json are "
            "checked (or give a directory)",
        ),
        (
            "a.yaml~",
            "a.yaml~ is not a desired file: only files ending in .yaml, .yml or .json are "
            "checked (or give a directory)",
        ),
    ],
)
def test_a_path_that_is_neither_a_tree_nor_a_desired_file(
    tmp_path: Path, name: str, message: str
) -> None:
    (tmp_path / "notes.txt").write_text('AppId: "a"\n')
    (tmp_path / "a.yaml~").write_text('AppId: "a"\n')
    for output in ("text", "json"):
        r = run_cli("validate", name, "-o", output, cwd=tmp_path)
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr.splitlines()[-1] == f"error: {message}"


def test_validate_json_of_a_valid_tree(tmp_path: Path) -> None:
    write(tmp_path / "desired", "team/a.yaml", TWO_TASKS)
    write(tmp_path / "desired", "empty.yaml", "")
    r = run_cli("validate", "desired", "--output", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "format_version": 1,
        "valid": True,
        "root": "desired",
        "files": 2,
        "tasks": 2,
        "invalid_files": [],
        "problems": [],
    }


def test_validate_json_of_an_invalid_tree_and_file(tmp_path: Path) -> None:
    root = tmp_path / "desired"
    write(root, "good.yaml", TWO_TASKS)
    write(root, "team/bad.yaml", 'AppId: "a"\nRoomId: 0123\nTaskId: "t"\nDuraton: 5\n')
    r = run_cli("validate", "desired/", "-o", "json", cwd=tmp_path)
    assert r.returncode == 1
    problems = [
        {
            "path": "desired/team/bad.yaml",
            "line": 2,
            "column": 9,
            "field": "RoomId",
            "message": 'value 0123 reads as a number; quote it: RoomId: "0123"',
        },
        {
            "path": "desired/team/bad.yaml",
            "line": 4,
            "column": 1,
            "field": None,
            "message": "unknown field 'Duraton' — did you mean 'Duration'?",
        },
    ]
    assert json.loads(r.stdout) == {
        "format_version": 1,
        "valid": False,
        "root": "desired/",
        "files": 2,
        "tasks": 2,
        "invalid_files": ["desired/team/bad.yaml"],
        "problems": problems,
    }
    # stdout is the document alone; the one-line verdict goes to stderr.
    assert r.stderr.splitlines()[-1] == (
        "error: desired tree desired/ is invalid: 2 problem(s) in 1 file(s)"
    )

    r = run_cli("validate", "desired/team/bad.yaml", "-o", "json", cwd=tmp_path)
    assert r.returncode == 1
    assert json.loads(r.stdout) == {
        "format_version": 1,
        "valid": False,
        "root": "desired/team/bad.yaml",
        "files": 1,
        "tasks": 0,
        "invalid_files": ["desired/team/bad.yaml"],
        "problems": problems,
    }


def test_validate_json_counts_tree_problems_outside_any_file(tmp_path: Path) -> None:
    root = tmp_path / "desired"
    write(root, "a.yaml", 'AppId: "a"\nRoomId: "r"\nTaskId: "t"\n')
    outside = write(tmp_path, "outside.yaml", 'AppId: "a"\nRoomId: "r2"\nTaskId: "t"\n')
    (root / "link.yaml").symlink_to(outside)
    r = run_cli("validate", "desired", "-o", "json", cwd=tmp_path)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["valid"] is False and doc["tasks"] == 1 and doc["invalid_files"] == []
    assert doc["problems"] == [
        {
            "path": "desired/link.yaml",
            "line": 1,
            "column": 1,
            "field": None,
            "message": "refused: a symlink that leads outside the desired tree",
        }
    ]


def test_validate_output_from_its_own_environment_variable(tmp_path: Path) -> None:
    write(tmp_path / "desired", "a.yaml", TWO_TASKS)
    r = run_cli("validate", cwd=tmp_path, env={"RECONCILER_VALIDATE_OUTPUT": "json"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["valid"] is True
    # The plan's and status's old shared name is not validate's.
    r = run_cli("validate", cwd=tmp_path, env={"RECONCILER_OUTPUT": "json"})
    assert r.returncode == 0 and r.stdout == "valid: 2 tasks in 1 files under desired\n"


def test_a_pasted_task_is_one_problem_not_one_per_copy_naming_every_other(
    tmp_path: Path,
) -> None:
    """Each duplicate group is reported once per file, with its first places and a count:
    output grows with the tree, never with its square."""
    copies = 2000
    task = '  - RoomId: "r1"\n    TaskId: "seg"\n    Identifier: "same"\n'
    write(tmp_path / "desired", "a.yaml", 'defaults:\n  AppId: "app"\ntasks:\n' + task * copies)
    r = run_cli("validate", "desired", "-o", "json", cwd=tmp_path)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    (key,) = [p for p in problems if "declared more than once" in p["message"]]
    assert (key["path"], key["line"]) == ("desired/a.yaml", 4)
    assert key["message"] == (
        f"task app/r1/seg is declared more than once ({copies:,} times); also at "
        f"a.yaml:7:5, a.yaml:10:5, a.yaml:13:5 and {copies - 4:,} more"
    )
    (same,) = [p for p in problems if p["field"] == "Identifier"]
    assert same["message"].endswith(f"and {copies - 4:,} more")
    text = run_cli("validate", "desired", cwd=tmp_path)
    assert len(text.stdout) + len(text.stderr) < 5_000, "a few lines, not millions"

    # Across files: once in each file (every file involved is shown invalid), no more.
    (tmp_path / "desired" / "a.yaml").unlink()
    for i in range(60):
        write(tmp_path / "desired", f"f{i:02d}.yaml", 'AppId: "app"\nRoomId: "r1"\nTaskId: "seg"\n')
    doc = json.loads(run_cli("validate", "desired", "-o", "json", cwd=tmp_path).stdout)
    assert len(doc["problems"]) == 60 and len(doc["invalid_files"]) == 60
    assert all(p["message"].endswith("and 56 more") for p in doc["problems"])
