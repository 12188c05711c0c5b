"""One writer per state store: a second daemon, or apply beside a daemon, is refused.

Every process that writes a store sends the calls its own plan finds, so two
writers send every call twice, and each duplicate Duration cuts a live slice.
Real processes on a real SQLite file (the lock is the OS's ``flock``, freed
by ``kill -9``) and on the real PostgreSQL of ``tests/postgres.py`` (where
``apply`` takes the replicas' election lock). Each process signs with an
access key of its own, so the emulator's per-key counts say who called.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler.emulator import EmulatorHandle
from reconciler.store.base import PostgresURL, Store, StoreError
from reconciler.store.lock import PostgresWriter, StoreInUse, WriterLock, lock_path
from tests.conftest import ACCESS_KEY, SECRET_KEY, run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "0ne0wr1ter0app00"
TASKS = 20
KEYS = {
    "first": (ACCESS_KEY, SECRET_KEY),
    "second": ("AKLTsecondWriter00002", "c2Vjb25kLXdyaXRlci1rZXk="),
    "apply": ("AKLTapplyWriter000003", "YXBwbHktd3JpdGVyLWtleQ=="),
}


def creds(name: str) -> dict[str, str]:
    ak, sk = KEYS[name]
    return {"VOLC_ACCESSKEY": ak, "VOLC_SECRETKEY": sk}


def requests_by(h: EmulatorHandle, name: str) -> int:
    """Every request (any action) signed with ``name``'s key."""
    by_key: dict[str, Any] = h.stats_snapshot()["by_key"]
    return sum(sum(per_second.values()) for per_second in by_key.get(KEYS[name][0], {}).values())


