"""The state store: what the server last confirmed for each task, in SQLite.

One row per task (``app_id``, ``room_id``, ``task_id``) holds the last-applied
managed values the server accepted with ``Result: "ok"`` (JSON text; ``NULL``
means no call ever succeeded, which is not the same as ``{}``, "nothing to
manage"), where the task stands (:class:`~reconciler.task.SyncStatus`) and
since when, when the daemon will try it again, the last call and error, and
where the task was declared. The planner reads the rows as
:class:`~reconciler.task.AppliedRecord` values; ``apply`` and the daemon write
one result at a time; ``reconciler status`` lists them. A ``meta`` table holds
facts about the whole store: the tree root it was applied from, and its
*lineage* and *generation* (Terraform's lineage and serial): a random id made
with the store, and a number bumped by every transaction that changes what
the planner reads (anything but an observation), so a saved plan can tell
that the store it was made from is still the store, unchanged.

Durability. Every writer is one transaction, committed before it returns, so
a process killed mid-run loses nothing already recorded. The database runs in
WAL mode with ``synchronous=NORMAL``: a commit is appended to the write-ahead
log before the writer returns, and the log survives the process being killed
(only a power loss or OS crash can roll back the last few commits, never
corrupt the file). :meth:`StateStore.bulk` groups many writes into one
transaction when that matters for speed (a first sync of 100k in-sync tasks).

Files. The store and its ``-wal``/``-shm`` companions are created owner-only
(0600), a missing parent directory 0700: the rows name tasks and ids, never
secrets, but nothing here is for other users. No column holds headers, raw
requests or credentials.

Schema. ``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS` are
forward steps, each applied in its own transaction together with the version
bump. A store written by a newer reconciler, a file that is not a database, a
foreign SQLite database or a corrupt one is a :class:`StateError` naming the
path and what is wrong: the store is never silently reset or re-created.

Concurrency. A :class:`StateStore` keeps one connection and is meant for one
asyncio program: callers make one call at a time (it may come from a worker
thread, hence ``check_same_thread=False``). Other processes may read
concurrently (``status`` while the daemon runs); writers from two processes
wait on each other up to the busy timeout.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from reconciler.events import get_logger
from reconciler.live import LiveState, Observation
from reconciler.task import MANAGED_FIELDS, AppliedRecord, FieldValue, Source, SyncStatus, TaskKey

#: Marks a SQLite file as a reconciler state store (``PRAGMA application_id``).
APPLICATION_ID: Final = 0x52435354
#: Default location, relative to the current folder.
DEFAULT_PATH: Final = Path(".reconciler") / "state.db"
#: How long a writer waits for another process holding the write lock.
BUSY_TIMEOUT_S: Final = 5.0

log = get_logger()


class StateError(Exception):
    """The state store cannot be used: missing, unreadable, corrupt, too new, closed."""


class FencedError(StateError):
    """A write refused because this replica no longer leads (another one took over).

    Raised by a :class:`Fencing` check inside the write's own transaction, so
    the transaction records nothing.
    """


class Fencing(Protocol):
    """What a shared (PostgreSQL) store asks before every write transaction.

    ``check`` runs inside the transaction, before its writes, on the same
    connection (``cursor`` is that connection's); it raises
    :class:`FencedError` when the writer has been deposed.
    :class:`reconciler.leader.Leadership` is the one implementation.
    """

    def check(self, cursor: Any) -> None: ...


Migration = Callable[[sqlite3.Connection], None]


def _v1_base(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE tasks (
            app_id          TEXT NOT NULL,
            room_id         TEXT NOT NULL,
            task_id         TEXT NOT NULL,
            business_id     TEXT,
            applied_fields  TEXT,
            applied_at      TEXT,
            request_id      TEXT,
            status          TEXT NOT NULL
                CHECK (status IN ('Synced', 'Pending', 'NotRunning', 'Failed')),
            attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            last_call_at    TEXT,
            last_error      TEXT,
            last_error_code TEXT,
            source          TEXT,
            updated_at      TEXT NOT NULL,
            PRIMARY KEY (app_id, room_id, task_id)
        ) WITHOUT ROWID
        """
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _path_of_source(text: str | None) -> str | None:
    """``"a/b.yaml:3:5"`` → ``"a/b.yaml"``; text without a position is kept whole."""
    if text is None:
        return None
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0]
    return text


def _v2_source_path_and_refusals(conn: sqlite3.Connection) -> None:
    # The planner holds tasks of an invalid file by path, and blocks a refused
    # spec by hash; v1 kept only the "file:line:column" text and no hash. The
    # request id of a failed call gets its own column so that ``request_id``
    # stays the one of the last success.
    conn.execute("ALTER TABLE tasks ADD COLUMN source_path TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN failed_spec TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN last_error_request_id TEXT")
    conn.create_function("_path_of_source", 1, _path_of_source, deterministic=True)
    conn.execute("UPDATE tasks SET source_path = _path_of_source(source)")


