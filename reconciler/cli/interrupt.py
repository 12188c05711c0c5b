"""Ctrl-C at any moment: one line on stderr and exit status 130, never a traceback.

The console script and ``python -m reconciler`` start here, in a module that
imports nothing but the standard library's ``os``, ``signal`` and ``sys``:
loading the command line (click, structlog, YAML ...) takes about half a
second, and an interrupt during it used to print the ``KeyboardInterrupt``
traceback of whatever import it landed in. :func:`main` runs the whole
command inside one ``except KeyboardInterrupt``; commands that drain on
SIGINT (``apply``, ``run``) install their own handlers and exit as they
document. Once the command has finished (or was interrupted), a further
Ctrl-C while the interpreter shuts down ends the process at once with the
same line and status instead of an "Exception ignored" report.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

#: 128 + SIGINT: what a shell reports for a command ended by Ctrl-C.
STATUS = 128 + signal.SIGINT
LINE = "Interrupted."


def _say_and_exit(_: int = 0, __: FrameType | None = None, *, newline: bool = True) -> None:
    """Write the line and leave now: no cleanup is left that an interrupt may spoil.

    ``newline``: start a line first (the terminal echoed ``^C`` where the cursor was).
    """
    try:
        os.write(2, (("\n" if newline else "") + LINE + "\n").encode())
    finally:
        os._exit(STATUS)


def main() -> None:
    try:
        from reconciler.cli.app import entry_point

        entry_point()
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGINT, _say_and_exit)
        try:
            sys.stdout.flush()
        finally:
            # Re-raised from click's Abort: click has ended the ^C line.
            _say_and_exit(newline=exc.__cause__ is None and exc.__suppress_context__ is False)
    finally:
        # From here on only the interpreter's own shutdown runs.
        signal.signal(signal.SIGINT, _say_and_exit)


if __name__ == "__main__":
    main()