@pytest.fixture
def fleet(make_emulator: Callable[..., EmulatorHandle], tmp_path: Path) -> EmulatorHandle:
    """``TASKS`` running tasks, declared in ``desired/a.yaml`` with Duration 60."""
    h = make_emulator(credentials=dict(KEYS.values()), seed=5)
    rooms = [f"room-{i:02d}" for i in range(TASKS)]
    for room in rooms:
        h.start_task(app_id=APP, room_id=room, task_id="seg")
    rows = [{"RoomId": room, "TaskId": "seg", "Duration": 60} for room in rooms]
    write(tmp_path / "desired", "a.yaml", tasks_yaml(APP, rows))
    return h


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(cwd: Path, *args: str | Path, name: str, env: dict[str, str]) -> DaemonProcess:
        d = DaemonProcess(cwd, *args, name=name, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def since_of(text: str) -> datetime:
    """The ``since`` a refusal names, as a time."""
    stamp = text.split("since ", 1)[1].split(")", 1)[0].split(",", 1)[0]
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_a_second_daemon_or_apply_on_a_sqlite_store_is_refused_and_sends_nothing(
    tmp_path: Path, fleet: EmulatorHandle, daemons: Callable[..., DaemonProcess]
) -> None:
    args = ("desired", "--state", "state.db", "--endpoint", fleet.url, "--health-port", "0")
    first = daemons(tmp_path, *args, name="first", env=creds("first"))
    first.wait_ready()
    wait_for(lambda: all(t.duration == 60 for t in fleet.tasks()))
    started = datetime.now(UTC)

    second = daemons(tmp_path, *args, name="second", env=creds("second"))
    assert second.wait(timeout=15) == 1, "refused at once, not after a while"
    said = second.log_path.read_text()
    (line,) = [x for x in said.splitlines() if x.startswith("error: ")]
    pid, host = first.proc.pid, socket.gethostname()
    assert f"state store state.db is in use: reconciler run (pid {pid} on {host}, since" in line
    assert "state.db.lock" in line and "Traceback" not in said
    assert abs((since_of(line) - started).total_seconds()) < 60
    assert requests_by(fleet, "second") == 0, "the refused daemon sent nothing, reads included"

    refused = run_cli("apply", "desired", "--state", "state.db", "--endpoint", fleet.url,
                      cwd=tmp_path, env=creds("apply"))  # fmt: skip
    assert refused.returncode == 1
    assert f"reconciler run (pid {pid} on {host}, since" in refused.stderr
    assert "Traceback" not in refused.stderr and requests_by(fleet, "apply") == 0

    # Readers take no lock: plan and status still work while the daemon writes.
    plan = run_cli("plan", "desired", "--state", "state.db", "--no-refresh", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    status = run_cli("status", "desired", "--state", "state.db", "-o", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert '"Synced": 20' in status.stdout
    migrated = run_cli("state", "migrate", "--from", "state.db", "--to", "copy.db", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr

    # kill -9: the OS frees the lock; the file still names the dead daemon, and is no holder.
    first.kill()
    assert str(pid) in lock_path(tmp_path / "state.db").read_text()
    write(tmp_path / "desired", "a.yaml", tasks_yaml(APP, [
        {"RoomId": f"room-{i:02d}", "TaskId": "seg", "Duration": 90} for i in range(TASKS)
    ]))  # fmt: skip
    after = run_cli("apply", "desired", "--state", "state.db", "--endpoint", fleet.url,
                    "--allow-mass-change", cwd=tmp_path, env=creds("apply"))  # fmt: skip
    assert after.returncode == 0, after.stderr
    assert all(t.duration == 90 for t in fleet.tasks())
    assert "reconciler apply" in lock_path(tmp_path / "state.db").read_text(), "the last holder"


def test_a_refused_writer_never_touches_the_store(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from reconciler.store.base import Store\n"
         f"s = Store.open({str(db)!r}, command='holder')\n"
         "print('open', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert "open\n" in iter(holder.stdout.readline, ""), "the holder opened the store"
        before = db.read_bytes()
        with pytest.raises(StoreInUse, match=rf"holder \(pid {holder.pid} on ") as refused:
            Store.open(db)
        assert refused.value.holder is not None and refused.value.holder.pid == holder.pid
        with pytest.raises(StoreInUse):
            Store.open(tmp_path / "state.db", create=False)
        with Store.open(db, read_only=True) as reader:  # a reader is welcome
            assert reader.all() == []
        assert db.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    with Store.open(db) as store:  # the holder died: its lock went with it
        assert store.all() == []


def test_the_lock_is_shared_within_a_process_and_goes_with_the_last_handle(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    probe = [sys.executable, "-c",
             "from reconciler.store.base import Store, StoreError\n"
             f"try:\n    Store.open({str(db)!r}).close()\nexcept StoreError as e:\n"
             "    print(e)\n    raise SystemExit(3)\n"]  # fmt: skip
    one = Store.open(db)
    two = Store.open(db)  # the same process: one writer still
    one.close()
    assert subprocess.run(probe, capture_output=True, check=False).returncode == 3
    two.close()
    assert subprocess.run(probe, capture_output=True, check=False).returncode == 0
    lock = WriterLock.acquire(db, command="test")
    lock.release()
    lock.release()  # idempotent


def test_a_stale_lock_file_is_no_holder(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    lock_path(db).write_text('{"pid": 1, "host": "elsewhere", "since": "x", "command": "run"}')
    with Store.open(db) as store:
        assert store.opened_schema == 0
        assert f'"pid": {os.getpid()}' in lock_path(db).read_text()


# --- PostgreSQL ------------------------------------------------------------------------


def test_apply_is_refused_while_a_replica_leads_and_goes_with_the_override(
    tmp_path: Path,
    fleet: EmulatorHandle,
    daemons: Callable[..., DaemonProcess],
    postgres_url: str,
) -> None:
    url = postgres_url
    replica = daemons(
        tmp_path, "desired", "--state", url, "--endpoint", fleet.url, "--health-port", "0",
        "--replica", "pod-a", name="pod-a", env=creds("first"),
    )  # fmt: skip
    (elected,) = replica.wait_event("leader.elected")
    replica.wait_ready()
    wait_for(lambda: all(t.duration == 60 for t in fleet.tasks()))

    refused = run_cli("apply", "desired", "--state", url, "--endpoint", fleet.url,
                      cwd=tmp_path, env=creds("apply"))  # fmt: skip
    assert refused.returncode == 1
    holder = f"pod-a/{replica.proc.pid}"
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error: ")]
    assert f"daemon replica {holder}, the leader (epoch {elected['epoch']}, since " in line
    assert "nothing was sent" in line and "--force-while-leading" in line
    assert "Traceback" not in refused.stderr and requests_by(fleet, "apply") == 0
    password = PostgresURL(url).password
    assert password is not None and password not in refused.stdout + refused.stderr

    plan = run_cli("plan", "desired", "--state", url, "--no-refresh", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    status = run_cli("status", "desired", "--state", url, "-o", "json", cwd=tmp_path)
    assert status.returncode == 0 and '"Synced": 20' in status.stdout, status.stderr

    forced = run_cli("apply", "desired", "--state", url, "--endpoint", fleet.url,
                     "--force-while-leading", cwd=tmp_path, env=creds("apply"))  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    (beside,) = [e for e in forced.events() if e["event"] == "apply.beside_leader"]
    assert holder in beside["holder"]
    assert replica.proc.poll() is None, "the daemon runs on"


def test_apply_holds_the_election_lock_while_it_runs(postgres_url: str) -> None:
    url = PostgresURL(postgres_url)
    with Store.open(url):
        pass
    first = PostgresWriter.claim(url, command="reconciler apply")
    try:
        assert first.holds
        with pytest.raises(StoreInUse, match=r"reconciler apply .*/\d+, since ") as second:
            PostgresWriter.claim(url, command="reconciler apply")
        assert "nothing was sent" in str(second.value)
        forced = PostgresWriter.claim(url, command="reconciler apply", force=True)
        assert not forced.holds
        forced.release()
    finally:
        first.release()
    again = PostgresWriter.claim(url, command="reconciler apply")  # let go: free again
    assert again.holds
    again.release()


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = PostgresURL(f"postgresql://u:hunter2@127.0.0.1:{port}/db?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect") as refused:
        PostgresWriter.claim(url, command="reconciler apply")
    assert "hunter2" not in str(refused.value) and time.monotonic() - started < 10
