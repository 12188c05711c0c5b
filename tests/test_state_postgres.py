"""The PostgreSQL store's own behaviour, on a real server (``tests/postgres.py``).

The interface itself runs on both backends in ``test_state.py``; here: the
schema and its forward steps, foreign and newer databases refused, read-only
sessions, the fence, secrets, reconnecting, the same answers as SQLite to the
dashboard's queries, copying a store across, and the CLI end to end.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.task import FieldValue, Source, SyncStatus, TaskKey
from reconciler.emulator import EmulatorHandle
from reconciler.store.base import (
    SCHEMA_VERSION,
    FencedError,
    PostgresURL,
    Store,
    StoreError,
    TaskQuery,
)
from reconciler.store.postgres import MIGRATIONS, SCHEMA, Cursor, open_postgres
from tests.conftest import run_cli, tasks_yaml, write
from tests.harness import DaemonProcess
from tests.postgres import PostgresServer

SRC = Source("rooms/a.yaml", 3, 5)
KEY = TaskKey("app1", "room1", "task1")
FIELDS: dict[str, FieldValue] = {"Identifier": "slice_1", "Handle": True, "Duration": 30}


def admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def version_row(url: str) -> tuple[Any, ...] | None:
    with admin(url) as conn:
        if conn.execute("SELECT to_regclass('reconciler.schema_version')").fetchone() == (None,):
            return None
        return conn.execute("SELECT application, version FROM reconciler.schema_version").fetchone()


def test_a_new_store_is_a_versioned_schema_of_its_own(postgres_url: str) -> None:
    with admin(postgres_url) as conn:  # someone else's table in the shared database
        conn.execute("CREATE TABLE public.other (x int)")
        conn.execute("INSERT INTO public.other VALUES (42)")
    with Store.open(postgres_url) as store:
        assert store.opened_schema == 0 and store.lineage() is not None
        store.record_success(KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC)
    assert version_row(postgres_url) == ("rtc-segment-reconciler", SCHEMA_VERSION)
    with admin(postgres_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        assert conn.execute("SELECT x FROM public.other").fetchall() == [(42,)]
    assert tables == [
        ("public", "other"),
        (SCHEMA, "meta"),
        (SCHEMA, "observations"),
        (SCHEMA, "schema_version"),
        (SCHEMA, "tasks"),
    ]
    with Store.open(postgres_url, create=False) as store:
        assert store.opened_schema == SCHEMA_VERSION and store.get(KEY) is not None


def test_forward_steps_apply_once_and_a_newer_schema_is_refused(postgres_url: str) -> None:
    url = PostgresURL(postgres_url)
    with Store.open(url) as store:
        store.record_success(KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC)
        lineage = store.lineage()

    def v6_note(cur: Cursor) -> None:
        cur.execute("ALTER TABLE reconciler.tasks ADD COLUMN note TEXT")
        cur.execute("UPDATE reconciler.tasks SET note = 'kept'")

    steps = {**MIGRATIONS, SCHEMA_VERSION: (SCHEMA_VERSION + 1, v6_note)}
    for expected in (SCHEMA_VERSION, SCHEMA_VERSION + 1):  # the second open applies nothing
        conn, opened = open_postgres(url, create=False, read_only=False, steps=steps)
        conn.close()
        assert opened == expected
    assert version_row(postgres_url) == ("rtc-segment-reconciler", SCHEMA_VERSION + 1)
    with admin(postgres_url) as c:
        assert c.execute("SELECT task_id, note FROM reconciler.tasks").fetchall() == [
            ("task1", "kept")
        ]
    for read_only in (False, True):
        newer = rf"written by a newer reconciler \(schema {SCHEMA_VERSION + 1}, this one"
        with pytest.raises(StoreError, match=newer):
            Store.open(url, read_only=read_only)
    assert version_row(postgres_url) == ("rtc-segment-reconciler", SCHEMA_VERSION + 1)
    with admin(postgres_url) as c:
        (meta,) = c.execute("SELECT value FROM reconciler.meta WHERE key = 'lineage'").fetchall()
    assert meta == (lineage,), "never reset"


def test_a_failed_step_leaves_the_store_as_it_was(postgres_url: str) -> None:
    url = PostgresURL(postgres_url)
    Store.open(url).close()

    def broken(cur: Cursor) -> None:
        cur.execute("ALTER TABLE reconciler.tasks ADD COLUMN half TEXT")
        cur.execute("SELECT no_such_function()")

    with pytest.raises(StoreError, match="no_such_function"):
        steps = {**MIGRATIONS, SCHEMA_VERSION: (SCHEMA_VERSION + 1, broken)}
        open_postgres(url, create=True, read_only=False, steps=steps)
    assert version_row(postgres_url) == ("rtc-segment-reconciler", SCHEMA_VERSION)
    with admin(postgres_url) as c:
        columns = c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'tasks'"
        ).fetchall()
    assert ("half",) not in columns


def test_a_schema_6_store_gets_the_last_heal_columns(postgres_url: str) -> None:
    url = PostgresURL(postgres_url)
    before_heals = {k: v for k, v in MIGRATIONS.items() if v[0] <= 6}
    conn, _ = open_postgres(url, create=True, read_only=False, steps=before_heals)
    conn.close()
    with admin(postgres_url) as c:
        c.execute(
            "INSERT INTO reconciler.tasks (app_id, room_id, task_id, applied_fields, status,"
            " attempts, source, source_path, updated_at, status_since)"
            " VALUES ('app1', 'room1', 'task1', '{\"Duration\":30}', 'Synced', 0,"
            " 'rooms/a.yaml:3:5', 'rooms/a.yaml', '2024-05-01T12:00:00.000000Z',"
            " '2024-05-01T12:00:00.000000Z')"
        )
    assert version_row(postgres_url) == ("rtc-segment-reconciler", 6)
    with pytest.raises(StoreError, match="cannot upgrade it"):
        Store.open(url, read_only=True)
    with Store.open(url) as store:
        assert store.opened_schema == 6
        row = store.get(KEY)
        assert row is not None and row.fields == {"Duration": 30}
        assert (row.last_heal_at, row.last_heal_reason) == (None, None)
        store.record_success(
            KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC, heal="restart"
        )
    assert version_row(postgres_url) == ("rtc-segment-reconciler", SCHEMA_VERSION)
    with Store.open(url, read_only=True) as store:
        row = store.get(KEY)
        assert row is not None and row.last_heal_reason == "restart" and row.last_heal_at


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("CREATE SCHEMA reconciler; CREATE TABLE reconciler.tasks (id int)", "tables named tasks"),
        (
            "CREATE SCHEMA reconciler; CREATE TABLE reconciler.schema_version"
            " (application text, version int); INSERT INTO reconciler.schema_version"
            " VALUES ('someone-else', 1)",
            "names 'someone-else'",
        ),
    ],
)
def test_a_foreign_database_is_refused_not_reset(
    postgres_url: str, setup: str, message: str
) -> None:
    with admin(postgres_url) as conn:
        for statement in setup.split("; "):
            conn.execute(statement)
    for read_only in (False, True):
        with pytest.raises(StoreError, match=f"is not a reconciler database: .*{message}"):
            Store.open(postgres_url, read_only=read_only)
    with admin(postgres_url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'reconciler'"
        ).fetchall()
    assert len(tables) == 1, "nothing made, nothing dropped"


def test_other_tables_in_the_schema_are_left_alone(postgres_url: str) -> None:
    # A leader lease may live beside the store, made before it.
    with admin(postgres_url) as conn:
        conn.execute("CREATE SCHEMA reconciler")
        conn.execute("CREATE TABLE reconciler.leader (epoch int)")
    with Store.open(postgres_url) as store:
        assert store.opened_schema == 0


def test_read_only_writes_nothing(postgres_url: str) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(postgres_url, read_only=True)
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(postgres_url, create=False)
    assert version_row(postgres_url) is None, "no schema made by a dry run"
    with Store.open(postgres_url) as store:
        store.record_success(KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC)
        generation = store.generation()
    with Store.open(postgres_url, read_only=True) as store:
        assert store.read_only and store.get(KEY) is not None
        with pytest.raises(StoreError, match="read-only transaction"):
            store.forget(KEY)
        with pytest.raises(StoreError, match="read-only transaction"):
            store.record_tree_root("/srv/desired")
        with pytest.raises(StoreError, match="read-only transaction"), store.bulk():
            store.mark_pending(KEY, source=SRC, business_id=None)
        assert store.generation() == generation
    with Store.open(postgres_url) as store:
        assert store.generation() == generation and store.tree_root() is None
        assert store.get(KEY) is not None


class EpochFence:
    """A real fence: the writer's epoch against the database's, checked FOR SHARE
    so a takeover waits for a write already past its check."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.checks: list[tuple[int, bool]] = []

    def check(self, cursor: Cursor) -> None:
        # now() is when the transaction began, statement_timestamp() this statement:
        # later only inside a transaction block.
        cursor.execute(
            "SELECT epoch, pg_backend_pid(), now() < statement_timestamp()"
            " FROM public.lease FOR SHARE"
        )
        row = cursor.fetchone()
        assert row is not None
        current, pid, in_transaction = row
        self.checks.append((pid, in_transaction))
        if current != self.epoch:
            raise FencedError(
                f"this replica no longer leads (epoch {self.epoch}, the database's "
                f"{current}); nothing was recorded"
            )


