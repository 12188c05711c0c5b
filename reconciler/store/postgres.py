"""The PostgreSQL backend of the state store (psycopg 3), for a store that outlives a pod.

:class:`~reconciler.store.base.Store` holds the logic and the SQL both
backends share; this module connects, keeps the schema right, and translates
SQLite's spelling of the shared SQL (``?`` placeholders, ``IS NOT`` as a
null-safe comparison) into PostgreSQL's.

Tables. Everything lives in the schema :data:`SCHEMA` (``reconciler``), so
the database can hold other things: ``tasks``, ``observations`` and ``meta``
as in SQLite, and ``schema_version``, one row naming the application and the
version. Ids are ``COLLATE "C"`` and times ISO-8601 text, so rows sort and
compare exactly as SQLite's do.

Schema. :data:`MIGRATIONS` are forward steps keyed by the version they start
from; the first builds the current shape (SQLite's version 5) in one step,
and later versions add one step each, to both backends. Each step runs in
one transaction with the version bump, under an advisory lock, so two
replicas opening an old store at once cannot both apply it (PostgreSQL's
DDL is transactional: a failed step leaves nothing). A ``reconciler`` schema
without our version row, another application's row, or a newer version is a
:class:`~reconciler.store.base.StoreError`: never reset.

Connection. One connection, in autocommit: a read outside a transaction is
one statement, and every write is an explicit ``BEGIN`` ... ``COMMIT``; the
fence (:class:`~reconciler.store.base.Fencing`) is checked right after ``BEGIN``
on the same cursor. Statements are prepared on first use (``prepare_threshold
= 0``): a recorded result is four round trips (``BEGIN``, the upsert, the
generation bump, ``COMMIT``) of already-planned statements. A connection
found broken between transactions is opened again (a server restart or
failover); one broken inside a transaction fails that write, which recorded
nothing. A read-only store sets ``default_transaction_read_only``, so even a
bug cannot write through it.

Secrets. The URL's password, ``PGPASSWORD`` and a password file are libpq's
business: messages name the store by its URL without the password
(:class:`~reconciler.store.base.PostgresURL`), and every driver message is
scrubbed of both passwords before it is shown. Connection errors are not
chained (``from None``): libpq may quote the connection string in them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import psycopg

from reconciler.eventlog.setup import get_logger, register_secret
from reconciler.store.base import (
    BUSY_TIMEOUT_S,
    GENERATION_KEY,
    INDEXES,
    LINEAGE_KEY,
    POSTGRES,
    SCHEMA_VERSION,
    Dialect,
    Fencing,
    PostgresURL,
    StoreError,
    newer_schema,
)

#: The schema that holds the store's tables.
SCHEMA: Final = "reconciler"
#: The store's tables in :data:`SCHEMA` (others may keep tables there too).
TABLES: Final = ("tasks", "observations", "meta")
#: What ``schema_version.application`` says in a reconciler store.
APPLICATION: Final = "rtc-segment-reconciler"
#: Key of the advisory lock that serialises schema steps (per database).
MIGRATION_LOCK: Final = 0x52435354
#: How long to wait for the server when the URL and PGCONNECT_TIMEOUT say nothing.
CONNECT_TIMEOUT_S: Final = 10

log = get_logger()

Cursor = psycopg.Cursor[Any]
Step = Callable[[Cursor], None]


def _base_v5(cur: Cursor) -> None:
    # SQLite's version 5 in one step: the shape a new store starts from.
    cur.execute(
        f"""
        CREATE TABLE {SCHEMA}.tasks (
            app_id                TEXT COLLATE "C" NOT NULL,
            room_id               TEXT COLLATE "C" NOT NULL,
            task_id               TEXT COLLATE "C" NOT NULL,
            business_id           TEXT,
            applied_fields        TEXT,
            applied_at            TEXT,
            request_id            TEXT,
            status                TEXT NOT NULL CHECK (status IN
                ('Synced', 'Pending', 'NotRunning', 'Failed', 'OutOfSync')),
            attempts              INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            last_call_at          TEXT,
            last_error            TEXT,
            last_error_code       TEXT,
            source                TEXT,
            updated_at            TEXT NOT NULL,
            source_path           TEXT COLLATE "C",
            failed_spec           TEXT,
            last_error_request_id TEXT,
            status_since          TEXT COLLATE "C",
            prior_status          TEXT,
            prior_since           TEXT,
            next_retry_at         TEXT,
            applied_incarnation   BIGINT,
            PRIMARY KEY (app_id, room_id, task_id)
        )
        """
    )
    cur.execute(
        f"""
        CREATE TABLE {SCHEMA}.observations (
            app_id      TEXT COLLATE "C" NOT NULL,
            room_id     TEXT COLLATE "C" NOT NULL,
            task_id     TEXT COLLATE "C" NOT NULL,
            observed_at DOUBLE PRECISION NOT NULL,
            state       TEXT NOT NULL
                CHECK (state IN ('running', 'ended', 'not_found', 'unknown')),
            status      BIGINT,
            start_time  BIGINT,
            end_time    BIGINT,
            stop_reason TEXT,
            fields      TEXT NOT NULL,
            PRIMARY KEY (app_id, room_id, task_id)
        )
        """
    )
    cur.execute(
        f'CREATE TABLE {SCHEMA}.meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)'
    )
    cur.execute(
        f"INSERT INTO {SCHEMA}.meta (key, value) VALUES (%s, %s), (%s, '0')",
        (LINEAGE_KEY, uuid.uuid4().hex, GENERATION_KEY),
    )


def _v6_status_and_path_indexes(cur: Cursor) -> None:
    # As SQLite's step 6: the dashboard's counts, trouble list and path filter.
    for sql in INDEXES:
        cur.execute(sql.replace(" ON tasks ", f" ON {SCHEMA}.tasks "))


def _v7_last_heal(cur: Cursor) -> None:
    # As SQLite's step 7: when a task was last healed, and why.
    cur.execute(f"ALTER TABLE {SCHEMA}.tasks ADD COLUMN last_heal_at TEXT")
    cur.execute(f"ALTER TABLE {SCHEMA}.tasks ADD COLUMN last_heal_reason TEXT")


#: Forward steps: the version a step starts from → (the version it reaches, the step).
MIGRATIONS: Final[Mapping[int, tuple[int, Step]]] = {
    0: (5, _base_v5),
    5: (6, _v6_status_and_path_indexes),
    6: (7, _v7_last_heal),
}


def _latest(steps: Mapping[int, tuple[int, Step]]) -> int:
    return max(to for to, _ in steps.values())


assert _latest(MIGRATIONS) == SCHEMA_VERSION, "a schema step belongs to every backend"

# ``a IS NOT b`` is SQLite's null-safe "differs"; PostgreSQL spells it IS DISTINCT
# FROM (and ``IS NOT NULL`` means the same in both).
_IS_NOT = re.compile(r"\bIS NOT (?!NULL\b)")


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The shared SQL (SQLite's spelling) as PostgreSQL runs it."""
    if "%" in sql:
        raise ValueError("shared SQL must not contain '%' (psycopg's placeholder mark)")
    return _IS_NOT.sub("IS DISTINCT FROM ", sql).replace("?", "%s")


