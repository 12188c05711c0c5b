"""The daemon as a real subprocess, for tests and benches.

Its JSON events go to a log file that is parsed on demand; its health port and
embedded emulator's URL are read from its own ``daemon.started`` and
``emulator.embedded`` events, so every run binds free ports (``--*-port 0``).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.conftest import cli_env, reconciler_cmd

Event = dict[str, Any]


class DaemonProcess:
    def __init__(
        self,
        cwd: Path,
        *args: str | Path,
        env: Mapping[str, str] | None = None,
        name: str = "daemon",
        health_port: int | None = None,
    ) -> None:
        """``health_port``: bind it instead of reading the port from ``daemon.started``
        (that event is not written at ``--log-level warning``)."""
        self.cwd = cwd
        self.health_port = health_port
        if health_port is not None:
            args = (*args, "--health-port", str(health_port))
        self.log_path = cwd / f"{name}.log"
        self._log = self.log_path.open("ab")
        self._offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            reconciler_cmd("run", *args),
            cwd=cwd,
            env=cli_env(**(env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._http = httpx.Client(timeout=5.0)

    # --- events -------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[Event]:
        out = []
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            for raw in f:
                if raw.startswith(b"{"):
                    try:
                        event = json.loads(raw)
                    except json.JSONDecodeError:
                        continue  # a line being written right now
                    if name is None or event.get("event") == name:
                        out.append(event)
        return out

    def wait_event(
        self,
        name: str,
        where: Callable[[Event], bool] = lambda _: True,
        *,
        timeout: float = 20.0,
        count: int = 1,
    ) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if where(e)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {name!r} within {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- HTTP ---------------------------------------------------------------------

    @property
    def health_url(self) -> str:
        if self.health_port is not None:
            return f"http://127.0.0.1:{self.health_port}"
        return str(self.wait_event("daemon.started")[0]["health"])

    @property
    def emulator_url(self) -> str:
        return str(self.wait_event("emulator.embedded")[0]["url"])

    def health(self, path: str) -> httpx.Response:
        return self._http.get(self.health_url + path)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready within {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def live_tasks(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The embedded emulator's live tasks, keyed by identity."""
        doc = self._http.get(self.emulator_url + "/_emulator/tasks").json()
        return {(t["AppId"], t["RoomId"], t["TaskId"]): t for t in doc["tasks"]}

    def metric(self, name: str, labels: str = "") -> float:
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.health("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    # --- lifecycle ----------------------------------------------------------------

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._http.close()
        self._log.close()


class BlackHole:
    """A TCP server that accepts every connection and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._held.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                continue
            if not data:
                return
            self.requests += data.count(b"HTTP/1.1\r\n")

    def close(self) -> None:
        self._stop.set()
        for conn in self._held:
            conn.close()
        self.sock.close()
