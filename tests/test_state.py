"""The state store, exercised on real files under ``tmp_path`` and on a real PostgreSQL.

Tests of the interface take ``store_at`` and run on both backends; those of
files, pragmas and SQLite's migrations take ``db``. PostgreSQL's own opening,
schema and secrets are in ``test_state_postgres.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.core.errors import NotRunningError
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import AppliedRecord, DesiredTask, FieldValue, Source, SyncStatus, TaskKey
from reconciler.store.base import (
    SCHEMA_VERSION,
    PostgresURL,
    Store,
    StoredTask,
    StoreError,
    StoreLocation,
    StoreWriteError,
    heal_reason,
)
from reconciler.store.recorder import Recorder
from reconciler.store.sqlite import APPLICATION_ID, SqliteConnection
from tests.postgres import PostgresServer

KEY = TaskKey("app1", "room1", "task1")
SRC = Source("rooms/a.yaml", 3, 5)
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
T2 = T0 + timedelta(seconds=2)
T3 = T0 + timedelta(seconds=3)
FIELDS: dict[str, FieldValue] = {"Identifier": "slice_1", "Handle": True, "Duration": 30}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> StoreLocation:
    """Where a new store goes, on each backend: the interface tests run on both."""
    if request.param == "sqlite":
        return tmp_path / "state" / "state.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return PostgresURL(server.create_database())


def open_store(path: StoreLocation) -> Store:
    return Store.open(path)


def reopened(path: StoreLocation, key: TaskKey = KEY) -> StoredTask:
    """The row as a fresh process would see it: proves the write was committed."""
    with Store.open(path, create=False) as store:
        state = store.get(key)
    assert state is not None
    return state


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files and permissions -----------------------------------------------------


def test_new_store_is_owner_only_and_umask_is_restored(tmp_path: Path) -> None:
    db = tmp_path / "outer" / "inner" / "state.db"
    old = os.umask(0o022)
    try:
        with open_store(db) as store:
            store.mark_pending(KEY, source=SRC, business_id=None)
            # WAL companions exist while the connection is open.
            wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
            assert wal.exists() and shm.exists()
            assert mode(wal) == 0o600
            assert mode(shm) == 0o600
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)
    assert mode(db) == 0o600
    assert mode(db.parent) == 0o700
    assert mode(db.parent.parent) == 0o700


def test_existing_parent_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    with open_store(tmp_path / "state.db"):
        pass
    assert mode(tmp_path) == 0o755
    assert mode(tmp_path / "state.db") == 0o600


def test_create_false_refuses_a_missing_store(db: Path) -> None:
    with pytest.raises(StoreError, match=f"state store {db} does not exist"):
        Store.open(db, create=False)
    assert not db.exists()
    assert not db.parent.exists()


def test_directory_in_place_of_the_file_is_a_clear_error(db: Path) -> None:
    db.mkdir(parents=True)
    with pytest.raises(StoreError, match=f"state store {db} is a directory"):
        Store.open(db)


def test_parent_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder")
    path = tmp_path / "state" / "state.db"
    with pytest.raises(StoreError, match=f"state store {path}: cannot create"):
        Store.open(path)


def test_closed_store_refuses_use(store_at: StoreLocation) -> None:
    store = open_store(store_at)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        store.applied()
    with pytest.raises(StoreError, match="is closed"):
        store.forget(KEY)


# -- writers -------------------------------------------------------------------


def test_mark_pending_creates_a_row_and_counts_attempts(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id="biz", at=T0)
        store.mark_pending(KEY, source=Source("rooms/b.yaml", 1, 1), business_id="biz2", at=T1)
    state = reopened(store_at)
    assert state.status is SyncStatus.PENDING
    assert state.attempts == 2
    assert state.fields is None
    assert state.last_call_at == T1
    assert state.applied_at is None
    assert state.request_id is None
    # No last-applied record yet, so the latest declaration's BusinessId stands.
    assert state.business_id == "biz2"
    assert state.source == "rooms/b.yaml:1:1"
    assert state.source_path == "rooms/b.yaml"
    assert state.updated_at == T1


def test_record_success_sets_last_applied_and_clears_the_past(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id="biz", at=T0)
        store.record_failure(
            KEY,
            message="boom",
            code="InternalError",
            request_id="req-bad",
            source=SRC,
            failed_spec="abc",
            at=T1,
        )
        store.mark_pending(KEY, source=SRC, business_id="biz", at=T2)
        store.record_success(
            KEY, fields=FIELDS, business_id="biz", request_id="req-ok", source=SRC, at=T3
        )
    state = reopened(store_at)
    assert state.status is SyncStatus.SYNCED
    assert state.fields == FIELDS
    assert isinstance(state.fields["Handle"], bool)
    assert isinstance(state.fields["Duration"], int)
    assert not isinstance(state.fields["Duration"], bool)
    assert state.attempts == 0
    assert state.applied_at == T3
    assert state.last_call_at == T2
    assert state.request_id == "req-ok"
    assert state.last_error is None
    assert state.last_error_code is None
    assert state.last_error_request_id is None
    assert state.failed_spec is None
    assert state.business_id == "biz"


def test_business_id_of_an_applied_record_changes_only_on_success(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_success(
            KEY, fields=FIELDS, business_id="old", request_id="r1", source=SRC, at=T0
        )
        store.mark_pending(KEY, source=SRC, business_id="new", at=T1)
        assert store.applied()[KEY].business_id == "old"
        store.record_success(KEY, fields=FIELDS, business_id="new", request_id="r2", source=SRC)
        assert store.applied()[KEY].business_id == "new"


def test_record_not_running_keeps_last_applied(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="req-ok", source=SRC, at=T0
        )
        store.mark_pending(KEY, source=SRC, business_id=None, at=T1)
        store.record_not_running(
            KEY,
            message="task is not running",
            code="InvalidParameter.ErrorActiveTaskNotFound",
            request_id="req-nr",
            source=SRC,
            at=T2,
        )
    state = reopened(store_at)
    assert state.status is SyncStatus.NOT_RUNNING
    assert state.fields == FIELDS
    assert state.applied_at == T0
    assert state.request_id == "req-ok"
    assert state.last_error == "task is not running"
    assert state.last_error_code == "InvalidParameter.ErrorActiveTaskNotFound"
    assert state.last_error_request_id == "req-nr"
    assert state.attempts == 1
    assert state.last_call_at == T1
    assert state.updated_at == T2


def test_record_failure_terminal_and_retryable(store_at: StoreLocation) -> None:
    other = TaskKey("app1", "room1", "task2")
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id=None, at=T0)
        store.record_failure(
            KEY,
            message="Duration out of range",
            code="InvalidParameter",
            request_id="req-1",
            source=SRC,
            failed_spec="0123456789abcdef",
            at=T1,
        )
        for _ in range(3):
            store.mark_pending(other, source=SRC, business_id=None, at=T0)
        store.record_failure(
            other,
            message="connection reset",
            code=None,
            request_id=None,
            source=SRC,
            failed_spec=None,
            at=T1,
        )
        applied = store.applied()
    failed = SyncStatus.FAILED
    assert applied[KEY] == AppliedRecord(
        KEY, None, None, "rooms/a.yaml", "0123456789abcdef", status=failed
    )
    assert applied[other] == AppliedRecord(other, None, None, "rooms/a.yaml", None, status=failed)
    state = reopened(store_at)
    assert state.status is SyncStatus.FAILED
    assert state.fields is None
    assert state.last_error == "Duration out of range"
    assert state.last_error_code == "InvalidParameter"
    retry = reopened(store_at, other)
    assert retry.status is SyncStatus.FAILED
    assert retry.attempts == 3
    assert retry.last_error_code is None
    assert retry.failed_spec is None


def test_a_result_without_mark_pending_still_creates_the_row(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_not_running(
            KEY, message="gone", code="InvalidParameter", request_id=None, source=SRC, at=T0
        )
    state = reopened(store_at)
    assert state.status is SyncStatus.NOT_RUNNING
    assert state.attempts == 1
    assert state.last_call_at == T0
    assert state.fields is None


def test_record_release_drops_fields(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC, at=T0
        )
        store.record_release(KEY, fields={"Identifier": "slice_1"}, at=T1)
    state = reopened(store_at)
    assert state.fields == {"Identifier": "slice_1"}
    assert state.status is SyncStatus.SYNCED
    assert state.applied_at == T0
    assert state.updated_at == T1


def test_record_release_refuses_values_never_applied(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        with pytest.raises(StoreError, match="no last-applied values"):
            store.record_release(KEY, fields={})
        store.mark_pending(KEY, source=SRC, business_id=None)
        with pytest.raises(StoreError, match="no last-applied values"):
            store.record_release(KEY, fields={})
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC, at=T0
        )
        with pytest.raises(ValueError, match="Duration"):
            store.record_release(KEY, fields={"Duration": 60})
        # The refused release left the record as it was.
        assert store.applied()[KEY].fields == FIELDS


def test_null_fields_differ_from_empty_fields(store_at: StoreLocation) -> None:
    never = TaskKey("app1", "room1", "never")
    empty = TaskKey("app1", "room1", "empty")
    with open_store(store_at) as store:
        store.mark_pending(never, source=SRC, business_id=None)
        store.record_in_sync(empty, business_id=None, source=SRC, fields={})
    with Store.open(store_at) as store:
        applied = store.applied()
    assert applied[never].fields is None
    assert applied[empty].fields == {}
    assert applied[empty].source == "rooms/a.yaml"


def test_record_in_sync_creates_clears_and_skips_no_op_writes(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_in_sync(KEY, business_id="b", source=SRC, fields=FIELDS, at=T0)
        first = store.get(KEY)
        assert first is not None
        assert first.status is SyncStatus.SYNCED
        assert first.fields == FIELDS
        assert first.applied_at is None  # nothing was sent
        assert first.updated_at == T0

        store.record_in_sync(KEY, business_id="b", source=SRC, fields=FIELDS, at=T1)
        assert store.get(KEY) == first  # nothing changed, nothing written

        store.mark_pending(KEY, source=SRC, business_id="b", at=T1)
        store.record_failure(
            KEY,
            message="bad",
            code="InvalidParameter",
            request_id="r",
            source=SRC,
            failed_spec="feed",
            at=T1,
        )
        moved = Source("rooms/b.yaml", 9, 3)
        store.record_in_sync(KEY, business_id="b", source=moved, fields=FIELDS, at=T2)
    state = reopened(store_at)
    assert state.status is SyncStatus.SYNCED
    assert state.attempts == 0
    assert state.last_error is None
    assert state.last_error_code is None
    assert state.failed_spec is None
    assert state.source == "rooms/b.yaml:9:3"
    assert state.source_path == "rooms/b.yaml"
    assert state.updated_at == T2


def test_forget_removes_the_row(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_in_sync(KEY, business_id=None, source=SRC, fields={})
        store.forget(KEY)
        store.forget(KEY)  # already gone: fine
        assert store.get(KEY) is None
    with Store.open(store_at) as store:
        assert store.applied() == {}


def test_all_is_sorted_and_counts_cover_every_status(store_at: StoreLocation) -> None:
    keys = [
        TaskKey("b", "r", "t"),
        TaskKey("a", "r2", "t"),
        TaskKey("a", "r10", "t"),
        TaskKey("a", "r1", "z"),
        TaskKey("a", "r1", "Z"),
    ]
    with open_store(store_at) as store:
        assert store.counts() == dict.fromkeys(SyncStatus, 0)
        for key in keys:
            store.record_in_sync(key, business_id=None, source=SRC, fields={})
        store.mark_pending(keys[0], source=SRC, business_id=None)
        store.record_failure(
            keys[1], message="x", code=None, request_id=None, source=SRC, failed_spec=None
        )
        assert [s.key for s in store.all()] == sorted(keys)
        assert store.counts() == {
            SyncStatus.SYNCED: 3,
            SyncStatus.OUT_OF_SYNC: 0,
            SyncStatus.PENDING: 1,
            SyncStatus.NOT_RUNNING: 0,
            SyncStatus.FAILED: 1,
        }


def test_writers_reject_bad_input(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        with pytest.raises(ValueError, match="no timezone"):
            store.mark_pending(KEY, source=SRC, business_id=None, at=datetime(2024, 1, 1))
        with pytest.raises(ValueError, match="not managed fields: AppId"):
            store.record_in_sync(KEY, business_id=None, source=SRC, fields={"AppId": "x"})
        with pytest.raises(ValueError, match="Duration has a float"):
            store.record_success(
                KEY,
                fields={"Duration": 1.5},  # type: ignore[dict-item]
                business_id=None,
                request_id="r",
                source=SRC,
            )
        assert store.get(KEY) is None


def test_times_are_stored_in_utc(db: Path) -> None:
    plus8 = datetime(2024, 5, 1, 20, 0, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=8)))
    with open_store(db) as store:
        store.mark_pending(KEY, source=SRC, business_id=None, at=plus8)
    raw = sqlite3.connect(db).execute("SELECT last_call_at FROM tasks").fetchone()[0]
    assert raw == "2024-05-01T20:00:00.000000Z"
    assert reopened(db).last_call_at == plus8


def test_to_json_shape(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id="biz", at=T0)
        store.record_success(
            KEY, fields=FIELDS, business_id="biz", request_id="req-1", source=SRC, at=T1
        )
        store.mark_pending(KEY, source=SRC, business_id="biz", at=T2)
        state = store.get(KEY)
    assert state is not None
    doc = state.to_json()
    assert doc == {
        "app_id": "app1",
        "room_id": "room1",
        "task_id": "task1",
        "business_id": "biz",
        "status": "Pending",
        "fields": {"Identifier": "slice_1", "Handle": True, "Duration": 30},
        "applied_at": "2024-05-01T12:00:01.000000Z",
        "request_id": "req-1",
        "attempts": 1,
        "last_call_at": "2024-05-01T12:00:02.000000Z",
        "last_error": None,
        "last_error_code": None,
        "last_error_request_id": None,
        "source": "rooms/a.yaml:3:5",
        "source_path": "rooms/a.yaml",
        "failed_spec": None,
        "updated_at": "2024-05-01T12:00:02.000000Z",
        "status_since": "2024-05-01T12:00:02.000000Z",
        "next_retry_at": None,
        "last_heal_at": None,
        "last_heal_reason": None,
    }
    assert json.loads(json.dumps(doc)) == doc


# -- transactions --------------------------------------------------------------


def test_each_writer_commits_before_returning(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id=None)
        # A second connection (another process, e.g. `status`) already sees it.
        with Store.open(store_at, create=False) as reader:
            state = reader.get(KEY)
        assert state is not None and state.status is SyncStatus.PENDING


def test_bulk_is_one_transaction(store_at: StoreLocation) -> None:
    keys = [TaskKey("a", "r", f"t{i}") for i in range(50)]
    with open_store(store_at) as store, Store.open(store_at) as reader:
        with store.bulk():
            for key in keys:
                store.record_in_sync(key, business_id=None, source=SRC, fields={})
            with store.bulk():  # nested blocks join the outer one
                store.mark_pending(keys[0], source=SRC, business_id=None)
            assert reader.applied() == {}  # not committed yet
            assert len(store.applied()) == 50  # but visible to the writer
        assert len(reader.applied()) == 50


def test_bulk_rolls_back_everything_on_error(store_at: StoreLocation) -> None:
    with open_store(store_at) as store:
        store.record_in_sync(KEY, business_id=None, source=SRC, fields={})
        with pytest.raises(RuntimeError), store.bulk():
            store.forget(KEY)
            store.record_in_sync(TaskKey("a", "r", "new"), business_id=None, source=SRC, fields={})
            raise RuntimeError("stop")
        assert list(store.applied()) == [KEY]
        # The store is usable afterwards.
        store.forget(KEY)
        assert store.applied() == {}


def test_a_killed_process_loses_no_recorded_result(db: Path) -> None:
    writer = f"""
