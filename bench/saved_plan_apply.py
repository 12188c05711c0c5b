"""Throughput of ``apply FILE`` (a saved plan) against ``apply DIR``, same run, same emulator.

Scenario (issue "Change control and operations"): 3,000 tasks each needing
one UpdateSegment; the emulator (its own process) enforces 150/s over any
one-second window and answers after 40 ms. Both modes run the real CLI as a
subprocess with a fresh SQLite store: ``reconciler apply desired`` and
``reconciler plan desired --save p.json`` then ``reconciler apply p.json``.

The rate is taken from the CLI's own ``task.synced`` events: (N - 1) calls
over the time between the first and the last answer; the target is >= 0.95 of
150/s for the saved plan, and the ratio saved / tree near 1. The command's
wall time (start-up, loading, hashing, planning included) is printed too.

    python bench/saved_plan_apply.py [--tasks 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.apply_throughput import AK, SK, EmulatorProcess, make_tree
from tests.conftest import reconciler_cmd


def run(cwd: Path, *args: str, url: str) -> tuple[float, list[dict[str, object]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLC_", "RECONCILER_"))}
    env.update(VOLC_ACCESSKEY=AK, VOLC_SECRETKEY=SK, RECONCILER_LOG_FORMAT="json")
    t0 = time.perf_counter()
    proc = subprocess.run(
        reconciler_cmd(*args, "--endpoint", url),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    events = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    return seconds, events


def rate(events: list[dict[str, object]], n: int) -> float:
    stamps = sorted(
        datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp()
        for e in events
        if e["event"] == "task.synced"
    )
    if len(stamps) != n:
        raise SystemExit(f"{len(stamps)} of {n} tasks synced")
    return (n - 1) / (stamps[-1] - stamps[0])


def one_round(n: int) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = work / "desired"
        tree.mkdir()
        make_tree(tree, n)
        results = []
        for mode in ("tree", "saved"):
            emulator = EmulatorProcess(tree)
            try:
                state = f"{mode}.db"
                if mode == "tree":
                    seconds, events = run(
                        work, "apply", "desired", "--state", state, url=emulator.url
                    )
                else:
                    run(
                        work,
                        "plan",
                        "desired",
                        "--state",
                        state,
                        "--save",
                        "p.json",
                        url=emulator.url,
                    )
                    seconds, events = run(
                        work, "apply", "p.json", "--state", state, url=emulator.url
                    )
                throttled = emulator.stats()["throttled"]
                if throttled:
                    print(f"  {mode}: {throttled} FlowLimitExceeded answers")
                results += [rate(events, n), seconds]
            finally:
                emulator.close()
        return results[0], results[1], results[2], results[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = args.tasks
    for r in range(args.rounds):
        tree_rate, tree_s, saved_rate, saved_s = one_round(n)
        print(
            f"round {r + 1}: apply DIR {tree_rate:.1f} calls/s ({tree_rate / 150:.3f} of 150/s, "
            f"command {tree_s:.1f} s); apply FILE {saved_rate:.1f} calls/s "
            f"({saved_rate / 150:.3f} of 150/s, command {saved_s:.1f} s); "
            f"ratio FILE/DIR {saved_rate / tree_rate:.3f}"
        )
    print("target: apply FILE >= 0.95 of 150/s")


if __name__ == "__main__":
    main()
