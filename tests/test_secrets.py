"""Secrets (the SK, session tokens) never reach logs, plans, state or errors."""

from __future__ import annotations

import signal
from pathlib import Path

from reconciler.api.credentials import Credentials, CredentialsError, load_credentials
from reconciler.emulator import EmulatorConfig, EmulatorHandle
from tests.conftest import ACCESS_KEY, SECRET_KEY, run_cli, tasks_yaml, write
from tests.harness import DaemonProcess

TOKEN = "STS-session-token-that-must-stay-hidden-0001"


def test_credentials_repr_and_errors_hide_the_secret(tmp_path: Path) -> None:
    creds = Credentials(ACCESS_KEY, SECRET_KEY, TOKEN)
    for text in (repr(creds), str(creds)):
        assert SECRET_KEY not in text and TOKEN not in text and ACCESS_KEY in text
    assert repr(EmulatorConfig(credentials={ACCESS_KEY: SECRET_KEY})).count(SECRET_KEY) == 0

    ini = tmp_path / "credentials"
    ini.write_text(f"[default]\nsecret_access_key = {SECRET_KEY}\n")
    try:
        load_credentials(environ={}, path=ini)
    except CredentialsError as exc:
        assert SECRET_KEY not in str(exc) and SECRET_KEY not in repr(exc)
    else:
        raise AssertionError("a credentials file without access_key_id must be refused")


def test_daemon_with_session_token_at_debug_level_never_writes_secrets(
    tmp_path: Path, make_emulator: object
) -> None:
    h = make_emulator(session_tokens={ACCESS_KEY: TOKEN})  # type: ignore[operator]
    h.start_task(app_id="app1", room_id="r1", task_id="t1")
    write(
        tmp_path / "desired",
        "a.yaml",
        tasks_yaml(
            "app1",
            [
                {"RoomId": "r1", "TaskId": "t1", "Duration": 9},
                {"RoomId": "r2", "TaskId": "t1", "Duration": 9},
            ],
        ),
    )
    d = DaemonProcess(
        tmp_path,
        *("desired", "--endpoint", h.url, "--health-port", "0", "--state", "state.db"),
        env={"VOLC_SESSION_TOKEN": TOKEN, "RECONCILER_LOG_LEVEL": "debug"},
    )
    try:
        d.wait_event("task.synced")
        d.wait_event("task.not_running")
        assert d.events("call.sending"), "debug events were written"
    finally:
        assert d.stop(signal.SIGTERM) == 0
    plan = run_cli(
        "plan",
        "desired",
        "--state",
        "state.db",
        "-o",
        "json",
        cwd=tmp_path,
        env={"VOLC_SESSION_TOKEN": TOKEN},
    )
    for blob in (
        d.log_path.read_bytes(),
        (tmp_path / "state.db").read_bytes(),
        plan.stdout.encode() + plan.stderr.encode(),
    ):
        assert SECRET_KEY.encode() not in blob and TOKEN.encode() not in blob


def test_an_open_credentials_file_is_warned_of_and_run_refuses_it(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """As ssh with a private key: a credentials file its group or others may read."""
    home = tmp_path / "home"
    ini = home / ".volc" / "credentials"
    ini.parent.mkdir(parents=True)
    ini.write_text(f"[default]\naccess_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n")
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{"RoomId": "r1", "TaskId": "t1"}]))
    # From the file alone: no key in the environment.
    env = {"HOME": str(home), "VOLC_ACCESSKEY": "", "VOLC_SECRETKEY": ""}
    api = ("--endpoint", emulator.url, "--state", "state.db")

    def warnings(text: str) -> list[str]:
        return [line for line in text.splitlines() if "too open" in line]

    for mode in (0o644, 0o666, 0o640):
        ini.chmod(mode)
        refused = run_cli("run", "desired", *api, "--health-port", "0", cwd=tmp_path, env=env)
        assert refused.returncode == 1, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert line == (
            f"error: permissions {mode:04o} for {ini} are too open: it holds the secret key "
            f"and {'its group' if mode == 0o640 else 'everyone'} may read it (run: chmod 600 "
            f"{ini}); run does not start with it (--allow-open-credentials or "
            "RECONCILER_ALLOW_OPEN_CREDENTIALS=1 starts it anyway)"
        )
        assert not (tmp_path / "state.db").exists(), "refused before anything was opened"

    ini.chmod(0o644)
    plan = run_cli("plan", "desired", *api, "--refresh", cwd=tmp_path, env=env)
    assert plan.returncode == 0, plan.stderr
    assert len(warnings(plan.stderr)) == 1 and plan.stderr.count("warning: permissions 0644") == 1
    apply = run_cli("apply", "desired", *api, cwd=tmp_path, env=env)
    assert apply.returncode == 0, apply.stderr
    assert len(warnings(apply.stderr)) == 1
    with DaemonProcess(
        tmp_path,
        *("desired", *api, "--health-port", "0"),
        env={**env, "RECONCILER_ALLOW_OPEN_CREDENTIALS": "1"},
    ) as d:
        d.wait_ready()
        assert d.stop() == 0
    assert len(warnings(d.log_path.read_text())) == 1, "overridden, and still said"
    for result in (plan, apply):
        assert SECRET_KEY not in result.stdout + result.stderr
    assert SECRET_KEY not in d.log_path.read_text()

    ini.chmod(0o600)
    quiet = run_cli("plan", "desired", *api, "--refresh", cwd=tmp_path, env=env)
    assert quiet.returncode == 0 and not warnings(quiet.stderr), quiet.stderr