def test_the_fence_is_checked_in_every_write_transaction_before_its_writes(
    postgres_url: str,
) -> None:
    with admin(postgres_url) as conn:
        conn.execute("CREATE TABLE public.lease (epoch int NOT NULL)")
        conn.execute("INSERT INTO public.lease VALUES (1)")
    with pytest.raises(ValueError, match="PostgreSQL"):
        Store.open(Path("x.db"), fencing=EpochFence(1))
    fence = EpochFence(1)
    with Store.open(postgres_url, fencing=fence) as store:
        assert fence.checks == [], "opening is not fenced"
        store.mark_pending(KEY, source=SRC, business_id=None)
        store.record_success(KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC)
        with store.bulk():
            for n in range(5):
                store.record_in_sync(TaskKey("a", "r", f"t{n}"), business_id=None, source=SRC,
                                     fields={})  # fmt: skip
        store.record_observation(Observation(key=KEY, observed_at=1.0, state=LiveStatus.RUNNING))
        store.applied(), store.all(), store.generation()  # reads are not fenced
        assert len(fence.checks) == 4, "one check per transaction"
        ((pid,),) = store._query("SELECT pg_backend_pid()")
        assert fence.checks == [(pid, True)] * 4, "on the store's connection, in the transaction"
        generation = store.generation()

        with admin(postgres_url) as conn:  # another replica took over
            conn.execute("UPDATE public.lease SET epoch = 2")
        with pytest.raises(FencedError, match=r"epoch 1, the database's 2\); nothing was"):
            store.record_success(
                TaskKey("a", "r", "late"), fields={}, business_id=None, request_id="x", source=SRC
            )
        with pytest.raises(FencedError), store.bulk():
            store.forget(KEY)
        assert store.get(TaskKey("a", "r", "late")) is None and store.get(KEY) is not None
        assert store.generation() == generation
        fence.epoch = 2  # elected again: the same connection writes again
        store.forget(KEY)
        assert store.get(KEY) is None


