"""Leader election against a real PostgreSQL server (no mocks): :mod:`reconciler.store.leader`.

Each test gets a fresh database (``postgres_url``, tests/postgres.py); two
:class:`Leadership` objects in one process are two sessions, which is all an
advisory lock tells apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
import pytest

from reconciler.core.task import Source, TaskKey
from reconciler.store.base import FencedError, Store
from reconciler.store.leader import LOCK_KEY, Leadership, read_leader
from reconciler.store.postgres import SCHEMA

FAST: dict[str, Any] = {
    "retry_s": 0.2,
    "poll_s": 0.1,
    "keepalive_s": 0.2,
    "timeout_s": 0.5,
    "margin_s": 0.5,
}


class Replica:
    """A :class:`Leadership` running in the test's loop, with what it was told."""

    def __init__(self, url: str, name: str, *, schema: str | None = None, **timing: Any) -> None:
        timing = {**FAST, **timing}
        self.lead = Leadership(url, replica=name, schema=schema, clock=time.monotonic, **timing)
        self.elected: list[tuple[int, float]] = []
        self.lost: list[tuple[str, float]] = []
        self.lapsed: list[tuple[str, float]] = []
        self.renewed: list[float] = []
        self.task = asyncio.create_task(
            self.lead.run(
                on_elected=lambda e: self.elected.append((e, time.monotonic())),
                on_lost=lambda why: self.lost.append((why, time.monotonic())),
                on_lapsed=lambda why: self.lapsed.append((why, time.monotonic())),
                on_renewed=lambda: self.renewed.append(time.monotonic()),
            )
        )

    async def stop(self, *, release: bool = True) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        if release:
            await self.lead.release()


