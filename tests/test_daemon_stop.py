"""The daemon always stops on a signal, and pauses once when the API cannot be reached.

Real subprocesses, real pipes and signals: a pipe whose reader died (``make
demo | tee`` then Ctrl-C) must never keep the daemon from stopping.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from reconciler.emulator import EmulatorHandle
from tests.conftest import cli_env, reconciler_cmd, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "661e4a7b9c0d1e2f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(root: Path, count: int, *, duration: int) -> None:
    rows = [{"RoomId": f"room-{i}", "TaskId": "seg", "Duration": duration} for i in range(count)]
    write(root, "a.yaml", tasks_yaml(APP, rows))


@pytest.mark.parametrize(
    ("sig", "stderr_too"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["sigint-both-streams-broken", "sigterm-stdout-broken"],
)
def test_a_signal_stops_the_daemon_after_its_log_reader_died(
    tmp_path: Path, emulator: EmulatorHandle, sig: signal.Signals, stderr_too: bool
) -> None:
    for i in range(3):
        emulator.start_task(app_id=APP, room_id=f"room-{i}", task_id="seg")
    tree(tmp_path / "desired", 3, duration=21)
    port = free_port()
    err = (tmp_path / "err.txt").open("wb")
    args = ("run", "desired", "--endpoint", emulator.url, "--health-port", str(port))
    proc = subprocess.Popen(
        reconciler_cmd(*args, "--state", "state.db"),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr_too else err,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"reconcile.completed" in line:
                break
        proc.stdout.close()  # the reader dies, as `tee` does on Ctrl-C
        tree(tmp_path / "desired", 3, duration=22)  # the daemon has things to log again
        wait_for(lambda: all(t.duration == 22 for t in emulator.tasks()), timeout=15)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(15) == 0, "a signal always stops the daemon"
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
    text = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text
    if not stderr_too:
        assert '"event": "daemon.stopped"' in text, "events fell back to stderr"


def test_an_unreachable_endpoint_pauses_the_daemon_after_one_probe(tmp_path: Path) -> None:
    tree(tmp_path / "desired", 20, duration=9)
    url = f"http://127.0.0.1:{free_port()}"
    with DaemonProcess(
        tmp_path, "desired", "--endpoint", url, "--health-port", "0", "--state", "state.db"
    ) as d:
        (paused,) = d.wait_event("daemon.paused")
        assert paused["code"] == "ConnectError"
        assert paused["error"].startswith(f"cannot reach {url}: connection refused"), paused
        ready = d.health("/readyz")
        assert ready.status_code == 503 and "cannot reach" in ready.text
        time.sleep(1.0)
        assert len(d.events("call.failed")) == 1, "one probe, not one failure per task"
        assert len(d.events("daemon.paused")) == 1
        started = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5, "the pause does not hold up shutdown"
