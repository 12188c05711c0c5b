"""The state store: what the server last confirmed for each task, in SQLite or PostgreSQL.

One row per task (``app_id``, ``room_id``, ``task_id``) holds the last-applied
managed values the server accepted with ``Result: "ok"`` (JSON text; ``NULL``
means no call ever succeeded, which is not the same as ``{}``, "nothing to
manage"), where the task stands (:class:`~reconciler.core.task.SyncStatus`) and
since when, when the daemon will try it again, the last call and error,
where the task was declared, and when a call last healed it (set back a
restart or drift) and why. The planner reads the rows as
:class:`~reconciler.core.task.AppliedRecord` values; ``apply`` and the daemon write
one result at a time; ``reconciler status`` lists them. A ``meta`` table holds
facts about the whole store: the tree root it was applied from, and its
*lineage* and *generation* (Terraform's lineage and serial): a random id made
with the store, and a number bumped by every transaction that changes what
the planner reads (anything but an observation), so a saved plan can tell
that the store it was made from is still the store, unchanged.

Backends. A store is a SQLite file (``--state PATH``,
:mod:`reconciler.store.sqlite`) or a PostgreSQL database (``--state
postgresql://...``, :mod:`reconciler.store.postgres`, its tables in a schema
of their own so the database can be shared). :class:`Store` is the one
interface: its methods, the SQL of every read and write, the generation
bookkeeping and the transactions live here, written once in SQLite's
dialect. A backend is a small connection object (:class:`Backend`) that
opens, checks and migrates its store; PostgreSQL's translates the few
spellings that differ (placeholders, ``IS NOT``), and :class:`Dialect` those
of the dashboard's filters. The column types keep values alike on both sides
(times as ISO-8601 text, ids in byte order), so rows, their order and a
digest of them do not depend on the backend; :meth:`Store.snapshot` and
:meth:`Store.restore` move a store from one to the other
(``reconciler state migrate``).

Durability. Every writer is one transaction, committed before it returns, so
a process killed mid-run loses nothing already recorded.
:meth:`Store.bulk` groups many writes into one transaction when that
matters for speed (a first sync of 100k in-sync tasks). A write the database
refuses (a full disk, a read-only file system, a lost connection) rolls back
and is a :class:`StoreWriteError`: callers send no call they could not
record (:class:`ResultNotRecorded` is the answer to a call already made that
could not be recorded; :meth:`Store.check_writable` probes).

Schema. Each backend keeps a schema version and forward steps up to
:data:`SCHEMA_VERSION`, each applied in its own transaction together with
the version bump. A store written by a newer reconciler, or something that
is not a store (a foreign database, a corrupt file), is a :class:`StoreError`
naming the store and what is wrong: the store is never silently reset or
re-created. A read-only open (``plan``, ``status``) never writes the store.
A row that cannot be read back (fields or an observation that are not a JSON
object) is a :class:`StoreError` naming the store and the task.

Secrets. No column holds headers, raw requests or credentials. A PostgreSQL
store is named by a :class:`PostgresURL` (a URL, or a libpq connection
string), whose ``str`` and ``repr`` leave the password out: logs, messages,
``status`` and saved plans show that form, and the password (and
``PGPASSWORD``) is scrubbed from whatever the driver says. Text that looks
like a URL or a connection string is never taken for a SQLite file
(:func:`parse_location`).

Fencing. A PostgreSQL store may be given a :class:`Fencing` object: every
write transaction calls its ``check(cursor)`` first, on the store's own
connection, so a replica that lost the leadership records nothing
(:class:`FencedError`).

Concurrency. A :class:`Store` keeps one connection and is meant for one
asyncio program: callers make one call at a time (it may come from a worker
thread). The calls are synchronous and short. Other processes may read
concurrently (``status`` while the daemon runs); one process writes
(:mod:`reconciler.store.lock`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol
from urllib.parse import unquote

from reconciler.core.errors import OUTCOME_UNKNOWN_CODES
from reconciler.core.heap import gc_paused
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import (
    MANAGED_FIELDS,
    AppliedRecord,
    FieldValue,
    Source,
    SyncStatus,
    TaskKey,
)
from reconciler.eventlog.setup import get_logger

#: Default location, relative to the current folder.
DEFAULT_PATH: Final = Path(".reconciler") / "state.db"
#: How long a writer waits for another one holding the lock (SQLite's busy
#: timeout, PostgreSQL's lock timeout).
BUSY_TIMEOUT_S: Final = 5.0
#: The schema version this code writes; every backend's forward steps reach it.
SCHEMA_VERSION: Final = 7
#: Indexes every backend keeps (schema 6): tasks by status and since-when (the
#: counts and the needs-attention list) and by file path (the path filter).
INDEXES: Final = (
    "CREATE INDEX tasks_by_status ON tasks (status, status_since)",
    "CREATE INDEX tasks_by_path ON tasks (source_path)",
)
#: ``meta`` key of the tree root the store was last applied from.
TREE_ROOT_KEY: Final = "tree_root"
#: ``meta`` keys of the store's random id and of its change counter.
LINEAGE_KEY: Final = "lineage"
GENERATION_KEY: Final = "generation"

log = get_logger()


class Backends:
    """How a location is opened: the backends' entry points, filled in by the
    :mod:`reconciler.store` package, so this module imports no backend (each
    backend imports it) and a process that only reads SQLite never loads the
    PostgreSQL driver."""

    open_sqlite: Callable[..., tuple[Backend, int]]
    open_postgres: Callable[..., tuple[Backend, int]]
    postgres_exists: Callable[[PostgresURL], bool]


BACKENDS: Final = Backends()


class StoreError(Exception):
    """The state store cannot be used: missing, unreadable, corrupt, too new, closed."""


def newer_schema(store: object, version: int, known: int = SCHEMA_VERSION) -> StoreError:
    """The refusal of a store written by a newer reconciler (never migrated back)."""
    return StoreError(
        f"state store {store} was written by a newer reconciler "
        f"(schema {version}, this one knows up to {known})"
    )


class StoreWriteError(StoreError):
    """A write the store could not make (a full disk, a read-only file system, an
    I/O error, a lost connection): its transaction was rolled back, nothing of it
    was recorded."""

    def __init__(self, store: object, what: str, reason: str) -> None:
        super().__init__(f"state store {store}: cannot {what}: {reason}")
        self.store = str(store)
        self.what = what
        self.reason = reason


class ResultNotRecorded(StoreWriteError):
    """A call went out and was answered, but its result could not be recorded.

    The task stays as :meth:`Store.mark_pending` left it before the call
    (Pending), so the store still says a call was made whose outcome it does
    not know. ``record`` makes the same write again (the daemon does once the
    store takes writes again).
    """

    def __init__(self, key: TaskKey, error: StoreWriteError, record: Callable[[], object]) -> None:
        super().__init__(error.store, error.what, error.reason)
        self.key = key
        self.record = record


class FencedError(StoreError):
    """A write refused because this replica no longer leads (another one took over).

    Raised by a :class:`Fencing` check inside the write's own transaction, so
    the transaction records nothing.
    """


class Fencing(Protocol):
    """What a shared (PostgreSQL) store asks before every write transaction.

    ``check`` runs inside the transaction, before its writes, on the same
    connection (``cursor`` is that connection's); it raises
    :class:`FencedError` when the writer has been deposed.
    :class:`reconciler.store.leader.Leadership` is the one implementation.
    """

    def check(self, cursor: Any) -> None: ...


class PostgresURL:
    """A PostgreSQL state store: a ``postgresql://`` (or ``postgres://``) URL, the
    scheme in any case, or a libpq keyword/value connection string
    (``host=db dbname=reconciler user=u``).

    ``str`` and ``repr`` are the location without its password (nor a
    ``password`` query parameter or keyword): the form that logs, messages,
    ``status`` and saved plans show. :meth:`conninfo` is the location itself,
    for connecting only. The password may be left out, for libpq to find in
    ``PGPASSWORD``, a password file or a service file. A connection string
    libpq cannot parse is a :class:`ValueError` whose message quotes no value.
    """

    __slots__ = ("_dsn", "_url")

    SCHEMES: Final = ("postgresql://", "postgres://")

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        if sep and scheme.lower() in ("postgresql", "postgres"):
            self._url, self._dsn = f"{scheme.lower()}://{rest}", False
        elif sep:
            raise ValueError("a PostgreSQL URL starts with postgresql:// or postgres://")
        else:
            self._url, self._dsn = url, True
            _conninfo_params(url)  # refuses what libpq cannot parse

    def conninfo(self) -> str:
        """The location as given, password included: for the driver, never for a message."""
        return self._url

    @property
    def password(self) -> str | None:
        """The password it carries, if any (percent-decoded, unquoted)."""
        if self._dsn:
            return _conninfo_params(self._url).get("password")
        userinfo = _netloc(self._url).rpartition("@")[0]
        if ":" in userinfo:
            return unquote(userinfo.partition(":")[2])
        for name, value in _query_params(self._url):
            if name == "password":
                return value
        return None

    def __str__(self) -> str:
        if self._dsn:
            from psycopg.conninfo import make_conninfo

            params = _conninfo_params(self._url)
            return make_conninfo("", **{k: v for k, v in params.items() if k != "password"})
        scheme, _, rest = self._url.partition("://")
        netloc = _netloc(self._url)
        userinfo, at, hosts = netloc.rpartition("@")
        path, question, query = rest[len(netloc) :].partition("?")
        if question:
            query = "&".join(
                p for p in query.split("&") if unquote(p.partition("=")[0]) != "password"
            )
            question = "?" if query else ""
        return f"{scheme}://{userinfo.partition(':')[0]}{at}{hosts}{path}{question}{query}"

    def __repr__(self) -> str:
        return f"PostgresURL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostgresURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    def scrub(self, text: str) -> str:
        """``text`` without this location's password or ``PGPASSWORD``: a driver's message
        may quote a connection string, or a part of one it could not parse."""
        text = text.replace(self._url, str(self))
        if self._dsn:
            raw = {m.group(1) for m in _DSN_PASSWORD.finditer(self._url)}
        else:
            raw = {_netloc(self._url).rpartition("@")[0].partition(":")[2]}
        secrets = {*raw, self.password or "", os.environ.get("PGPASSWORD", "")}
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def exists(self) -> bool:
        """Whether the database holds a state store (its schema); connects to find
        out, so a database that cannot be reached is a :class:`StoreError`."""
        return BACKENDS.postgres_exists(self)


#: A ``password`` keyword's value as written in a connection string (quoted or not).
_DSN_PASSWORD: Final = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
#: Text that names a URL: a scheme, then ``://``.
_URL_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: A URL as a path spells it (``Path`` folds ``//`` into one slash), also under a folder.
_URL_LIKE_PATH: Final = re.compile(r"(?:^|/)[A-Za-z][A-Za-z0-9+.-]*:/")
#: A ``keyword=`` of a connection string, at the start or after white space.
_DSN_KEYWORD: Final = re.compile(r"(?:^|\s)([A-Za-z_]+)\s*=")


def _conninfo_params(dsn: str) -> dict[str, str]:
    """libpq's own reading of a keyword/value connection string; a :class:`ValueError`
    that quotes no value (libpq's message may quote the text it choked on)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0]
        reason = re.sub(r'after ".*" in', "after a word in", first)
        raise ValueError(f"not a connection string libpq can read: {reason}") from None
    if not params:
        raise ValueError("an empty connection string")
    return {k: str(v) for k, v in params.items() if v is not None}


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    from psycopg import pq

    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def _netloc(url: str) -> str:
    rest = url.partition("://")[2]
    return re.split(r"[/?]", rest, maxsplit=1)[0]


def _query_params(url: str) -> list[tuple[str, str]]:
    query = url.partition("?")[2]
    pairs = [p.partition("=") for p in query.split("&") if p]
    return [(unquote(k), unquote(v)) for k, _, v in pairs]


#: Where a store is: a SQLite file or a PostgreSQL database.
StoreLocation = Path | PostgresURL


def parse_location(text: str | Path) -> StoreLocation:
    """``--state`` as given: a PostgreSQL URL (the scheme in any case) or keyword/value
    connection string, else a file path. Text that looks like a URL of another
    scheme, or like a connection string libpq cannot read, is a :class:`ValueError`
    naming neither its password nor any other value: it is never taken for a file
    (whose name, event and folders on disk would show the password)."""
    if isinstance(text, Path):
        check_file_location(text)
        return text
    if (url := _URL_SCHEME.match(text)) is not None:
        if url.group(1).lower() in ("postgresql", "postgres"):
            return PostgresURL(text)
        raise ValueError(
            f"a {url.group(1)}:// URL is not a state store: give a file path (SQLite) or a "
            "postgresql:// URL"
        )
    if _looks_like_conninfo(text):
        return PostgresURL(text)
    check_file_location(Path(text))
    return Path(text)


def _looks_like_conninfo(text: str) -> bool:
    """Whether ``text`` reads as a libpq connection string: a libpq ``keyword=``
    anywhere, or two ``word=`` pairs (a misspelt keyword among them)."""
    words = _DSN_KEYWORD.findall(text)
    return bool(words) and (len(words) >= 2 or bool(set(words) & _libpq_keywords()))


def check_file_location(path: Path) -> None:
    """Refuse (:class:`ValueError`) a SQLite file named like a URL or a connection
    string: the store meant is a PostgreSQL one, or the name is a mistake."""
    text = str(path)
    if _URL_LIKE_PATH.search(text) or _looks_like_conninfo(text):
        raise ValueError(
            "a state store file may not be named like a URL or a connection string: give a "
            "file path (SQLite), or a postgresql:// URL or connection string as text"
        )


def _glob_to_regex(pattern: str) -> str:
    """SQLite's ``GLOB`` pattern as an anchored regular expression for PostgreSQL's
    ``~``: ``*`` any text (``/`` included), ``?`` one character, ``[...]`` a class
    (``[^...]`` negated, a leading ``]`` literal), case-sensitive."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        close = -1
        if c == "[":
            first = i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1
            close = pattern.find("]", first + 1)
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif close > 0:
            body = pattern[i + 1 : close]
            negate = body.startswith("^")
            body = (body[1:] if negate else body).replace("\\", "\\\\").replace("]", "\\]")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Dialect:
    """The spellings of :class:`TaskQuery`'s filters that differ between backends."""

    name: str
    #: A ``WHERE`` clause that matches every row.
    true: str
    #: ``column <glob_operator> ?``, with the GLOB pattern turned into its parameter.
    glob_operator: str
    glob_pattern: Callable[[str], str]
    #: ``find(haystack, needle)``: the needle's 1-based position, 0 when absent.
    find: str


SQLITE: Final = Dialect("sqlite", "1", "GLOB", lambda pattern: pattern, "instr")
POSTGRES: Final = Dialect("postgresql", "TRUE", "~", _glob_to_regex, "strpos")


class Backend(Protocol):
    """A store's connection, as :class:`Store` uses it (one per backend module).

    ``query`` and ``execute`` take SQLite's spelling (``?`` placeholders); a
    backend translates what its database spells otherwise. Errors are the
    driver's own (:attr:`errors`); the store turns them into
    :class:`StoreError` with :meth:`describe`.
    """

    @property
    def location(self) -> StoreLocation:
        """The store as messages name it: a path, or a URL (shown without its password)."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """The driver's errors, which the store reports as :class:`StoreError`."""

    def query(self, sql: str, params: Sequence[object]) -> list[Any]: ...

    def execute(self, sql: str, params: Sequence[object]) -> None: ...

    def execute_many(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    def begin(self) -> None:
        """Start a write transaction (PostgreSQL: and check the fence in it)."""

    def begin_snapshot(self) -> None:
        """Start a read transaction that sees one consistent snapshot."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Roll back if a transaction is open; never raises for a dead connection."""

    def close(self) -> None: ...

    def describe(self, exc: BaseException) -> str:
        """A driver error as message text, with no secret in it."""


@dataclass(frozen=True, slots=True)
class StoredTask:
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
    #: When a call last healed the task (set back a restart or drift: a
    #: successful call whose cause was ``restart`` or ``drift``), and why
    #: (:func:`heal_reason`); ``None`` when it never was.
    last_heal_at: datetime | None = None
    last_heal_reason: str | None = None

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
            "last_heal_at": format_time(self.last_heal_at),
            "last_heal_reason": self.last_heal_reason,
        }


def heal_reason(cause: str, changes: Iterable[tuple[str, object, object]]) -> str:
    """Why a call healed a task, for a person: its cause, then each field it set back.

    ``restart: Identifier "3f2a..." → "edu-hall-b-0902", Duration 20 → 60``;
    ``drift: Duration 45 → 60``. ``changes`` are ``(field, old, new)`` with
    ``old`` the live value (``None``: live did not say, shown as ``Field=new``).
    Values are spelled as the files spell them (JSON).
    """
    parts = []
    for name, old, new in changes:
        shown = json.dumps(new, ensure_ascii=False)
        if old is None:
            parts.append(f"{name}={shown}")
        else:
            parts.append(f"{name} {json.dumps(old, ensure_ascii=False)} → {shown}")
    return f"{cause}: {', '.join(parts)}" if parts else cause


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
    " updated_at, last_error_request_id, status_since, next_retry_at, last_heal_at,"
    " last_heal_reason"
)


def _decode_fields(text: str) -> dict[str, FieldValue]:
    """Stored fields (JSON text): an object, or a :class:`ValueError` saying what is wrong."""
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise ValueError(f"a JSON {type(fields).__name__}, not an object")
    return fields


def corrupt_row(store: object, key: TaskKey, what: str, exc: Exception) -> StoreError:
    """The refusal of a row that cannot be read back: it names the store and the task."""
    why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    return StoreError(
        f"state store {store}: the row of task {key} is corrupt: {what} cannot be read "
        f"({why}); fix or delete that row (the store is never reset)"
    )


def _row_to_state(row: Sequence[Any], store: object) -> StoredTask:
    try:
        return _row_values(row)
    except (ValueError, TypeError) as exc:
        key = TaskKey(row[0], row[1], row[2])
        try:
            None if row[5] is None else _decode_fields(row[5])
        except (ValueError, TypeError) as field_exc:
            raise corrupt_row(store, key, "its last-applied fields", field_exc) from None
        raise corrupt_row(store, key, "a column", exc) from None


def _row_values(row: Sequence[Any]) -> StoredTask:
    return StoredTask(
        key=TaskKey(row[0], row[1], row[2]),
        status=SyncStatus(row[3]),
        business_id=row[4],
        fields=None if row[5] is None else _decode_fields(row[5]),
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
        last_heal_at=_parse_time(row[19]),
        last_heal_reason=row[20],
    )


# Writers are upserts: a result for a task with no row creates it with no
# last-applied values, so a caller that skipped mark_pending loses nothing.
# In an upsert's SET, ``tasks.column`` is the row's value before the update
# (so the CASE expressions below see the old status) and ``excluded.column``
# the value offered; PostgreSQL insists on the table name, SQLite accepts it.
_MARK_PENDING: Final = """
INSERT INTO tasks (app_id, room_id, task_id, business_id, status, attempts,
                   last_call_at, source, source_path, updated_at, status_since)
VALUES (?, ?, ?, ?, 'Pending', 1, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    status = 'Pending',
    attempts = tasks.attempts + 1,
    last_call_at = excluded.last_call_at,
    -- business_id belongs to the last-applied record once there is one
    business_id = CASE WHEN tasks.applied_fields IS NULL
                       THEN excluded.business_id ELSE tasks.business_id END,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    -- the settled status this call starts from; a row left Pending by a
    -- killed process keeps the one from before that call
    prior_status = CASE WHEN tasks.status = 'Pending'
                        THEN tasks.prior_status ELSE tasks.status END,
    prior_since = CASE WHEN tasks.status = 'Pending'
                       THEN tasks.prior_since ELSE tasks.status_since END,
    status_since = CASE WHEN tasks.status = 'Pending'
                        THEN tasks.status_since ELSE excluded.status_since END,
    next_retry_at = NULL
"""

_RECORD_SUCCESS: Final = """
INSERT INTO tasks (app_id, room_id, task_id, business_id, applied_fields, applied_at,
                   request_id, status, attempts, last_call_at, source, source_path, updated_at,
                   status_since, last_heal_at, last_heal_reason)
VALUES (?, ?, ?, ?, ?, ?, ?, 'Synced', 0, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    business_id = excluded.business_id,
    applied_fields = excluded.applied_fields,
    applied_at = excluded.applied_at,
    request_id = excluded.request_id,
    status = 'Synced',
    attempts = 0,
    last_call_at = COALESCE(tasks.last_call_at, excluded.last_call_at),
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
    next_retry_at = NULL,
    -- a heal is remembered until the next heal, whatever comes between
    last_heal_at = COALESCE(excluded.last_heal_at, tasks.last_heal_at),
    last_heal_reason = CASE WHEN excluded.last_heal_at IS NULL
                            THEN tasks.last_heal_reason ELSE excluded.last_heal_reason END
"""

_RECORD_PROBLEM: Final = """
INSERT INTO tasks (app_id, room_id, task_id, status, attempts, last_call_at, last_error,
                   last_error_code, last_error_request_id, failed_spec, source, source_path,
                   updated_at, status_since, next_retry_at)
VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (app_id, room_id, task_id) DO UPDATE SET
    status = excluded.status,
    last_call_at = COALESCE(tasks.last_call_at, excluded.last_call_at),
    last_error = excluded.last_error,
    last_error_code = excluded.last_error_code,
    last_error_request_id = excluded.last_error_request_id,
    failed_spec = excluded.failed_spec,
    source = excluded.source,
    source_path = excluded.source_path,
    updated_at = excluded.updated_at,
    -- NotRunning for two days stays "since two days" across its retries
    status_since = CASE
        WHEN tasks.status = excluded.status THEN tasks.status_since
        WHEN tasks.status = 'Pending' AND tasks.prior_status = excluded.status
            THEN tasks.prior_since
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
    status_since = CASE WHEN tasks.status = 'Synced'
                        THEN tasks.status_since ELSE excluded.status_since END,
    prior_status = NULL,
    prior_since = NULL,
    next_retry_at = NULL
-- a resync of an unchanged tree rewrites nothing, so updated_at stays meaningful
WHERE tasks.business_id IS NOT excluded.business_id
   OR tasks.applied_fields IS NOT excluded.applied_fields
   OR tasks.status != 'Synced' OR tasks.attempts != 0
   OR tasks.last_error IS NOT NULL OR tasks.last_error_code IS NOT NULL
   OR tasks.last_error_request_id IS NOT NULL OR tasks.failed_spec IS NOT NULL
   OR tasks.source IS NOT excluded.source OR tasks.source_path IS NOT excluded.source_path
   OR tasks.next_retry_at IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A filter over the recorded tasks, for pages of them (every part empty: no filter).

    Made for the dashboard, which pages through 100k rows in SQL rather than
    loading them. ``path_glob`` is SQLite's ``GLOB`` on the recorded source
    path (``*`` also crosses ``/``; PostgreSQL matches the same pattern as a
    regular expression); ``text`` is a case-insensitive substring of the ids,
    the source or the last error.
    """

    statuses: frozenset[str] = frozenset()
    apps: frozenset[str] = frozenset()
    #: :class:`~reconciler.core.live.LiveStatus` values; a task never read is ``unknown``.
    lives: frozenset[str] = frozenset()
    path_glob: str | None = None
    text: str | None = None

    def where(
        self, *, before: TaskKey | None = None, dialect: Dialect = SQLITE
    ) -> tuple[str, list[object]]:
        """The ``WHERE`` clause (always true when empty) over ``tasks`` and its
        parameters, in ``dialect``'s spelling."""
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
            parts.append(f"source_path {dialect.glob_operator} ?")
            params.append(dialect.glob_pattern(self.path_glob))
        if self.text:
            parts.append(
                f"{dialect.find}(lower(app_id || ' ' || room_id || ' ' || task_id || ' ' ||"
                " COALESCE(source, '') || ' ' || COALESCE(last_error_code, '') || ' ' ||"
                " COALESCE(last_error, '')), ?) > 0"
            )
            params.append(self.text.lower())
        if before is not None:
            parts.append("(app_id, room_id, task_id) < (?, ?, ?)")
            params.extend(before)
        return " AND ".join(parts) or dialect.true, params


class Store:
    """The state store at :attr:`path`, a SQLite file or a PostgreSQL database;
    open with :meth:`open`."""

    #: Where the store is; its ``str`` never shows a password.
    path: StoreLocation

    #: The schema version the store had before this open migrated it (0: new).
    opened_schema: int

    def __init__(
        self,
        backend: Backend,
        *,
        opened_schema: int = SCHEMA_VERSION,
        read_only: bool = False,
    ) -> None:
        # Use Store.open: the backend prepares the file or database and its schema.
        self.path = backend.location
        self.opened_schema = opened_schema
        self._read_only = read_only
        self._backend = backend
        self._open = True
        self._depth = 0
        # A write inside the current transaction changed what the planner reads.
        self._changed = False

    def __repr__(self) -> str:
        return f"Store(path={str(self.path)!r})"

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: StoreLocation | str,
        *,
        create: bool = True,
        read_only: bool = False,
        fencing: Fencing | None = None,
        command: str = "reconciler",
    ) -> Store:
        """Open (and, with ``create``, create) the store, migrating it forward.

        ``location`` is a file path (SQLite) or a :class:`PostgresURL` (text
        is parsed with :func:`parse_location`). With ``create=False`` a
        missing store is a :class:`StoreError` (``status`` reports on a store,
        it never makes one). ``read_only`` (``plan``, ``status``) never writes
        the store: SQLite migrates an older schema in a private in-memory
        copy, so a newer CLI's dry run cannot upgrade a store that a running
        older daemon still uses; PostgreSQL refuses an older schema until
        ``apply`` or ``run`` migrates it. ``fencing`` (PostgreSQL only) is
        checked in every write transaction, before its writes.

        A writable SQLite open first takes the store's writer lock
        (:mod:`reconciler.store.lock`), naming ``command`` as the holder; a store
        another process writes is refused (:class:`~reconciler.store.lock.StoreInUse`).
        """
        if not isinstance(location, PostgresURL):
            try:
                location = parse_location(location)
            except ValueError as exc:
                raise StoreError(f"state store: {exc}") from None
        backend: Backend
        if isinstance(location, PostgresURL):
            backend, opened_schema = BACKENDS.open_postgres(
                location, create=create, read_only=read_only, fencing=fencing
            )
        else:
            if fencing is not None:
                raise ValueError("fencing is for a shared (PostgreSQL) store, not a SQLite file")
            backend, opened_schema = BACKENDS.open_sqlite(
                location, create=create, read_only=read_only, command=command
            )
        return cls(backend, opened_schema=opened_schema, read_only=read_only)

    def close(self) -> None:
        """Close the connection; further use is a :class:`StoreError`. Idempotent."""
        if self._open:
            self._open = False
            self._backend.close()

    def __enter__(self) -> Store:
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
            " failed_spec, applied_at, applied_incarnation, status, last_call_at,"
            " last_error_code FROM tasks"
        )
        loads = json.loads
        epoch = _epoch
        statuses = {s.value: s for s in SyncStatus}
        out: dict[TaskKey, AppliedRecord] = {}
        row: Any = None
        try:
            with gc_paused():
                for row in rows:
                    app_id, room_id, task_id, business_id, text, source_path, failed_spec = row[:7]
                    key = TaskKey(app_id, room_id, task_id)
                    fields = None if text is None else loads(text)
                    if fields is not None and fields.__class__ is not dict:
                        raise ValueError(f"a JSON {type(fields).__name__}, not an object")
                    status, called, code = statuses.get(row[9]), row[10], row[11]
                    doubt = called is not None and (
                        status is SyncStatus.PENDING
                        or (status is SyncStatus.FAILED and code in OUTCOME_UNKNOWN_CODES)
                    )
                    out[key] = AppliedRecord(
                        key,
                        business_id,
                        fields,
                        source_path,
                        failed_spec,
                        applied_at=None if row[7] is None else epoch(row[7]),
                        incarnation=row[8],
                        status=status,
                        in_doubt_since=epoch(called) if doubt else None,
                    )
        except (ValueError, TypeError) as exc:
            key = TaskKey(row[0], row[1], row[2])
            what = "its last-applied time"
            try:
                None if row[4] is None else _decode_fields(row[4])
            except (ValueError, TypeError):
                what = "its last-applied fields"
            raise corrupt_row(self.path, key, what, exc) from None
        return out

    def observations(self) -> dict[TaskKey, Observation]:
        """The latest observation of each task that has one."""
        rows = self._query(
            "SELECT app_id, room_id, task_id, observed_at, state, status, start_time, end_time,"
            " stop_reason, fields FROM observations"
        )
        out: dict[TaskKey, Observation] = {}
        key: TaskKey | None = None
        try:
            with gc_paused():
                for app_id, room_id, task_id, at, state, status, start, end, reason, text in rows:
                    key = TaskKey(app_id, room_id, task_id)
                    out[key] = Observation(
                        key, at, LiveStatus(state), start, end, reason, status, _decode_fields(text)
                    )
        except (ValueError, TypeError) as exc:
            assert key is not None
            raise corrupt_row(self.path, key, "its latest observation", exc) from None
        return out

    def get(self, key: TaskKey) -> StoredTask | None:
        """The row of ``key``, if any."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE app_id = ? AND room_id = ? AND task_id = ?",
            tuple(key),
        )
        return _row_to_state(rows[0], self.path) if rows else None

    def all(self) -> list[StoredTask]:
        """Every row, sorted by key."""
        rows = self._query(f"SELECT {_COLUMNS} FROM tasks ORDER BY app_id, room_id, task_id")
        with gc_paused():
            return [_row_to_state(row, self.path) for row in rows]

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
        where, params = query.where(before=before, dialect=self._backend.dialect)
        ((n,),) = self._query(f"SELECT COUNT(*) FROM tasks WHERE {where}", params)
        return int(n)

    def page_tasks(self, query: TaskQuery, *, offset: int, limit: int) -> list[StoredTask]:
        """The rows ``query`` matches, sorted by key, from ``offset``: at most ``limit``."""
        where, params = query.where(dialect=self._backend.dialect)
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE {where}"
            " ORDER BY app_id, room_id, task_id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [_row_to_state(row, self.path) for row in rows]

    def latest_in_status(self, statuses: Sequence[SyncStatus], *, limit: int) -> list[StoredTask]:
        """Up to ``limit`` rows in ``statuses``, the latest to enter its status first."""
        marks = ", ".join("?" * len(statuses))
        rows = self._query(
            f"SELECT {_COLUMNS} FROM tasks WHERE status IN ({marks})"
            " ORDER BY status_since DESC, app_id, room_id, task_id LIMIT ?",
            [*map(str, statuses), limit],
        )
        return [_row_to_state(row, self.path) for row in rows]

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

    def snapshot(self) -> Snapshot:
        """Every row of every table, as one consistent snapshot (a daemon may be writing)."""
        conn = self._connection()
        try:
            conn.begin_snapshot()
            try:
                snap = self._read_snapshot(conn)
            finally:
                conn.rollback()  # a read: nothing to commit
        except conn.errors as exc:
            raise StoreError(f"state store {self.path}: cannot read: {conn.describe(exc)}") from exc
        return snap

    @staticmethod
    def _read_snapshot(conn: Backend) -> Snapshot:
        with gc_paused():
            return Snapshot(
                tasks=[
                    tuple(r)
                    for r in conn.query(f"SELECT {_TASK_ROW} FROM tasks ORDER BY {_KEY}", ())
                ],
                observations=[
                    tuple(r)
                    for r in conn.query(
                        f"SELECT {_OBSERVATION_ROW} FROM observations ORDER BY {_KEY}", ()
                    )
                ],
                meta=dict(conn.query("SELECT key, value FROM meta ORDER BY key", ())),
            )

    # -- writing -------------------------------------------------------------

    def check_writable(self) -> None:
        """Make one write transaction that leaves the store as it was (a row added
        and removed again, so pages are really written); raises
        :class:`StoreWriteError` while the store cannot take writes."""
        with self._transaction("write", changes_plan=False) as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_PROBE_KEY, _stamp(None)))
            conn.execute("DELETE FROM meta WHERE key = ?", (_PROBE_KEY,))

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

    def restore(self, snapshot: Snapshot) -> None:
        """Fill this empty store with ``snapshot``, lineage and generation included.

        One transaction: the rows are read back in it and must have the
        snapshot's digest, or nothing is written. A store that holds any
        task, observation, tree root or recorded result is refused
        (:class:`StoreError`), and nothing is written either.
        """
        with self._transaction("copy the store into", changes_plan=False) as conn:
            ((tasks,),) = conn.query("SELECT COUNT(*) FROM tasks", ())
            ((observations,),) = conn.query("SELECT COUNT(*) FROM observations", ())
            meta = dict(conn.query("SELECT key, value FROM meta", ()))
            generation = int(meta.get(GENERATION_KEY) or 0)
            if tasks or observations or generation or TREE_ROOT_KEY in meta:
                raise StoreError(
                    f"state store {self.path} is not empty ({tasks} tasks, {observations} "
                    f"observations, generation {generation}): nothing was copied into it"
                )
            conn.execute("DELETE FROM meta", ())
            conn.execute_many(
                "INSERT INTO meta (key, value) VALUES (?, ?)", list(snapshot.meta.items())
            )
            marks = ", ".join("?" * len(_TASK_ROW.split(",")))
            conn.execute_many(f"INSERT INTO tasks ({_TASK_ROW}) VALUES ({marks})", snapshot.tasks)
            marks = ", ".join("?" * len(_OBSERVATION_ROW.split(",")))
            conn.execute_many(
                f"INSERT INTO observations ({_OBSERVATION_ROW}) VALUES ({marks})",
                snapshot.observations,
            )
            copied = self._read_snapshot(conn)
            if copied.digest() != snapshot.digest():
                raise StoreError(
                    f"state store {self.path}: the copied rows differ from the source's "
                    f"({copied.counts()} against {snapshot.counts()}): nothing was copied"
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
        heal: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """The server answered ``ok``: last-applied := ``fields`` (the task's full
        desired managed fields), Synced, attempts and errors cleared.

        ``heal``: the call set back a restart or drift, and why
        (:func:`heal_reason`); it becomes the task's last heal, at this time.
        Without it the last heal recorded stays as it was."""
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
                None if heal is None else now,
                heal,
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
        record has nothing to release: :class:`StoreError`.
        """
        text = _encode_fields(fields)
        now = _stamp(at)
        with self._transaction("record release") as conn:
            rows = conn.query(
                "SELECT applied_fields FROM tasks WHERE app_id = ? AND room_id = ? AND task_id = ?",
                tuple(key),
            )
            row = rows[0] if rows else None
            if row is None or row[0] is None:
                raise StoreError(f"task {key} has no last-applied values to release from")
            try:
                current = _decode_fields(row[0])
            except (ValueError, TypeError) as exc:
                raise corrupt_row(self.path, key, "its last-applied fields", exc) from None
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

    def _connection(self) -> Backend:
        if not self._open:
            raise StoreError(f"state store {self.path} is closed")
        return self._backend

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        conn = self._connection()
        try:
            return conn.query(sql, params)
        except conn.errors as exc:
            raise StoreError(f"state store {self.path}: cannot read: {conn.describe(exc)}") from exc

    def _execute(
        self, what: str, sql: str, params: Sequence[object], *, changes_plan: bool = True
    ) -> None:
        with self._transaction(what, changes_plan=changes_plan) as conn:
            conn.execute(sql, params)

    @contextmanager
    def _transaction(self, what: str, *, changes_plan: bool = True) -> Iterator[Backend]:
        """One transaction (or a part of the enclosing ``bulk`` one).

        ``changes_plan``: the writes change what the planner reads, so the
        commit bumps the generation (once per transaction, in it). A
        :class:`StoreError` from the backend's start (a fence) rolls back and
        reaches the caller as it is.
        """
        conn = self._connection()
        self._changed |= changes_plan
        if self._depth:
            # Inside bulk(): the outer block commits.
            self._depth += 1
            try:
                yield conn
            except conn.errors as exc:
                raise StoreWriteError(self.path, what, conn.describe(exc)) from exc
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            conn.begin()
            yield conn
            if self._changed:
                conn.execute(_BUMP_GENERATION, (GENERATION_KEY,))
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            if isinstance(exc, conn.errors):
                raise StoreWriteError(self.path, what, conn.describe(exc)) from exc
            raise
        finally:
            self._depth = 0
            self._changed = False