def _v3_status_times_and_tree_root(conn: sqlite3.Connection) -> None:
    # ``status`` shows since when a task is in its status and when the daemon
    # tries it again. ``prior_*`` keep the settled status a call started from,
    # so a retry that ends where it began (NotRunning again) keeps its
    # since-time. ``meta`` records the tree root the store was applied from,
    # so a plan of the wrong tree cannot forget every task outside it.
    # Rows from v2 have no history: their last write is the best since-time.
    conn.execute("ALTER TABLE tasks ADD COLUMN status_since TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN prior_status TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN prior_since TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN next_retry_at TEXT")
    conn.execute("UPDATE tasks SET status_since = updated_at")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")


_STATUS_CHECK_V1: Final = "'NotRunning', 'Failed')"


def _v4_live_observations(conn: sqlite3.Connection) -> None:
    # Live observation (GetSegmentTask): the latest read of each task, the
    # incarnation (StartTime) that last-applied values were applied to, and a
    # fifth status, OutOfSync, for drift that is reported instead of healed.
    # SQLite cannot change a CHECK constraint in place: the table is rebuilt
    # from its own CREATE text with the wider list, rows copied as they are.
    (sql,) = conn.execute(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'tasks'"
    ).fetchone()
    if _STATUS_CHECK_V1 not in sql:
        raise StateError("the tasks table does not have the status check this step widens")
    wider = sql.replace("CREATE TABLE tasks", "CREATE TABLE tasks_v4", 1).replace(
        _STATUS_CHECK_V1, "'NotRunning', 'Failed', 'OutOfSync')"
    )
    conn.execute(wider)
    conn.execute("INSERT INTO tasks_v4 SELECT * FROM tasks")
    conn.execute("DROP TABLE tasks")
    conn.execute("ALTER TABLE tasks_v4 RENAME TO tasks")
    conn.execute("ALTER TABLE tasks ADD COLUMN applied_incarnation INTEGER")
    conn.execute(
        """
        CREATE TABLE observations (
            app_id      TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            task_id     TEXT NOT NULL,
            observed_at REAL NOT NULL,
            state       TEXT NOT NULL
                CHECK (state IN ('running', 'ended', 'not_found', 'unknown')),
            status      INTEGER,
            start_time  INTEGER,
            end_time    INTEGER,
            stop_reason TEXT,
            fields      TEXT NOT NULL,
            PRIMARY KEY (app_id, room_id, task_id)
        ) WITHOUT ROWID
        """
    )


def _v5_lineage_and_generation(conn: sqlite3.Connection) -> None:
    # Saved plans (``plan --out``) name the store they were made from and its
    # generation; ``apply FILE`` refuses a plan whose store has moved on.
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [(LINEAGE_KEY, uuid.uuid4().hex), (GENERATION_KEY, "0")],
    )


#: Forward schema steps; step ``i`` takes a store from version ``i`` to ``i + 1``.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _v1_base,
    _v2_source_path_and_refusals,
    _v3_status_times_and_tree_root,
    _v4_live_observations,
    _v5_lineage_and_generation,
)
#: ``meta`` key of the tree root the store was last applied from.
TREE_ROOT_KEY: Final = "tree_root"
#: ``meta`` keys of the store's random id and of its change counter.
LINEAGE_KEY: Final = "lineage"
GENERATION_KEY: Final = "generation"
#: The schema version this code writes.
SCHEMA_VERSION: Final = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class TaskState:
    """One task's row, as ``reconciler status`` shows it."""

    key: TaskKey
    status: SyncStatus
    business_id: str | None
    #: Last-applied managed values; ``None`` when no call ever succeeded.
    fields: Mapping[str, FieldValue] | None
    applied_at: datetime | None
    #: The server's request id of the last successful call.
    request_id: str | None
    #: Calls made since the last success.
    attempts: int
    last_call_at: datetime | None
    last_error: str | None
    last_error_code: str | None
    #: ``file:line:column`` where the task was last declared.
    source: str | None
    source_path: str | None
    failed_spec: str | None
    updated_at: datetime
    #: The server's request id of the call that produced ``last_error``.
    last_error_request_id: str | None = None
    #: When the task entered ``status`` (a retry ending in the status it
    #: started from does not count as a change).
    status_since: datetime | None = None
    #: When the daemon will try a NotRunning or failed task again; ``None``
    #: when nothing is scheduled (``apply`` schedules nothing).
    next_retry_at: datetime | None = None

    def to_json(self) -> dict[str, object]:
        """A stable, JSON-ready shape: snake_case keys, ISO-8601 UTC times, nulls kept."""
        return {
            "app_id": self.key.app_id,
            "room_id": self.key.room_id,
            "task_id": self.key.task_id,
            "business_id": self.business_id,
            "status": str(self.status),
            "fields": None if self.fields is None else dict(self.fields),
            "applied_at": format_time(self.applied_at),
            "request_id": self.request_id,
            "attempts": self.attempts,
            "last_call_at": format_time(self.last_call_at),
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "last_error_request_id": self.last_error_request_id,
            "source": self.source,
            "source_path": self.source_path,
            "failed_spec": self.failed_spec,
            "updated_at": format_time(self.updated_at),
            "status_since": format_time(self.status_since),
            "next_retry_at": format_time(self.next_retry_at),
        }


