"""``validate``, ``plan`` and ``status`` as a user runs them: subprocesses, real files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

from reconciler.state import StateStore
from reconciler.task import Source, TaskKey
from tests.conftest import REPO, CliResult, cli_env, run_cli, tasks_yaml, write

APP = "661e4a7b9c0d1e2f"
KEY = TaskKey(APP, "room-1", "seg")


def one_task(root: Path, **fields: object) -> None:
    write(root, "a.yaml", tasks_yaml(APP, [{"RoomId": "room-1", "TaskId": "seg", **fields}]))


def test_validate_accepts_a_valid_tree_and_the_sample(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    r = run_cli("validate", "desired", cwd=tmp_path)
    assert r.returncode == 0 and "1 tasks in 1 files" in r.stdout

    repo = Path(__file__).resolve().parents[1]
    r = run_cli("validate", repo / "desired", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_validate_lists_every_problem_with_its_location(tmp_path: Path) -> None:
    write(
        tmp_path / "desired",
        "bad.yaml",
        """
        AppId: app1
        RoomId: 0123
        TaskId: "t"
        Duraton: 30
        """,
    )
    write(
        tmp_path / "desired", "worse.yaml", 'AppId: "a"\nRoomId: "r"\nTaskId: "t"\nDuration: 601\n'
    )
    r = run_cli("validate", "desired", cwd=tmp_path)
    assert r.returncode == 1
    assert "desired/bad.yaml:2:9" in r.stderr and "quote" in r.stderr
    assert "did you mean 'Duration'" in r.stderr
    assert "desired/worse.yaml:4:11" in r.stderr
    assert "3 problem(s)" in r.stderr


def test_validate_missing_directory_is_an_error(tmp_path: Path) -> None:
    r = run_cli("validate", "nowhere", cwd=tmp_path)
    assert r.returncode == 1 and "nowhere does not exist" in r.stderr


def test_plan_exit_codes_and_no_state_written(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    r = run_cli("plan", "desired", "--state", "s.db", "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "~ UpdateSegment" in r.stdout and "+ Duration" in r.stdout
    assert "Plan: 1 to update, 0 in sync" in r.stdout
    assert not (tmp_path / "s.db").exists(), "a dry run creates nothing"

    r = run_cli("plan", "desired", "--state", "s.db", cwd=tmp_path)
    assert r.returncode == 0, "without --detailed-exitcode pending calls still exit 0"

    with StateStore.open(tmp_path / "s.db") as store:
        store.record_success(
            KEY,
            fields={"Duration": 30},
            business_id=None,
            request_id="r1",
            source=Source("a.yaml", 3, 5),
        )
    r = run_cli("plan", "desired", "--state", "s.db", "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 0 and "No changes" in r.stdout

    write(tmp_path / "desired", "broken.yaml", "AppId: [\n")
    r = run_cli("plan", "desired", "--state", "s.db", "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 1 and "desired/broken.yaml" in r.stderr


def test_plan_json_shows_old_and_new_values(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=45, Handle=True)
    with StateStore.open(tmp_path / "s.db") as store:
        store.record_success(
            KEY,
            fields={"Duration": 30, "Handle": True},
            business_id=None,
            request_id="r1",
            source=Source("a.yaml", 3, 5),
        )
    r = run_cli("plan", "desired", "--state", "s.db", "--output", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (call,) = doc["calls"]
    assert call["body"] == {"AppId": APP, "RoomId": "room-1", "TaskId": "seg", "Duration": 45}
    assert call["changes"] == [{"field": "Duration", "old": 30, "new": 45}]
    assert doc["summary"]["to_update"] == 1 and doc["summary"]["in_sync"] == 0

    text = run_cli("plan", "desired", "--state", "s.db", cwd=tmp_path).stdout
    assert "Duration = 30 → 45" in text


def test_plan_against_a_base_tree_needs_no_state(tmp_path: Path) -> None:
    one_task(tmp_path / "base", Duration=30, Identifier="lec")
    one_task(tmp_path / "head", Duration=30, Identifier="lec-v2")
    r = run_cli("plan", "head", "--base", "base", "--detailed-exitcode", "-o", "json", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (call,) = json.loads(r.stdout)["calls"]
    assert call["changes"] == [{"field": "Identifier", "old": "lec", "new": "lec-v2"}]
    assert not (tmp_path / ".reconciler").exists()


def test_options_come_from_the_environment(tmp_path: Path) -> None:
    one_task(tmp_path / "tree", Duration=30)
    r = run_cli(
        "plan",
        cwd=tmp_path,
        env={
            "RECONCILER_DIR": "tree",
            "RECONCILER_OUTPUT": "json",
            "RECONCILER_DETAILED_EXITCODE": "1",
        },
    )
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout)["summary"]["to_update"] == 1


def test_status_shows_each_task_and_json_shape(tmp_path: Path) -> None:
    r = run_cli("status", "--state", "s.db", cwd=tmp_path)
    assert r.returncode == 1 and "state store s.db does not exist" in r.stderr
    with StateStore.open(tmp_path / "s.db") as store:
        store.record_success(
            KEY,
            fields={"Duration": 30},
            business_id=None,
            request_id="req-1",
            source=Source("a.yaml", 3, 5),
        )
        other = TaskKey(APP, "room-2", "seg")
        store.mark_pending(other, source=Source("a.yaml", 6, 5), business_id=None)
        store.record_not_running(
            other,
            message="task not found",
            code="InvalidParameter.ErrorActiveTaskNotFound",
            request_id="req-2",
            source=Source("a.yaml", 6, 5),
        )
    r = run_cli("status", "--state", "s.db", cwd=tmp_path)
    assert r.returncode == 0
    assert "Synced" in r.stdout and "NotRunning" in r.stdout and "CALLED" in r.stdout
    assert "2 tasks: 1 Synced, 0 Pending, 1 NotRunning, 0 Failed, 0 New." in r.stdout

    doc = json.loads(run_cli("status", "--state", "s.db", "-o", "json", cwd=tmp_path).stdout)
    assert doc["counts"] == {"Synced": 1, "Pending": 0, "NotRunning": 1, "Failed": 0, "New": 0}
    row = doc["tasks"][0]
    assert (row["app_id"], row["room_id"], row["task_id"]) == KEY
    assert row["status"] == "Synced" and row["fields"] == {"Duration": 30}


def test_a_corrupt_state_store_is_a_clear_error(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    (tmp_path / "s.db").write_bytes(b"this is not a database at all" * 100)
    for args in (("plan", "desired", "--state", "s.db"), ("status", "--state", "s.db")):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 1 and "s.db" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "s.db").read_bytes().startswith(b"this is not"), "never reset"


def test_usage_errors_exit_1_never_2(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    for args in (
        ("plan", "desired", "--detailed-exitcode", "--output", "yaml"),
        ("plan", "desired", "surplus-argument", "--detailed-exitcode"),
        ("no-such-command",),
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert "Error" in r.stderr and "Traceback" not in r.stderr
    assert run_cli("plan", "--help", cwd=tmp_path).returncode == 0


def test_plan_base_with_problems_is_used_with_a_warning(tmp_path: Path) -> None:
    one_task(tmp_path / "head", Duration=31)
    one_task(tmp_path / "base", Duration=30)
    write(tmp_path / "base", "broken.yaml", "AppId: [\n")
    r = run_cli("plan", "head", "--base", "base", "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "base/broken.yaml" in r.stderr and "warning" in r.stderr
    assert "Duration = 30 → 31" in r.stdout


def test_bad_endpoint_and_busy_port_are_clear_errors(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    r = run_cli("apply", "desired", "--endpoint", "notaurl", cwd=tmp_path)
    assert r.returncode == 1 and "--endpoint" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli(
            "run",
            "desired",
            "--emulator",
            "--emulator-port",
            "0",
            "--health-port",
            str(port),
            cwd=tmp_path,
        )
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


# --- the installed console script: version and shell completion --------------------

SCRIPT = Path(sys.executable).with_name("reconciler")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def console_script(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """The ``reconciler`` script pip installed: click keys completion on its name."""
    assert SCRIPT.is_file(), f"{SCRIPT} missing: `pip install -e .` installs it"
    proc = subprocess.run(
        [str(SCRIPT), *args],
        env=cli_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_version_names_the_distribution_to_install() -> None:
    r = console_script("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"reconciler {PROJECT['version']} (distribution {PROJECT['name']})")


@pytest.mark.parametrize(
    ("shell", "marks"),
    [
        ("bash", ["complete -o nosort -F _reconciler_completion reconciler"]),
        ("zsh", ["#compdef reconciler", "compdef _reconciler_completion reconciler"]),
        ("fish", ["complete --no-files --command reconciler"]),
    ],
)
def test_shell_completion_sources_come_from_the_console_script(
    shell: str, marks: list[str]
) -> None:
    r = console_script(env={"_RECONCILER_COMPLETE": f"{shell}_source"})
    assert r.returncode == 0, r.stderr
    for mark in marks:
        assert mark in r.stdout, (shell, r.stdout)
    assert f"_RECONCILER_COMPLETE={shell}_complete" in r.stdout


def test_bash_completion_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        cword = str(len(words.split()) - 1)
        env = {"_RECONCILER_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
        r = console_script(env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("reconciler em") == ["plain,emulator"]
    assert "plain,--emulator-port" in complete("reconciler run --emu")
