"""First sync from an empty store: every task of a 1k, 10k and 100k tree needs a call.

For each size N the tree holds N tasks in files of 100 (as the other daemon
benches generate them: Duration 30), the emulator (its own process) runs the
same N tasks with Duration 45 (started in bulk through its admin API), and
the state store is empty. ``reconciler run`` (a subprocess, at the daemon's
defaults except ``--read-qps``) then owes one UpdateSegment to every task.
The bench waits until the emulator has applied N of them, checks that every
task had exactly one and holds Duration 30, and reports:

- CPU-seconds of the daemon process (utime + stime from ``/proc``) per 1,000
  tasks; target: the largest N's figure within 1.5x of the smallest's. Also
  the CPU spent before the first call (start-up and loading, a fixed cost)
  and the CPU per 1,000 calls after it;
- wall time, daemon start to the N-th call at the emulator, against N / 150 s
  (UpdateSegment's QPS budget); with observation also against the reads'
  budget, N / --read-qps s (each task is read with GetSegmentTask before its
  first call), and the reads made;
- ``/healthz`` latency, polled every 50 ms from a process of its own for the
  whole run (from the daemon's start until it is told to stop); a request
  that times out (5 s) counts as 5 s and as a failure: p50, p99, max,
  failures, and the longest stretch without a 200;
- peak RSS (VmHWM), the ``reconcile.completed`` event, and SIGTERM to exit.

The daemon observes live tasks by default (``--observe``, at ``--read-qps
60`` here, the API's limit, rather than the daemon's default 20): 100k tasks
then take about 28 minutes of reads beside 11 of calls. ``--no-observe``
measures the calls alone (about 11 minutes at 100k).

The load average (``/proc/loadavg``) is printed with each size: the machine
may be shared. The last line of output is one JSON object with every figure.

    .venv/bin/python bench/first_sync.py [--sizes 1000,10000,100000]
        [--observe | --no-observe] [--read-qps 60] [--log-level info]
    .venv/bin/python bench/first_sync.py --quick   # 1,000 and 3,000 tasks
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    HEALTH_P99_TARGET_MS,
    HEALTH_TIMEOUT_S,
    PER_FILE,
    Daemon,
    EmulatorProcess,
    EventTail,
    HealthPoller,
    cpu_seconds,
    figure,
    generate,
    health_figures,
    health_summary,
    load_average,
    memory_mb,
)
from reconciler.tree.desired import load_tree

#: UpdateSegment's QPS budget (the daemon's --qps default and maximum).
WRITE_QPS: Final = 150
DESIRED_DURATION: Final = 30  # what bench._common.file_text writes
LIVE_DURATION: Final = 45
#: The target: CPU per 1,000 tasks of the largest size within this of the smallest's.
CPU_RATIO_TARGET: Final = 1.5


def seed_rows(root: Path, n: int) -> list[dict[str, Any]]:
    """The tree's tasks as StartSegment bodies, each with a Duration other than the tree's."""
    index = load_tree(root)
    if index.problems or len(index.tasks) != n:
        raise RuntimeError(f"generated tree is wrong: {len(index.tasks)} tasks, {index.problems}")
    rows = []
    for key, task in sorted(index.tasks.items()):
        fields = dict(task.fields)
        if fields.get("Duration") != DESIRED_DURATION:
            raise RuntimeError(f"{key}: Duration {fields.get('Duration')}, not {DESIRED_DURATION}")
        rows.append({**key.identity(), **fields, "Duration": LIVE_DURATION})
    return rows


def by_action(stats: dict[str, Any], action: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in stats["by_action"].get(action, {}).items()}


def one_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    observe = args.observe
    print(
        f"\n== first sync of {n} tasks from an empty store, "
        + (f"observing (--read-qps {args.read_qps})" if observe else "--no-observe")
        + f"; load average {load_average()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-first-sync-{n}-") as tmp:
        work = Path(tmp)
        t_prep = time.monotonic()
        generate(work / "desired", files=n // PER_FILE, per_file=PER_FILE)
        with EmulatorProcess(work) as emulator:
            emulator.seed(seed_rows(work / "desired", n))
            figure("prepared (tree + emulator) in", f"{time.monotonic() - t_prep:.1f} s")
            result = run_daemon(work, emulator, n, args)
    return result


def run_daemon(
    work: Path, emulator: EmulatorProcess, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    flags: list[str] = ["desired", "--state", "state.db", "--read-qps", str(args.read_qps)]
    if not args.observe:
        flags.append("--no-observe")
    budget = n / WRITE_QPS + (n / args.read_qps if args.observe else 0.0)
    timeout = budget * 3 + 300
    base = emulator.stats()
    t_wall = time.time()
    t0 = time.monotonic()
    with Daemon(work, *flags, endpoint=emulator.url, log_level=args.log_level) as daemon:
        pid = daemon.proc.pid
        tail = EventTail(daemon.log_path, ["reconcile.started", "reconcile.completed"])
        seen: dict[str, dict[str, Any]] = {}
        poller = HealthPoller(
            f"http://127.0.0.1:{daemon.health_port}/healthz",
            work / "healthz.txt",
            timeout=HEALTH_TIMEOUT_S,
            limit=timeout + 120,
        )
        with poller:
            first_call: tuple[float, float, int] | None = None  # seconds, CPU, calls then
            next_report = t0 + args.progress
            loads = [load_average()]
            while True:
                time.sleep(0.25)
                now = time.monotonic()
                if daemon.proc.poll() is not None:
                    raise RuntimeError(
                        f"daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}"
                    )
                cpu = cpu_seconds(pid)
                calls = emulator.updates() - int(by_action(base, "UpdateSegment").get("ok", 0))
                for event in tail.poll():
                    seen.setdefault(str(event["event"]), {**event, "_seen_s": now - t0})
                if first_call is None and calls > 0:
                    first_call = (now - t0, cpu, calls)
                if calls >= n:
                    break
                if now - t0 > timeout:
                    raise RuntimeError(f"{calls}/{n} calls after {timeout:.0f} s")
                if now >= next_report:
                    next_report += args.progress
                    loads.append(load_average())
                    reads = sum(by_action(emulator.stats(), "GetSegmentTask").values()) - sum(
                        by_action(base, "GetSegmentTask").values()
                    )
                    h = health_summary(poller.samples())
                    print(
                        f"  ... {now - t0:6.0f} s: {calls} calls, {reads} reads, daemon CPU "
                        f"{cpu:.0f} s, RSS {memory_mb(pid)['VmRSS']:.0f} MB, /healthz "
                        f"max {h.get('max_ms', 0):.0f} ms, {h.get('failures', 0)} not 200; "
                        f"load {loads[-1]}",
                        flush=True,
                    )
            seconds = now - t0
            cpu_done = cpu
            mem = memory_mb(pid)
            loads.append(load_average())
            # The pass's own event (info level only): every task handled once.
            if args.log_level in ("debug", "info"):
                deadline = time.monotonic() + 120
                while "reconcile.completed" not in seen and time.monotonic() < deadline:
                    if daemon.proc.poll() is not None:
                        break
                    for event in tail.poll():
                        seen.setdefault(
                            str(event["event"]), {**event, "_seen_s": time.monotonic() - t0}
                        )
                    time.sleep(0.25)
            t_stop, t_stop_wall = time.monotonic(), time.time()
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                code: int | str = daemon.proc.wait(120)
            except subprocess.TimeoutExpired:
                code = "still running after 120 s: killed"
            stop_s = time.monotonic() - t_stop
            health = health_summary(poller.samples(), until=t_stop_wall)
    stats = emulator.stats()
    rows = emulator.live_tasks()
    one_call = sum(r["UpdateCalls"] == 1 and r["Duration"] == DESIRED_DURATION for r in rows)
    stamps = [t for r in rows for t in r["UpdateTimes"]]
    writes = {
        k: v - by_action(base, "UpdateSegment").get(k, 0)
        for k, v in by_action(stats, "UpdateSegment").items()
    }
    read_answers = {
        k: v - by_action(base, "GetSegmentTask").get(k, 0)
        for k, v in by_action(stats, "GetSegmentTask").items()
    }
    fc_s, fc_cpu, fc_calls = first_call or (seconds, cpu_done, 0)
    marginal = (cpu_done - fc_cpu) / max(1, n - fc_calls) * 1000
    completed = seen.get("reconcile.completed")
    fig: dict[str, Any] = {
        "tasks": n,
        "observe": args.observe,
        "read_qps": args.read_qps if args.observe else None,
        "seconds": round(seconds, 2),
        "write_budget_s": round(n / WRITE_QPS, 1),
        "read_budget_s": round(n / args.read_qps, 1) if args.observe else None,
        "last_call_s": round(max(stamps) - t_wall, 2) if stamps else None,
        "first_call_s": round(fc_s, 2),
        "cpu_s": round(cpu_done, 2),
        "cpu_per_1k_tasks_s": round(cpu_done / n * 1000, 3),
        "cpu_before_first_call_s": round(fc_cpu, 2),
        "cpu_per_1k_calls_after_first_s": round(marginal, 3),
        "cpu_pct_of_a_core": round(cpu_done / seconds * 100, 1),
        "rss_mb": round(mem["VmRSS"], 1),
        "hwm_mb": round(mem["VmHWM"], 1),
        "update_calls": sum(writes.values()),
        "update_answers": writes,
        "reads": sum(read_answers.values()),
        "read_answers": read_answers,
        "tasks_with_one_call_at_desired": one_call,
        "reconcile_completed_seen_s": round(completed["_seen_s"], 2) if completed else None,
        "reconcile_completed_pass_s": completed.get("seconds") if completed else None,
        "healthz": health,
        "stop_s": round(stop_s, 2),
        "exit_code": code,
        "load_average": loads,
    }
    report(fig)
    return fig


def report(fig: dict[str, Any]) -> None:
    n = fig["tasks"]
    figure("daemon start to the N-th call", f"{fig['seconds']:.1f} s")
    figure(
        f"  against {n}/{WRITE_QPS} s (calls' budget)",
        f"{fig['seconds'] / fig['write_budget_s']:.2f}x",
        f"{fig['write_budget_s']:.1f} s",
    )
    if fig["observe"]:
        figure(
            f"  against {n}/{fig['read_qps']} s (reads' budget)",
            f"{fig['seconds'] / fig['read_budget_s']:.2f}x",
            f"{fig['read_budget_s']:.1f} s",
        )
    figure("  first call after", f"{fig['first_call_s']:.1f} s")
    applied = fig["update_answers"].get("ok", 0)
    figure("UpdateSegment calls applied (ok)", f"{applied}", f"{n}", ok=applied == n)
    others = {k: v for k, v in fig["update_answers"].items() if k != "ok"}
    figure("  other answers (429 throttled, ...)", json.dumps(others) if others else "0")
    figure(
        "tasks with exactly one call, at Duration 30",
        f"{fig['tasks_with_one_call_at_desired']}/{n}",
        f"{n}",
        ok=fig["tasks_with_one_call_at_desired"] == n,
    )
    figure(
        "GetSegmentTask reads (all answers)",
        f"{fig['reads']}",
        f"{n} (one per task)" if fig["observe"] else "0",
    )
    figure("daemon CPU, start to the N-th call", f"{fig['cpu_s']:.1f} s")
    figure("  per 1,000 tasks", f"{fig['cpu_per_1k_tasks_s']:.2f} s")
    figure("  before the first call (start-up, load)", f"{fig['cpu_before_first_call_s']:.1f} s")
    figure("  per 1,000 calls after the first", f"{fig['cpu_per_1k_calls_after_first_s']:.2f} s")
    figure("  share of one core", f"{fig['cpu_pct_of_a_core']:.0f} %")
    figure("VmRSS at the end / VmHWM (peak)", f"{fig['rss_mb']:.0f} / {fig['hwm_mb']:.0f} MB")
    health_figures("/healthz", fig["healthz"], p99_target_ms=HEALTH_P99_TARGET_MS)
    if fig["reconcile_completed_seen_s"] is not None:
        figure(
            "reconcile.completed seen after / its seconds",
            f"{fig['reconcile_completed_seen_s']:.1f} / {fig['reconcile_completed_pass_s']} s",
        )
    else:
        figure("reconcile.completed", "not seen")
    figure("SIGTERM to exit", f"{fig['stop_s']:.1f} s (exit {fig['exit_code']})")
    figure("load average (start ... end)", " | ".join(fig["load_average"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="task counts, comma-separated")
    ap.add_argument(
        "--observe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the daemon reads live tasks (its default); --no-observe: calls only",
    )
    ap.add_argument("--read-qps", type=int, default=60, help="the daemon's --read-qps")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--quick", action="store_true", help="sizes 1000,3000")
    args = ap.parse_args()
    if args.quick:
        args.sizes = "1000,3000"
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    if any(s < PER_FILE or s % PER_FILE for s in sizes):
        ap.error(f"every size must be a positive multiple of {PER_FILE}")
    results = [one_size(n, args) for n in sizes]
    summary: dict[str, Any] = {"bench": "first_sync", "sizes": results}
    if len(results) > 1:
        small, large = results[0], results[-1]
        ratio = large["cpu_per_1k_tasks_s"] / small["cpu_per_1k_tasks_s"]
        summary["cpu_per_1k_ratio"] = round(ratio, 2)
        print(flush=True)
        for r in results:
            h = r["healthz"]
            print(
                f"{r['tasks']:>7} tasks: CPU {r['cpu_per_1k_tasks_s']:.2f} s per 1k, wall "
                f"{r['seconds'] / r['write_budget_s']:.2f}x N/150, /healthz p99 "
                f"{h.get('p99_ms', 0):.0f} ms, max {h.get('max_ms', 0):.0f} ms, "
                f"{h.get('failures', 0)} not 200; load {r['load_average'][-1]}",
                flush=True,
            )
        figure(
            f"CPU per 1k tasks, {large['tasks']} vs {small['tasks']}",
            f"{ratio:.2f}x",
            f"<= {CPU_RATIO_TARGET}x",
            ok=ratio <= CPU_RATIO_TARGET,
        )
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