class PostgresConnection:
    """The PostgreSQL side of :class:`~reconciler.store.base.Store`: one connection."""

    dialect: Dialect = POSTGRES
    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(
        self,
        url: PostgresURL,
        conn: psycopg.Connection[Any],
        *,
        read_only: bool,
        fencing: Fencing | None,
    ) -> None:
        self.location = url
        self._url = url
        self._read_only = read_only
        self._fencing = fencing
        self._conn = conn
        self._cur = conn.cursor()
        self._in_transaction = False
        self._pipeline: contextlib.AbstractContextManager[Any] | None = None

    def query(self, sql: str, params: Sequence[object]) -> list[Any]:
        if self._in_transaction:
            self._cur.execute(translate(sql), params, prepare=True)
        else:
            self._retried(translate(sql), params, prepare=True)
        return self._cur.fetchall()

    def execute(self, sql: str, params: Sequence[object]) -> None:
        self._cursor().execute(translate(sql), params, prepare=True)

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._cursor().executemany(translate(sql), rows)

    def begin(self) -> None:
        """The whole transaction in pipeline mode: ``BEGIN``, the fence, the writes
        and the ``COMMIT`` cost one round trip (two with a fence, whose answer is
        needed), not one each. At 150 results a second, round trips blocking the
        event loop were what capped throughput.

        A connection the server ended while it sat idle (a restart, a terminated
        backend) has something to read: it is opened again first, since nothing of
        this transaction was sent yet. That costs no round trip.
        """
        if self._idle_connection_lost():
            self._reconnect()
        self._pipeline = self._cursor().connection.pipeline()
        self._pipeline.__enter__()
        self._in_transaction = True
        self._cur.execute("BEGIN", prepare=False)
        if self._fencing is not None:
            self._fencing.check(self._cur)

    def _idle_connection_lost(self) -> bool:
        """Between transactions nothing is due from the server: anything readable
        is its goodbye (a FATAL message, then the end of the stream)."""
        if self._conn.broken or self._conn.closed:
            return True
        try:
            readable, _, _ = select.select([self._conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def begin_snapshot(self) -> None:
        self._retried("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", (), prepare=False)
        self._in_transaction = True

    def commit(self) -> None:
        self._cur.execute("COMMIT", prepare=False)
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.__exit__(None, None, None)  # sends what is queued; raises its error
        self._in_transaction = False

    def rollback(self) -> None:
        self._in_transaction = False
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            # The error being reported matters, not one the aborted pipeline repeats.
            with contextlib.suppress(psycopg.Error):
                pipeline.__exit__(None, None, None)
        if self._conn.broken or self._conn.closed:
            return
        if self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return  # the failed COMMIT already ended it
        with contextlib.suppress(psycopg.Error):
            self._cur.execute("ROLLBACK", prepare=False)

    def close(self) -> None:
        self._conn.close()

    def describe(self, exc: BaseException) -> str:
        return self._url.scrub(" ".join(str(exc).split()))

    def _cursor(self) -> Cursor:
        if self._conn.broken or self._conn.closed:
            self._reconnect()
        return self._cur

    def _retried(self, sql: str, params: Sequence[object], *, prepare: bool) -> None:
        """A statement that starts a transaction or is a read on its own: the
        connection found dead there (server restart, failover) is opened again
        and the statement sent once more, since nothing was done. A connection
        lost inside a transaction fails that write instead: it recorded nothing."""
        try:
            self._cursor().execute(sql, params, prepare=prepare)
        except psycopg.OperationalError:
            if not self._conn.broken:
                raise
            self._reconnect()
            self._cur.execute(sql, params, prepare=prepare)

    def _reconnect(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
        self._conn = _connect(self._url, read_only=self._read_only)
        self._cur = self._conn.cursor()
        log.info("state.reconnected", path=str(self._url))


def open_postgres(
    url: PostgresURL,
    *,
    create: bool,
    read_only: bool,
    fencing: Fencing | None = None,
    steps: Mapping[int, tuple[int, Step]] = MIGRATIONS,
) -> tuple[PostgresConnection, int]:
    """Connect, check the database holds our schema (or none), and migrate it forward
    with ``steps``; also returns the version it had (0: new)."""
    conn = _connect(url, read_only=read_only)
    try:
        cur = conn.cursor()
        if read_only or not create:
            version = _version(cur, url)
            if version == 0:
                raise StoreError(
                    f"state store {url} does not exist (the database has no {SCHEMA} "
                    "schema: nothing has been applied with it)"
                )
        if read_only:
            if version > _latest(steps):
                raise _newer(url, version, steps)
            if version < _latest(steps):
                raise StoreError(
                    f"state store {url} has schema {version}, older than this reconciler's "
                    f"{_latest(steps)}: a read-only command cannot upgrade it; run apply or "
                    "run (which migrate it) first"
                )
            opened = version
        else:
            opened = _migrate(cur, url, steps)
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"state store {url}: {url.scrub(' '.join(str(exc).split()))}") from exc
    except BaseException:
        conn.close()
        raise
    return PostgresConnection(url, conn, read_only=read_only, fencing=fencing), opened


def store_exists(url: PostgresURL) -> bool:
    """Whether the database at ``url`` holds a state store (any version)."""
    conn = _connect(url, read_only=True)
    try:
        return _version(conn.cursor(), url) > 0
    except psycopg.Error as exc:
        raise StoreError(f"state store {url}: {url.scrub(' '.join(str(exc).split()))}") from exc
    finally:
        conn.close()


def _connect(url: PostgresURL, *, read_only: bool) -> psycopg.Connection[Any]:
    register_secret(url.password)  # events scrub it too, should a message carry it
    register_secret(os.environ.get("PGPASSWORD") or None)
    options: dict[str, Any] = {}
    conninfo = url.conninfo()
    if "connect_timeout" not in conninfo and "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in conninfo and "PGAPPNAME" not in os.environ:
        options["application_name"] = "reconciler"
    try:
        conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=0, **options)
    except psycopg.Error as exc:
        # Not chained: libpq may quote the connection string it could not use.
        message = url.scrub(" ".join(str(exc).split()))
        raise StoreError(f"state store {url}: cannot connect: {message}") from None
    try:
        # The shared SQL names tables bare; pg_catalog stays first, implicitly.
        conn.execute(f"SET search_path TO {SCHEMA}")
        conn.execute(f"SET lock_timeout = '{int(BUSY_TIMEOUT_S * 1000)}ms'")
        if "synchronous_commit" not in conninfo + os.environ.get("PGOPTIONS", ""):
            # SQLite's synchronous=NORMAL, in PostgreSQL's terms: a commit is
            # visible at once and survives this process; only a crash of the
            # server itself can roll back its last moments (never corrupt).
            # Waiting for the WAL flush of every result made recording the
            # bottleneck of a 150/s rollout. The URL may ask for more
            # (options=-csynchronous_commit=on).
            conn.execute("SET synchronous_commit = off")
        if read_only:
            conn.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"state store {url}: {url.scrub(' '.join(str(exc).split()))}") from exc
    return conn