import sys
from pathlib import Path
from reconciler.store.base import Store
from reconciler.core.task import Source, TaskKey
store = Store.open(Path({str(db)!r}))
src = Source("a.yaml", 1, 1)
i = 0
while True:
    key = TaskKey("app", "room", f"t{{i:05d}}")
    store.mark_pending(key, source=src, business_id=None)
    store.record_success(key, fields={{"Identifier": f"id{{i}}", "Duration": 30}},
                         business_id=None, request_id=f"req-{{i}}", source=src)
    sys.stderr.write(f"done {{i}}\\n")
    sys.stderr.flush()
    i += 1
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", writer],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stderr is not None
    done: list[int] = []
    try:
        for line in proc.stderr:
            if line.startswith("done "):
                done.append(int(line.split()[1]))
                if len(done) == 40:
                    break
            else:
                pytest.fail(f"writer failed: {line}{proc.stderr.read()}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert done == list(range(40))
    with Store.open(db, create=False) as store:
        applied = store.applied()
        for i in done:
            key = TaskKey("app", "room", f"t{i:05d}")
            assert applied[key].fields == {"Identifier": f"id{i}", "Duration": 30}
            state = store.get(key)
            assert state is not None
            assert state.status is SyncStatus.SYNCED
            assert state.request_id == f"req-{i}"


# -- schema, migrations, damaged files ----------------------------------------

V1_SCHEMA = """
CREATE TABLE tasks (
    app_id TEXT NOT NULL, room_id TEXT NOT NULL, task_id TEXT NOT NULL,
    business_id TEXT, applied_fields TEXT, applied_at TEXT, request_id TEXT,
    status TEXT NOT NULL
        CHECK (status IN ('Synced', 'Pending', 'NotRunning', 'Failed')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_call_at TEXT, last_error TEXT, last_error_code TEXT,
    source TEXT, updated_at TEXT NOT NULL,
    PRIMARY KEY (app_id, room_id, task_id)
) WITHOUT ROWID;
"""


def write_v1_store(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.executemany(
        "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                "app1",
                "room1",
                "task1",
                "biz",
                '{"Identifier":"slice_1","Handle":true,"Duration":30}',
                "2024-05-01T12:00:00.000000Z",
                "req-1",
                "Synced",
                0,
                "2024-05-01T11:59:59.000000Z",
                None,
                None,
                "rooms/a.yaml:3:5",
                "2024-05-01T12:00:00.000000Z",
            ),
            (
                "app1",
                "room2",
                "task9",
                None,
                None,
                None,
                None,
                "NotRunning",
                2,
                "2024-05-01T12:00:00.000000Z",
                "not running",
                "InvalidParameter.ErrorActiveTaskNotFound",
                "odd:name.yaml:10:1",
                "2024-05-01T12:00:00.000000Z",
            ),
        ],
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        return version
    finally:
        conn.close()


def test_new_store_is_at_the_current_schema(db: Path) -> None:
    with open_store(db):
        pass
    assert SCHEMA_VERSION == 7
    assert user_version(db) == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    meta = {row[1] for row in conn.execute("PRAGMA table_info(meta)")}
    observed = {row[1] for row in conn.execute("PRAGMA table_info(observations)")}
    conn.close()
    assert meta == {"key", "value"}
    assert observed == {
        "app_id",
        "room_id",
        "task_id",
        "observed_at",
        "state",
        "status",
        "start_time",
        "end_time",
        "stop_reason",
        "fields",
    }
    # No column for headers, raw requests or anything that could carry a secret.
    assert columns == {
        "app_id",
        "room_id",
        "task_id",
        "business_id",
        "applied_fields",
        "applied_at",
        "request_id",
        "status",
        "attempts",
        "last_call_at",
        "last_error",
        "last_error_code",
        "last_error_request_id",
        "source",
        "source_path",
        "failed_spec",
        "updated_at",
        "status_since",
        "prior_status",
        "prior_since",
        "next_retry_at",
        "applied_incarnation",
        "last_heal_at",
        "last_heal_reason",
    }


def test_v1_store_is_migrated_forward(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    write_v1_store(path)
    with Store.open(path, create=False) as store:
        applied = store.applied()
        conn = sqlite3.connect(path)
        (stamp,) = conn.execute(
            "SELECT applied_at FROM tasks WHERE applied_at IS NOT NULL"
        ).fetchone()
        conn.close()
        at = datetime.fromisoformat(stamp).timestamp()
        assert applied[KEY] == AppliedRecord(
            KEY,
            "biz",
            FIELDS,
            "rooms/a.yaml",
            None,
            applied_at=at,
            incarnation=None,
            status=SyncStatus.SYNCED,
        )
        odd = TaskKey("app1", "room2", "task9")
        assert applied[odd] == AppliedRecord(
            odd, None, None, "odd:name.yaml", None, status=SyncStatus.NOT_RUNNING
        )
        state = store.get(odd)
        assert state is not None
        assert state.status is SyncStatus.NOT_RUNNING
        assert state.attempts == 2
        assert state.last_error_request_id is None
        assert (state.last_heal_at, state.last_heal_reason) == (None, None), "never healed"
        # The new columns work.
        store.record_failure(
            KEY, message="bad", code="X", request_id="r", source=SRC, failed_spec="feed"
        )
        assert store.applied()[KEY].failed_spec == "feed"
    assert user_version(path) == SCHEMA_VERSION
    # Opening again applies nothing more and keeps the data.
    with Store.open(path) as store:
        assert store.applied()[KEY].fields == FIELDS


def test_store_from_a_newer_reconciler_is_refused(db: Path) -> None:
    with open_store(db) as store:
        store.record_in_sync(KEY, business_id=None, source=SRC, fields={})
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    expected = (
        f"state store {db} was written by a newer reconciler "
        f"(schema {SCHEMA_VERSION + 1}, this one knows up to {SCHEMA_VERSION})"
    )
    with pytest.raises(StoreError) as err:
        Store.open(db)
    assert str(err.value) == expected
    assert user_version(db) == SCHEMA_VERSION + 1  # untouched


def test_garbage_file_is_refused_not_reset(db: Path) -> None:
    db.parent.mkdir()
    garbage = b"this is not sqlite at all\x00\xff" * 200
    db.write_bytes(garbage)
    with pytest.raises(StoreError) as err:
        Store.open(db)
    message = str(err.value)
    assert str(db) in message
    assert "not a usable SQLite database" in message
    assert "not a database" in message
    assert db.read_bytes() == garbage


def test_damaged_pages_are_reported_as_corrupt(db: Path) -> None:
    with open_store(db) as store, store.bulk():
        for i in range(2000):
            store.record_in_sync(
                TaskKey("app", "room", f"task{i:05d}"),
                business_id=None,
                source=SRC,
                fields={"Identifier": f"slice_{i}"},
            )
    page_size = 4096
    assert db.stat().st_size > 8 * page_size
    with db.open("r+b") as f:
        for page in range(2, 8):
            f.seek(page * page_size)
            f.write(b"\xa5" * page_size)
    with pytest.raises(StoreError) as err:
        Store.open(db)
    assert str(err.value).startswith(f"state store {db} is corrupt: ")
    assert "\n" not in str(err.value)


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="SQLite database of something else"):
        Store.open(other)

    versioned = tmp_path / "versioned.db"
    conn = sqlite3.connect(versioned)
    conn.execute("CREATE TABLE tasks (x)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="application id 0x0"):
        Store.open(versioned)


def test_read_only_open_never_writes_the_file(tmp_path: Path) -> None:
    old = tmp_path / "v1.db"
    write_v1_store(old)
    old.chmod(0o644)
    before = old.read_bytes()
    with Store.open(old, create=False, read_only=True) as store:
        applied = store.applied()
        row = store.get(TaskKey("app1", "room1", "task1"))
    assert row is not None and row.source_path == "rooms/a.yaml", "migrated in memory"
    assert applied[TaskKey("app1", "room1", "task1")].fields == {
        "Identifier": "slice_1",
        "Handle": True,
        "Duration": 30,
    }
    assert old.read_bytes() == before and user_version(old) == 1
    assert mode(old) == 0o644, "a dry run does not even fix permissions"

    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError, match="empty file"):  # not a store: refused, not read as one
        Store.open(empty, create=False, read_only=True)
    assert empty.stat().st_size == 0

    with Store.open(old) as store:  # a writer upgrades and tightens it
        pass
    assert user_version(old) == SCHEMA_VERSION and mode(old) == 0o600


# -- since-times, retries and the tree root (schema 3) ---------------------------

V2_SCHEMA = (
    V1_SCHEMA
    + """
ALTER TABLE tasks ADD COLUMN source_path TEXT;
ALTER TABLE tasks ADD COLUMN failed_spec TEXT;
ALTER TABLE tasks ADD COLUMN last_error_request_id TEXT;
"""
)


def write_v2_store(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V2_SCHEMA)
    conn.execute(
        "INSERT INTO tasks (app_id, room_id, task_id, applied_fields, status, attempts,"
        " last_call_at, last_error, last_error_code, source, source_path, updated_at)"
        " VALUES ('app1', 'room1', 'task1', '{\"Duration\":30}', 'NotRunning', 3,"
        " '2024-05-01T11:00:00.000000Z', 'not running', 'InvalidParameter.ErrorActiveTaskNotFound',"
        " 'rooms/a.yaml:3:5', 'rooms/a.yaml', '2024-05-01T12:00:00.000000Z')"
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()


def test_v2_store_is_migrated_to_since_times_and_a_meta_table(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    write_v2_store(path)
    with Store.open(path, create=False) as store:
        state = store.get(KEY)
        assert state is not None
        # No history in v2: the row's last write is the best since-time there is.
        assert state.status_since == T0
        assert state.next_retry_at is None
        assert store.tree_root() is None
        store.record_tree_root("/srv/config/desired")
        store.mark_pending(KEY, source=SRC, business_id=None, at=T1)
        store.record_not_running(
            KEY, message="still not running", code="X", request_id=None, source=SRC, at=T2
        )
        assert store.get(KEY).status_since == T0  # type: ignore[union-attr]
    assert user_version(path) == SCHEMA_VERSION
    with Store.open(path, create=False, read_only=True) as store:
        assert store.tree_root() == "/srv/config/desired"


def test_read_only_open_migrates_a_v2_store_in_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    write_v2_store(path)
    before = path.read_bytes()
    with Store.open(path, create=False, read_only=True) as store:
        assert store.tree_root() is None
        (row,) = store.all()
        assert row.status_since == T0 and row.next_retry_at is None
    assert path.read_bytes() == before and user_version(path) == 2


def test_generation_counts_changes_to_what_the_planner_reads_and_reads_do_not(
    store_at: StoreLocation,
) -> None:
    with open_store(store_at) as store:
        lineage = store.lineage()
        assert lineage is not None and len(lineage) == 32 and store.generation() == 0
        assert store.opened_schema == 0
        store.mark_pending(KEY, source=SRC, business_id=None, at=T1)
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC, at=T2
        )
        assert store.generation() == 2
        store.record_observation(
            Observation(key=KEY, observed_at=T2.timestamp(), state=LiveStatus.UNKNOWN)
        )
        assert store.generation() == 2, "a read changes nothing a plan depends on"
        with store.bulk():  # one transaction, one bump
            store.record_incarnation(KEY, 123)
            store.record_tree_root("/srv/config/desired")
        assert store.generation() == 3
        with contextlib.suppress(RuntimeError), store.bulk():
            store.forget(KEY)
            raise RuntimeError("rolled back")
        assert store.generation() == 3 and store.get(KEY) is not None
    with Store.open(store_at, create=False, read_only=True) as store:
        assert (store.lineage(), store.generation(), store.opened_schema) == (
            lineage,
            3,
            SCHEMA_VERSION,
        )
    with Store.open(store_at, create=False) as store:
        assert store.lineage() == lineage, "the lineage is made once, with the store"


def test_an_older_store_gets_its_lineage_when_the_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    write_v2_store(path)
    with Store.open(path, create=False, read_only=True) as store:
        # Migrated in memory only: an id made now would not be the file's.
        assert store.lineage() is None and store.generation() == 0 and store.opened_schema == 2
    with Store.open(path, create=False) as store:
        assert store.opened_schema == 2 and store.lineage() is not None
        lineage = store.lineage()
    with Store.open(path, create=False, read_only=True) as store:
        assert store.lineage() == lineage


def test_status_since_survives_retries_that_end_where_they_began(store_at: StoreLocation) -> None:
    days = [T0 + timedelta(days=d) for d in range(6)]
    with open_store(store_at) as store:
        store.mark_pending(KEY, source=SRC, business_id=None, at=days[0])
        store.record_not_running(
            KEY, message="gone", code="X", request_id=None, source=SRC, at=days[0]
        )
        for day in days[1:3]:  # two retries, both NotRunning again
            store.mark_pending(KEY, source=SRC, business_id=None, at=day)
            assert reopened(store_at).status is SyncStatus.PENDING
            assert reopened(store_at).status_since == day, "Pending since the call started"
            store.record_not_running(
                KEY, message="gone", code="X", request_id=None, source=SRC, at=day
            )
            assert reopened(store_at).status_since == days[0], "NotRunning since the first answer"
        store.mark_pending(KEY, source=SRC, business_id=None, at=days[3])
        store.record_failure(
            KEY, message="500", code=None, request_id=None, source=SRC, failed_spec=None, at=days[3]
        )
        assert reopened(store_at).status_since == days[3], "a new status starts a new since"
        store.mark_pending(KEY, source=SRC, business_id=None, at=days[4])
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC, at=days[4]
        )
        assert reopened(store_at).status_since == days[4]
        # Bookkeeping of an unchanged, synced task (a file moved) keeps the since-time.
        moved = Source("rooms/b.yaml", 1, 1)
        store.record_in_sync(KEY, business_id=None, source=moved, fields=FIELDS, at=days[5])
    state = reopened(store_at)
    assert state.source_path == "rooms/b.yaml" and state.status_since == days[4]


def test_a_row_left_pending_by_a_killed_process_keeps_its_prior_status(
    store_at: StoreLocation,
) -> None:
    with open_store(store_at) as store:
        store.record_not_running(KEY, message="gone", code="X", request_id=None, source=SRC, at=T0)
        store.mark_pending(KEY, source=SRC, business_id=None, at=T1)
        # killed here; the next run calls again
        store.mark_pending(KEY, source=SRC, business_id=None, at=T2)
        assert reopened(store_at).status_since == T1
        store.record_not_running(KEY, message="gone", code="X", request_id=None, source=SRC, at=T3)
    assert reopened(store_at).status_since == T0


def test_next_retry_at_comes_with_the_result_and_goes_with_the_next_call(
    store_at: StoreLocation,
) -> None:
    later = T0 + timedelta(minutes=5)
    with open_store(store_at) as store:
        store.record_not_running(
            KEY, message="gone", code="X", request_id=None, source=SRC, next_retry_at=later, at=T0
        )
        assert reopened(store_at).next_retry_at == later
        store.mark_pending(KEY, source=SRC, business_id=None, at=T1)
        assert reopened(store_at).next_retry_at is None, "the retry is happening"
        store.record_failure(
            KEY, message="500", code=None, request_id=None, source=SRC, failed_spec=None, at=T2
        )
        assert reopened(store_at).next_retry_at is None, "nothing scheduled (apply)"
        store.record_failure(
            KEY,
            message="500",
            code=None,
            request_id=None,
            source=SRC,
            failed_spec=None,
            next_retry_at=later,
            at=T2,
        )
        store.record_in_sync(KEY, business_id=None, source=SRC, fields={}, at=T3)
        assert reopened(store_at).next_retry_at is None
        with pytest.raises(ValueError, match="no timezone"):
            store.record_not_running(
                KEY,
                message="x",
                code="X",
                request_id=None,
                source=SRC,
                next_retry_at=datetime(2024, 1, 1),
            )


def test_a_result_with_its_retry_time_is_one_transaction(db: Path) -> None:
    later = T0 + timedelta(minutes=5)
    task = DesiredTask(KEY, None, {"Duration": 30}, SRC)
    with open_store(db) as store:
        recorder = Recorder(store)
        recorder.retry_at = lambda key: later if key == KEY else None
        statements: list[str] = []
        conn = store._connection()
        assert isinstance(conn, SqliteConnection)
        conn.conn.set_trace_callback(statements.append)
        recorder.not_running(
            task,
            NotRunningError(
                action="UpdateSegment",
                code="InvalidParameter.ErrorActiveTaskNotFound",
                message="not running",
                request_id="r",
            ),
        )
        conn.conn.set_trace_callback(None)
    assert [s for s in statements if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    state = reopened(db)
    assert state.status is SyncStatus.NOT_RUNNING and state.next_retry_at == later


def test_tree_root_is_kept_as_given_and_must_be_absolute(
    store_at: StoreLocation, tmp_path: Path
) -> None:
    target = tmp_path / "revs" / "rev1"
    target.mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(target)
    with open_store(store_at) as store:
        assert store.tree_root() is None
        store.record_tree_root(str(link))
        store.record_tree_root(str(link))  # recording it again is fine
        with pytest.raises(ValueError, match="not an absolute path"):
            store.record_tree_root("desired")
    with Store.open(store_at, create=False) as store:
        assert store.tree_root() == str(link), "the link, not today's target"


# -- the last heal (schema 7) ------------------------------------------------------


def test_a_heal_is_kept_until_the_next_one_whatever_comes_between(
    store_at: StoreLocation, tmp_path: Path
) -> None:
    why = 'restart: Identifier "3f2a" → "slice_1", Duration 20 → 30'
    with open_store(store_at) as store:
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r1", source=SRC, at=T0
        )
        assert (reopened(store_at).last_heal_at, reopened(store_at).last_heal_reason) == (
            None,
            None,
        ), "a first sync or a change is no heal"
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r2", source=SRC, heal=why, at=T1
        )
        assert (reopened(store_at).last_heal_at, reopened(store_at).last_heal_reason) == (T1, why)
        # A change, a failure, a retry, bookkeeping: the last heal stands.
        store.mark_pending(KEY, source=SRC, business_id=None, at=T2)
        store.record_failure(
            KEY, message="500", code=None, request_id=None, source=SRC, failed_spec=None, at=T2
        )
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r3", source=SRC, at=T2
        )
        moved = Source("rooms/b.yaml", 1, 1)
        store.record_in_sync(KEY, business_id=None, source=moved, fields=FIELDS, at=T3)
        state = reopened(store_at)
        assert (state.last_heal_at, state.last_heal_reason) == (T1, why)
        assert state.to_json()["last_heal_at"] == "2024-05-01T12:00:01.000000Z"
        assert state.to_json()["last_heal_reason"] == why
        # The next heal replaces it; a copy of the store carries it.
        store.record_success(
            KEY,
            fields=FIELDS,
            business_id=None,
            request_id="r4",
            source=SRC,
            heal="drift: Duration 45 → 30",
            at=T3,
        )
        snapshot = store.snapshot()
    with Store.open(tmp_path / "copy.db") as copy:
        copy.restore(snapshot)
        row = copy.get(KEY)
    assert row is not None and (row.last_heal_at, row.last_heal_reason) == (
        T3,
        "drift: Duration 45 → 30",
    )
    with open_store(store_at) as store:
        store.forget(KEY)
        assert store.get(KEY) is None


