"""How much the demo prints for its first sync, as a person sees it in a terminal.

Runs ``reconciler run desired --emulator`` (what ``make demo`` runs) in a real
pseudo-terminal of 120 columns, waits for ``reconcile.completed``, stops it with
SIGINT, and counts what was printed up to and including that line: logical
lines, screen rows once long lines wrap at 120 columns, and the longest line.

``--repo DIR`` runs the code of another checkout (e.g. a ``git worktree`` of an
older commit) with this venv, so before/after figures come from one run.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
COLUMNS = 120


def run_demo(repo: Path, *, timeout: float = 60.0) -> str:
    """The demo's terminal output up to its first ``reconcile.completed``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECONCILER_", "NO_COLOR"))}
    env.update(COLUMNS=str(COLUMNS), LINES="50", TERM="xterm-256color")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "reconciler",
            "run",
            str(repo / "desired"),
            "--emulator",
            "--emulator-port",
            "0",
            "--health-port",
            "0",
            "--state",
            str(Path(tmp) / "state.db"),
        ]
        proc = subprocess.Popen(
            cmd, cwd=repo, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and b"reconcile.completed" not in out:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        out += os.read(master, 65536)
                    except OSError:
                        break
            time.sleep(0.3)  # anything printed right after the line itself
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                out += os.read(master, 65536)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            os.close(master)
    text = out.decode(errors="replace").replace("\r\n", "\n")
    if "reconcile.completed" not in text:
        raise SystemExit(f"no reconcile.completed within {timeout}s:\n{text[-2000:]}")
    head, _, rest = text.partition("reconcile.completed")
    return head + "reconcile.completed" + rest.split("\n", 1)[0] + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    parser.add_argument("--show", action="store_true", help="print the captured output too")
    args = parser.parse_args()
    text = run_demo(args.repo.resolve())
    lines = [ANSI.sub("", line).rstrip("\r") for line in text.splitlines()]
    rows = sum(max(1, math.ceil(len(line) / COLUMNS)) for line in lines)
    if args.show:
        print(text)
    print(f"checkout: {args.repo}")
    print(f"first sync of the sample tree, in a {COLUMNS}-column terminal:")
    print(f"  lines printed:           {len(lines)}")
    print(f"  screen rows (wrapped):   {rows}")
    print(f"  longest line:            {max(map(len, lines))} characters")
    print(f"  lines over {COLUMNS} columns:  {sum(len(line) > COLUMNS for line in lines)}")


if __name__ == "__main__":
    main()
