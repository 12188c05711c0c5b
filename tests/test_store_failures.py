"""Stores that fail fail loudly and lose nothing (no call goes out that cannot be recorded).

Real processes and real files: an empty or foreign file in place of a store,
a corrupt row, a store in a read-only folder, and a full disk, which is a
real size-limited file system (a tmpfs mounted for the test; those tests are
skipped, saying why, where mounting is impossible) and, portably, SQLite's
own ``PRAGMA max_page_count`` limit (``SQLITE_FULL``) on the store's
connection. The emulator counts what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.api.client import ClientConfig, RtcClient
from reconciler.api.credentials import Credentials
from reconciler.core.plan import compute_plan
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.engine.apply import apply_plan
from reconciler.engine.reconcile import TaskReconciler
from reconciler.store.base import Store
from reconciler.store.recorder import Recorder
from reconciler.store.sqlite import SqliteConnection
from reconciler.tree.desired import load_tree
from tests.conftest import ACCESS_KEY, SECRET_KEY, CliResult, run_cli, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

APP = "fa11ingst0re0app"


def rooms(n: int) -> list[str]:
    return [f"room-{i:03d}" for i in range(n)]


def declare(root: Path, names: list[str], duration: int) -> None:
    rows = [{"RoomId": r, "TaskId": "seg", "Duration": duration} for r in names]
    write(root / "desired", "a.yaml", tasks_yaml(APP, rows))


def start(h: EmulatorHandle, names: list[str]) -> None:
    for r in names:
        h.start_task(app_id=APP, room_id=r, task_id="seg")


def updates(h: EmulatorHandle) -> int:
    counts: dict[str, int] = h.stats_snapshot()["by_action"].get("UpdateSegment", {})
    return sum(counts.values())


def live_durations(h: EmulatorHandle) -> dict[str, int]:
    return {t.key.room_id: t.duration for t in h.tasks()}


def rows_of(db: Path) -> dict[str, str]:
    """Each task's recorded status, by room (read-only: the store is not touched)."""
    with Store.open(db, create=False, read_only=True) as store:
        return {r.key.room_id: str(r.status) for r in store.all()}


def one_error(r: CliResult, *parts: str) -> str:
    """The command failed with one ``error:`` line holding ``parts``, and no traceback."""
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    for part in parts:
        assert part in line, line
    return line


@pytest.fixture
def fleet(make_emulator: Callable[..., EmulatorHandle]) -> EmulatorHandle:
    return make_emulator(seed=11)


# --- a file that is not a store ----------------------------------------------------------


