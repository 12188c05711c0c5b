"""Leader election among daemon replicas sharing one PostgreSQL state store.

Two (or more) ``reconciler run`` processes on one database: one leads and
makes requests, the others stand by, warm, and take over when it goes. The
pieces, and why each is there:

- **The lease row.** The table ``reconciler_leader`` holds one row
  ``(id=1, epoch, holder, since, heartbeat, released_at, backends)``. The
  leader renews it with a *keepalive* every ``keepalive_s``: an ``UPDATE``
  of ``heartbeat`` that matches only while ``epoch`` is still its own.
  Standbys read the row every ``poll_s`` and take over when the leader let
  go (``released_at`` set; it also sends a ``NOTIFY``, so that takes one
  round trip) or when ``heartbeat`` has stayed the same for ``takeover_s``
  on the standby's own clock. Taking over is one compare-and-swap: the
  epoch is bumped only if ``(epoch, heartbeat, released_at)`` are still the
  values watched, so a leader that renewed meanwhile is never deposed, and
  of two standbys only one wins. Nothing depends on a session dying: a
  frozen process (SIGSTOP, a long GC pause, a hung VM, a stalled disk)
  keeps its sockets open and its sessions alive, yet stops renewing.
- **The fencing epoch.** A new leader bumps ``epoch`` and remembers it;
  :meth:`Leadership.check`, which the store runs inside every write
  transaction before its writes (:class:`reconciler.store.base.Fencing`), reads
  the row ``FOR SHARE`` and raises :class:`~reconciler.store.base.FencedError`
  unless the epoch is still ours. The share lock makes the bump wait for
  write transactions already under way, so after the bump commits a deposed
  leader can record nothing, however late its answers arrive.
- **The deposed leader's sessions.** A process frozen inside a write
  transaction holds that share lock (and the rows it wrote) with nothing on
  the server to end it: PostgreSQL arms no timeout while it waits for the
  rest of a pipelined transaction, and the frozen process's kernel still
  answers TCP keepalives. So a standby taking over from a stale leader
  first ends the sessions that leader recorded in ``backends`` (its lock
  connection and its store connection) with ``pg_terminate_backend``, which
  the same role may do. Their locks go with them; the bump never waits for
  a process that may never wake.
- **The lease, and the arithmetic.** A keepalive that succeeded proves the
  lead was ours when it was *sent* (the server ran it later). The leader
  may send a request only until ``lease_s`` after the send of its last good
  keepalive, checked on a monotonic clock (``CLOCK_BOOTTIME``, which also
  counts a suspended machine) at the last moment before each request is
  written (:meth:`may_send`, the client's gate on every attempt, reads
  included). With ``K`` = ``keepalive_s``, ``τ`` = ``timeout_s`` (a
  keepalive unanswered that long loses the lead), ``m`` = ``margin_s``::

      L = lease_s    = K + τ          (0.5 + 1.0 = 1.5 s) the leader's "may send" window
      T = takeover_s = L + m          (1.5 + 1.0 = 2.5 s) the standby's wait

  A standby first saw the last heartbeat value at ``r0``, after the
  keepalive that wrote it was sent at ``s``: ``s <= r0``. The leader sends
  nothing after ``s + L``; the standby takes over at ``r0 + T >= s + L + m``.
  ``m`` covers what happens between the check and the request reaching the
  API (the write, the network, a short stall) and clock rates. The check and
  the write run in one step of the event loop, nothing else between them
  (unless the socket's send buffer is full). What the kernel has accepted
  is out of the process's hands: a whole VM paused right after a write sends
  it when it resumes; only a fencing token checked by the API could refuse
  that, and the RTC API has none. Keepalives
  go every ``K`` from send to send: while each is answered within ``K``, the
  next renews the lease before it runs out. A slower one may let it lapse
  for a moment (calls wait); one unanswered within ``τ`` loses the lead.
- **Pauses.** A frozen process wakes with every timer overdue and runs
  whatever is ready, in no useful order. Besides the arithmetic, a watchdog
  ticks every ``tick_s``; a tick later than ``lag_s`` (or a gate that finds
  the last tick that old: the watchdog has not run yet) means the event
  loop stood still, and the lease counts as *lapsed* until a keepalive
  sent after that succeeds (``leader.lapsed``, then ``leader.renewed``).
  ``on_lapsed`` runs at once (the daemon holds its workers and reads and
  withdraws calls waiting for a QPS slot, as on a loss) and ``on_renewed``
  lets them go again. If another replica took over meanwhile, the
  keepalive finds the epoch moved, or its session ended: ``leader.lost``.
- **The advisory lock.** The leader also holds ``pg_try_advisory_lock``
  on :data:`LOCK_KEY` while it can: replicas of earlier releases, which
  elected by that lock alone, then cannot take the lead from a live leader
  of this one during a rolling update. This release never waits for it.

Standbys make no API request at all, reads included: reads spend the
account's GetSegmentTask budget, which the leader's observer uses. They
load and watch the tree (the daemon does that) and read only the leader row,
to say who leads and to see it go stale.

Events: ``leader.standby`` (who leads; once per leader and epoch),
``leader.elected`` (``epoch``, ``previous``, ``grace_s``: how long the last
leader's heartbeat was watched unchanged, ``ended_sessions``),
``leader.lost`` (``why``), ``leader.lapsed`` / ``leader.renewed`` (the
lease in doubt, then renewed), ``leader.released`` (a clean handover on
shutdown), ``leader.end_sessions_failed`` and ``leader.take_over_blocked``
(a frozen leader's session could not be ended). The database URL may hold a
password: it is registered as a secret and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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

from reconciler.eventlog import setup as events
from reconciler.store.base import FencedError

#: The advisory lock's key (bigint): "RECONCIL" in ASCII, so it is unlikely to
#: collide with another application's locks in a shared database.
LOCK_KEY: Final = 0x5245434F4E43494C
#: Serializes creating the table when two replicas start at once.
_SETUP_KEY: Final = LOCK_KEY + 1
TABLE: Final = "reconciler_leader"
CHANNEL: Final = "reconciler_leader"

#: Defaults of the lease arithmetic (see the module docstring).
KEEPALIVE_S: Final = 0.5
TIMEOUT_S: Final = 1.0
MARGIN_S: Final = 1.0
#: How often a standby reads the leader row.
POLL_S: Final = 0.25
#: The watchdog's period, and how late a tick may be before the lease lapses.
TICK_S: Final = 0.1
LAG_S: Final = 0.5

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_BOOTTIME: Final[int | None] = getattr(time, "CLOCK_BOOTTIME", None)


def lease_clock() -> float:
    """Seconds on a monotonic clock that also counts time the machine was suspended.

    Linux's ``CLOCK_BOOTTIME``: after a suspended VM resumes, ``time.monotonic``
    would not show the time that passed, and a lease would look younger than it
    is. Elsewhere ``time.monotonic``.
    """
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


def table_name(schema: str | None) -> str:
    """The leader table, in ``schema`` (the store's own) or on the search path."""
    if schema is None:
        return TABLE
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return f'"{schema}".{TABLE}'


def _setup_sql(schema: str | None) -> str:
    create_schema = f'CREATE SCHEMA IF NOT EXISTS "{schema}";' if schema else ""
    table = table_name(schema)
    # ``backends`` came later: added to a table made by an earlier release, and
    # only when missing (ALTER TABLE would wait for every lock on the table,
    # a frozen leader's included).
    return f"""
{create_schema}
CREATE TABLE IF NOT EXISTS {table} (
    id          integer PRIMARY KEY CHECK (id = 1),
    epoch       bigint NOT NULL DEFAULT 0,
    holder      text,
    since       timestamptz,
    heartbeat   timestamptz,
    released_at timestamptz,
    backends    integer[]
);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{table}'::regclass
                   AND attname = 'backends' AND NOT attisdropped) THEN
        ALTER TABLE {table} ADD COLUMN backends integer[];
    END IF;
END $$;
INSERT INTO {table} (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
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
    #: The leader's sessions (lock and store connections), to end on a takeover.
    backends: tuple[int, ...] = ()

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LeaderRow:
        backends = tuple(int(p) for p in row[5] or ()) if len(row) > 5 else ()
        return cls(int(row[0]), row[1], row[2], row[3], row[4], backends)

    @property
    def leading(self) -> bool:
        """Someone holds the lead: elected and not released since."""
        return self.holder is not None and self.released_at is None

    @property
    def watched(self) -> tuple[int, datetime | None, datetime | None]:
        """What a takeover compares and swaps: any renewal or handover changes it."""
        return (self.epoch, self.heartbeat, self.released_at)

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
    """One replica's side of the election; also the store's :class:`~reconciler.store.base.Fencing`.

    :meth:`run` stands by, takes the lead when the last leader let go or went
    stale, keeps the lease alive, and calls ``on_elected(epoch)`` /
    ``on_lost(why)`` (and ``on_lapsed(why)`` / ``on_renewed()`` while the
    lease is in doubt); :meth:`release` lets go on shutdown. One asyncio
    program owns it; :meth:`check` and :meth:`may_send` run on its thread.
    """

    def __init__(
        self,
        url: str,
        *,
        replica: str | None = None,
        schema: str | None = None,
        retry_s: float = 1.0,
        poll_s: float = POLL_S,
        keepalive_s: float = KEEPALIVE_S,
        timeout_s: float = TIMEOUT_S,
        margin_s: float = MARGIN_S,
        tick_s: float = TICK_S,
        lag_s: float = LAG_S,
        connect_timeout_s: float = 5.0,
        clock: Callable[[], float] = lease_clock,
    ) -> None:
        if min(poll_s, keepalive_s, timeout_s, margin_s, tick_s, lag_s) <= 0:
            raise ValueError("the leadership's periods, timeout and margin must be positive")
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
        self.poll_s = poll_s
        self.keepalive_s = keepalive_s
        self.timeout_s = timeout_s
        self.margin_s = margin_s
        self.tick_s = tick_s
        self.lag_s = lag_s
        self.connect_timeout_s = connect_timeout_s
        self._now = clock
        #: The epoch of our current term (``None``: standing by).
        self.epoch: int | None = None
        #: The epoch our writes are fenced with: the last one we were elected
        #: with. It outlives a lost connection, so answers that arrive after the
        #: lead was lost are still recorded, unless another replica took over.
        self._fence_epoch: int | None = None
        #: The leader row as last read (who leads, for standbys' readiness).
        self.leader: LeaderRow | None = None
        #: Why the database cannot be used right now (``None``: it can).
        self.problem: str | None = None
        #: Requests may go until then (:meth:`lease_clock` seconds): the send of
        #: the last keepalive that succeeded plus :attr:`lease_s`.
        self._lease_until = -math.inf
        #: The watchdog's last tick; why the lease lapsed, and since when.
        self._tick = -math.inf
        self._lapsed: str | None = None
        self._lapsed_at = -math.inf
        self._on_lapsed: Callable[[str], None] = lambda _why: None
        self._on_renewed: Callable[[], None] = lambda: None
        self._locked = False
        self._lock_pid: int | None = None
        self._store_pid: int | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._told: tuple[str | None, int] | None = None
        self._blocked: str | None = None
        self._log = events.get_logger(replica=self.replica)

    # --- the arithmetic --------------------------------------------------------------

    @property
    def lease_s(self) -> float:
        """``L``: how long after the *send* of its last good keepalive a leader may send."""
        return self.keepalive_s + self.timeout_s

    @property
    def takeover_s(self) -> float:
        """``T``: how long a standby watches an unchanged heartbeat before it takes over.

        Longer than :attr:`lease_s` by :attr:`margin_s`: see the module docstring.
        """
        return self.lease_s + self.margin_s

    @property
    def lease_deadline(self) -> float:
        """Until when (:func:`lease_clock`) requests may go, unless lapsed before."""
        return self._lease_until

    # --- what others ask -----------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    @property
    def lapsed(self) -> str | None:
        """Why the lease is in doubt while still leading (``None``: it is not)."""
        return self._lapsed

    def holds(self) -> bool:
        """Leading on a lease that holds now (nothing is changed by asking)."""
        return self._doubt(self._now()) is None

    def may_send(self) -> bool:
        """The gate, asked at the last moment before each request is written.

        ``True`` while the lease holds. Otherwise the lease lapses (once:
        ``leader.lapsed`` and ``on_lapsed``), until a keepalive sent after
        now succeeds, and the answer is ``False``.
        """
        now = self._now()
        why = self._doubt(now)
        if why is None:
            return True
        if self.epoch is not None:
            self._lapse(why, now)
        return False

    def _doubt(self, now: float) -> str | None:
        """Why no request may go at ``now`` (``None``: it may)."""
        if self.epoch is None:
            return "not leading"
        if self._lapsed is not None:
            return self._lapsed
        if now >= self._lease_until:
            return f"no keepalive succeeded within the lease ({self.lease_s:g} s)"
        if now - self._tick > self.tick_s + self.lag_s:
            return f"the event loop stood still for {now - self._tick:.2f} s"
        return None

    def standby_reason(self) -> str:
        """What a standby's ``/readyz`` says: who leads."""
        if self.leader is None:
            return "standby: waiting for the leader row"
        return f"standby: {self.leader.describe()}"

    def check(self, cursor: Any) -> None:
        """The fence (:class:`~reconciler.store.base.Fencing`): inside the store's write
        transaction, refuse unless the row's epoch is still ours."""
        ours = self._fence_epoch
        if ours is None:
            raise FencedError(f"replica {self.holder} has never led: a standby records nothing")
        # The store's session, to be ended by whoever takes over from us stale
        # (the client knows it: no round trip). The next keepalive records it.
        with contextlib.suppress(AttributeError):
            self._store_pid = int(cursor.connection.info.backend_pid)
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
        self,
        *,
        on_elected: Callable[[int], None],
        on_lost: Callable[[str], None],
        on_lapsed: Callable[[str], None] | None = None,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        """Stand by, lead, and stand by again, until cancelled (then :meth:`release`)."""
        if on_lapsed is not None:
            self._on_lapsed = on_lapsed
        if on_renewed is not None:
            self._on_renewed = on_renewed
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
                previous, waited, ended = await self._stand_by(conn)
                epoch = self.epoch
                assert epoch is not None
                self._log.info(
                    "leader.elected",
                    epoch=epoch,
                    holder=self.holder,
                    previous=None if previous is None else previous.holder,
                    grace_s=round(waited, 3),
                    ended_sessions=ended,
                )
                try:
                    on_elected(epoch)
                except Exception as exc:
                    why = f"taking over failed: {exc!r}"
                    self._log.exception("leader.take_over_failed", error=repr(exc))
                else:
                    # Re-planning everything held the loop: a stall of our own, not one
                    # we know nothing of. The lease, from the bump's send, still bounds it.
                    self._tick = self._now()
                    why = await self._lead(conn, epoch)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                why = f"lost the connection to the state database: {_why(exc)}"
                self._unusable(why)
            if self.epoch is not None:
                self.epoch = None
                self._lapsed = None
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
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                    await conn.execute(f"NOTIFY {CHANNEL}")
                self._log.info("leader.released", epoch=epoch, holder=self.holder)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            # The next leader waits for the heartbeat to go stale instead.
            self._log.warning("leader.release_failed", error=_why(exc), epoch=epoch)
        finally:
            await self._close()

    # --- steps -------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        params = conninfo_to_dict(self._url)
        # Server side: a statement that hangs fails. Both sides: TCP keepalives
        # notice a peer that is gone (on TCP connections; sockets ignore them).
        # The election relies on neither: a frozen process keeps its session.
        options = (
            f"-c statement_timeout={int(self.timeout_s * 3000)} "
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
        self._locked = False
        self._lock_pid = conn.info.backend_pid
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
            cur = await conn.execute(
                f"SELECT epoch, holder, since, heartbeat, released_at, backends "
                f"FROM {self._table} WHERE id = 1"
            )
            row = await cur.fetchone()
        if row is None:
            raise psycopg.OperationalError(f"the {self._table} row is missing")
        self.leader = LeaderRow.from_row(row)
        return self.leader

    async def _stand_by(
        self, conn: psycopg.AsyncConnection[Any]
    ) -> tuple[LeaderRow | None, float, int]:
        """Until the lead is ours: the last leader's row (``None``: there was none), how
        long its heartbeat was watched unchanged (0 after a release), sessions ended."""
        watched: tuple[int, datetime | None, datetime | None] | None = None
        since = 0.0
        while True:
            row = await self._read_row(conn)
            now = self._now()
            if row.watched != watched:
                # First sight of this heartbeat: it was written after the keepalive
                # that wrote it was sent, so the lease it renewed ends within
                # lease_s from no later than now.
                watched, since = row.watched, now
            stale = now - since
            clean = row.holder is None or row.released_at is not None
            ours = row.epoch == self._fence_epoch  # our own last term: nobody came since
            if clean or ours or stale >= self.takeover_s:
                ended = 0 if clean or ours else await self._end_sessions(conn, row)
                if await self._take_over(conn, row):
                    previous = None if row.holder is None else row
                    return previous, 0.0 if clean or ours else stale, ended
                continue  # renewed, or another standby won: look again at once
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
            # A leader that lets go notifies; else read again after poll_s, or
            # exactly when the heartbeat would have been unchanged for takeover_s.
            wait = max(0.0, min(self.poll_s, since + self.takeover_s - now))
            async for _ in conn.notifies(timeout=wait, stop_after=1):
                pass

    async def _end_sessions(self, conn: psycopg.AsyncConnection[Any], row: LeaderRow) -> int:
        """End the stale leader's sessions, so no lock of a frozen process blocks the bump.

        Only sessions that existed at its last keepalive (a pid used again since
        is someone else's). Ending another role's sessions needs
        ``pg_signal_backend``; refused, the bump may wait for them.
        """
        if not row.backends or row.heartbeat is None:
            return 0
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                # Signalled, a session ends within moments; the bump's lock_timeout
                # waits for that.
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE pid = ANY(%s) AND pid <> pg_backend_pid() "
                    "AND backend_start <= %s",
                    (list(row.backends), row.heartbeat),
                )
                got = await cur.fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            self._log.warning(
                "leader.end_sessions_failed", error=_why(exc), leader=row.holder, epoch=row.epoch
            )
            return 0
        return 0 if got is None else int(got[0])

    async def _take_over(self, conn: psycopg.AsyncConnection[Any], row: LeaderRow) -> bool:
        """Bump the epoch if the row is still as watched; whether we lead now."""
        sent = self._now()
        try:
            async with asyncio.timeout(self.timeout_s * 3), conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(self.timeout_s * 1000)}")
                cur = await conn.execute(
                    f"UPDATE {self._table} SET epoch = epoch + 1, holder = %s, since = now(), "
                    "heartbeat = now(), released_at = NULL, backends = %s "
                    "WHERE id = 1 AND epoch = %s AND heartbeat IS NOT DISTINCT FROM %s "
                    "AND released_at IS NOT DISTINCT FROM %s "
                    "RETURNING epoch, pg_try_advisory_lock(%s)",
                    (self.holder, self._backends(), *row.watched, LOCK_KEY),
                )
                won = await cur.fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            # A session we could not end holds the row: try again at the next look.
            why = f"the leader row is locked by another session: {_why(exc)}"
            if self._blocked != why:
                self._log.warning("leader.take_over_blocked", error=why, leader=row.holder)
            self._blocked = why
            await asyncio.sleep(self.poll_s)
            return False
        self._blocked = None
        if won is None:
            return False
        self._locked = bool(won[1])
        self._lease_until = sent + self.lease_s
        self._tick = self._now()
        self._lapsed = None
        self.epoch = self._fence_epoch = int(won[0])
        self._told = None
        await self._read_row(conn)
        return True

    def _backends(self) -> list[int]:
        return [p for p in (self._lock_pid, self._store_pid) if p is not None]

    async def _lead(self, conn: psycopg.AsyncConnection[Any], epoch: int) -> str:
        """Keep the lease alive (and the watchdog ticking); return why the lead was lost."""
        watchdog = asyncio.create_task(self._watch(), name="leader watchdog")
        try:
            due = self._lease_until - self.lease_s + self.keepalive_s
            while True:
                await asyncio.sleep(max(0.0, due - self._now()))
                sent = self._now()
                due = sent + self.keepalive_s  # from send to send: no drift
                if (why := await self._keepalive(conn, epoch, sent)) is not None:
                    return why
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    async def _keepalive(
        self, conn: psycopg.AsyncConnection[Any], epoch: int, sent: float
    ) -> str | None:
        """One keepalive, sent at ``sent``; ``None`` if the lead is still ours, else why not."""
        try:
            async with asyncio.timeout(self.timeout_s):
                cur = await conn.execute(
                    f"UPDATE {self._table} SET heartbeat = now(), backends = %s "
                    "WHERE id = 1 AND epoch = %s "
                    "RETURNING CASE WHEN %s THEN true ELSE pg_try_advisory_lock(%s) END",
                    (self._backends(), epoch, self._locked, LOCK_KEY),
                )
                row = await cur.fetchone()
        except TimeoutError:
            return f"the keepalive got no answer within {self.timeout_s:g} s"
        except (psycopg.Error, OSError) as exc:
            return f"the lock connection failed: {_why(exc)}"
        if row is None:
            return "another replica took over (the epoch moved on)"
        self._locked = bool(row[0])
        self._lease_until = max(self._lease_until, sent + self.lease_s)
        if self._lapsed is not None and sent > self._lapsed_at:
            lapsed_s = self._now() - self._lapsed_at
            self._lapsed = None
            self._log.info("leader.renewed", epoch=epoch, lapsed_s=round(lapsed_s, 3))
            self._on_renewed()
        return None

    async def _watch(self) -> None:
        """Tick every ``tick_s``; a late tick means the event loop stood still."""
        last = self._tick = self._now()
        while True:
            await asyncio.sleep(self.tick_s)
            now = self._now()
            late, last = now - last, now
            self._tick = now
            if late > self.tick_s + self.lag_s:
                self._lapse(f"the event loop stood still for {late:.2f} s", now)
            elif now >= self._lease_until:
                self._lapse(f"no keepalive succeeded within the lease ({self.lease_s:g} s)", now)

    def _lapse(self, why: str, now: float) -> None:
        """The lease is in doubt: nothing goes until a keepalive sent after now succeeds."""
        if self.epoch is None or self._lapsed is not None:
            return
        self._lapsed, self._lapsed_at = why, now
        self._log.warning("leader.lapsed", why=why, epoch=self.epoch, holder=self.holder)
        self._on_lapsed(why)

    def _unusable(self, why: str) -> None:
        if self.problem != why:
            self._log.warning("leader.database_unavailable", error=why, holder=self.holder)
        self.problem = why

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._locked = False
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()


def _why(exc: BaseException) -> str:
    """An error in one line; psycopg's messages name no password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