def format_time(at: datetime | None) -> str | None:
    """ISO-8601 UTC with microseconds and ``Z``, as every stored and shown time is."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _stamp(at: datetime | None) -> str:
    """The text stored for ``at`` (now when ``None``); naive times are ambiguous, refused."""
    if at is None:
        at = datetime.now(UTC)
    elif at.tzinfo is None:
        raise ValueError(f"timestamp {at.isoformat()} has no timezone")
    stamp = format_time(at)
    assert stamp is not None
    return stamp


def _encode_fields(fields: Mapping[str, FieldValue]) -> str:
    """Canonical JSON (API field order, compact) so equal values give equal text."""
    unknown = sorted(set(fields) - set(MANAGED_FIELDS))
    if unknown:
        raise ValueError(f"not managed fields: {', '.join(unknown)}")
    for name, value in fields.items():
        if not isinstance(value, str | bool | int):
            raise ValueError(f"field {name} has a {type(value).__name__}, not str/bool/int")
    ordered = {name: fields[name] for name in MANAGED_FIELDS if name in fields}
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)


_COLUMNS: Final = (
    "app_id, room_id, task_id, status, business_id, applied_fields, applied_at, request_id,"
    " attempts, last_call_at, last_error, last_error_code, source, source_path, failed_spec,"
    " updated_at, last_error_request_id, status_since, next_retry_at"
)


def _row_to_state(row: Sequence[Any]) -> TaskState:
    return TaskState(
        key=TaskKey(row[0], row[1], row[2]),
        status=SyncStatus(row[3]),
        business_id=row[4],
        fields=None if row[5] is None else json.loads(row[5]),
        applied_at=_parse_time(row[6]),
        request_id=row[7],
        attempts=row[8],
        last_call_at=_parse_time(row[9]),
        last_error=row[10],
        last_error_code=row[11],
        source=row[12],
        source_path=row[13],
        failed_spec=row[14],
        updated_at=datetime.fromisoformat(row[15]),
        last_error_request_id=row[16],
        status_since=_parse_time(row[17]),
        next_retry_at=_parse_time(row[18]),
    )


# Writers are upserts: a result for a task with no row creates it with no
# last-applied values, so a caller that skipped mark_pending loses nothing.
# In an upsert's SET every bare column name is the row's value before the
# update, so the CASE expressions below see the old status.
_MARK_PENDING: Final = """
INSERT INTO tasks (app_id, room_id, task_id, business_id, status, attempts,
                   last_call_at, source, source_path, updated_at, status_since)
