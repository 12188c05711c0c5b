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
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.terminal import TerminalRun  # noqa: E402

COLUMNS = 120


def run_demo(repo: Path, *, timeout: float = 60.0) -> str:
    """The demo's terminal output (escape codes removed) up to its first ``reconcile.completed``."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ("run", repo / "desired", "--emulator", "--emulator-port", "0")
        with TerminalRun(
            *args,
            "--health-port",
            "0",
            "--state",
            Path(tmp) / "state.db",
            cwd=repo,
            env={"PYTHONPATH": str(repo)},
            columns=COLUMNS,
            rows=50,
        ) as term:
            # Today's console line says "every task handled"; older ones the event's name.
            term.wait_for(
                lambda out: b"every task handled" in out or b"reconcile.completed" in out,
                timeout=timeout,
            )
            term.read(0.3)  # anything printed right after it
            term.press("\x03")
            term.finish(30)
            text = term.text()
    marker = "every task handled" if "every task handled" in text else "reconcile.completed"
    head, _, rest = text.partition(marker)
    return head + marker + rest.split("\n", 1)[0] + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    parser.add_argument("--show", action="store_true", help="print the captured output too")
    args = parser.parse_args()
    text = run_demo(args.repo.resolve())
    lines = [line.rstrip("\r") for line in text.splitlines()]
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