_MISSING: Final = object()
#: ``meta`` key that :meth:`Store.check_writable` writes and removes in one transaction.
_PROBE_KEY: Final = "write_probe"

_KEY: Final = "app_id, room_id, task_id"
#: Every column, for copying a store whole (:meth:`Store.snapshot`).
_TASK_ROW: Final = (
    "app_id, room_id, task_id, business_id, applied_fields, applied_at, request_id, status,"
    " attempts, last_call_at, last_error, last_error_code, source, updated_at, source_path,"
    " failed_spec, last_error_request_id, status_since, prior_status, prior_since,"
    " next_retry_at, applied_incarnation, last_heal_at, last_heal_reason"
)
_OBSERVATION_ROW: Final = (
    "app_id, room_id, task_id, observed_at, state, status, start_time, end_time, stop_reason,"
    " fields"
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A whole store's rows at one moment, in key order: what ``state migrate`` moves."""

    tasks: list[tuple[Any, ...]]
    observations: list[tuple[Any, ...]]
    meta: dict[str, str]

    def digest(self) -> str:
        """SHA-256 of every row and meta entry: equal on both backends for equal stores."""
        h = hashlib.sha256()
        for name, rows in (("tasks", self.tasks), ("observations", self.observations)):
            h.update(name.encode())
            for row in rows:
                h.update(json.dumps(row, ensure_ascii=False).encode())
                h.update(b"\n")
        h.update(json.dumps(sorted(self.meta.items()), ensure_ascii=False).encode())
        return h.hexdigest()

    def counts(self) -> str:
        return f"{len(self.tasks)} tasks, {len(self.observations)} observations"


_BUMP_GENERATION: Final = """
INSERT INTO meta (key, value) VALUES (?, '1')
ON CONFLICT (key) DO UPDATE SET value = CAST(meta.value AS INTEGER) + 1
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
