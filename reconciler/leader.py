"""Leader election among daemon replicas sharing one PostgreSQL state store.

Two (or more) ``reconciler run`` processes on one database: one leads and
makes calls, the others stand by, warm, and take over when it goes. The
pieces, and why each is there:

- **The lock.** Each replica keeps a dedicated connection (never the store's)
  and tries ``pg_try_advisory_lock(LOCK_KEY)``, a *session* lock: it is held
  for as long as that connection lives and is freed by the server the moment
  the session ends, whether the process exited, was killed (``kill -9``
  closes its sockets) or the connection was terminated. Standbys try again
  every ``retry_s`` and sooner on a ``NOTIFY`` that a leader sends when it
  lets go, so a clean handover takes one round trip, not a poll period.
- **The fencing epoch.** The table ``reconciler_leader`` holds one row
  ``(id=1, epoch, holder, since, heartbeat, released_at)``. A new leader bumps
  ``epoch`` in one transaction and remembers it; :meth:`Leadership.check`,
  which the store runs inside every write transaction before its writes
  (:class:`reconciler.state.Fencing`), reads the row ``FOR SHARE`` and raises
  :class:`~reconciler.state.FencedError` unless the epoch is still ours. The
  share lock makes the bump wait for write transactions already under way,
  so after the bump commits a deposed leader can record nothing, however
  late its answers arrive.
- **Keepalive.** The leader updates ``heartbeat`` on its lock connection every
  ``keepalive_s`` (bounded by ``timeout_s``; the connection also carries a
  ``statement_timeout``, TCP keepalives, and an ``idle_session_timeout`` so a
  partitioned leader's session, hence its lock, is ended by the server).
  Any failure means the lock may be gone: ``on_lost`` runs at once (the
  daemon pauses its workers and withdraws calls waiting for a QPS slot) and
  the replica goes back to standing by. :meth:`holds` is the same promise
  as a lease, for the moment a call is sent: a leader whose keepalive has not
  succeeded within ``keepalive_s + timeout_s`` (a blocked event loop) sends
  nothing.
- **Grace.** A leader that ended without releasing (killed, cut off) may still
  be sending for up to ``keepalive_s + timeout_s`` before its keepalive tells
  it so; the new leader waits that long before its first call. After a clean
  release (``released_at`` set) there is nothing to wait for.

Standbys make no API request at all, reads included: reads spend the
account's GetSegmentTask budget, which the leader's observer uses. They
load and watch the tree (the daemon does that) and read only the leader row,
to say who leads.

Events: ``leader.standby`` (who leads; once per leader and epoch),
``leader.elected`` (``epoch``, ``previous``, ``grace_s``), ``leader.lost``
(``why``), ``leader.released`` (a clean handover on shutdown). The database
URL may hold a password: it is registered as a secret and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from reconciler import events
from reconciler.state import FencedError

#: The advisory lock's key (bigint): "RECONCIL" in ASCII, so it is unlikely to
#: collide with another application's locks in a shared database.
LOCK_KEY: Final = 0x5245434F4E43494C
#: Serializes creating the table when two replicas start at once.
_SETUP_KEY: Final = LOCK_KEY + 1
TABLE: Final = "reconciler_leader"
CHANNEL: Final = "reconciler_leader"

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def table_name(schema: str | None) -> str:
    """The leader table, in ``schema`` (the store's own) or on the search path."""
    if schema is None:
        return TABLE
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return f'"{schema}".{TABLE}'


def _setup_sql(schema: str | None) -> str:
    create_schema = f'CREATE SCHEMA IF NOT EXISTS "{schema}";' if schema else ""
    return f"""
{create_schema}
CREATE TABLE IF NOT EXISTS {table_name(schema)} (
    id          integer PRIMARY KEY CHECK (id = 1),
    epoch       bigint NOT NULL DEFAULT 0,
    holder      text,
    since       timestamptz,
    heartbeat   timestamptz,
    released_at timestamptz
);
INSERT INTO {table_name(schema)} (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
"""


def _row_sql(table: str) -> str:
    return f"SELECT epoch, holder, since, heartbeat, released_at FROM {table} WHERE id = 1"


def default_replica() -> str:
    """The replica's name: the host name (a Kubernetes pod's name)."""
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class LeaderRow:
    """Who leads (or led last), from the ``reconciler_leader`` row."""

    epoch: int
    holder: str | None
    since: datetime | None
    heartbeat: datetime | None
    released_at: datetime | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LeaderRow:
        return cls(int(row[0]), row[1], row[2], row[3], row[4])

    @property
    def leading(self) -> bool:
        """Someone holds the lead: elected and not released since."""
        return self.holder is not None and self.released_at is None

    def describe(self) -> str:
        if self.holder is None:
            return "no leader elected yet"
        since = _iso(self.since)
        if self.released_at is not None:
            return f"no leader: {self.holder} released at {_iso(self.released_at)}"
        return f"leader is {self.holder} (epoch {self.epoch}) since {since}"

    def to_json(self, *, now: datetime | None = None) -> dict[str, object]:
        now = now or datetime.now(UTC)
        age = None
        if self.heartbeat is not None:
            age = round(max(0.0, (now - self.heartbeat).total_seconds()), 3)
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "since": _iso(self.since),
            "heartbeat": _iso(self.heartbeat),
            "heartbeat_age_s": age,
            "released_at": _iso(self.released_at),
            "leading": self.leading,
        }


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def read_leader(url: str, *, schema: str | None = None, timeout_s: float = 5.0) -> LeaderRow | None:
    """The leader row of the database at ``url`` (``None``: no replica ever ran there).

    Read-only and short-lived, for ``reconciler status``.
    """
    table = table_name(schema)
    with psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout_s))) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute(_row_sql(table)).fetchone()
        return None if row is None else LeaderRow.from_row(row)


