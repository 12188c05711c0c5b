"""Leader election against a real PostgreSQL server (no mocks): :mod:`reconciler.leader`.

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

from reconciler.leader import Leadership, read_leader
from reconciler.state import FencedError, StateStore
from reconciler.state_postgres import SCHEMA
from reconciler.task import Source, TaskKey

FAST: dict[str, Any] = {"retry_s": 0.2, "keepalive_s": 0.2, "timeout_s": 0.5}


class Replica:
    """A :class:`Leadership` running in the test's loop, with what it was told."""

    def __init__(self, url: str, name: str, *, schema: str | None = None) -> None:
        self.lead = Leadership(url, replica=name, schema=schema, **FAST)
        self.elected: list[tuple[int, float]] = []
        self.lost: list[tuple[str, float]] = []
        self.task = asyncio.create_task(
            self.lead.run(
                on_elected=lambda e: self.elected.append((e, time.monotonic())),
                on_lost=lambda why: self.lost.append((why, time.monotonic())),
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
        StateStore.open(postgres_url, create=True).close()
        a = Replica(postgres_url, "a", schema=SCHEMA)
        await until(lambda: a.elected)
        b = Replica(postgres_url, "b", schema=SCHEMA)
        await until(lambda: b.lead.leader is not None)
        with StateStore.open(postgres_url, fencing=a.lead) as store:
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
        with StateStore.open(postgres_url, fencing=b.lead) as store:
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
        assert not a.lead.holds() and not a.lead.leading
        # b took the freed lock but waits out the grace (the lease a might still
        # have been sending under) before it calls: no second with both calling.
        (epoch, elected_at), *_ = await until(lambda: b.elected)
        assert epoch == 2
        assert elected_at - cut >= b.lead.lease_s - 0.05
        assert elected_at > lost_at
        # a stands by again and says who leads now.
        await until(lambda: a.lead.leader is not None and a.lead.leader.holder == b.lead.holder)
        await a.stop()
        await b.stop()

    run(scenario)


def test_the_password_is_registered_as_a_secret() -> None:
    from reconciler import events

    Leadership("postgresql://reconciler:s3cr3t-pw-value@127.0.0.1:1/db", replica="x")
    event = events._redact(None, "", {"error": "connect to s3cr3t-pw-value failed"})
    assert event["error"] == "connect to [redacted] failed"