VALUES (?, ?, ?, ?, 'Pending', 1, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    status = 'Pending',
    attempts = attempts + 1,
    last_call_at = excluded.last_call_at,
    -- business_id belongs to the last-applied record once there is one
    business_id = CASE WHEN applied_fields IS NULL
                       THEN excluded.business_id ELSE business_id END,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    -- the settled status this call starts from; a row left Pending by a
    -- killed process keeps the one from before that call
    prior_status = CASE WHEN status = 'Pending' THEN prior_status ELSE status END,
    prior_since = CASE WHEN status = 'Pending' THEN prior_since ELSE status_since END,
    status_since = CASE WHEN status = 'Pending'
                        THEN status_since ELSE excluded.status_since END,
    next_retry_at = NULL
"""

_RECORD_SUCCESS: Final = """
INSERT INTO tasks (app_id, room_id, task_id, business_id, applied_fields, applied_at,
                   request_id, status, attempts, last_call_at, source, source_path, updated_at,
                   status_since)
VALUES (?, ?, ?, ?, ?, ?, ?, 'Synced', 0, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    business_id = excluded.business_id,
    applied_fields = excluded.applied_fields,
    applied_at = excluded.applied_at,
    request_id = excluded.request_id,
    status = 'Synced',
    attempts = 0,
    last_call_at = COALESCE(last_call_at, excluded.last_call_at),
    last_error = NULL,
    last_error_code = NULL,
    last_error_request_id = NULL,
    failed_spec = NULL,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    -- a success applies values just now, even after an earlier Synced spell
    status_since = excluded.status_since,
    prior_status = NULL,
    prior_since = NULL,
    next_retry_at = NULL
"""

_RECORD_PROBLEM: Final = """
INSERT INTO tasks (app_id, room_id, task_id, status, attempts, last_call_at, last_error,
                   last_error_code, last_error_request_id, failed_spec, source, source_path,
                   updated_at, status_since, next_retry_at)
VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    status = excluded.status,
    last_call_at = COALESCE(last_call_at, excluded.last_call_at),
    last_error = excluded.last_error,
    last_error_code = excluded.last_error_code,
    last_error_request_id = excluded.last_error_request_id,
    failed_spec = excluded.failed_spec,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    -- NotRunning for two days stays "since two days" across its retries
    status_since = CASE
        WHEN status = excluded.status THEN status_since
        WHEN status = 'Pending' AND prior_status = excluded.status THEN prior_since
        ELSE excluded.status_since END,
    prior_status = NULL,
    prior_since = NULL,
    next_retry_at = excluded.next_retry_at
"""

_RECORD_IN_SYNC: Final = """
INSERT INTO tasks (app_id, room_id, task_id, business_id, applied_fields, status, attempts,
                   source, source_path, updated_at, status_since)
VALUES (?, ?, ?, ?, ?, 'Synced', 0, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    business_id = excluded.business_id,
    applied_fields = excluded.applied_fields,
    status = 'Synced',
    attempts = 0,
    last_error = NULL,
    last_error_code = NULL,
    last_error_request_id = NULL,
    failed_spec = NULL,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    status_since = CASE WHEN status = 'Synced' THEN status_since ELSE excluded.status_since END,
    prior_status = NULL,
    prior_since = NULL,
    next_retry_at = NULL
-- a resync of an unchanged tree rewrites nothing, so updated_at stays meaningful
WHERE business_id IS NOT excluded.business_id
   OR applied_fields IS NOT excluded.applied_fields
   OR status != 'Synced' OR attempts != 0
   OR last_error IS NOT NULL OR last_error_code IS NOT NULL
   OR last_error_request_id IS NOT NULL OR failed_spec IS NOT NULL
   OR source IS NOT excluded.source OR source_path IS NOT excluded.source_path
   OR next_retry_at IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A filter over the recorded tasks, for pages of them (every part empty: no filter).

    Made for the dashboard, which pages through 100k rows in SQL rather than
    loading them. ``path_glob`` is SQLite's ``GLOB`` on the recorded source
    path (``*`` also crosses ``/``); ``text`` is a case-insensitive substring
    of the ids, the source or the last error.
    """

    statuses: frozenset[str] = frozenset()
    apps: frozenset[str] = frozenset()
    #: :class:`~reconciler.live.LiveState` values; a task never read is ``unknown``.
    lives: frozenset[str] = frozenset()
    path_glob: str | None = None
    text: str | None = None

    def where(self, *, before: TaskKey | None = None) -> tuple[str, list[object]]:
        """The ``WHERE`` clause (``"1"`` when empty) over ``tasks`` and its parameters."""
        parts: list[str] = []
        params: list[object] = []

        def among(column: str, values: frozenset[str]) -> None:
            parts.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(sorted(values))

        if self.statuses:
            among("status", self.statuses)
        if self.apps:
            among("app_id", self.apps)
        if self.lives:
            # A correlated lookup by primary key, so the rows stay in key order.
            among(
                "COALESCE((SELECT o.state FROM observations o WHERE o.app_id = tasks.app_id"
                " AND o.room_id = tasks.room_id AND o.task_id = tasks.task_id), 'unknown')",
                self.lives,
            )
        if self.path_glob:
            parts.append("source_path GLOB ?")
            params.append(self.path_glob)
        if self.text:
            parts.append(
                "instr(lower(app_id || ' ' || room_id || ' ' || task_id || ' ' ||"
                " COALESCE(source, '') || ' ' || COALESCE(last_error_code, '') || ' ' ||"
                " COALESCE(last_error, '')), ?) > 0"
            )
            params.append(self.text.lower())
        if before is not None:
            parts.append("(app_id, room_id, task_id) < (?, ?, ?)")
            params.extend(before)
        return " AND ".join(parts) or "1", params


class StateStore:
    """The SQLite state store at :attr:`path`; open with :meth:`open`."""

    path: Path

    #: The schema version the file had before this open migrated it (0: new).
    opened_schema: int

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        *,
        opened_schema: int = SCHEMA_VERSION,
        read_only: bool = False,
    ) -> None:
        # Use StateStore.open: it prepares the file, pragmas and schema.
        self.path = path
        self.opened_schema = opened_schema
        self._read_only = read_only
        self._conn: sqlite3.Connection | None = conn
        self._depth = 0
        # A write inside the current transaction changed what the planner reads.
        self._changed = False

    def __repr__(self) -> str:
        return f"StateStore(path={str(self.path)!r})"

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = True, read_only: bool = False) -> StateStore:
        """Open (and, with ``create``, create) the store, migrating it forward.

        With ``create=False`` a missing file is a :class:`StateError` (``status``
        reports on a store, it never makes one). ``read_only`` (``plan``,
        ``status``) never writes the file: an older schema is migrated in a
        private in-memory copy, so a newer CLI's dry run cannot upgrade a store
        that a running older daemon still uses.
        """
        path = Path(path)
        if read_only:
            _prepare_file(path, create=False)
            conn, opened_schema = _connect_read_only(path)
            return cls(path, conn, opened_schema=opened_schema, read_only=True)
        # Process-wide, so set only while the files are made: WAL and SHM files
        # appear on the first access, and must come out owner-only too.
        old_umask = os.umask(0o077)
        try:
            _prepare_file(path, create=create)
            conn, opened_schema = _connect(path)
        finally:
            os.umask(old_umask)
        return cls(path, conn, opened_schema=opened_schema)

    def close(self) -> None:
        """Close the connection; further use is a :class:`StateError`. Idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading -------------------------------------------------------------

    def applied(self) -> dict[TaskKey, AppliedRecord]:
        """Every row as the planner sees it."""
        rows = self._query(
            "SELECT app_id, room_id, task_id, business_id, applied_fields, source_path,"
            " failed_spec, applied_at, applied_incarnation FROM tasks"
        )
        loads = json.loads
        epoch = _epoch
        out: dict[TaskKey, AppliedRecord] = {}
        with _gc_paused():
            for row in rows:
                app_id, room_id, task_id, business_id, text, source_path, failed_spec = row[:7]
                key = TaskKey(app_id, room_id, task_id)
                fields = None if text is None else loads(text)
                out[key] = AppliedRecord(
                    key,
                    business_id,
                    fields,
                    source_path,
                    failed_spec,
                    applied_at=None if row[7] is None else epoch(row[7]),
                    incarnation=row[8],
                )
        return out

    def observations(self) -> dict[TaskKey, Observation]:
        """The latest observation of each task that has one."""
        rows = self._query(
            "SELECT app_id, room_id, task_id, observed_at, state, status, start_time, end_time,"
            " stop_reason, fields FROM observations"
        )
        out: dict[TaskKey, Observation] = {}
        with _gc_paused():
            for app_id, room_id, task_id, at, state, status, start, end, reason, text in rows:
                key = TaskKey(app_id, room_id, task_id)
                out[key] = Observation(
                    key, at, LiveState(state), start, end, reason, status, json.loads(text)
                )
        return out

    def get(self, key: TaskKey) -> TaskState | None:
        """The row of ``key``, if any."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE app_id = ? AND room_id = ? AND task_id = ?",
            tuple(key),
        )
        return _row_to_state(rows[0]) if rows else None

    def all(self) -> list[TaskState]:
        """Every row, sorted by key."""
        rows = self._query(f"SELECT {_COLUMNS} FROM tasks ORDER BY app_id, room_id, task_id")
        with _gc_paused():
            return [_row_to_state(row) for row in rows]

    def keys_with_status(self, status: SyncStatus) -> list[TaskKey]:
        """The tasks recorded in ``status``."""
        rows = self._query(
            "SELECT app_id, room_id, task_id FROM tasks WHERE status = ?", (str(status),)
        )
        return [TaskKey(*row) for row in rows]

    def counts(self) -> dict[SyncStatus, int]:
        """How many tasks are in each status (every status present, zero or not)."""
        out = dict.fromkeys(SyncStatus, 0)
        for status, n in self._query("SELECT status, COUNT(*) FROM tasks GROUP BY status"):
            out[SyncStatus(status)] = n
        return out

    def count_tasks(self, query: TaskQuery, *, before: TaskKey | None = None) -> int:
        """How many rows ``query`` matches (only those sorting before ``before``, if given)."""
        where, params = query.where(before=before)
        ((n,),) = self._query(f"SELECT COUNT(*) FROM tasks WHERE {where}", params)
        return int(n)

    def page_tasks(self, query: TaskQuery, *, offset: int, limit: int) -> list[TaskState]:
        """The rows ``query`` matches, sorted by key, from ``offset``: at most ``limit``."""
        where, params = query.where()
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE {where}"
            " ORDER BY app_id, room_id, task_id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [_row_to_state(row) for row in rows]

    def latest_in_status(self, statuses: Sequence[SyncStatus], *, limit: int) -> list[TaskState]:
        """Up to ``limit`` rows in ``statuses``, the latest to enter its status first."""
        marks = ", ".join("?" * len(statuses))
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE status IN ({marks})"
            " ORDER BY status_since DESC, app_id, room_id, task_id LIMIT ?",
            [*map(str, statuses), limit],
        )
        return [_row_to_state(row) for row in rows]

    def tree_root(self) -> str | None:
        """The tree root the store was last applied from (``None``: never recorded)."""
        return self._meta(TREE_ROOT_KEY)

    def lineage(self) -> str | None:
        """The store's random id, made with it; ``None`` while an older file is only
        migrated in memory (a read-only open), since that id is not the file's."""
        if self.read_only and self.opened_schema < SCHEMA_VERSION:
            return None
        return self._meta(LINEAGE_KEY)

    def generation(self) -> int:
        """How many transactions changed what the planner reads (observations aside)."""
        return int(self._meta(GENERATION_KEY) or 0)

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    # -- writing -------------------------------------------------------------

    def record_tree_root(self, root: str) -> None:
        """Record the tree root ``apply`` and ``run`` reconcile from.

        ``root`` is an absolute path kept as given, symlinks unresolved: a
        git-sync root is a symlink swapped on every revision, and it is the
        link, not today's target, that names the tree.
        """
        if not os.path.isabs(root):
            raise ValueError(f"tree root {root!r} is not an absolute path")
        self._execute(
            "record the tree root",
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (TREE_ROOT_KEY, root),
        )

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Group the writer calls made inside into one transaction.

        All or nothing: an exception inside rolls every write of the block
        back. Nested blocks join the outermost one.
        """
        with self._transaction("bulk write", changes_plan=False):
            yield

    def mark_pending(
        self,
        key: TaskKey,
        *,
        source: Source,
        business_id: str | None,
        at: datetime | None = None,
    ) -> None:
        """A call for ``key`` is about to be sent: Pending, one more attempt.

        Creates the row (no last-applied values) if missing. ``business_id``
        is written only while the task has no last-applied record.
        """
        now = _stamp(at)
        self._execute(
            "mark pending",
            _MARK_PENDING,
            (*key, business_id, now, str(source), source.path, now, now),
        )

    def record_success(
        self,
        key: TaskKey,
        *,
        fields: Mapping[str, FieldValue],
        business_id: str | None,
        request_id: str,
        source: Source,
        at: datetime | None = None,
    ) -> None:
        """The server answered ``ok``: last-applied := ``fields`` (the task's full
        desired managed fields), Synced, attempts and errors cleared."""
        now = _stamp(at)
        self._execute(
            "record success",
            _RECORD_SUCCESS,
            (
                *key,
                business_id,
                _encode_fields(fields),
                now,
                request_id,
                now,
                str(source),
                source.path,
                now,
                now,
            ),
        )

    def record_not_running(
        self,
        key: TaskKey,
        *,
        message: str,
        code: str,
        request_id: str | None,
        source: Source,
        next_retry_at: datetime | None = None,
        at: datetime | None = None,
    ) -> None:
        """The task is not running on the server: NotRunning, last-applied unchanged.

        ``next_retry_at``: when the daemon will try again (``None``: not scheduled).
        """
        self._record_problem(
            "record not running",
            key,
            status=SyncStatus.NOT_RUNNING,
            message=message,
            code=code,
            request_id=request_id,
            source=source,
            failed_spec=None,
            next_retry_at=next_retry_at,
            at=at,
        )

    def record_failure(
        self,
        key: TaskKey,
        *,
        message: str,
        code: str | None,
        request_id: str | None,
        source: Source,
        failed_spec: str | None,
        next_retry_at: datetime | None = None,
        at: datetime | None = None,
    ) -> None:
        """The call failed: Failed, last-applied unchanged.

        ``failed_spec`` is the spec hash of a spec refused as bad input (the
        task waits until it changes); ``None`` for a retryable failure.
        ``next_retry_at``: when the daemon will try again (``None``: not scheduled).
        """
        self._record_problem(
            "record failure",
            key,
            status=SyncStatus.FAILED,
            message=message,
            code=code,
            request_id=request_id,
            source=source,
            failed_spec=failed_spec,
            next_retry_at=next_retry_at,
            at=at,
        )

    def record_release(
        self, key: TaskKey, *, fields: Mapping[str, FieldValue], at: datetime | None = None
    ) -> None:
        """Released fields are dropped: last-applied := ``fields``, what remains.

        No call was made, so ``fields`` must be part of the current last-applied
        values (a :class:`ValueError` otherwise: recording values the server
        never confirmed would hide a needed call). A task with no last-applied
        record has nothing to release: :class:`StateError`.
        """
        text = _encode_fields(fields)
        now = _stamp(at)
        with self._transaction("record release") as conn:
            row = conn.execute(
                "SELECT applied_fields FROM tasks WHERE app_id = ? AND room_id = ? AND task_id = ?",
                tuple(key),
            ).fetchone()
            if row is None or row[0] is None:
                raise StateError(f"task {key} has no last-applied values to release from")
            current: dict[str, FieldValue] = json.loads(row[0])
            strays = sorted(
                name for name, value in fields.items() if current.get(name, _MISSING) != value
            )
            if strays:
                raise ValueError(
                    f"task {key}: releasing cannot record values not last applied: "
                    + ", ".join(strays)
                )
            conn.execute(
                "UPDATE tasks SET applied_fields = ?, updated_at = ?"
                " WHERE app_id = ? AND room_id = ? AND task_id = ?",
                (text, now, *key),
            )

    def record_in_sync(
        self,
        key: TaskKey,
        *,
        business_id: str | None,
        source: Source,
        fields: Mapping[str, FieldValue],
        at: datetime | None = None,
    ) -> None:
        """The plan found nothing to send: Synced, last-applied := ``fields``.

        Creates the row if missing. A row already saying exactly this is left
        untouched (its ``updated_at`` too).
        """
        stamp = _stamp(at)
        self._execute(
            "record in sync",
            _RECORD_IN_SYNC,
            (*key, business_id, _encode_fields(fields), str(source), source.path, stamp, stamp),
        )

    def forget(self, key: TaskKey) -> None:
        """Drop the row (and observation) of a task removed from the tree; no row, no error."""
        with self._transaction("forget") as conn:
            for table in ("tasks", "observations"):
                conn.execute(
                    f"DELETE FROM {table} WHERE app_id = ? AND room_id = ? AND task_id = ?",
                    tuple(key),
                )

    def record_observation(self, obs: Observation) -> None:
        """Keep ``obs`` as the task's latest observation (one transaction)."""
        self._execute(
            "record observation",
            _RECORD_OBSERVATION,
            (
                *obs.key,
                obs.observed_at,
                str(obs.state),
                obs.status,
                obs.start_time_ms,
                obs.end_time_ms,
                obs.stop_reason,
                _encode_fields(obs.fields),
            ),
            changes_plan=False,  # a read: the daemon's readers must not stale every saved plan
        )

    def record_incarnation(self, key: TaskKey, incarnation: int | None) -> None:
        """The incarnation (StartTime, ms) that the last-applied values hold for."""
        self._execute("record incarnation", _SET_INCARNATION, (incarnation, *key, incarnation))

    def record_out_of_sync(
        self, key: TaskKey, *, message: str, source: Source, at: datetime | None = None
    ) -> None:
        """Live values drifted and ``--drift report`` leaves them: OutOfSync, no call."""
        self._record_problem(
            "record out of sync",
            key,
            status=SyncStatus.OUT_OF_SYNC,
            message=message,
            code="Drift",
            request_id=None,
            source=source,
            failed_spec=None,
            next_retry_at=None,
            at=at,
        )

    # -- internals -----------------------------------------------------------

    def _record_problem(
        self,
        what: str,
        key: TaskKey,
        *,
        status: SyncStatus,
        message: str,
        code: str | None,
        request_id: str | None,
        source: Source,
        failed_spec: str | None,
        next_retry_at: datetime | None,
        at: datetime | None,
    ) -> None:
        now = _stamp(at)
        retry = None if next_retry_at is None else _stamp(next_retry_at)
        self._execute(
            what,
            _RECORD_PROBLEM,
            (
                *key,
                str(status),
                now,
                message,
                code,
                request_id,
                failed_spec,
                str(source),
                source.path,
                now,
                now,
                retry,
            ),
        )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"state store {self.path} is closed")
        return self._conn

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.path}: cannot read: {exc}") from exc

    def _execute(
        self, what: str, sql: str, params: Sequence[object], *, changes_plan: bool = True
    ) -> None:
        with self._transaction(what, changes_plan=changes_plan) as conn:
            conn.execute(sql, params)

    @contextmanager
    def _transaction(self, what: str, *, changes_plan: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (or a part of the enclosing ``bulk`` one).

        ``changes_plan``: the writes change what the planner reads, so the
        commit bumps the generation (once per transaction, in it).
        """
        conn = self._connection()
        self._changed |= changes_plan
        if self._depth:
            # Inside bulk(): the outer block commits.
            self._depth += 1
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StateError(f"state store {self.path}: cannot {what}: {exc}") from exc
            finally:
                self._depth -= 1
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._changed = False
            raise StateError(f"state store {self.path}: cannot {what}: {exc}") from exc
        self._depth = 1
        try:
            yield conn
            if self._changed:
                conn.execute(_BUMP_GENERATION, (GENERATION_KEY,))
            conn.execute("COMMIT")
        except BaseException as exc:
            _rollback(conn)
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"state store {self.path}: cannot {what}: {exc}") from exc
            raise
        finally:
            self._depth = 0
            self._changed = False


_MISSING: Final = object()

_BUMP_GENERATION: Final = """
INSERT INTO meta (key, value) VALUES (?, '1')
ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
"""

_RECORD_OBSERVATION: Final = """
INSERT INTO observations (app_id, room_id, task_id, observed_at, state, status, start_time,
                          end_time, stop_reason, fields)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    observed_at = excluded.observed_at,
    state = excluded.state,
    status = excluded.status,
    start_time = excluded.start_time,
    end_time = excluded.end_time,
    stop_reason = excluded.stop_reason,
    fields = excluded.fields
"""

_SET_INCARNATION: Final = """
UPDATE tasks SET applied_incarnation = ?
WHERE app_id = ? AND room_id = ? AND task_id = ? AND applied_incarnation IS NOT ?
"""


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cycle collector while building many acyclic objects.

    Reading 100k rows makes ~400k small objects; the collector's repeated
    passes over them cost about a fifth of the time and can free nothing.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back on its own (e.g. SQLITE_FULL).
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _prepare_file(path: Path, *, create: bool) -> None:
    """Make sure ``path`` is a regular file, creating it (0600) if allowed."""
    try:
        if path.exists() or path.is_symlink():
            if not path.is_file():
                kind = "a directory" if path.is_dir() else "not a regular file"
                raise StateError(f"state store {path} is {kind}")
            st = path.stat()
            if create and st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)  # a store made by other means: owner-only, as ours are
            return
        if not create:
            raise StateError(f"state store {path} does not exist")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return  # another process made it first; it is checked like any other
        os.close(fd)
    except OSError as exc:
        raise StateError(f"state store {path}: cannot create: {exc.strerror or exc}") from exc


def _connect(path: Path) -> tuple[sqlite3.Connection, int]:
    """Connect, set pragmas, check the file is ours, and migrate it forward;
    also returns the schema version the file had."""
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StateError(f"state store {path}: cannot open: {exc}") from exc
    try:
        _configure(conn, path)
        opened_schema = _migrate(conn, path)
        _check_integrity(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StateError(f"state store {path} {_describe(exc)}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, opened_schema


def _connect_read_only(path: Path) -> tuple[sqlite3.Connection, int]:
    """A connection that cannot write ``path``; an old schema is migrated in memory."""
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StateError(f"state store {path}: cannot open: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        _check_identity(conn, path, version)
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state store {path} was written by a newer reconciler "
                f"(schema {version}, this one knows up to {SCHEMA_VERSION})"
            )
        _check_integrity(conn, path)
        if version == SCHEMA_VERSION:
            return conn, version
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        conn.backup(memory)
        conn.close()
        _migrate(memory, path, announce=False)
        return memory, version
    except sqlite3.Error as exc:
        conn.close()
        raise StateError(f"state store {path} {_describe(exc)}") from exc
    except BaseException:
        conn.close()
        raise


def _describe(exc: sqlite3.Error) -> str:
    """What an error while opening says about the file, for a message."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return f"is locked by another process: {exc}"
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_IOERR")):
        return f"cannot be read and written: {exc}"
    return f"is not a usable SQLite database: {exc}"


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StateError(
            f"state store {path}: the file system does not support WAL mode (got {mode})"
        )
    conn.execute("PRAGMA synchronous = NORMAL")


def _migrate(conn: sqlite3.Connection, path: Path, *, announce: bool = True) -> int:
    """Apply the forward steps the file lacks; returns the version it started at."""
    started: int | None = None
    while True:
        # Version read and step applied under one write lock, so two processes
        # opening an old store at once cannot both apply a step.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if started is None:
                started = version
                _check_identity(conn, path, version)
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state store {path} was written by a newer reconciler "
                    f"(schema {version}, this one knows up to {SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                break
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if started and announce:  # an existing store upgraded, not a new one built
            log.info("state.migrated", path=str(path), from_schema=version, to_schema=version + 1)
    if started == 0 and announce:
        log.info("state.created", path=str(path), schema=SCHEMA_VERSION)
    return started or 0


def _check_identity(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Refuse a SQLite file that some other program wrote."""
    if version == 0:
        (objects,) = conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
        if objects:
            raise StateError(
                f"state store {path} is a SQLite database of something else "
                "(it has tables but no reconciler schema version)"
            )
        return
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != APPLICATION_ID:
        raise StateError(
            f"state store {path} is a SQLite database of something else "
            f"(application id {app_id:#x}, expected {APPLICATION_ID:#x})"
        )


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        details = "; ".join(problems).replace("\n", "; ")
        raise StateError(f"state store {path} is corrupt: {details}")
