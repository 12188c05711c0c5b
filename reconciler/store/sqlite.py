"""The SQLite backend of the state store: a file, its pragmas, its schema steps.

:class:`~reconciler.store.base.Store` holds the logic and the SQL both
backends share; this module only opens the file and keeps it right.

Files. The store and its ``-wal``/``-shm`` companions are created owner-only
(0600), a missing parent directory 0700: the rows name tasks and ids, never
secrets, but nothing here is for other users. A new store is built in a file
of its own beside the path (``.state.db.new-*``) and hard-linked into place
once complete, so a file at the path is always a store: an existing file
that holds none (0 bytes, or an empty SQLite database) is refused, never
taken for a new store. Beside it, ``state.db.lock`` is the writer lock
(:class:`~reconciler.store.lock.WriterLock`).

Durability. The database runs in WAL mode with ``synchronous=NORMAL``: a
commit is appended to the write-ahead log before the writer returns, and the
log survives the process being killed (only a power loss or OS crash can roll
back the last few commits, never corrupt the file).

Schema. ``PRAGMA user_version`` is the schema version and ``PRAGMA
application_id`` marks the file as ours; :data:`MIGRATIONS` are forward steps,
each applied in its own ``BEGIN IMMEDIATE`` transaction together with the
version bump, so two processes opening an old store at once cannot both
apply a step. A read-only open never writes the file: an older schema is
migrated in a private in-memory copy. Where the folder cannot be written
(``mode=ro`` cannot make the ``-shm`` index), a store with nothing in its
``-wal`` is opened immutable, and one whose ``-wal`` holds commits is copied
with it into a private temporary folder (SQLite recovers the log there) and
read from memory.

Concurrency. One connection (``check_same_thread=False``: a call may come
from a worker thread, one at a time). Other processes may read concurrently;
a writable open holds the store's writer lock for as long as it is open, so
a second writing process is refused at once (the busy timeout only covers
readers' checkpoints and the odd writer outside the reconciler).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from reconciler.eventlog.setup import get_logger
from reconciler.store.base import (
    BUSY_TIMEOUT_S,
    GENERATION_KEY,
    INDEXES,
    LINEAGE_KEY,
    SCHEMA_VERSION,
    SQLITE,
    Dialect,
    StoreError,
    newer_schema,
)
from reconciler.store.lock import WriterLock

#: Marks a SQLite file as a reconciler state store (``PRAGMA application_id``).
APPLICATION_ID: Final = 0x52435354

log = get_logger()

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
        raise StoreError("the tasks table does not have the status check this step widens")
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
    # Saved plans (``plan --save``) name the store they were made from and its
    # generation; ``apply FILE`` refuses a plan whose store has moved on.
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [(LINEAGE_KEY, uuid.uuid4().hex), (GENERATION_KEY, "0")],
    )


def _v6_status_and_path_indexes(conn: sqlite3.Connection) -> None:
    # The dashboard counts tasks by status, lists the latest in trouble and
    # filters by file path on every page: without these, each is a full scan
    # (80 ms at 100k tasks for the counts alone).
    for sql in INDEXES:
        conn.execute(sql)


def _v7_last_heal(conn: sqlite3.Connection) -> None:
    # ``status`` and the dashboard say when a task was last healed (a restart or
    # drift set back by a call) and why; events alone are gone by then. Rows
    # from v6 have no such history: never healed, as far as the store knows.
    conn.execute("ALTER TABLE tasks ADD COLUMN last_heal_at TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN last_heal_reason TEXT")


#: Forward schema steps; step ``i`` takes a store from version ``i`` to ``i + 1``.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _v1_base,
    _v2_source_path_and_refusals,
    _v3_status_times_and_tree_root,
    _v4_live_observations,
    _v5_lineage_and_generation,
    _v6_status_and_path_indexes,
    _v7_last_heal,
)
assert len(MIGRATIONS) == SCHEMA_VERSION, "a schema step belongs to every backend"


class SqliteConnection:
    """The SQLite side of :class:`~reconciler.store.base.Store`: one connection to one file."""

    dialect: Dialect = SQLITE
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(
        self, path: Path, conn: sqlite3.Connection, lock: WriterLock | None = None
    ) -> None:
        self.location = path
        self.conn = conn
        #: The writer lock of a writable open (``None``: read-only).
        self.lock = lock

    def query(self, sql: str, params: Sequence[object]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[object]) -> None:
        self.conn.execute(sql, params)

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    def begin(self) -> None:
        # IMMEDIATE: take the write lock now, not at the first write, so a
        # second writer waits here instead of failing mid-transaction.
        self.conn.execute("BEGIN IMMEDIATE")

    def begin_snapshot(self) -> None:
        # A deferred read transaction: one WAL snapshot for every read in it.
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        _rollback(self.conn)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def describe(self, exc: BaseException) -> str:
        return str(exc)


def open_sqlite(
    path: Path, *, create: bool, read_only: bool, command: str = "reconciler"
) -> tuple[SqliteConnection, int]:
    """Open the store file at ``path``; also returns the schema version it had (0: new).

    A writable open holds the store's writer lock (:class:`WriterLock`, naming
    ``command``) until the connection closes; a new store is built aside and
    linked into place whole, so a file at ``path`` is always a store.
    """
    if read_only:
        _prepare_file(path, create=False)
        conn, opened_schema = _connect_read_only(path)
        return SqliteConnection(path, conn), opened_schema
    # Process-wide, so set only while the files are made: WAL and SHM files
    # appear on the first access, and must come out owner-only too.
    old_umask = os.umask(0o077)
    try:
        if create:
            _make_parent(path)
        elif not (path.exists() or path.is_symlink()):
            raise StoreError(f"state store {path} does not exist")
        lock = WriterLock.acquire(path, command=command)
        try:
            created = _prepare_file(path, create=create)
            conn, opened_schema = _connect(path)
        except BaseException:
            lock.release()
            raise
    finally:
        os.umask(old_umask)
    return SqliteConnection(path, conn, lock), 0 if created else opened_schema


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back on its own (e.g. SQLITE_FULL).
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"state store {path}: cannot create: {exc.strerror or exc}") from exc


def _prepare_file(path: Path, *, create: bool) -> bool:
    """Make sure ``path`` is a store's regular file, building a new store there if
    allowed (the writer lock held); returns whether it was built now.

    A file that is there must be a store: an empty one (0 bytes) is refused,
    never taken for a new store (every task would be sent again)."""
    try:
        if path.exists() or path.is_symlink():
            if not path.is_file():
                kind = "a directory" if path.is_dir() else "not a regular file"
                raise StoreError(f"state store {path} is {kind}")
            st = path.stat()
            if st.st_size == 0:
                raise StoreError(
                    f"state store {path} is an empty file (0 bytes), not a state store; "
                    "it is never reset: if nothing should be recorded there, delete it"
                )
            if create and st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)  # a store made by other means: owner-only, as ours are
            return False
        if not create:
            raise StoreError(f"state store {path} does not exist")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _build(path)
    except OSError as exc:
        raise StoreError(f"state store {path}: cannot create: {exc.strerror or exc}") from exc


def _build(path: Path) -> bool:
    """Build a new store in a file of its own beside ``path`` and link it into place
    once complete: a process killed meanwhile leaves no half-made store at ``path``
    (only a ``.state.db.new-*`` file). ``False``: a store appeared there first."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.new-", dir=path.parent)
    os.close(fd)
    aside = Path(name)
    try:
        try:
            conn = sqlite3.connect(aside, isolation_level=None)
            try:
                _configure(conn, path)
                _migrate(conn, path, new=True)
            finally:
                conn.close()  # the last connection: the log is checkpointed into the file
        except sqlite3.Error as exc:
            raise StoreError(f"state store {path}: cannot create: {exc}") from exc
        try:
            os.link(aside, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: the writer lock keeps others out anyway
            if path.exists():
                return False
            os.rename(aside, path)
        _sync_folder(path.parent)
        return True
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{aside}{suffix}")


def _sync_folder(folder: Path) -> None:
    """Make a new name in ``folder`` survive a power loss (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _connect(path: Path) -> tuple[sqlite3.Connection, int]:
    """Connect, set pragmas, check the file is ours, and migrate it forward;
    also returns the schema version the file had."""
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreError(f"state store {path}: cannot open: {exc}") from exc
    try:
        _configure(conn, path)
        opened_schema = _migrate(conn, path)
        _check_integrity(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"state store {path} {_describe(exc)}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, opened_schema


def _connect_read_only(path: Path) -> tuple[sqlite3.Connection, int]:
    """A connection that cannot write ``path``; an old schema is migrated in memory."""
    conn = _reader(path)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        _check_identity(conn, path, version)
        if version > SCHEMA_VERSION:
            raise newer_schema(path, version)
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
        raise StoreError(f"state store {path} {_describe(exc)}") from exc
    except BaseException:
        conn.close()
        raise


def _open_uri(path: Path, query: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?{query}",
        uri=True,
        timeout=BUSY_TIMEOUT_S,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()  # opens the file now
    except BaseException:
        conn.close()
        raise
    return conn


def _reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to ``path``, even where its folder cannot be written.

    ``mode=ro`` reads a WAL database through its ``-shm`` index, which it must
    be able to create unless it is there already. Where it cannot (a
    read-only folder or file system), a file with nothing in its ``-wal`` is
    read as immutable, and one whose ``-wal`` holds commits is copied (with
    its ``-wal``) into a private folder, where SQLite recovers the log, and
    read from memory.
    """
    try:
        return _open_uri(path, "mode=ro")
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if not name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY")) or not os.access(
            path, os.R_OK
        ):
            raise StoreError(f"state store {path} {_describe(exc)}") from exc
        first = exc
    wal = Path(f"{path}-wal")
    try:
        if not wal.exists() or wal.stat().st_size == 0:
            return _open_uri(path, "immutable=1")
        with tempfile.TemporaryDirectory(prefix="reconciler-read-") as folder:
            copy = Path(folder) / "state.db"
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, Path(f"{copy}-wal"))
            source = sqlite3.connect(copy, isolation_level=None)
            try:
                memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                source.backup(memory)
            finally:
                source.close()
            return memory
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(
            f"state store {path}: cannot open read-only ({first}), nor read a copy: {exc}"
        ) from exc


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
        raise StoreError(
            f"state store {path}: the file system does not support WAL mode (got {mode})"
        )
    conn.execute("PRAGMA synchronous = NORMAL")


