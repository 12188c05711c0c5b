"""The CLI in a real pseudo-terminal, as a person runs it, for tests and benches.

:class:`TerminalRun` starts ``reconciler ...`` with stdin, stdout and stderr on
the slave side of a pty of a given size, collects everything it writes, and
can type into it (``\\x03`` pressed is a real Ctrl-C: the terminal sends SIGINT to the
foreground process group). :func:`screen` replays the bytes through pyte, a
VT100 emulator, to get the screen a person would see, so a test can tell a
progress bar redrawn in place from lines scrolled over it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import pyte

from tests.conftest import cli_env, reconciler_cmd

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


class TerminalRun:
    def __init__(
        self,
        *args: str | Path,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        columns: int = 120,
        rows: int = 40,
        stdout_to_pty: bool = True,
    ) -> None:
        """``env`` adds to :func:`tests.conftest.cli_env`, less its ``RECONCILER_LOG_FORMAT``
        (a person's terminal has none). ``stdout_to_pty=False``: stdout is a pipe
        (``self.proc.stdout``), as in ``reconciler apply > out.txt``."""
        self.columns, self.rows = columns, rows
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        full = cli_env(**(env or {}))
        if "RECONCILER_LOG_FORMAT" not in (env or {}):
            full.pop("RECONCILER_LOG_FORMAT", None)
        full.update(COLUMNS=str(columns), LINES=str(rows), TERM="xterm-256color")
        self.master = master
        self.output = b""
        self.proc = subprocess.Popen(
            reconciler_cmd(*args),
            cwd=cwd,
            env=full,
            stdin=slave,
            stdout=slave if stdout_to_pty else subprocess.PIPE,
            stderr=slave,
            start_new_session=True,  # the pty becomes its controlling terminal
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)

    def read(self, timeout: float = 0.1) -> bytes:
        """Collect what is written within ``timeout``; returns the new bytes."""
        got = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                got += chunk
            elif left <= 0:
                break
        self.output += got
        return got

    def wait_for(self, predicate: Callable[[bytes], bool], *, timeout: float = 30.0) -> bytes:
        """Read until ``predicate(self.output)`` holds; fail with the output so far."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout}s:\n{self.text()[-3000:]}")
            self.read(0.05)
            if self.proc.poll() is not None:
                self.read(0.2)
                if not predicate(self.output):
                    raise AssertionError(
                        f"exited {self.proc.returncode} first:\n{self.text()[-3000:]}"
                    )
        return self.output

    def press(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit, reading everything it writes."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running after {timeout}s:\n{self.text()[-3000:]}")
            self.read(0.05)
        self.read(0.2)
        return self.proc.returncode

    def text(self) -> str:
        """The output as plain text: escape sequences removed, CRLF as LF."""
        return ANSI.sub(b"", self.output).decode(errors="replace").replace("\r\n", "\n")

    def screen(self) -> list[str]:
        return screen(self.output, columns=self.columns, rows=self.rows)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def screen(output: bytes, *, columns: int, rows: int) -> list[str]:
    """The terminal's screen after ``output``, one string per row, trailing blanks cut."""
    term = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(term)
    stream.feed(output.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))
    return [line.rstrip() for line in term.display]
