"""Restart -> re-applied: how long a task restarted by someone else stays wrong.

Scenario (issue "Close the loop", Measure): N tasks all in sync (the store
holds them as applied, the emulator runs them with the desired values). The
daemon runs with ``--observe-interval 10`` and a given ``--read-qps``. During
one full read sweep, ``--restarts`` tasks chosen at random are restarted in the
emulator at random moments as new incarnations with StartSegment's defaults
(a random Identifier, Duration 20), through its admin API, as an application
backend would. For each, the latency is the emulator's wall-clock stamp of
the UpdateSegment that put it right minus the moment it was restarted.

Printed per (N, read-qps): p50 and max latency; the physical limit
``max(interval, N / read-qps)`` (a task is read at most once per sweep); the
target ``max <= 1.1 x that + 2 s``; UpdateSegment calls beyond the restarted
tasks (target 0); throttled reads (target 0); reads per second achieved.

The emulator runs in its own process; the daemon is ``reconciler run``.

    .venv/bin/python bench/observe_restart.py [--tasks 1000,10000] [--read-qps 20,60]
        [--restarts 40] [--interval 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Daemon, EmulatorProcess, figure, generate
from reconciler.core.task import TaskKey
from reconciler.eventlog import setup as events
from reconciler.store.base import Store
from reconciler.tree.desired import load_tree

PER_FILE = 100


def prepare(work: Path, emulator: EmulatorProcess, tasks: int) -> list[TaskKey]:
    """The tree, every task applied in the store and running in the emulator."""
    root = work / "desired"
    generate(root, files=tasks // PER_FILE, per_file=PER_FILE)
    index = load_tree(root)
    rows = [{**key.identity(), **dict(task.fields)} for key, task in index.tasks.items()]
    emulator.seed(rows)
    time.sleep(0.05)  # applied strictly after these incarnations started
    with Store.open(work / "state.db") as store, store.bulk():
        for key, task in index.tasks.items():
            store.record_success(
                key,
                fields=task.fields,
                business_id=task.business_id,
                request_id="bench-prefill",
                source=task.source,
            )
    return sorted(index.tasks)


def one_run(tasks: int, read_qps: int, *, restarts: int, interval: float, seed: int) -> bool:
    rng = random.Random(seed)
    sweep = max(interval, tasks / read_qps)
    target = 1.1 * sweep + 2.0
    print(f"\n{tasks} tasks, --read-qps {read_qps}: a full sweep takes {sweep:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        work = Path(tmp)
        with EmulatorProcess(work) as emulator:
            keys = prepare(work, emulator, tasks)
            flags = ["desired", "--state", "state.db", "--resync", "3600"]
            flags += ["--read-qps", str(read_qps), "--observe-interval", str(interval)]
            with Daemon(work, *flags, endpoint=emulator.url, log_level="warning") as daemon:
                daemon.wait_ready(timeout=300)
                base = emulator.stats()
                chosen = rng.sample(keys, restarts)
                moments = sorted(rng.uniform(0, sweep) for _ in chosen)
                start = time.time()
                restarted: dict[TaskKey, float] = {}
                for key, at in zip(chosen, moments, strict=True):
                    time.sleep(max(0.0, start + at - time.time()))
                    restarted[key] = time.time()
                    emulator.restart(key.identity())
                latencies: dict[TaskKey, float] = {}
                deadline = time.time() + target + 30
                while len(latencies) < len(restarted) and time.time() < deadline:
                    for key, when in restarted.items():
                        if key in latencies:
                            continue
                        row = emulator.task(key.identity())
                        if row["UpdateCalls"] > 0:
                            latencies[key] = row["UpdateTimes"][-1] - when
                    time.sleep(0.25)
                elapsed = time.time() - start
                stats_then = emulator.stats()
                time.sleep(3.0)  # anything a stale read would still cause
                stats = emulator.stats()
    done = sorted(latencies.values())
    updates = stats["by_action"].get("UpdateSegment", {}).get("ok", 0) - base["by_action"].get(
        "UpdateSegment", {}
    ).get("ok", 0)
    reads = stats["by_action"].get("GetSegmentTask", {})
    reads_before = base["by_action"].get("GetSegmentTask", {})
    read_ok = stats_then["by_action"].get("GetSegmentTask", {}).get("ok", 0) - reads_before.get(
        "ok", 0
    )
    throttled = reads.get("FlowLimitExceeded.QPSOverLimit", 0)
    ok = (
        len(done) == len(restarted)
        and done[-1] <= target
        and updates == restarts
        and throttled == 0
    )
    figure("restarted tasks re-applied", f"{len(done)}/{len(restarted)}", f"{len(restarted)}")
    if done:
        figure("restart -> re-applied, p50", f"{statistics.median(done):.1f} s")
        figure(
            "restart -> re-applied, max",
            f"{done[-1]:.1f} s",
            f"<= {target:.1f} s (1.1 x {sweep:.1f} + 2)",
            ok=done[-1] <= target,
        )
    figure("physical limit max(interval, N / read-qps)", f"{sweep:.1f} s")
    figure(
        "UpdateSegment calls", f"{updates}", f"{restarts} (one per restart)", ok=updates == restarts
    )
    figure("throttled reads", f"{throttled}", "0", ok=throttled == 0)
    figure("reads per second", f"{read_ok / elapsed:.1f}", f"<= {read_qps}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="1000,10000")
    ap.add_argument("--read-qps", default="20,60")
    ap.add_argument("--restarts", type=int, default=40)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    events.configure(level="warning")
    results = []
    for tasks in (int(t) for t in args.tasks.split(",")):
        for qps in (int(q) for q in args.read_qps.split(",")):
            results.append(
                one_run(tasks, qps, restarts=args.restarts, interval=args.interval, seed=args.seed)
            )
    print(f"\n{sum(results)} of {len(results)} runs met every target")


if __name__ == "__main__":
    main()