def test_heal_reason_says_the_cause_and_each_field_set_back() -> None:
    assert (
        heal_reason("restart", [("Identifier", "3f2a", "edu-1"), ("Duration", 20, 60)])
        == 'restart: Identifier "3f2a" → "edu-1", Duration 20 → 60'
    )
    assert heal_reason("drift", [("Handle", None, True)]) == "drift: Handle=true"
    assert heal_reason("drift", []) == "drift"


def test_the_recorder_records_a_heal_with_the_success(db: Path) -> None:
    task = DesiredTask(KEY, None, FIELDS, SRC)
    with open_store(db) as store:
        recorder = Recorder(store)
        recorder.success(task, request_id="r1", incarnation=7, heal="restart: Duration 20 → 30")
        state = store.get(KEY)
        assert state is not None and state.last_heal_reason == "restart: Duration 20 → 30"
        assert state.last_heal_at is not None and state.last_heal_at == state.applied_at
        recorder.success(task, request_id="r2")
        after = store.get(KEY)
        assert after is not None and after.request_id == "r2"
        assert (after.last_heal_at, after.last_heal_reason) == (
            state.last_heal_at,
            state.last_heal_reason,
        ), "a success that is no heal leaves the last heal as it was"


# -- rows that cannot be read back, writes that cannot be made ---------------------------