SECRET = "pw-Sec%2Fret"  # percent-encoded in the URL: "pw-Sec/ret"


def test_passwords_never_reach_repr_errors_or_events(
    postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = PostgresURL(f"postgresql://someone:{SECRET}@127.0.0.1:{postgres_server.port}/nope")
    assert str(url) == f"postgresql://someone@127.0.0.1:{postgres_server.port}/nope"
    assert "Sec" not in repr(url) and url.password == "pw-Sec/ret"
    query = PostgresURL("postgres://u@h/db?sslmode=require&password=pw-Sec%2Fret&x=1")
    assert str(query) == "postgres://u@h/db?sslmode=require&x=1"
    messages = []
    for bad in (
        url,  # the server refuses the password
        PostgresURL(f"postgresql://someone:{SECRET}@127.0.0.1:1/db"),  # nothing listens
        PostgresURL("postgresql://someone:pw-Sec%zzret@127.0.0.1/db"),  # libpq quotes it
        PostgresURL("postgresql://u@127.0.0.1:1/db?password=pw-Secret&bogus=1"),
    ):
        with pytest.raises(StoreError) as info:
            Store.open(bad)
        messages.append(str(info.value))
        assert info.value.__cause__ is None, "no driver error chained: it may quote the URL"
        with pytest.raises(StoreError) as info:
            bad.exists()
        messages.append(str(info.value))
    assert all("cannot connect" in m for m in messages), messages
    for text in [*messages, capsys.readouterr().err]:
        assert "Sec" not in text, text
    url_ok = PostgresURL(postgres_server.create_database())
    with Store.open(url_ok) as store:
        assert postgres_server.password not in repr(store) + str(store.path)


def test_a_connection_lost_between_writes_is_opened_again(postgres_url: str) -> None:
    with Store.open(postgres_url) as store:
        store.mark_pending(KEY, source=SRC, business_id=None)
        ((pid,),) = store._query("SELECT pg_backend_pid()")
        with admin(postgres_url) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.05)
        store.record_success(KEY, fields=FIELDS, business_id=None, request_id="r", source=SRC)
        ((again,),) = store._query("SELECT pg_backend_pid()")
        assert again != pid and store.counts()[SyncStatus.SYNCED] == 1


