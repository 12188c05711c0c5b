"""Kill test: ``kill -9`` the daemon in the middle of a 3,000-task rollout, restart it.

Targets: after the restart every task is Synced, and the calls made beyond
one per task are at most the in-flight limit (``--max-in-flight``, 64 by
default): a result is recorded as soon as the server confirms it, so only the
calls in flight at the kill can be sent twice.

The emulator runs in its own process with the 3,000 tasks running and a
realistic 40 ms answer latency; the daemon starts on an empty state store, so
each task needs one call. When the emulator has applied ``--kill-after``
calls, the daemon gets SIGKILL. The daemon spends its budget in bursts (up to
150 calls in any second, then a wait), so the default kill point is half the
tasks plus 75: mid-burst, when the most calls are in flight, not in the quiet
gap after a burst where nothing is at stake. Then the bench reads the store
(``reconciler status --output json``), restarts the daemon on the same store,
waits for its first reconcile to finish and for calls to stop, and reads the
store again.

    .venv/bin/python bench/daemon_kill.py [--tasks 3000] [--latency-ms 40] [--max-in-flight 64]
    .venv/bin/python bench/daemon_kill.py --quick       # 600 tasks
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Daemon,
    EmulatorProcess,
    daemon_args,
    figure,
    generate,
    wait_quiet,
    wait_until,
)
from tests.conftest import run_cli

PER_FILE = 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=3000, help="a multiple of 100")
    ap.add_argument(
        "--kill-after", type=int, default=None, help="calls (default: half the tasks + 75)"
    )
    ap.add_argument("--latency-ms", type=float, default=40.0)
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--quick", action="store_true", help="600 tasks: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.tasks = 600
    if args.tasks < PER_FILE or args.tasks % PER_FILE:
        ap.error(f"--tasks must be a positive multiple of {PER_FILE}")
    kill_after = args.kill_after if args.kill_after is not None else args.tasks // 2 + 75
    if not 0 < kill_after < args.tasks:
        ap.error("--kill-after must be between 0 and --tasks")

    print(
        f"{args.tasks} tasks ({args.tasks // PER_FILE} files x {PER_FILE}), emulator latency "
        f"{args.latency_ms:g} ms, --max-in-flight {args.max_in_flight}, kill after "
        f"{kill_after} calls; daemon --log-level {args.log_level}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        work = Path(tmp)
        generate(work / "desired", files=args.tasks // PER_FILE, per_file=PER_FILE)
        r = run(work, args, kill_after=kill_after)

    excess = r["total"] - args.tasks
    synced = r["after"].get("Synced", 0)
    figure("calls received before the kill", f"{r['before_kill']}")
    figure(
        "store at the kill: Synced / Pending",
        f"{r['at_kill'].get('Synced', 0)} / {r['at_kill'].get('Pending', 0)}",
    )
    figure("restart: seconds to ready (its first pass done)", f"{r['restart_ready_s']:.1f} s")
    figure("total calls (both runs)", f"{r['total']}")
    figure("tasks that got more than one call", f"{r['repeated']}")
    figure(
        "excess calls (total - tasks)",
        f"{excess}",
        f"<= {args.max_in_flight} (in-flight limit)",
        ok=0 <= excess <= args.max_in_flight,
    )
    figure(
        "tasks Synced after restart",
        f"{synced}/{args.tasks}",
        f"{args.tasks}",
        ok=synced == args.tasks and sum(r["after"].values()) == args.tasks,
    )
    figure("tasks whose live Duration is the desired 30", f"{r['live_ok']}/{args.tasks}")
    figure("throttled answers (429) seen", f"{r['throttled']}")


def store_counts(work: Path) -> dict[str, int]:
    res = run_cli("status", "--state", "state.db", "--output", "json", cwd=work, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"reconciler status failed: {res.stderr}")
    return {k: int(v) for k, v in json.loads(res.stdout)["counts"].items() if v}


def run(work: Path, args: argparse.Namespace, *, kill_after: int) -> dict[str, Any]:
    flags = [*daemon_args(), "--max-in-flight", str(args.max_in_flight)]
    budget = args.tasks / 150 * 3 + 60  # seconds: three times the QPS-bound time, and some
    with EmulatorProcess(work, tasks=work / "desired", latency_ms=args.latency_ms) as emulator:
        with Daemon(work, *flags, endpoint=emulator.url, log_level=args.log_level) as first:
            wait_until(
                lambda: emulator.updates() >= kill_after,
                timeout=budget,
                interval=0.01,
                what=f"{kill_after} calls",
            )
            first.kill()  # SIGKILL
        # Calls already on the wire are still applied by the server; let them land.
        time.sleep(max(1.0, 3 * args.latency_ms / 1000))
        before_kill = emulator.updates()
        at_kill = store_counts(work)

        started = time.monotonic()
        with Daemon(
            work, *flags, endpoint=emulator.url, log_level=args.log_level, name="restarted"
        ) as second:
            second.wait_ready(timeout=budget)
            ready_s = time.monotonic() - started
            total = wait_quiet(emulator.updates, timeout=budget)
        after = store_counts(work)
        live = [t for t in emulator.live_tasks() if t["Running"]]
        return {
            "before_kill": before_kill,
            "at_kill": at_kill,
            "restart_ready_s": ready_s,
            "total": total,
            "after": after,
            "repeated": sum(1 for t in live if t["UpdateCalls"] > 1),
            "live_ok": sum(1 for t in live if t["Duration"] == 30 and t["UpdateCalls"] >= 1),
            "throttled": emulator.stats()["throttled"],
        }


if __name__ == "__main__":
    main()