def _version(cur: Cursor, url: PostgresURL) -> int:
    """The schema version of the store (0: no schema yet); refuses a foreign one."""
    # Tables of others in the schema (a leader lease) are theirs; ours without
    # a version row mean something else made them.
    cur.execute(
        "SELECT to_regclass(%s) IS NOT NULL, ARRAY(SELECT c.relname::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) ORDER BY 1)",
        (f"{SCHEMA}.schema_version", SCHEMA, list(TABLES)),
    )
    row = cur.fetchone()
    assert row is not None
    has_version, ours = row
    if not has_version:
        if ours:
            raise StoreError(
                f"state store {url} is not a reconciler database: its {SCHEMA!r} schema "
                f"has tables named {', '.join(ours)} but no reconciler schema version"
            )
        return 0
    cur.execute(f"SELECT application, version FROM {SCHEMA}.schema_version")
    rows = cur.fetchall()
    if len(rows) != 1 or rows[0][0] != APPLICATION:
        found = ", ".join(repr(r[0]) for r in rows) or "no row"
        raise StoreError(
            f"state store {url} is not a reconciler database: its {SCHEMA}.schema_version "
            f"names {found}, expected {APPLICATION!r}"
        )
    return int(rows[0][1])


def _newer(url: PostgresURL, version: int, steps: Mapping[int, tuple[int, Step]]) -> StoreError:
    return newer_schema(url, version, _latest(steps))