async def until(predicate: Callable[[], Any], within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def lock_is_free(url: str) -> bool:
    """Whether a replica of an earlier release, electing by the advisory lock, would lead."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        return bool(row and row[0])


def cut_off(url: str, lead: Leadership) -> bool:
    """End ``lead``'s lock session from the server side, as a network cut or an
    administrator would: the server frees the lock, nobody released it."""
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (f"reconciler leader {lead.holder}",),
        ).fetchone()
    return bool(row and row[0])


def test_one_leader_and_a_clean_handover_bumps_the_epoch(postgres_url: str) -> None:
    async def scenario() -> None:
        a = Replica(postgres_url, "a")
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b")
        await until(lambda: b.lead.leader is not None)
        await asyncio.sleep(0.6)  # several of b's tries: the lock stays a's
        assert not b.elected and a.lead.leading and not b.lead.leading
        assert b.lead.standby_reason().startswith(f"standby: leader is {a.lead.holder} (epoch 1)")
        row = await asyncio.to_thread(read_leader, postgres_url)
        assert row is not None and row.holder == a.lead.holder and row.epoch == 1
        assert not await asyncio.to_thread(lock_is_free, postgres_url)

        released = time.monotonic()
        await a.stop()
        (epoch, at), *_ = await until(lambda: b.elected)
        assert epoch == 2
        # The release notifies: b takes over at once, with no grace to wait.
        assert at - released < 0.5
        assert not b.lost
        await b.stop()
        row = await asyncio.to_thread(read_leader, postgres_url)
        assert row is not None and row.epoch == 2 and row.released_at is not None

    run(scenario)


def test_a_deposed_leaders_write_is_refused_and_records_nothing(postgres_url: str) -> None:
    async def scenario() -> None:
        a = Replica(postgres_url, "a")
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b")
        await until(lambda: b.lead.leader is not None)
        with pytest.raises(FencedError, match="never led"):
            b.lead.check(None)  # a standby writes nothing, and asks nothing to know it
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE results (n int)")
            with conn.transaction(), conn.cursor() as cur:
                a.lead.check(cur)  # a leads: its write goes through
                cur.execute("INSERT INTO results VALUES (1)")
            # a is cut off without letting go: its session ends, the lock frees
            await a.stop(release=False)
            assert cut_off(postgres_url, a.lead)
            await until(lambda: b.elected)
            with (
                pytest.raises(FencedError, match="deposed"),
                conn.transaction(),
                conn.cursor() as cur,
            ):
                a.lead.check(cur)
                cur.execute("INSERT INTO results VALUES (2)")
            with conn.transaction(), conn.cursor() as cur:
                b.lead.check(cur)
                cur.execute("INSERT INTO results VALUES (3)")
            rows = conn.execute("SELECT n FROM results ORDER BY n").fetchall()
        assert rows == [(1,), (3,)]
        await b.stop()

    run(scenario)


def test_the_store_refuses_a_deposed_leaders_result(postgres_url: str) -> None:
    """The contract with the store: its write transactions check the fence first."""
    key = TaskKey("app", "room", "task")
    where = Source("a.yaml", 1, 1)

    async def scenario() -> None:
        # The store first: it makes the schema the leader row then joins.
        Store.open(postgres_url, create=True).close()
        a = Replica(postgres_url, "a", schema=SCHEMA)
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b", schema=SCHEMA)
        await until(lambda: b.lead.leader is not None)
        with Store.open(postgres_url, fencing=a.lead) as store:
            store.record_success(
                key, fields={"Duration": 30}, business_id=None, request_id="r1", source=where
            )
            await a.stop(release=False)
            assert cut_off(postgres_url, a.lead)
            await until(lambda: b.elected)
            with pytest.raises(FencedError, match="deposed"):
                store.record_success(
                    key, fields={"Duration": 60}, business_id=None, request_id="r2", source=where
                )
        with Store.open(postgres_url, fencing=b.lead) as store:
            record = store.get(key)
            assert record is not None and record.request_id == "r1"
            store.record_success(
                key, fields={"Duration": 90}, business_id=None, request_id="r3", source=where
            )
            record = store.get(key)
            assert record is not None and record.request_id == "r3"
        await b.stop()
        row = await asyncio.to_thread(read_leader, postgres_url, schema=SCHEMA)
        assert row is not None and row.epoch == 2 and row.holder == b.lead.holder

    run(scenario)


def test_losing_the_lock_connection_stops_the_leader_at_once(postgres_url: str) -> None:
    async def scenario() -> None:
        a = Replica(postgres_url, "a")
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b")
        await until(lambda: b.lead.leader is not None)
        assert a.lead.holds()
        assert cut_off(postgres_url, a.lead)
        cut = time.monotonic()
        (why, lost_at), *_ = await until(lambda: a.lost)
        # Noticed by the next keepalive (0.2 s apart), and from then on no call may go.
        assert lost_at - cut < 1.0, why
        assert "connection" in why
        assert not a.lead.holds() and not a.lead.leading and not a.lead.may_send()
        # Nobody took over (a's heartbeat never went stale): a leads again, in a
        # term of its own, without waiting; b stands by all along.
        (epoch, again_at) = (await until(lambda: a.elected[1:]))[0]
        assert epoch == 2 and again_at - lost_at < 1.0
        assert not b.elected
        await until(lambda: b.lead.leader is not None and b.lead.leader.epoch == 2)
        await a.stop()
        await b.stop()

    run(scenario)


def test_a_stale_leader_is_taken_over_once_its_lease_surely_ended(postgres_url: str) -> None:
    """A frozen leader: its sessions stay open, one in the middle of a write transaction
    holding the fence's share lock; the standby takes over all the same, no sooner
    than the margin after the frozen one's lease ended, and ends those sessions."""

    async def scenario() -> None:
        Store.open(postgres_url, create=True).close()
        a = Replica(postgres_url, "a", schema=SCHEMA)
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b", schema=SCHEMA)
        await until(lambda: b.lead.leader is not None)
        with psycopg.connect(postgres_url, autocommit=True) as store:
            cur = store.cursor()
            with store.transaction():  # a's earlier writes: the fence learns the session
                a.lead.check(cur)
            await asyncio.sleep(3 * FAST["keepalive_s"])  # a's keepalives name it in the row
            # Frozen in the middle of a pipelined write: the fence's share lock and a
            # written row held, the rest not sent yet (no server timeout applies).
            pipeline = store.pipeline()
            pipeline.__enter__()
            cur.execute("BEGIN")
            a.lead.check(cur)
            cur.execute(f"UPDATE {SCHEMA}.meta SET value = value WHERE key = 'generation'")
            store.pgconn.flush()
            a.task.cancel()  # frozen: no keepalive, no release, every session open
            with pytest.raises(asyncio.CancelledError):
                await a.task
            deadline = a.lead.lease_deadline  # a sends nothing from then on ...
            assert a.lead.lease_s < b.lead.takeover_s
            (epoch, elected_at), *_ = await until(lambda: b.elected)
            # ... and b's first call may come at once: the margin is between them.
            assert epoch == 2
            assert elected_at >= deadline + b.lead.margin_s - 0.05
            assert elected_at - deadline < b.lead.margin_s + 1.0
            assert not a.lead.holds() and not a.lead.may_send()
            # The frozen transaction was ended with its session: nothing of it stays.
            with pytest.raises(psycopg.OperationalError):
                cur.execute("COMMIT")
                pipeline.__exit__(None, None, None)
        row = await asyncio.to_thread(read_leader, postgres_url, schema=SCHEMA)
        assert row is not None and row.holder == b.lead.holder and row.epoch == 2
        assert not await asyncio.to_thread(lock_is_free, postgres_url)
        await b.stop()

    run(scenario)


def test_a_paused_event_loop_lapses_the_lease_until_a_keepalive_renews_it(
    postgres_url: str,
) -> None:
    async def scenario() -> None:
        a = Replica(postgres_url, "a", timeout_s=1.0, lag_s=0.3)  # a lease of 1.2 s
        await until(lambda: a.elected)
        await asyncio.sleep(0.3)
        assert a.lead.holds() and a.lead.may_send() and not a.lapsed
        time.sleep(0.5)  # noqa: ASYNC251 (on purpose: the loop stands still, longer than lag_s, shorter than the lease)
        assert a.lead.lease_deadline > time.monotonic()  # the arithmetic alone would send
        assert not a.lead.may_send()  # the stale watchdog tick says no
        (why, _), *_ = a.lapsed
        assert "stood still" in why and a.lead.lapsed is not None
        renewed_at = (await until(lambda: a.renewed))[0]
        assert renewed_at - a.lapsed[0][1] < 2 * a.lead.keepalive_s + a.lead.timeout_s
        assert a.lead.holds() and a.lead.may_send() and a.lead.epoch == 1
        assert not a.lost and len(a.elected) == 1
        await a.stop()

    run(scenario)


def test_the_password_is_registered_as_a_secret() -> None:
    from reconciler.eventlog import setup as events

    Leadership("postgresql://reconciler:s3cr3t-pw-value@127.0.0.1:1/db", replica="x")
    event = events._redact(None, "", {"error": "connect to s3cr3t-pw-value failed"})
    assert event["error"] == "connect to [redacted] failed"
