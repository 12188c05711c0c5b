"""Latency of the daemon: a desired file saved -> its UpdateSegment received by the server.

Target: p50 <= 300 ms over 200 edits.

The emulator runs in its own process with every task of the tree running; the
daemon (``reconciler run``, default settings, JSON events at ``--log-level``)
talks to it over loopback. After the daemon's first reconcile, the bench
makes ``--edits`` edits one at a time: each rewrites one file (new file, then
rename, as git and editors save) giving one task a Duration it never had just
before, so every edit needs exactly one call; it then waits for that call to
land before the next edit. "Saved" is the wall clock just before the rename;
"received" is the emulator's own wall-clock stamp of the applied call
(``UpdateTimes``), so polling adds no error. Edits rotate over the files and
tasks of the tree, so the watcher and the queue see different keys.

    .venv/bin/python bench/daemon_latency.py [--edits 200] [--files 10] [--per-file 10]
    .venv/bin/python bench/daemon_latency.py --quick      # 20 edits, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
    percentile,
    rel_of,
    save,
    wait_until,
)
from reconciler.emulator import LAST_BODIES

TARGET_P50_MS = 300.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--per-file", type=int, default=10)
    ap.add_argument(
        "--gap", type=float, default=0.1, help="seconds between one call landing and the next edit"
    )
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--quick", action="store_true", help="20 edits: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.edits = 20
    if args.edits < 1 or args.files < 1 or args.per_file < 1:
        ap.error("--edits, --files and --per-file must be positive")

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        root = work / "desired"
        generate(root, files=args.files, per_file=args.per_file)
        print(
            f"tree: {args.files} files x {args.per_file} tasks; {args.edits} edits one at a time; "
            f"daemon --log-level {args.log_level}",
            flush=True,
        )
        latencies, extra_calls = run(work, root, args)

    ms = [x * 1000 for x in latencies]
    p50 = percentile(ms, 50)
    figure("edits measured", f"{len(ms)}")
    figure("latency p50", f"{p50:.0f} ms", f"<= {TARGET_P50_MS:.0f} ms", ok=p50 <= TARGET_P50_MS)
    figure("latency p90", f"{percentile(ms, 90):.0f} ms")
    figure("latency p99", f"{percentile(ms, 99):.0f} ms")
    figure("latency max", f"{max(ms):.0f} ms")
    figure("latency min / mean", f"{min(ms):.0f} / {statistics.fmean(ms):.0f} ms")
    figure("calls beyond one per edit", f"{extra_calls}", "0", ok=extra_calls == 0)


def run(work: Path, root: Path, args: argparse.Namespace) -> tuple[list[float], int]:
    durations: dict[int, dict[int, int]] = {f: {} for f in range(args.files)}
    latencies: list[float] = []
    extra_calls = 0
    with (
        EmulatorProcess(work, tasks=root) as emulator,
        Daemon(work, *daemon_args(), endpoint=emulator.url, log_level=args.log_level) as daemon,
    ):
        daemon.wait_ready(timeout=60)
        total = args.files * args.per_file
        wait_until(lambda: emulator.updates() >= total, timeout=60, what="first reconcile's calls")
        for i in range(args.edits):
            f = i % args.files
            t = (i // args.files) % args.per_file
            ident = identity(f, t)
            current = durations[f].get(t, 30)
            new = 31 + i % 500
            if new == current:
                new += 1
            before = emulator.task(ident)["UpdateCalls"]
            durations[f][t] = new
            saved = save(
                root, rel_of(f), file_text(f, per_file=args.per_file, durations=durations[f])
            )
            row = emulator.wait_task(ident, calls_above=before, timeout=30)
            # The first call after the edit (more may have come while polling).
            first = len(row["UpdateTimes"]) - min(row["UpdateCalls"] - before, LAST_BODIES)
            body = row["LastBodies"][first]
            if body.get("Duration") != new:
                raise RuntimeError(f"edit {i}: the call carried {body}, not Duration {new}")
            latencies.append(row["UpdateTimes"][first] - saved)
            time.sleep(args.gap)
            # Anything more for this task by now is a call the edit did not need.
            extra_calls += emulator.task(ident)["UpdateCalls"] - before - 1
    return latencies, extra_calls


if __name__ == "__main__":
    main()