def raw_execute(location: StoreLocation, sql: str, params: tuple[object, ...]) -> None:
    """Change a row behind the store's back, in the backend's own spelling."""
    if isinstance(location, PostgresURL):
        import psycopg

        with psycopg.connect(location.conninfo(), autocommit=True) as pg:
            pg.execute(sql.replace("?", "%s").replace(" tasks", " reconciler.tasks")
                       .replace(" observations", " reconciler.observations"), params)  # fmt: skip
        return
    with contextlib.closing(sqlite3.connect(location)) as conn, conn:
        conn.execute(sql, params)


def test_a_corrupt_row_is_an_error_naming_the_task_and_the_store(store_at: StoreLocation) -> None:
    other = TaskKey("app1", "room2", "task1")
    with open_store(store_at) as store:
        for key in (KEY, other):
            store.record_success(key, fields=FIELDS, business_id=None, request_id="r", source=SRC)
            store.record_observation(
                Observation(key, 1.0, LiveStatus.RUNNING, 5, None, None, 2, {"Duration": 30})
            )
    where = "app_id = ? AND room_id = ? AND task_id = ?"
    raw_execute(store_at, f"UPDATE tasks SET applied_fields = '{{\"Dur' WHERE {where}", KEY)
    with open_store(store_at) as store:
        for read in (store.applied, store.all, lambda: store.get(KEY)):
            with pytest.raises(StoreError) as refused:
                read()
            assert str(refused.value).startswith(f"state store {store_at}: the row of task {KEY}")
            assert "last-applied fields cannot be read" in str(refused.value)
        assert store.get(other) is not None, "the other rows read as ever"
        with pytest.raises(StoreError, match="last-applied fields cannot be read"):
            store.record_release(KEY, fields={})
    raw_execute(store_at, f"UPDATE tasks SET applied_fields = NULL WHERE {where}", KEY)
    raw_execute(store_at, f"UPDATE observations SET fields = '42' WHERE {where}", KEY)
    with open_store(store_at) as store, pytest.raises(StoreError) as refused:
        store.observations()
    assert f"task {KEY} is corrupt: its latest observation cannot be read" in str(refused.value)


def test_a_write_the_store_refuses_is_a_store_write_error_that_records_nothing(
    db: Path,
) -> None:
    with open_store(db) as store:
        store.check_writable()  # a store that takes writes: nothing to see
        generation = store.generation()
        backend = store._backend
        assert isinstance(backend, SqliteConnection)
        (pages,) = backend.conn.execute("PRAGMA page_count").fetchone()
        backend.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreWriteError) as refused:
            for n in range(200):  # until a new page is needed
                store.mark_pending(TaskKey("app", "room", f"t{n:03d}"), source=SRC,
                                   business_id=None)  # fmt: skip
        assert refused.value.what == "mark pending" and "full" in refused.value.reason
        backend.conn.execute(f"PRAGMA max_page_count = {pages * 100}")
        store.check_writable()
        assert store.generation() == generation + n, "the refused write recorded nothing"
        assert store._meta("write_probe") is None, "the probe leaves no trace"
