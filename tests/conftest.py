"""Shared fixtures: an emulator on loopback, desired trees on disk, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.emulator import EmulatorConfig, EmulatorHandle, running_emulator

ACCESS_KEY = "AKLTtestAccessKey0001"
SECRET_KEY = "c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFrLTAwMDE="
REPO = Path(__file__).resolve().parents[1]

# The PostgreSQL fixtures (postgres_server, postgres_url): one server per session.
pytest_plugins = ("tests.postgres",)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: test credentials, JSON events, no user config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "RECONCILER_"))}
    env.update(
        VOLC_ACCESSKEY=ACCESS_KEY,
        VOLC_SECRETKEY=SECRET_KEY,
        RECONCILER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def reconciler_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "reconciler", *map(str, args)]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def events(self, stream: str = "stderr") -> list[dict[str, Any]]:
        text = self.stderr if stream == "stderr" else self.stdout
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_cli(
    *args: str | Path, cwd: Path, timeout: float = 60, env: Mapping[str, str] | None = None
) -> CliResult:
    proc = subprocess.run(
        reconciler_cmd(*args),
        cwd=cwd,
        env=cli_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def write(root: Path, rel: str, text: str) -> Path:
    """Write a desired file atomically (as git does: new file, then rename)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def tasks_yaml(
    app: str, tasks: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None
) -> str:
    """A defaults+tasks file with every id quoted."""
    lines = ["defaults:", f'  AppId: "{app}"']
    for k, v in (defaults or {}).items():
        lines.append(f"  {k}: {json.dumps(v)}")
    lines.append("tasks:")
    for t in tasks:
        first = True
        for k, v in t.items():
            lines.append(f"  {'- ' if first else '  '}{k}: {json.dumps(v)}")
            first = False
    return "\n".join(lines) + "\n"


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    with running_emulator(EmulatorConfig(credentials={ACCESS_KEY: SECRET_KEY}, seed=7)) as h:
        yield h


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., EmulatorHandle]]:
    """Start emulators with custom config; all are stopped at teardown."""
    stack: list[Any] = []

    def start(**config: Any) -> EmulatorHandle:
        config.setdefault("credentials", {ACCESS_KEY: SECRET_KEY})
        cm = running_emulator(EmulatorConfig(**config))
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate`` returns something truthy; fail with a clear message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