def _migrate(cur: Cursor, url: PostgresURL, steps: Mapping[int, tuple[int, Step]]) -> int:
    """Apply the forward steps the store lacks; returns the version it started at."""
    started: int | None = None
    while True:
        cur.execute("BEGIN")
        try:
            # Version read and step applied under one lock, so two replicas
            # opening an old store at once cannot both apply a step.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = _version(cur, url)
            if started is None:
                started = version
            if version > _latest(steps):
                raise _newer(url, version, steps)
            if version == _latest(steps):
                cur.execute("COMMIT")
                break
            if version not in steps:
                raise StoreError(f"state store {url} has schema {version}, which no step upgrades")
            to, step = steps[version]
            if version == 0:
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                cur.execute(
                    f"CREATE TABLE {SCHEMA}.schema_version (application TEXT NOT NULL,"
                    " version INTEGER NOT NULL)"
                )
                cur.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (%s, 0)", (APPLICATION,))
            step(cur)
            cur.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (to,))
            cur.execute("COMMIT")
        except BaseException:
            if not cur.connection.broken:
                cur.execute("ROLLBACK")
            raise
        if started:  # an existing store upgraded, not a new one built
            log.info("state.migrated", path=str(url), from_schema=version, to_schema=to)
    if started == 0:
        log.info("state.created", path=str(url), schema=_latest(steps))
    return started or 0
