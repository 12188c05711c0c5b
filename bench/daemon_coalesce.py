"""Coalescing in the daemon: one task's Duration saved 50 times within 1 s.

Target: at most 3 UpdateSegment calls for that task, the last one carrying the
final value. (Every call that carries Duration cuts the current slice, so a
burst of saves must not turn into a burst of calls.)

The emulator runs in its own process with every task of a small tree running;
the daemon (``reconciler run``, default settings) talks to it over loopback.
After the first reconcile, each round rewrites one file ``--saves`` times,
evenly over ``--window`` seconds (new file, then rename, as an editor saves),
each time with a new Duration for one task of it; then it waits until no call
has arrived for a while and reads, from the emulator, how many calls that
task got and the Duration each carried. Rounds use different tasks.

    .venv/bin/python bench/daemon_coalesce.py [--saves 50] [--window 1.0] [--rounds 3]
    .venv/bin/python bench/daemon_coalesce.py --quick     # one round
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Daemon,
    EmulatorProcess,
    daemon_args,
    figure,
    file_text,
    generate,
    identity,
    rel_of,
    save,
    wait_quiet,
    wait_until,
)
from reconciler.emulator import LAST_BODIES

TARGET_CALLS = 3
FILES, PER_FILE = 5, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saves", type=int, default=50)
    ap.add_argument("--window", type=float, default=1.0, help="seconds the saves are spread over")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--latency-ms", type=float, default=0.0, help="emulator latency added to every answer"
    )
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--quick", action="store_true", help="one round: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    if not 1 <= args.saves <= 500 or args.rounds < 1 or args.rounds > FILES * PER_FILE:
        ap.error(f"--saves must be in [1, 500], --rounds in [1, {FILES * PER_FILE}]")

    print(
        f"{args.rounds} round(s) of {args.saves} saves of one file within {args.window:g} s, "
        f"each a new Duration for one task; emulator latency {args.latency_ms:g} ms; "
        f"daemon --log-level {args.log_level}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-coalesce-") as tmp:
        work = Path(tmp)
        root = work / "desired"
        generate(root, files=FILES, per_file=PER_FILE)
        rounds = run(work, root, args)

    worst = max(calls for calls, _, _ in rounds)
    all_last_final = all(ok for _, _, ok in rounds)
    for n, (calls, values, last_ok) in enumerate(rounds, 1):
        shown = ", ".join(map(str, values))
        if calls > len(values):
            shown = f"... {shown}"
        figure(
            f"round {n}: calls for the task",
            f"{calls}",
            f"<= {TARGET_CALLS}",
            ok=calls <= TARGET_CALLS,
        )
        figure(f"round {n}: Durations received", shown)
        figure(
            f"round {n}: last call carries the final value",
            "yes" if last_ok else "NO",
            "yes",
            ok=last_ok,
        )
    figure("most calls in a round", f"{worst}", f"<= {TARGET_CALLS}", ok=worst <= TARGET_CALLS)
    figure(
        "last call always carries the final value",
        "yes" if all_last_final else "NO",
        "yes",
        ok=all_last_final,
    )


def run(work: Path, root: Path, args: argparse.Namespace) -> list[tuple[int, list[int], bool]]:
    out: list[tuple[int, list[int], bool]] = []
    with (
        EmulatorProcess(work, tasks=root, latency_ms=args.latency_ms) as emulator,
        Daemon(work, *daemon_args(), endpoint=emulator.url, log_level=args.log_level) as daemon,
    ):
        daemon.wait_ready(timeout=60)
        wait_until(
            lambda: emulator.updates() >= FILES * PER_FILE,
            timeout=60,
            what="first reconcile's calls",
        )
        for r in range(args.rounds):
            f, t = r % FILES, (r // FILES) % PER_FILE
            ident = identity(f, t)
            before = emulator.task(ident)["UpdateCalls"]
            # Values 101..(100 + saves): none is the 30 the task has now.
            values = [101 + i for i in range(args.saves)]
            started = time.monotonic()
            for i, value in enumerate(values):
                # Paced against the round's start, so the saves span the window
                # however long each write takes.
                pause = started + i * args.window / args.saves - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                save(root, rel_of(f), file_text(f, per_file=PER_FILE, durations={t: value}))
            spent = time.monotonic() - started
            wait_quiet(partial(emulator.calls, ident), timeout=60)
            row = emulator.task(ident)
            calls = row["UpdateCalls"] - before
            received = [b.get("Duration") for b in row["LastBodies"]][-min(calls, LAST_BODIES) :]
            if calls == 0:
                received = []
            print(f"  round {r + 1}: {args.saves} saves took {spent:.3f} s", flush=True)
            out.append((calls, received, bool(received) and received[-1] == values[-1]))
            # Put the task back so the next round's file starts from the defaults.
            save(root, rel_of(f), file_text(f, per_file=PER_FILE))
            emulator.wait_task(ident, calls_above=row["UpdateCalls"], timeout=30)
    return out


if __name__ == "__main__":
    main()
