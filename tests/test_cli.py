"""``validate``, ``plan`` and ``status`` as a user runs them: subprocesses, real files."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.core.task import Source, TaskKey
from reconciler.store.base import Store
from tests.conftest import (
    REPO,
    CliResult,
    cli_env,
    reconciler_cmd,
    run_cli,
    tasks_yaml,
    wait_for,
    write,
)

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
    offline = ("plan", "desired", "--state", "s.db", "--no-refresh")
    r = run_cli(*offline, "--detailed-exitcode", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "~ UpdateSegment" in r.stdout and "+ Duration" in r.stdout
    assert "every field: live not read" in r.stdout
    assert "Plan: 1 to update, 0 in sync" in r.stdout
    assert "live tasks were not read (--no-refresh)" in r.stdout
    assert not (tmp_path / "s.db").exists(), "a dry run creates nothing"

    r = run_cli(*offline, cwd=tmp_path)
    assert r.returncode == 0, "without --detailed-exitcode pending calls still exit 0"

    with Store.open(tmp_path / "s.db") as store:
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
    with Store.open(tmp_path / "s.db") as store:
        store.record_success(
            KEY,
            fields={"Duration": 30, "Handle": True},
            business_id=None,
            request_id="r1",
            source=Source("a.yaml", 3, 5),
        )
    offline = ("plan", "desired", "--state", "s.db", "--no-refresh")
    r = run_cli(*offline, "--output", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["refresh"] == {"mode": "none", "read": 0, "failed": 0, "reason": "--no-refresh"}
    assert doc["refreshed"] is False
    (call,) = doc["calls"]
    assert call["body"] == {"AppId": APP, "RoomId": "room-1", "TaskId": "seg", "Duration": 45}
    assert call["changes"] == [{"field": "Duration", "old": 30, "new": 45}]
    assert doc["summary"]["to_update"] == 1 and doc["summary"]["in_sync"] == 0

    text = run_cli(*offline, cwd=tmp_path).stdout
    assert "Duration = 30 → 45" in text
    assert "Planned against the last-applied state; live tasks were not read" in text


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
            "RECONCILER_PLAN_OUTPUT": "json",
            "RECONCILER_DETAILED_EXITCODE": "1",
            "RECONCILER_REFRESH": "false",
        },
    )
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout)["summary"]["to_update"] == 1
    assert json.loads(r.stdout)["refresh"]["mode"] == "none"


def test_status_shows_each_task_and_json_shape(tmp_path: Path) -> None:
    r = run_cli("status", "--state", "s.db", cwd=tmp_path)
    assert r.returncode == 1 and "state store s.db does not exist" in r.stderr
    with Store.open(tmp_path / "s.db") as store:
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
    assert "2 tasks: 1 Synced, " in r.stdout and ", 1 NotRunning, 0 Failed, 0 New." in r.stdout

    doc = json.loads(run_cli("status", "--state", "s.db", "-o", "json", cwd=tmp_path).stdout)
    assert {k: n for k, n in doc["counts"].items() if n} == {"Synced": 1, "NotRunning": 1}
    assert {"Pending", "Failed", "New"} <= doc["counts"].keys()
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


# --- environment variables: one name per meaning -----------------------------------

# Renamed because one name meant different things in different commands; the old
# ones still work, with a warning. Mirrors the table in docs/commands.md.
EMULATOR_RENAMES = {
    f"RECONCILER_{old}": f"RECONCILER_EMULATOR_{old}"
    for old in (
        "HOST",
        "PORT",
        "TASKS",
        "LATENCY_MS",
        "JITTER_MS",
        "ERROR_RATE",
        "DROP_RATE",
        "DROP_PHASE",
        "UPDATE_QPS",
        "SEED",
    )
}


def deprecation_warnings(stderr: str) -> dict[str, str]:
    """Old variable → the new one its warning names."""
    found = {}
    for line in stderr.splitlines():
        m = re.search(r"\b(RECONCILER_\w+) is deprecated\b.*\b(RECONCILER_\w+)\b", line)
        if m:
            found[m[1]] = m[2]
    return found


def stored_task(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    with Store.open(tmp_path / ".reconciler" / "state.db") as store:
        store.record_success(
            KEY,
            fields={"Duration": 30},
            business_id=None,
            request_id="req-1",
            source=Source("a.yaml", 3, 5),
        )


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_each_command_reads_its_own_output_variable(tmp_path: Path) -> None:
    stored_task(tmp_path)
    plan_json = {"RECONCILER_PLAN_OUTPUT": "json"}
    r = run_cli("plan", cwd=tmp_path, env=plan_json)
    assert r.returncode == 0 and is_json(r.stdout), r.stderr
    # Asking plan for JSON no longer changes what status prints, nor validate.
    r = run_cli("status", cwd=tmp_path, env=plan_json)
    assert r.returncode == 0 and not is_json(r.stdout) and "Synced" in r.stdout, r.stderr
    r = run_cli("validate", cwd=tmp_path, env=plan_json)
    assert r.returncode == 0 and r.stdout.startswith("valid"), r.stderr
    r = run_cli("status", cwd=tmp_path, env={"RECONCILER_STATUS_OUTPUT": "json"})
    assert r.returncode == 0 and json.loads(r.stdout)["tasks"][0]["status"] == "Synced"
    r = run_cli("validate", cwd=tmp_path, env={"RECONCILER_VALIDATE_OUTPUT": "json"})
    assert r.returncode == 0 and is_json(r.stdout), r.stderr
    for r in (run_cli("plan", cwd=tmp_path, env=plan_json),):
        assert deprecation_warnings(r.stderr) == {}


def test_the_shared_output_variable_still_works_with_a_warning(tmp_path: Path) -> None:
    stored_task(tmp_path)
    old = {"RECONCILER_OUTPUT": "json"}
    for command in ("plan", "status"):
        r = run_cli(command, cwd=tmp_path, env=old)
        assert r.returncode == 0 and is_json(r.stdout), (command, r.stderr)
        new = f"RECONCILER_{command.upper()}_OUTPUT"
        assert deprecation_warnings(r.stderr) == {"RECONCILER_OUTPUT": new}, r.stderr
        # The new name wins, silently; so does the command line.
        for r in (
            run_cli(command, cwd=tmp_path, env={**old, new: "text"}),
            run_cli(command, "-o", "text", cwd=tmp_path, env=old),
        ):
            assert r.returncode == 0 and not is_json(r.stdout), (command, r.stderr)
            assert deprecation_warnings(r.stderr) == {}, r.stderr
    # validate never read RECONCILER_OUTPUT, so it does not start now.
    r = run_cli("validate", cwd=tmp_path, env=old)
    assert r.returncode == 0 and r.stdout.startswith("valid"), r.stderr
    assert deprecation_warnings(r.stderr) == {}


class EmulatorProcess:
    """``reconciler emulator`` as a subprocess, until its listening line appears."""

    def __init__(self, cwd: Path, env: Mapping[str, str]) -> None:
        self.log = cwd / "emulator.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                reconciler_cmd("emulator"),
                cwd=cwd,
                env=cli_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def listening() -> str | None:
            m = re.search(r"emulator listening on (\S+)", self.output())
            if m is None and self.proc.poll() is not None:
                raise AssertionError(f"emulator exited {self.proc.returncode}:\n{self.output()}")
            return m[1] if m else None

        self.url: str = wait_for(listening)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def settings(self) -> dict[str, Any]:
        """The faults and limits in force, and how many tasks run."""
        with httpx.Client(timeout=5.0) as http:
            faults: dict[str, Any] = http.post(f"{self.url}/_emulator/faults", json={}).json()
            faults["tasks"] = len(http.get(f"{self.url}/_emulator/tasks").json()["tasks"])
        faults["UpdateSegment"] = faults.pop("qps")["UpdateSegment"]
        return faults

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# 127.0.0.2 is loopback too (127.0.0.0/8), and not the default host.
HOST = "127.0.0.2"
EMULATOR_SETTINGS = {
    "TASKS": "desired",
    "LATENCY_MS": "3",
    "JITTER_MS": "2",
    "ERROR_RATE": "0.25",
    "DROP_RATE": "0.125",
    "DROP_PHASE": "before",
    "UPDATE_QPS": "40",
    "SEED": "5",
}
EXPECTED_SETTINGS = {
    "tasks": 1,
    "latency_ms": 3.0,
    "jitter_ms": 2.0,
    "error_rate": 0.25,
    "drop_rate": 0.125,
    "drop_phase": "before",
    "UpdateSegment": 40,
}


def test_emulator_reads_its_own_variables(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    port = free_port(HOST)
    env = {f"RECONCILER_EMULATOR_{k}": v for k, v in EMULATOR_SETTINGS.items()}
    env |= {"RECONCILER_EMULATOR_HOST": HOST, "RECONCILER_EMULATOR_PORT": str(port)}
    emulator = EmulatorProcess(tmp_path, env)
    try:
        assert emulator.url == f"http://{HOST}:{port}"
        assert emulator.settings() == EXPECTED_SETTINGS
    finally:
        emulator.stop()
    assert deprecation_warnings(emulator.output()) == {}


def test_emulator_old_variables_work_with_a_warning_and_new_ones_win(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    old_port, new_port = free_port(HOST), free_port(HOST)
    env = {f"RECONCILER_{k}": v for k, v in EMULATOR_SETTINGS.items()}
    env |= {"RECONCILER_HOST": HOST, "RECONCILER_PORT": str(old_port)}
    # Both names set: the new one is used, and nothing is said about the old one.
    both = {"RECONCILER_EMULATOR_PORT": str(new_port), "RECONCILER_EMULATOR_ERROR_RATE": "0.5"}
    emulator = EmulatorProcess(tmp_path, {**env, "RECONCILER_ERROR_RATE": "0.75", **both})
    try:
        assert emulator.url == f"http://{HOST}:{new_port}"
        assert emulator.settings() == {**EXPECTED_SETTINGS, "error_rate": 0.5}
    finally:
        emulator.stop()
    warned = deprecation_warnings(emulator.output())
    shadowed = {"RECONCILER_PORT", "RECONCILER_ERROR_RATE"}
    assert warned == {k: v for k, v in EMULATOR_RENAMES.items() if k not in shadowed}


def test_a_bad_value_names_the_variable_it_came_from(tmp_path: Path) -> None:
    for name in ("RECONCILER_EMULATOR_SEED", "RECONCILER_SEED"):
        r = run_cli("emulator", cwd=tmp_path, env={name: "five"}, timeout=20)
        assert r.returncode == 1, r.stderr
        assert f"Invalid value for '--seed' (env var: '{name}')" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_help_lists_the_new_variable_names(tmp_path: Path) -> None:
    def help_text(command: str) -> str:
        r = run_cli(command, "--help", cwd=tmp_path, env={"COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        return r.stdout

    emulator = help_text("emulator")
    for old, new in EMULATOR_RENAMES.items():
        assert new in emulator
        assert not re.search(rf"\b{old}\b", emulator), old
    # The port an emulator listens on: one name for `emulator` and `run --emulator`.
    assert "RECONCILER_EMULATOR_PORT" in help_text("run")
    for command in ("plan", "status", "validate"):
        text = help_text(command)
        assert f"RECONCILER_{command.upper()}_OUTPUT" in text
        assert not re.search(r"\bRECONCILER_OUTPUT\b", text)


def test_completion_command_installs_in_a_real_bash(tmp_path: Path) -> None:
    """``eval "$(reconciler completion bash)"`` in bash, then the function bash calls on
    Tab: it completes commands, and the choices of an option (plan's formats)."""
    script = (
        'eval "$(reconciler completion bash)"\n'
        "COMP_WORDS=(reconciler pl); COMP_CWORD=1; _reconciler_completion reconciler\n"
        'echo "commands: ${COMPREPLY[*]}"\n'
        'COMP_WORDS=(reconciler plan -o ""); COMP_CWORD=3; COMPREPLY=()\n'
        "_reconciler_completion reconciler\n"
        'echo "formats: ${COMPREPLY[*]}"\n'
    )
    env = cli_env(PATH=f"{SCRIPT.parent}:/usr/bin:/bin")
    r = subprocess.run(
        ["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "commands: plan" in r.stdout.splitlines()
    assert "formats: text json markdown" in r.stdout.splitlines()
    for shell, mark in (("zsh", "#compdef reconciler"), ("fish", "complete --no-files")):
        assert mark in console_script("completion", shell).stdout
    by_shell = console_script("completion", env={"SHELL": "/usr/bin/fish"})
    assert "complete --no-files --command reconciler" in by_shell.stdout
    unknown = console_script("completion", env={"SHELL": "/bin/tcsh"})
    assert unknown.returncode == 1 and "name it (bash, zsh, fish)" in unknown.stderr


def test_plan_saves_with_save_and_the_old_out_still_works_with_a_warning(tmp_path: Path) -> None:
    one_task(tmp_path / "desired", Duration=30)
    args = ("plan", "desired", "--no-refresh")
    new = run_cli(*args, "--save", "p.json", cwd=tmp_path)
    assert new.returncode == 0 and "deprecated" not in new.stderr, new.stderr
    assert json.loads((tmp_path / "p.json").read_text())["kind"] == "reconciler/saved-plan"
    old = run_cli(*args, "--out", "q.json", cwd=tmp_path)
    assert old.returncode == 0, old.stderr
    assert "warning: --out is deprecated: use --save" in old.stderr
    assert json.loads((tmp_path / "q.json").read_text())["kind"] == "reconciler/saved-plan"
    by_env = run_cli(*args, cwd=tmp_path, env={"RECONCILER_PLAN_OUT": "r.json"})
    assert by_env.returncode == 0 and (tmp_path / "r.json").is_file()
    assert deprecation_warnings(by_env.stderr) == {"RECONCILER_PLAN_OUT": "RECONCILER_PLAN_SAVE"}
    both = run_cli(*args, "--save", "a.json", "--out", "b.json", cwd=tmp_path)
    assert both.returncode == 1 and "name different files" in both.stderr
    # -o is the format: a file name given to it says which option takes one.
    wrong = run_cli(*args, "-o", "plan.json", cwd=tmp_path)
    assert wrong.returncode == 1
    assert "-o/--output is the format; to save the plan to a file, use --save plan.json" in (
        wrong.stderr
    )
    assert "use --save" not in run_cli(*args, "-o", "yaml", cwd=tmp_path).stderr


def test_run_help_groups_options_with_the_common_ones_first() -> None:
    r = console_script("run", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    headings = [
        line[:-1] for line in lines if line and not line.startswith(" ") and line[-1] == ":"
    ]
    assert headings == [
        "Options",
        "API",
        "Budget",
        "Observation",
        "Change control",
        "Desired-file limits",
        "Health, dashboard and notices",
        "Leadership",
        "Logging",
    ]

    def section(title: str) -> str:
        start = lines.index(f"{title}:")
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i] and lines[i][0] != " "), None
        )
        return "\n".join(lines[start:end])

    assert all(o in section("Options") for o in ("--state", "--endpoint", "--emulator", "--help"))
    assert "--qps" in section("Budget") and "--read-qps" in section("Budget")
    assert "--canary" in section("Change control") and "--replica" in section("Leadership")
    assert "--log-level" in section("Logging")
    options = re.findall(r"^\s{2}(?:-\w, )?(--[\w-]+)", r.stdout, flags=re.MULTILINE)
    assert len(options) == len(set(options)), "each option once"
    # Shorter help keeps run's 50-odd options to about two screens (the per-file limits included).
    assert len(lines) < 125, len(lines)


def test_the_emulator_says_it_stops_as_itself(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        reconciler_cmd("emulator", "--port", "0"),
        cwd=tmp_path,
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        while "emulator listening" not in (line := proc.stderr.readline()):
            assert line, "the emulator ended before listening"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        names = [json.loads(x)["event"] for x in proc.stderr.read().splitlines() if x[:1] == "{"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "emulator.signal" in names and "daemon.signal" not in names
