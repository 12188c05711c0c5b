"""A real PostgreSQL for the tests: one server per test session, a fresh database per test.

Fixtures (registered for every test by ``conftest.py``):

- ``postgres_server`` (session): the :class:`PostgresServer`; its
  :meth:`~PostgresServer.create_database` makes another empty database and
  returns its URL, :meth:`~PostgresServer.admin` connects as the superuser.
- ``postgres_url`` (function): the URL of a fresh, empty database of its own,
  ``postgresql://reconciler:PASSWORD@127.0.0.1:PORT/NAME``; the role owns the
  database and logs in with a password over TCP (scram-sha-256), so the
  password path is the one production takes.

The server is started on first use, by whichever xdist worker asks first, and
shared by the others through a lock file and a small JSON file in the
session's shared temporary folder; the last worker to finish stops it and
deletes its data. ``initdb`` and the server come from the ``pgserver`` wheel
(which ships PostgreSQL's binaries) and, if they cannot start here, from the
system's installation (Debian: ``/usr/lib/postgresql/*/bin``) or ``PATH``.
PostgreSQL refuses to run as root, so under root the server runs as
``nobody``, in a data folder of its own under the system temp folder.

The server runs with ``fsync=off``: the tests check what is committed and
visible, not what survives a power cut, and a fresh database then takes
about a tenth of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

#: The role the store connects as, with a password, over TCP.
USER = "reconciler"
#: The superuser, trusted on the server's Unix socket only.
ADMIN = "postgres"
HOST = "127.0.0.1"
#: An empty database each test's database is copied from: faster than template1.
TEMPLATE = "reconciler_template"


def binary_dirs() -> list[Path]:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` may be, in order of preference."""
    found: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())

    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if initdb := shutil.which("initdb"):
        found.append(Path(initdb).resolve().parent)
    return [d for d in dict.fromkeys(found) if (d / "initdb").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: where it is, and how to make databases on it."""

    bin_dir: Path
    data_dir: Path
    port: int
    password: str

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    def url(self, database: str, *, password: bool = True) -> str:
        """The store's URL for ``database`` (without the password if asked: libpq then
        finds it in ``PGPASSWORD`` or a password file)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{USER}{secret}@{HOST}:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> psycopg.Connection[Any]:
        """A superuser connection (autocommit) over the Unix socket."""
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=ADMIN, dbname=database, autocommit=True
        )

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by the store's role; returns its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER {USER} TEMPLATE {TEMPLATE}')
        return self.url(name)

    # -- running ---------------------------------------------------------------

    @classmethod
    def start(cls, *, fsync: bool = False) -> PostgresServer:
        """initdb and start a server in a new temp folder, trying each binary folder."""
        problems: list[str] = []
        for bin_dir in binary_dirs():
            data_dir = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
            server = cls(bin_dir, data_dir / "data", 0, f"pg-pw-{secrets.token_hex(8)}")
            try:
                server._init_and_start(fsync=fsync)
                return server
            except (OSError, subprocess.SubprocessError, psycopg.Error) as exc:
                problems.append(f"{bin_dir}: {exc}")
                server.stop()
        raise RuntimeError("no PostgreSQL could start here: " + "; ".join(problems or ["none"]))

    def _run(self, *args: str) -> None:
        # PostgreSQL refuses to run as root: the server's files and processes
        # belong to nobody then.
        user = "nobody" if os.geteuid() == 0 else None
        subprocess.run(
            args, check=True, capture_output=True, timeout=60, user=user, cwd=self.data_dir.parent
        )

    def _init_and_start(self, *, fsync: bool) -> None:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.data_dir.parent, nobody.pw_uid, nobody.pw_gid)
        pwfile = self.data_dir.parent / "pw"
        pwfile.write_text(self.password)
        if os.geteuid() == 0:
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        initdb = self.bin_dir / "initdb"
        self._run(
            str(initdb), "-D", str(self.data_dir), "-U", ADMIN, "-E", "UTF8", "--no-locale",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-N", "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        for attempt in range(3):
            self.port = _free_port()
            options = f"-h {HOST} -p {self.port} -k {self.socket_dir} -c max_connections=300"
            if not fsync:
                options += " -F -c full_page_writes=off"
            log = self.data_dir.parent / "log"
            try:
                self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log),
                    "-w", "-t", "30", "-o", options, "start",
                )  # fmt: skip
                break
            except subprocess.CalledProcessError:
                if attempt == 2:  # the port was taken between the probe and the start
                    raise
        with self.admin() as conn:
            if conn.info.server_version >= 160000:
                # Each login hashes the password this many times; tests log in often.
                conn.execute("SET scram_iterations = 16")
            conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
            conn.execute(f"CREATE DATABASE {TEMPLATE} OWNER {USER} IS_TEMPLATE true")

    def is_running(self) -> bool:
        try:
            with self.admin():
                return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """Stop the server (at once) and delete its data."""
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(
                    str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                    "-w", "stop",
                )  # fmt: skip
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "bin_dir": str(self.bin_dir),
            "data_dir": str(self.data_dir),
            "port": self.port,
            "password": self.password,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PostgresServer:
        return cls(Path(doc["bin_dir"]), Path(doc["data_dir"]), doc["port"], doc["password"])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One server for the whole session, shared by the xdist workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker != "main" else base
    lock, info = shared / "postgres.lock", shared / "postgres.json"
    with _locked(lock):
        doc: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}
        server = PostgresServer.from_json(doc["server"]) if doc else None
        if server is None or not server.is_running():
            server = PostgresServer.start()
            doc = {"server": server.to_json(), "users": []}
        doc["users"].append(worker)
        info.write_text(json.dumps(doc))
    try:
        yield server
    finally:
        with _locked(lock):
            doc = json.loads(info.read_text())
            doc["users"].remove(worker)
            if doc["users"]:
                info.write_text(json.dumps(doc))
            else:
                server.stop()
                info.unlink()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL (password included) of a fresh, empty database for this test alone."""
    return postgres_server.create_database()
