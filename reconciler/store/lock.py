"""One writer per state store: the lock a writer holds, and who holds it.

Every process that writes a store also plans from it and sends the calls its
plan finds. Two of them on one store (two daemons, or ``apply`` beside a
daemon) both send every call, and every duplicate UpdateSegment that carries
``Duration`` cuts a live slice once more. So a store has one writer at a time;
readers (``plan``, ``status``, ``state migrate --from``) take no lock.

SQLite. A writable open (:func:`reconciler.store.sqlite.open_sqlite`) first
takes an exclusive ``flock`` on ``<store>.lock`` beside the file
(:class:`WriterLock`), then writes into it who it is (:class:`Holder`: pid,
host, when, which command) as a small JSON document, over the last holder's.
The OS frees the lock when the process ends, however it ends (``kill -9``
included): a lock file whose lock nobody holds is no holder, whatever it
says (the last holder, until the next one). A second writer is
refused at once (:class:`StoreInUse`) with what the file says of the holder.
The lock file is never deleted: a writer that deleted it could leave a third
process locking a new file while the second still holds the old one. Within
one process the lock is shared (a second open of the same store there takes
no second lock): it keeps other *processes* out.

PostgreSQL. Replicas of ``run`` elect a leader on an advisory lock
(:mod:`reconciler.store.leader`). ``apply`` takes the same lock for as long as it
runs, on a session of its own (:class:`PostgresWriter`): while a daemon leads
it is refused, naming the leader (replica, epoch, since); while it runs, a
daemon replica stands by. ``--force-while-leading`` applies beside a leading
daemon on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final

from reconciler.eventlog.setup import get_logger
from reconciler.store.base import PostgresURL, StoreError, format_time

#: What the lock file's name adds to the store's.
LOCK_SUFFIX: Final = ".lock"
#: How long a refused writer waits for the holder to finish writing who it is.
_DETAILS_WAIT_S: Final = 0.5

log = get_logger()


def lock_path(store: Path) -> Path:
    """The lock file of the SQLite store at ``store``: ``state.db.lock``."""
    return store.with_name(store.name + LOCK_SUFFIX)


@dataclass(frozen=True, slots=True)
class Holder:
    """Who writes a store, as its lock file says (any part may be unknown)."""

    pid: int | None
    host: str | None
    since: str | None
    command: str | None

    @classmethod
    def me(cls, command: str) -> Holder:
        return cls(os.getpid(), socket.gethostname(), format_time(datetime.now(UTC)), command)

    def to_bytes(self) -> bytes:
        doc = {"pid": self.pid, "host": self.host, "since": self.since, "command": self.command}
        return (json.dumps(doc, ensure_ascii=False) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """What a lock file says; ``None`` when it says nothing readable."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict):
            return None

        def text(name: str) -> str | None:
            value = doc.get(name)
            return value if isinstance(value, str) and value else None

        pid = doc.get("pid")
        return cls(
            pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            text("host"),
            text("since"),
            text("command"),
        )

    def describe(self) -> str:
        """``reconciler run (pid 4242 on host-a, since 2026-05-09T10:11:12.000000Z)``."""
        where = [f"pid {self.pid if self.pid is not None else '?'} on {self.host or '?'}"]
        if self.since:
            where.append(f"since {self.since}")
        return f"{self.command or 'a reconciler process'} ({', '.join(where)})"