def fill(store: Store) -> None:
    with store.bulk():
        for n in range(30):
            at = datetime(2024, 5, 1, 12, n % 4, tzinfo=UTC)
            key = TaskKey(f"app{n % 3}", f"Room{n % 7}", f"t{n:02d}")
            src = Source(f"{'a' if n % 2 else 'b'}/[x]/f{n % 4}.yaml", 1, 1)
            if n % 5 == 0:
                store.record_failure(
                    key,
                    message=f"Boom {n}",
                    code="InternalError",
                    request_id=None,
                    source=src,
                    failed_spec=None,
                    at=at,
                )
            else:
                store.record_in_sync(
                    key, business_id=None, source=src, fields={"Duration": n}, at=at
                )
            if n % 6 == 1:  # healed: the last heal travels with the row
                store.record_success(
                    key,
                    fields={"Duration": n},
                    business_id=None,
                    request_id=f"r{n}",
                    source=src,
                    heal=f"drift: Duration 45 → {n}",
                    at=at,
                )
            if n % 3 == 0:
                state = LiveStatus.RUNNING if n % 2 else LiveStatus.ENDED
                store.record_observation(
                    Observation(key=key, observed_at=1e9 + n / 7, state=state, start_time_ms=n)
                )
        store.record_tree_root("/srv/desired")


QUERIES = [
    TaskQuery(),
    TaskQuery(statuses=frozenset({"Failed"})),
    TaskQuery(apps=frozenset({"app1", "app2"}), lives=frozenset({"running", "unknown"})),
    TaskQuery(path_glob="a/*"),
    TaskQuery(path_glob="*/[[]x]/f[12].yaml"),
    TaskQuery(path_glob="?/*f[^0].yaml"),
    TaskQuery(text="room3"),
    TaskQuery(text="BOOM 1"),
]


def test_both_backends_answer_the_same_and_a_store_copies_across(
    tmp_path: Path, postgres_url: str, postgres_server: PostgresServer
) -> None:
    with Store.open(tmp_path / "s.db") as lite, Store.open(postgres_url) as pg:
        fill(lite)
        fill(pg)
        for q in QUERIES:
            assert pg.count_tasks(q) == lite.count_tasks(q), q
            assert pg.page_tasks(q, offset=2, limit=9) == lite.page_tasks(q, offset=2, limit=9)
            before = TaskKey("app1", "Room2", "t00")
            assert pg.count_tasks(q, before=before) == lite.count_tasks(q, before=before)
        assert pg.all() == lite.all() and pg.observations() == lite.observations()
        statuses = [SyncStatus.FAILED, SyncStatus.SYNCED]
        assert pg.latest_in_status(statuses, limit=5) == lite.latest_in_status(statuses, limit=5)
        assert pg.counts() == lite.counts() and pg.generation() == lite.generation()
        snapshot = lite.snapshot()
        with pytest.raises(StoreError, match=r"is not empty .*30 tasks.* nothing was copied"):
            pg.restore(snapshot)
    with Store.open(postgres_server.create_database()) as store:
        store.restore(snapshot)
        assert store.snapshot().digest() == snapshot.digest()
        assert store.lineage() == snapshot.meta["lineage"]
        assert store.generation() == int(snapshot.meta["generation"])