def test_an_empty_file_is_refused_never_taken_for_a_new_store(
    tmp_path: Path, fleet: EmulatorHandle
) -> None:
    names = rooms(3)
    start(fleet, names)
    declare(tmp_path, names, 60)
    db = tmp_path / "state.db"
    db.touch()
    for command in (
        ("apply", "desired", "--state", "state.db", "--endpoint", fleet.url),
        ("plan", "desired", "--state", "state.db", "--no-refresh"),
        ("status", "desired", "--state", "state.db"),
    ):
        one_error(run_cli(*command, cwd=tmp_path), "state store state.db is an empty file")
    daemon = DaemonProcess(tmp_path, "desired", "--state", "state.db", "--endpoint", fleet.url,
                           "--health-port", "0")  # fmt: skip
    assert daemon.wait(timeout=20) == 1
    assert "state store state.db is an empty file" in daemon.log_path.read_text()
    assert db.stat().st_size == 0, "never reset"
    assert updates(fleet) == 0, "nothing was sent"

    # An empty SQLite database (a header, no tables) is no store either.
    db.unlink()
    sqlite3.connect(db).execute("PRAGMA journal_mode = WAL").fetchone()
    one_error(
        run_cli("apply", "desired", "--state", "state.db", "--endpoint", fleet.url, cwd=tmp_path),
        "is an empty SQLite database",
    )
    assert updates(fleet) == 0

    # A new store is built aside and linked whole: an interrupted build leaves no store.
    db.unlink()
    (tmp_path / ".state.db.new-leftover").write_bytes(b"half made")
    ok = run_cli("apply", "desired", "--state", "state.db", "--endpoint", fleet.url, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert rows_of(db) == dict.fromkeys(names, "Synced")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [".state.db.new-leftover"], "the build cleaned up after itself"


# --- a corrupt row ------------------------------------------------------------------------


def test_a_corrupt_row_names_its_task_and_the_store_without_a_traceback(
    tmp_path: Path, fleet: EmulatorHandle
) -> None:
    names = rooms(3)
    start(fleet, names)
    declare(tmp_path, names, 60)
    first = run_cli("apply", "desired", "--state", "state.db", "--endpoint", fleet.url,
                    cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    db = tmp_path / "state.db"

    def corrupt(sql: str) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            assert conn.execute(sql, (APP, "room-001")).rowcount == 1

    def every_command(*, plan_reads_it: bool) -> None:
        commands: list[tuple[str, ...]] = [
            ("status", "desired", "--state", "state.db"),
            ("apply", "desired", "--state", "state.db", "--endpoint", fleet.url),
        ]
        if plan_reads_it:
            commands.append(("plan", "desired", "--state", "state.db", "--no-refresh"))
        for command in commands:
            one_error(run_cli(*command, cwd=tmp_path), "state store state.db",
                      f"task {APP}/room-001/seg is corrupt")  # fmt: skip
        daemon = DaemonProcess(tmp_path, "desired", "--state", "state.db", "--endpoint",
                               fleet.url, "--health-port", "0")  # fmt: skip
        assert daemon.wait(timeout=20) == 1
        said = daemon.log_path.read_text()
        assert f"task {APP}/room-001/seg is corrupt" in said and "Traceback" not in said

    sent = updates(fleet)
    corrupt("UPDATE tasks SET applied_fields = '{\"Duration\": 6' WHERE app_id = ? AND room_id = ?")
    every_command(plan_reads_it=True)
    corrupt("UPDATE tasks SET applied_fields = '[60]' WHERE app_id = ? AND room_id = ?")
    one_error(run_cli("status", "desired", "--state", "state.db", cwd=tmp_path),
              "its last-applied fields cannot be read (a JSON list, not an object)")  # fmt: skip
    corrupt("UPDATE tasks SET applied_fields = '{}' WHERE app_id = ? AND room_id = ?")
    corrupt("UPDATE observations SET fields = 'nope' WHERE app_id = ? AND room_id = ?")
    every_command(plan_reads_it=False)  # plan --no-refresh reads no observation
    assert updates(fleet) == sent, "nothing was sent"


# --- a store in a read-only folder ------------------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` where nothing can be created: a read-only bind mount (root ignores
    permissions), else the folder itself with its write bits off."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    view = folder.parent / f"{folder.name}-ro"
    view.mkdir()
    bound = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if bound.returncode:
        pytest.skip(f"cannot make a read-only folder as root: mount --bind: {bound.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def write_store(db: Path, names: list[str], *, exit_abruptly: bool) -> None:
    """Record ``names`` Synced in a store, in another process; ``exit_abruptly`` ends it
    without closing (as a kill would), leaving the commits in the ``-wal``."""
    script = (
        "import os, sys\n"
        "from reconciler.store.base import Store\n"
        "from reconciler.core.task import Source, TaskKey\n"
        f"store = Store.open({str(db)!r})\n"
        f"for room in {names!r}:\n"
        f"    store.record_success(TaskKey({APP!r}, room, 'seg'), fields={{'Duration': 60}},\n"
        "        business_id=None, request_id='r', source=Source('a.yaml', 1, 1))\n"
        + ("os._exit(0)\n" if exit_abruptly else "store.close()\n")
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


@pytest.mark.parametrize("files", ["closed", "killed", "wal_without_shm"])
def test_status_and_plan_read_a_store_in_a_read_only_folder(tmp_path: Path, files: str) -> None:
    names = rooms(3)
    declare(tmp_path, names, 60)
    folder = tmp_path / "store"
    folder.mkdir()
    db = folder / "state.db"
    write_store(db, names, exit_abruptly=files != "closed")
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    if files == "closed":
        assert not wal.exists(), "a clean close checkpoints the log away"
    else:
        assert wal.stat().st_size > 0, "the commits are in the -wal"
    if files == "wal_without_shm":
        shm.unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with read_only(folder) as view:
        state = str(view / "state.db")
        status = run_cli("status", "desired", "--state", state, "-o", "json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"]["Synced"] == 3
        plan = run_cli("plan", "desired", "--state", state, "--no-refresh", "-o", "json",
                       cwd=tmp_path)  # fmt: skip
        assert plan.returncode == 0, plan.stderr
        assert json.loads(plan.stdout)["calls"] == [], "planned against what the store holds"
        refused = run_cli("apply", "desired", "--state", state, "--endpoint", "http://127.0.0.1:9",
                          cwd=tmp_path)  # fmt: skip
        one_error(refused, "state.db")  # a writer cannot use it, and says so in one line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, "nothing was written"


# --- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB file system (tmpfs), mounted for the test: room for the store and
    its write-ahead log (which SQLite lets grow to about 4 MiB before it starts over)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(
            "full-disk tests need a size-limited file system, and mounting a tmpfs is not "
            f"allowed here ({mounted.stderr.strip() or mounted.returncode}); "
            "test_apply_stops_where_sqlite_refuses_a_write covers apply portably"
        )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, *, leave: int = 0) -> Path:
    """Fill ``disk`` with a file until ``leave`` bytes are free (0: until it is full)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while size > 0:
                size -= os.write(fd, b"\0" * min(size, 1 << 16))
            while not leave:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def not_recorded(r: CliResult) -> list[str]:
    """The rooms apply says it called but could not record."""
    return [x.split("/")[1] for x in r.stderr.splitlines() if x.startswith("  not recorded: ")]


def test_apply_stops_at_the_first_write_a_full_disk_refuses(
    tmp_path: Path, small_disk: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(latency_ms=30.0, seed=12)
    names = rooms(120)
    start(h, names)
    db = small_disk / "state.db"
    state = str(db)
    declare(tmp_path, names[:1], 60)
    base = ("apply", "desired", "--state", state, "--endpoint", h.url, "--no-refresh")
    assert run_cli(*base, cwd=tmp_path).returncode == 0  # the store, its tree root recorded
    declare(tmp_path, names, 60)

    # Full: the store cannot even be opened for writing (its -wal and -shm); nothing goes out.
    filler = fill(small_disk)
    before = updates(h)
    one_error(run_cli(*base, cwd=tmp_path), f"state store {state} cannot be read and written")
    assert updates(h) == before

    # Nearly full: it stops at the first refused write; every call it made is recorded
    # Synced, or listed as not recorded and left Pending. None other went out.
    filler.unlink()
    filler = fill(small_disk, leave=160_000)
    r = run_cli(*base, "--log-format", "console", cwd=tmp_path)
    line = one_error(r, f"state store {state}: cannot", "database or disk is full",
                     "stopped sending at the first write it refused")  # fmt: skip
    filler.unlink()
    rows = rows_of(db)
    called = {room for room, d in live_durations(h).items() if d == 60}
    synced = {room for room, status in rows.items() if status == "Synced"}
    unrecorded = set(not_recorded(r))
    assert called == synced | unrecorded and not synced & unrecorded
    assert all(rows[room] == "Pending" for room in unrecorded), "left Pending, as marked"
    assert len(called) < len(names), "it stopped"
    assert updates(h) - before == len(called) - 1, "one call per task called"
    if unrecorded:
        assert f"{len(unrecorded)} call(s) were made but their results may not be recorded" in line


def test_apply_stops_where_sqlite_refuses_a_write(
    tmp_path: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    """The same rule, portably: SQLite's page limit makes the store's writes fail
    with ``SQLITE_FULL`` partway through, with calls in flight."""
    h = make_emulator(latency_ms=30.0, seed=13)
    names = rooms(300)
    start(h, names)
    declare(tmp_path, names, 60)
    db = tmp_path / "state.db"
    index = load_tree(tmp_path / "desired")
    with Store.open(db) as store:
        backend = store._backend
        assert isinstance(backend, SqliteConnection)
        (pages,) = backend.conn.execute("PRAGMA page_count").fetchone()
        backend.conn.execute(f"PRAGMA max_page_count = {pages + 8}")
        recorder = Recorder(store)
        plan = compute_plan(index.tasks, recorder.applied)

        async def run() -> Any:
            config = ClientConfig(endpoint=h.url, trust_env=False)
            async with RtcClient(Credentials(ACCESS_KEY, SECRET_KEY), config=config) as client:
                stop = asyncio.Event()
                reconciler = TaskReconciler(client=client, recorder=recorder, stop=stop)
                return await apply_plan(
                    plan, reconciler=reconciler, recorder=recorder, workers=32, stop=stop
                )

        report = asyncio.run(run())
    assert report.store_error is not None and "full" in str(report.store_error)
    assert not report.ok and not report.interrupted
    rows = rows_of(db)
    called = {room for room, d in live_durations(h).items() if d == 60}
    synced = {room for room, status in rows.items() if status == "Synced"}
    unrecorded = {key.room_id for key in report.unrecorded}
    assert called == synced | unrecorded and updates(h) == len(called)
    assert all(rows[room] == "Pending" for room in unrecorded)
    assert 0 < len(called) < len(names)
    made = {r.key for r in report.results} | set(report.unrecorded)
    assert {TaskKey(APP, room, "seg") for room in names} == made | set(report.not_started)


def test_the_daemon_holds_its_calls_while_the_disk_is_full_and_sends_none_twice(
    tmp_path: Path, small_disk: Path, make_emulator: Callable[..., EmulatorHandle]
) -> None:
    h = make_emulator(latency_ms=20.0, seed=14)
    names = rooms(40)
    start(h, names)
    declare(tmp_path, names, 60)
    daemon = DaemonProcess(
        tmp_path, "desired", "--state", str(small_disk / "state.db"), "--endpoint", h.url,
        "--health-port", "0", "--resync", "3600", "--allow-mass-change",
    )  # fmt: skip
    try:
        daemon.wait_ready()
        wait_for(lambda: all(d == 60 for d in live_durations(h).values()))
        before = updates(h)

        filler = fill(small_disk, leave=40_000)
        declare(tmp_path, names, 90)  # every task needs a call, and each call a record
        (unwritable,) = daemon.wait_event("daemon.store_unwritable")
        assert "database or disk is full" in unwritable["error"]
        ready = daemon.health("/readyz")
        assert ready.status_code == 503
        assert ready.text == (
            f"not ready: cannot write the state store {small_disk / 'state.db'}: "
            "database or disk is full\n"
        )
        assert daemon.metric("reconciler_ready") == 0
        time.sleep(0.5)  # calls already on the wire when the write failed are answered
        held = updates(h)
        time.sleep(3.5)  # the store is probed after 1 s, then 2 s more: refused both times
        assert daemon.health("/readyz").status_code == 503
        assert updates(h) == held, "no call while the store cannot record it"
        assert len(daemon.events("daemon.store_unwritable")) == 1, "said once, not per task"
        assert not daemon.events("task.error")

        filler.unlink()
        (writable,) = daemon.wait_event("daemon.store_writable", timeout=30)
        assert writable["failed_writes"] >= 1
        daemon.wait_ready()
        wait_for(lambda: all(d == 90 for d in live_durations(h).values()), timeout=30)
        wait_for(lambda: daemon.metric("reconciler_tasks", 'status="Synced"') == len(names))
        assert updates(h) - before == len(names), "each task called once: none sent twice"
        assert {t.update_calls for t in h.tasks()} == {2}, "first sync, then the change"
        assert len(daemon.events("daemon.store_writable")) == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert rows_of(small_disk / "state.db") == dict.fromkeys(names, "Synced")