def _migrate(
    conn: sqlite3.Connection, path: Path, *, announce: bool = True, new: bool = False
) -> int:
    """Apply the forward steps the file lacks; returns the version it started at.

    ``new``: the file is being built now (else one at version 0 is refused)."""
    started: int | None = None
    while True:
        # Version read and step applied under one write lock, so two processes
        # opening an old store at once cannot both apply a step.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if started is None:
                started = version
                _check_identity(conn, path, version, new=new or not announce)
            if version > SCHEMA_VERSION:
                raise newer_schema(path, version)
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


def _check_identity(
    conn: sqlite3.Connection, path: Path, version: int, *, new: bool = False
) -> None:
    """Refuse a SQLite file that some other program wrote, or that holds no store
    (``new``: a file being built now, which starts empty)."""
    if version == 0:
        (objects,) = conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
        if objects:
            raise StoreError(
                f"state store {path} is a SQLite database of something else "
                "(it has tables but no reconciler schema version)"
            )
        if not new:
            raise StoreError(
                f"state store {path} is an empty SQLite database (no tables, no reconciler "
                "schema version), not a state store; it is never reset: if nothing should "
                "be recorded there, delete it"
            )
        return
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != APPLICATION_ID:
        raise StoreError(
            f"state store {path} is a SQLite database of something else "
            f"(application id {app_id:#x}, expected {APPLICATION_ID:#x})"
        )


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        details = "; ".join(problems).replace("\n", "; ")
        raise StoreError(f"state store {path} is corrupt: {details}")