# -- the command line ----------------------------------------------------------


def test_state_migrate_moves_every_record_and_refuses_a_non_empty_target(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    db = tmp_path / "state.db"
    with Store.open(db) as store:
        fill(store)
        snapshot = store.snapshot()
    url = postgres_server.create_database()
    r = run_cli("state", "migrate", "--from", db, "--to", url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "migrated 30 task(s), 10 observation(s)" in r.stdout
    assert f"generation {snapshot.meta['generation']}, tree root /srv/desired" in r.stdout
    assert snapshot.digest() in r.stdout and postgres_server.password not in r.stdout + r.stderr
    with Store.open(url, read_only=True) as store:
        assert store.snapshot().digest() == snapshot.digest()
        generation = store.generation()
        healed = {t.key.task_id: t.last_heal_reason for t in store.all() if t.last_heal_at}
    assert healed == {f"t{n:02d}": f"drift: Duration 45 → {n}" for n in range(1, 30, 6)}

    again = run_cli("state", "migrate", "--from", db, "--to", url, cwd=tmp_path)
    assert again.returncode == 1 and "is not empty (30 tasks" in again.stderr
    assert postgres_server.password not in again.stdout + again.stderr
    with Store.open(url, read_only=True) as store:
        assert store.generation() == generation and store.snapshot().digest() == snapshot.digest()


def test_apply_plan_and_status_with_a_postgres_url(
    tmp_path: Path, emulator: EmulatorHandle, postgres_server: PostgresServer
) -> None:
    keys = [TaskKey("app1", f"room{n}", "seg") for n in range(3)]
    for k in keys:
        emulator.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
    tasks = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": 20} for k in keys]
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", tasks))
    url = postgres_server.create_database()
    bare = url.replace(f":{postgres_server.password}@", "@")  # the password from PGPASSWORD
    env = {"PGPASSWORD": postgres_server.password}
    r = run_cli("apply", "desired", "--state", bare, "--endpoint", emulator.url, cwd=tmp_path,
                env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (created,) = [e for e in r.events() if e["event"] == "state.created"]
    assert created["path"] == bare
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{**tasks[0], "Duration": 30}]))
    plan = run_cli("plan", "desired", "--save", "p.json", "--endpoint", emulator.url,
                   cwd=tmp_path, env={**env, "RECONCILER_STATE": bare})  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["state"]["path"] == bare
    status = run_cli("status", "desired", "--state", url, "-o", "json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["counts"]["Synced"] == 3
    everything = "".join(x.stdout + x.stderr for x in (r, plan, status))
    assert postgres_server.password not in everything + (tmp_path / "p.json").read_text()


def test_a_mis_cased_url_or_a_connection_string_is_the_database_never_a_file(
    tmp_path: Path, emulator: EmulatorHandle, postgres_server: PostgresServer
) -> None:
    """``POSTGRESQL://`` and ``host=... password=...`` are the same database as the
    URL: nothing is re-sent, no file or folder is made, the password shows nowhere."""
    pw = postgres_server.password
    key = TaskKey("app1", "room1", "seg")
    emulator.start_task(app_id=key.app_id, room_id=key.room_id, task_id=key.task_id)
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{"RoomId": "room1",
          "TaskId": "seg", "Duration": 30}]))  # fmt: skip
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    shouted = url.replace("postgresql://", "POSTGRESQL://")
    dsn = f"host=127.0.0.1 port={postgres_server.port} dbname={name} user=reconciler password={pw}"
    api = ("--endpoint", emulator.url)
    applied = run_cli("apply", "desired", "--state", shouted, *api, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    (created,) = [e for e in applied.events() if e["event"] == "state.created"]
    assert created["path"] == url.replace(f":{pw}@", "@")
    warned = [line for line in applied.stderr.splitlines() if line.startswith("warning: --state")]
    assert warned == [
        f"warning: --state {created['path']} carries a password on the command line, where "
        "other users may read it (ps); give it in RECONCILER_STATE, PGPASSWORD or a password "
        "file (~/.pgpass) instead"
    ]
    plan = run_cli("plan", "desired", "--state", dsn, "--refresh", *api, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "No changes." in plan.stdout, "the store the apply wrote: nothing is re-sent"
    assert f"warning: --state user=reconciler dbname={name} host=127.0.0.1 port=" in plan.stderr
    status = run_cli("status", "desired", "-o", "json", cwd=tmp_path,
                     env={"RECONCILER_STATE": dsn})  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["Synced"] == 1
    assert "warning" not in status.stderr, "from the environment: no one else sees it"
    assert emulator.stats_snapshot()["by_action"]["UpdateSegment"] == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desired"], "no file, no folder"
    for r in (applied, plan, status):
        assert pw not in r.stdout + r.stderr


def test_the_password_can_stay_out_of_the_command_line(
    tmp_path: Path, emulator: EmulatorHandle, postgres_server: PostgresServer
) -> None:
    """RECONCILER_STATE, PGPASSWORD, a password file, a service file: each reaches the
    database with no password in argv (what ps shows) and no warning."""
    pw, port = postgres_server.password, postgres_server.port
    emulator.start_task(app_id="app1", room_id="room1", task_id="seg")
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{"RoomId": "room1",
          "TaskId": "seg", "Duration": 30}]))  # fmt: skip
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    bare = url.replace(f":{pw}@", "@")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{port}:{name}:reconciler:{pw}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file others may read
    services = tmp_path / "pg_service.conf"
    services.write_text(
        f"[store]\nhost=127.0.0.1\nport={port}\ndbname={name}\nuser=reconciler\npassword={pw}\n"
    )
    ways: list[tuple[tuple[str, ...], dict[str, str]]] = [
        ((), {"RECONCILER_STATE": url}),
        (("--state", bare), {"PGPASSWORD": pw}),
        (("--state", bare), {"PGPASSFILE": str(pgpass)}),
        (("--state", "service=store"), {"PGSERVICEFILE": str(services)}),
        (("--state", "postgresql:///?service=store"), {"PGSERVICEFILE": str(services)}),
    ]
    for args, env in ways:
        r = run_cli("apply", "desired", *args, "--endpoint", emulator.url, cwd=tmp_path, env=env)
        assert r.returncode == 0, (args, r.stderr)
        assert "carries a password" not in r.stderr and pw not in r.stdout + r.stderr, args
        made = {p.name for p in tmp_path.iterdir()} - {"desired", "pgpass", "pg_service.conf"}
        assert not made, f"{args}: the database, not a file"
    with Store.open(url, read_only=True) as store:
        assert [t.status for t in store.all()] == [SyncStatus.SYNCED]

    # The daemon as ps sees it: the URL in its environment only.
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{"RoomId": "room1",
          "TaskId": "seg", "Duration": 31}]))  # fmt: skip
    with DaemonProcess(tmp_path, "desired", "--endpoint", emulator.url, "--health-port", "0",
                       env={"RECONCILER_STATE": url}) as d:  # fmt: skip
        d.wait_ready()
        argv = Path(f"/proc/{d.proc.pid}/cmdline").read_bytes()
        assert name.encode() not in argv and pw.encode() not in argv
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert pw not in log and "carries a password" not in log


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("sqlite:///x.db", "a sqlite:// URL is not a state store"),
        ("mysql://u:S3cr3tPw@db/x", "a mysql:// URL is not a state store"),
        ("host=db passwrd=S3cr3tPw", 'libpq can read: invalid connection option "passwrd"'),
        ("host=db password=S3cr3t Pw", 'libpq can read: missing "=" after a word in'),
        ("./state.db host=db password=S3cr3tPw", "libpq can read: missing"),
        ("x:/u:S3cr3tPw@db/x", "may not be named like a URL or a connection string"),
    ],
)
def test_a_location_like_a_url_or_connection_string_is_refused_not_made_a_file(
    tmp_path: Path, given: str, says: str
) -> None:
    write(tmp_path / "desired", "a.yaml", tasks_yaml("app1", [{"RoomId": "r", "TaskId": "t"}]))
    r = run_cli("plan", "desired", "--state", given, cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # a usage error, as the console script exits for it
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: Invalid value for '--state'") and says in error, error
    assert "S3cr3t" not in r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desired"]
    with pytest.raises(StoreError) as refused:
        Store.open(tmp_path / "POSTGRESQL:" / "u:S3cr3tPw@" / "db")  # //, folded by Path
    assert "S3cr3t" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desired"]