class Leadership:
    """One replica's side of the election; also the store's :class:`~reconciler.state.Fencing`.

    :meth:`run` stands by, takes the lead when the lock frees, keeps it alive,
    and calls ``on_elected(epoch)`` / ``on_lost(why)``; :meth:`release` lets go
    on shutdown. One asyncio program owns it; :meth:`check` may run from the
    store's (synchronous) writes on the same thread.
    """

    def __init__(
        self,
        url: str,
        *,
        replica: str | None = None,
        schema: str | None = None,
        retry_s: float = 1.0,
        keepalive_s: float = 1.0,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._url = url
        self._schema = schema
        self._table = table_name(schema)
        params = conninfo_to_dict(url)
        if password := params.get("password"):
            events.register_secret(str(password))
        self.replica = replica or default_replica()
        #: What the row and ``status`` name: the replica and its process.
        self.holder = f"{self.replica}/{os.getpid()}"
        self.retry_s = retry_s
        self.keepalive_s = keepalive_s
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        #: The epoch of our current term (``None``: standing by).
        self.epoch: int | None = None
        #: The epoch our writes are fenced with: the last one we were elected
        #: with. It outlives a lost connection, so answers that arrive after the
        #: lock was lost are still recorded, unless another replica took over.
        self._fence_epoch: int | None = None
        #: The leader row as last read (who leads, for standbys' readiness).
        self.leader: LeaderRow | None = None
        #: Why the database cannot be used right now (``None``: it can).
        self.problem: str | None = None
        self._last_ok = 0.0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._told: tuple[str | None, int] | None = None
        self._log = events.get_logger(replica=self.replica)

    # --- what others ask -----------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    @property
    def lease_s(self) -> float:
        """How long after its last good keepalive a leader may still call."""
        return self.keepalive_s + self.timeout_s

    def holds(self) -> bool:
        """Leading, with a keepalive that succeeded within :attr:`lease_s`."""
        return self.epoch is not None and time.monotonic() - self._last_ok < self.lease_s

    def standby_reason(self) -> str:
        """What a standby's ``/readyz`` says: who leads."""
        if self.leader is None:
            return "standby: waiting for the leader row"
        return f"standby: {self.leader.describe()}"

    def check(self, cursor: Any) -> None:
        """The fence (:class:`~reconciler.state.Fencing`): inside the store's write
        transaction, refuse unless the row's epoch is still ours."""
        ours = self._fence_epoch
        if ours is None:
            raise FencedError(f"replica {self.holder} has never led: a standby records nothing")
        cursor.execute(f"SELECT epoch, holder FROM {self._table} WHERE id = 1 FOR SHARE")
        row = cursor.fetchone()
        if row is None or int(row[0]) != ours:
            now = "nobody" if row is None else f"{row[1]} (epoch {row[0]})"
            raise FencedError(
                f"replica {self.holder} was deposed: it led with epoch {ours}, "
                f"{now} leads now; nothing was recorded"
            )

    # --- the loop --------------------------------------------------------------------

    async def run(
        self, *, on_elected: Callable[[int], None], on_lost: Callable[[str], None]
    ) -> None:
        """Stand by, lead, and stand by again, until cancelled (then :meth:`release`)."""
        while True:
            try:
                conn = await self._connect()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._unusable(f"cannot reach the state database: {_why(exc)}")
                await asyncio.sleep(self.retry_s)
                continue
            self.problem = None
            why: str | None = None
            try:
                previous = await self._stand_by(conn)
                epoch, grace = await self._take_over(conn, previous)
                self._log.info(
                    "leader.elected",
                    epoch=epoch,
                    holder=self.holder,
                    previous=None if previous is None else previous.holder,
                    grace_s=grace,
                )
                if grace:
                    # The last leader did not let go: it may still be sending
                    # until its own keepalive tells it. Keep the lease fresh.
                    await self._keepalive_for(conn, grace)
                self.epoch = epoch
                self._fence_epoch = epoch
                try:
                    on_elected(epoch)
                except Exception as exc:
                    why = f"taking over failed: {exc!r}"
                    self._log.exception("leader.take_over_failed", error=repr(exc))
                else:
                    why = await self._lead(conn)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                why = f"lost the connection to the state database: {_why(exc)}"
                self._unusable(why)
            if self.epoch is not None:
                self.epoch = None
                self._log.error("leader.lost", why=why, holder=self.holder)
                on_lost(why or "unknown")
            await self._close()
            await asyncio.sleep(self.retry_s)

    async def release(self) -> None:
        """Let go (shutdown): mark the row released, unlock, wake the standbys, close."""
        conn, epoch = self._conn, self.epoch
        self.epoch = None
        if conn is None:
            return
        try:
            if epoch is not None and not conn.closed:
                async with asyncio.timeout(self.timeout_s * 3):
                    await conn.execute(
                        f"UPDATE {self._table} SET released_at = now(), heartbeat = now() "
                        "WHERE id = 1 AND epoch = %s",
                        (epoch,),
                    )
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                    await conn.execute(f"NOTIFY {CHANNEL}")
                self._log.info("leader.released", epoch=epoch, holder=self.holder)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            # Closing the session frees the lock anyway; the next leader waits its grace.
            self._log.warning("leader.release_failed", error=_why(exc), epoch=epoch)
        finally:
            await self._close()

    # --- steps -------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        params = conninfo_to_dict(self._url)
        # Server side: a statement that hangs fails, and a session whose client is
        # gone (a partition) is ended, which frees its lock. Client side: TCP
        # keepalives notice a dead peer (on TCP connections; sockets ignore them).
        idle_ms = int(max(10.0, 10 * max(self.keepalive_s, self.retry_s)) * 1000)
        options = (
            f"-c statement_timeout={int(self.timeout_s * 3000)} "
            f"-c idle_session_timeout={idle_ms} "
            "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
        )
        if params.get("options"):
            options = f"{params['options']} {options}"
        params.update(
            options=options,
            application_name=f"reconciler leader {self.holder}"[:63],
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            connect_timeout=max(1, round(self.connect_timeout_s)),
        )
        async with asyncio.timeout(self.connect_timeout_s + 1):
            conn = await psycopg.AsyncConnection.connect(
                make_conninfo("", **params), autocommit=True
            )
        self._conn = conn
        try:
            async with asyncio.timeout(self.connect_timeout_s), conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_KEY,))
                await conn.execute(_setup_sql(self._schema))
            await conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            await self._close()
            raise
        return conn

    async def _read_row(self, conn: psycopg.AsyncConnection[Any]) -> LeaderRow:
        async with asyncio.timeout(self.timeout_s * 3):
            cur = await conn.execute(_row_sql(self._table))
            row = await cur.fetchone()
        if row is None:
            raise psycopg.OperationalError(f"the {self._table} row is missing")
        self.leader = LeaderRow.from_row(row)
        return self.leader

    async def _stand_by(self, conn: psycopg.AsyncConnection[Any]) -> LeaderRow | None:
        """Until the lock is ours; returns the row as it was (the last leader)."""
        while True:
            async with asyncio.timeout(self.timeout_s * 3):
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
                got = await cur.fetchone()
            row = await self._read_row(conn)
            if got and got[0]:
                return row if row.holder is not None else None
            told = (row.holder, row.epoch)
            if self._told != told:
                self._told = told
                self._log.info(
                    "leader.standby",
                    holder=self.holder,
                    leader=row.holder,
                    epoch=row.epoch,
                    since=_iso(row.since),
                    message=self.standby_reason(),
                )
            # A leader that lets go notifies; otherwise try again after retry_s.
            async for _ in conn.notifies(timeout=self.retry_s, stop_after=1):
                pass

    async def _take_over(
        self, conn: psycopg.AsyncConnection[Any], previous: LeaderRow | None
    ) -> tuple[int, float]:
        """Bump the epoch; return it and the grace to wait before calling."""
        async with asyncio.timeout(self.timeout_s * 3), conn.transaction():
            cur = await conn.execute(
                f"UPDATE {self._table} SET epoch = epoch + 1, holder = %s, since = now(), "
                "heartbeat = now(), released_at = NULL WHERE id = 1 RETURNING epoch",
                (self.holder,),
            )
            row = await cur.fetchone()
        if row is None:
            raise psycopg.OperationalError(f"the {self._table} row is missing")
        self._last_ok = time.monotonic()
        self._told = None
        await self._read_row(conn)
        clean = previous is None or previous.released_at is not None
        return int(row[0]), 0.0 if clean else self.lease_s

    async def _heartbeat(self, conn: psycopg.AsyncConnection[Any], epoch: int) -> str | None:
        """One keepalive; ``None`` if the lead is still ours, else why not."""
        try:
            async with asyncio.timeout(self.timeout_s):
                cur = await conn.execute(
                    f"UPDATE {self._table} SET heartbeat = now() WHERE id = 1 AND epoch = %s "
                    "RETURNING heartbeat",
                    (epoch,),
                )
                row = await cur.fetchone()
        except TimeoutError:
            return f"the keepalive got no answer within {self.timeout_s:g} s"
        except (psycopg.Error, OSError) as exc:
            return f"the lock connection failed: {_why(exc)}"
        if row is None:
            return "another replica took over (the epoch moved on)"
        self._last_ok = time.monotonic()
        return None

    async def _keepalive_for(self, conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.keepalive_s))
            async with asyncio.timeout(self.timeout_s * 3):
                await conn.execute("SELECT 1")
            self._last_ok = time.monotonic()

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> str:
        """Keep the lead alive; return why it was lost."""
        assert self.epoch is not None
        epoch = self.epoch
        while True:
            await asyncio.sleep(self.keepalive_s)
            if (why := await self._heartbeat(conn, epoch)) is not None:
                return why

    def _unusable(self, why: str) -> None:
        if self.problem != why:
            self._log.warning("leader.database_unavailable", error=why, holder=self.holder)
        self.problem = why

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()


def _why(exc: BaseException) -> str:
    """An error in one line; psycopg's messages name no password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