class StoreInUse(StoreError):
    """Another process writes the store: a second writer is refused, nothing is written."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class WriterLock:
    """The exclusive ``flock`` on a SQLite store's lock file, held until :meth:`release`.

    Shared within one process (counted): a second :meth:`acquire` of the same
    store there returns another handle on the same lock, and the lock goes
    with the last :meth:`release`.
    """

    _held: ClassVar[dict[str, tuple[int, int]]] = {}  # real path -> (fd, handles)
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: str, path: Path) -> None:
        self._key = key
        self.path = path
        self._released = False

    @classmethod
    def acquire(cls, store: Path, *, command: str) -> WriterLock:
        """Take the lock of ``store`` (its folder must exist), or raise :class:`StoreInUse`
        naming the holder; a lock file that cannot be made is a
        :class:`~reconciler.store.base.StoreError`."""
        path = lock_path(store)
        key = os.path.realpath(path)
        with cls._guard:
            if key in cls._held:
                fd, handles = cls._held[key]
                cls._held[key] = (fd, handles + 1)
                return cls(key, path)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(
                    f"state store {store}: cannot open its writer lock {path}: "
                    f"{exc.strerror or exc}"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                held = exc.errno in (errno.EWOULDBLOCK, errno.EACCES)
                holder = _read_holder(fd) if held else None
                os.close(fd)
                if not held:
                    raise StoreError(
                        f"state store {store}: cannot lock {path}: {exc.strerror or exc}"
                    ) from exc
                who = holder.describe() if holder else "another process (it does not say which)"
                raise StoreInUse(
                    f"state store {store} is in use: {who} holds its writer lock {path}; "
                    "only one process writes a store at a time (plan and status can still "
                    "read it)",
                    holder,
                ) from None
            details = Holder.me(command).to_bytes()
            try:
                # Over the last holder's details, in place: on a full disk the page is
                # there already. If even that fails, say nothing rather than name another.
                os.pwrite(fd, details, 0)
                os.ftruncate(fd, len(details))
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            cls._held[key] = (fd, 1)
            return cls(key, path)

    def release(self) -> None:
        """Let go (idempotent): the last handle in the process unlocks and closes."""
        if self._released:
            return
        self._released = True
        with self._guard:
            fd, handles = self._held[self._key]
            if handles > 1:
                self._held[self._key] = (fd, handles - 1)
                return
            del self._held[self._key]
            os.close(fd)  # closing the last descriptor frees the lock


def _read_holder(fd: int) -> Holder | None:
    """What the holder wrote; it writes right after locking, so wait a moment for it."""
    deadline = time.monotonic() + _DETAILS_WAIT_S
    while True:
        try:
            holder = Holder.parse(os.pread(fd, 4096, 0))
        except OSError:
            return None
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


# --- PostgreSQL ------------------------------------------------------------------------


class PostgresWriter:
    """A one-shot writer's hold on a PostgreSQL store: the replicas' election lock,
    on a connection of its own, until :meth:`release` (or the process ends)."""

    def __init__(self, url: PostgresURL, conn: Any | None) -> None:
        self.url = url
        self._conn = conn

    @property
    def holds(self) -> bool:
        """Whether the lock is ours (``False``: forced beside a leader)."""
        return self._conn is not None

    @classmethod
    def claim(
        cls, url: PostgresURL, *, command: str, force: bool = False, timeout_s: float = 10.0
    ) -> PostgresWriter:
        """Take the election lock, or raise :class:`StoreInUse` naming who holds it;
        with ``force``, go on without it (a warning says beside whom)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        from reconciler.store.leader import LOCK_KEY

        name = f"{command} {socket.gethostname()}/{os.getpid()}"[:63]
        try:
            params = conninfo_to_dict(url.conninfo())
            # Held as long as the apply runs: a server-wide idle timeout must not end it.
            options = "-c idle_session_timeout=0"
            if params.get("options"):
                options = f"{params['options']} {options}"
            params.update(
                options=options, application_name=name, connect_timeout=max(1, round(timeout_s))
            )
            conn = psycopg.connect(make_conninfo("", **params), autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"state store {url}: cannot connect: {url.scrub(str(exc))}") from None
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
            if row is not None and row[0]:
                return cls(url, conn)
            who = _describe_pg_holder(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(
                f"state store {url}: cannot take the writer lock: {url.scrub(str(exc))}"
            ) from None
        conn.close()
        if force:
            log.warning("apply.beside_leader", store=str(url), holder=who)
            return cls(url, None)
        raise StoreInUse(
            f"state store {url} is in use: {who} writes it; {command} refused, nothing was "
            "sent (plan and status can still read it). To apply beside it on purpose, pass "
            "--force-while-leading"
        )

    def release(self) -> None:
        """Let go and wake the standby replicas (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        import psycopg

        from reconciler.store.leader import CHANNEL, LOCK_KEY

        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            conn.execute(f"NOTIFY {CHANNEL}")
        except psycopg.Error:
            pass  # closing the session frees the lock anyway
        finally:
            conn.close()


def _describe_pg_holder(conn: Any) -> str:
    """Who holds the election lock: the leading replica (from the leader row), or the
    session's application name (another ``apply``)."""
    from reconciler.store.leader import LOCK_KEY, LeaderRow, table_name
    from reconciler.store.postgres import SCHEMA

    table = table_name(SCHEMA)
    leader: LeaderRow | None = None
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if exists and exists[0]:
        row = conn.execute(
            f"SELECT epoch, holder, since, heartbeat, released_at FROM {table} WHERE id = 1"
        ).fetchone()
        leader = None if row is None else LeaderRow.from_row(row)
    session = conn.execute(
        "SELECT a.application_name, a.backend_start FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
        " AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (LOCK_KEY >> 32, LOCK_KEY & 0xFFFFFFFF),
    ).fetchone()
    app = session[0] if session else None
    is_daemon = app is None or str(app).startswith("reconciler leader ")
    if leader is not None and leader.leading and is_daemon:
        return (
            f"daemon replica {leader.holder}, the leader (epoch {leader.epoch}, since "
            f"{format_time(leader.since)})"
        )
    if app:
        since = f", since {format_time(session[1])}" if session and session[1] else ""
        return f"{app}{since}"
    return "another session"
