"""First contact: reads before the first write, from an empty state store.

A task with no last-applied record is read with GetSegmentTask before any
call goes to it, so a call carries only what live lacks and no UpdateSegment
re-sends a Duration live already has (each one cuts the slice). Three
scenarios, each from an EMPTY state store, against the emulator in its own
process (per-action QPS enforced: GetSegmentTask 60/s, UpdateSegment 150/s):

1. **mixed** fleet: ``--tasks`` (1,000) live tasks started in bulk, ``--differ``
   (300) of them differing from the tree in one field (a third each: Duration,
   Identifier, Handle), the rest running with exactly the tree's values. Run
   once with ``reconciler apply --read-qps 60`` and once with the daemon
   (``reconciler run --read-qps 60``, until every differing task holds the
   desired values in the emulator, ``reconcile.completed`` is logged and
   ``status`` shows no Pending and no New task; then SIGTERM). Each: calls
   (target: exactly one per differing task), calls carrying an unchanged
   Duration (target 0: the emulator's per-task ``TimerRestarts`` of tasks
   whose live Duration already matched, plus any second Duration call to a
   Duration task), calls to matching tasks (target 0), reads, throttled
   answers, wall time, and beside it the physical limit
   ``reads / read-qps + calls / 150`` from the measured reads and calls.
2. **large** matching fleet: ``--large`` (100,000) tasks all running with the
   tree's values, ``apply --read-qps 60``: wall time, reads, calls (target 0)
   and the limit ``N / 60`` s (about 28 minutes for 100,000).
3. **plan**: a ``--plan-tasks`` (100,000) tree already applied (the store
   filled through :class:`~reconciler.store.base.Store` with records equal to
   the tree, the emulator running the same values), then ``--plan-changed``
   (10) tasks get a new Duration in the tree: the reads the emulator saw for a
   default ``plan`` (targeted refresh; target: one per changed task) and its
   wall time, beside ``plan --no-refresh`` (target 0 reads).

Every figure comes from the emulator's counters and admin view, the store, or
a clock around the real subprocess; nothing is assumed. The last line of
output is one JSON object with every figure.

    .venv/bin/python bench/first_contact.py [--only mixed|large|plan ...]
        [--tasks 1000] [--differ 300] [--large 100000] [--plan-tasks 100000]
        [--plan-changed 10] [--read-qps 60] [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Daemon,
    EmulatorProcess,
    figure,
    file_text,
    generate,
    rel_of,
    save,
)
from reconciler.core.plan import SETTLE_S
from reconciler.core.task import DesiredTask, FieldValue, TaskKey
from reconciler.eventlog import setup as events
from reconciler.store.base import Store
from reconciler.tree.desired import load_tree
from tests.conftest import cli_env, reconciler_cmd

PER_FILE: Final = 100
#: UpdateSegment's limit (and ``--qps``'s default and maximum).
WRITE_QPS: Final = 150
#: What the API (and so the emulator) allows GetSegmentTask per second.
API_READ_QPS: Final = 60
THROTTLED: Final = "FlowLimitExceeded.QPSOverLimit"
#: The live value a differing task of each group runs with (the tree says
#: Duration 30, Handle true, Identifier "slice-...").
DIFFER_FIELDS: Final = ("Duration", "Identifier", "Handle")
NEW_DURATION: Final = 31


# --------------------------------------------------------------------------- helpers


def make_tree(work: Path, tasks: int) -> dict[TaskKey, DesiredTask]:
    """``tasks`` tasks in files of 100 under ``work/desired``; the loaded tasks."""
    root = work / "desired"
    generate(root, files=tasks // PER_FILE, per_file=PER_FILE)
    index = load_tree(root)
    if index.problems or len(index.tasks) != tasks:
        raise RuntimeError(f"generated tree is wrong: {len(index.tasks)} tasks, {index.problems}")
    return dict(index.tasks)


def start_emulator(work: Path, latency_ms: float) -> EmulatorProcess:
    """An emulator whose GetSegmentTask limit is at least the API's 60/s (checked)."""
    emulator = EmulatorProcess(work, latency_ms=latency_ms)
    try:
        read_limit = emulator_limits(emulator)["GetSegmentTask"]  # 0: unlimited
        if 0 < read_limit < API_READ_QPS:
            set_read_limit(emulator, API_READ_QPS)
    except BaseException:
        emulator.close()
        raise
    return emulator


def emulator_limits(emulator: EmulatorProcess) -> dict[str, int]:
    """The per-action QPS limits in force (``POST /_emulator/faults {}`` changes nothing)."""
    resp = httpx_post(emulator, "/_emulator/faults", {})
    return {str(k): int(v) for k, v in resp["qps"].items()}


def set_read_limit(emulator: EmulatorProcess, qps: int) -> dict[str, int]:
    resp = httpx_post(emulator, "/_emulator/faults", {"qps": {"GetSegmentTask": qps}})
    return {str(k): int(v) for k, v in resp["qps"].items()}


def httpx_post(emulator: EmulatorProcess, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    resp = httpx.post(emulator.url + path, json=dict(body), timeout=30.0)
    resp.raise_for_status()
    return dict(resp.json())


def action_counts(stats: Mapping[str, Any], action: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in stats["by_action"].get(action, {}).items()}


def counts_delta(
    after: Mapping[str, Any], before: Mapping[str, Any], action: str
) -> dict[str, int]:
    a, b = action_counts(after, action), action_counts(before, action)
    return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) - b.get(k, 0)}


def seed_rows(
    tasks: Mapping[TaskKey, DesiredTask], live: Mapping[TaskKey, Mapping[str, FieldValue]]
) -> list[dict[str, Any]]:
    return [{**key.identity(), **dict(live[key])} for key in sorted(tasks)]


def run_cli(
    work: Path, *args: str, log_name: str, timeout: float, log_level: str = "info"
) -> tuple[int, float, str]:
    """Run ``reconciler ARGS`` in ``work``; its exit code, wall seconds and stdout.

    Events (stderr) go to ``work/<log_name>``; the clock spans process start to exit.
    """
    log = work / log_name
    with log.open("ab") as err:
        t0 = time.monotonic()
        proc = subprocess.run(
            reconciler_cmd(*args),
            cwd=work,
            env=cli_env(RECONCILER_LOG_LEVEL=log_level),
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=timeout,
            check=False,
        )
        seconds = time.monotonic() - t0
    return proc.returncode, seconds, proc.stdout.decode(errors="replace")


def status_counts(work: Path) -> dict[str, int]:
    """``reconciler status -o json``'s counts by sync status (read-only, any time)."""
    code, _, out = run_cli(
        work,
        "status",
        "desired",
        "--state",
        "state.db",
        "-o",
        "json",
        log_name="status.log",
        timeout=120,
        log_level="warning",
    )
    if code != 0:
        raise RuntimeError(f"status exited {code}:\n{out[-2000:]}")
    return {str(k): int(v) for k, v in json.loads(out)["counts"].items()}


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- 1. mixed fleet


def mixed_live(
    tasks: Mapping[TaskKey, DesiredTask], differ: int, seed: int
) -> tuple[dict[TaskKey, dict[str, FieldValue]], dict[TaskKey, str]]:
    """Live values: the tree's, except ``differ`` tasks with one field changed.

    Returns the live fields per task and, for the differing ones, which field.
    """
    rng = random.Random(seed)
    keys = sorted(tasks)
    chosen = sorted(rng.sample(keys, differ))
    which = {key: DIFFER_FIELDS[i % len(DIFFER_FIELDS)] for i, key in enumerate(chosen)}
    live: dict[TaskKey, dict[str, FieldValue]] = {}
    for key in keys:
        fields = dict(tasks[key].fields)
        field = which.get(key)
        if field == "Duration":
            fields["Duration"] = int(fields["Duration"]) + 15
        elif field == "Identifier":
            fields["Identifier"] = f"live-{key.room_id}"
        elif field == "Handle":
            fields["Handle"] = not fields["Handle"]
        live[key] = fields
    return live, which


def judge_emulator(
    emulator: EmulatorProcess,
    tasks: Mapping[TaskKey, DesiredTask],
    live: Mapping[TaskKey, Mapping[str, FieldValue]],
    which: Mapping[TaskKey, str],
) -> dict[str, int]:
    """What the emulator's per-task counters and live values say about the calls made."""
    rows = {
        TaskKey(r["AppId"], r["RoomId"], r["TaskId"]): r
        for r in emulator.live_tasks()
        if TaskKey(r["AppId"], r["RoomId"], r["TaskId"]) in tasks
    }
    out = {
        "tasks_at_desired": 0,
        "differing_at_desired": 0,
        "differing_with_one_call": 0,
        "calls_to_matching_tasks": 0,
        "matching_tasks_called": 0,
        "unchanged_duration_calls": 0,
        "unchanged_duration_tasks": 0,
        "bodies_with_field_live_had": 0,
        "update_calls_sum": 0,
        "timer_restarts_sum": 0,
    }
    for key, task in tasks.items():
        row = rows[key]
        desired = dict(task.fields)
        calls, restarts = int(row["UpdateCalls"]), int(row["TimerRestarts"])
        out["update_calls_sum"] += calls
        out["timer_restarts_sum"] += restarts
        at_desired = all(row[f] == v for f, v in desired.items())
        out["tasks_at_desired"] += at_desired
        if key in which:
            out["differing_at_desired"] += at_desired
            out["differing_with_one_call"] += calls == 1
        else:
            out["calls_to_matching_tasks"] += calls
            out["matching_tasks_called"] += calls > 0
        # A Duration call is unchanged when live already had that Duration: every
        # Duration call to a task whose live Duration matched, and any Duration call
        # after the first to a task whose Duration differed (the first set it).
        matched = live[key]["Duration"] == desired["Duration"]
        wasted = restarts if matched else max(0, restarts - 1)
        out["unchanged_duration_calls"] += wasted
        out["unchanged_duration_tasks"] += wasted > 0
        # The first body each task received (LastBodies keeps the last 8, oldest
        # first): does it carry a field whose live value was already the desired one?
        bodies = row["LastBodies"]
        if calls and len(bodies) == calls:
            first = bodies[0]
            out["bodies_with_field_live_had"] += any(
                f in first and live[key][f] == desired[f] == first[f] for f in desired
            )
    return out


def mixed(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    n, differ = args.tasks, args.differ
    print(
        f"\n== mixed fleet, {mode}: {n} live tasks, {differ} differing "
        f"({', '.join(DIFFER_FIELDS)} in turn), empty store, --read-qps {args.read_qps}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-first-{mode}-") as tmp:
        work = Path(tmp)
        tasks = make_tree(work, n)
        live, which = mixed_live(tasks, differ, args.seed)
        with start_emulator(work, args.latency_ms) as emulator:
            limits = emulator_limits(emulator)
            emulator.seed(seed_rows(tasks, live))
            base = emulator.stats()
            if mode == "apply":
                result = mixed_apply(work, emulator, args)
            else:
                result = mixed_run(work, emulator, tasks, args)
            stats = result.pop("_stats")
            judged = judge_emulator(emulator, tasks, live, which)
    reads = counts_delta(stats, base, "GetSegmentTask")
    writes = counts_delta(stats, base, "UpdateSegment")
    n_reads, n_writes = sum(reads.values()), sum(writes.values())
    limit = n_reads / args.read_qps + n_writes / WRITE_QPS
    seconds = float(result["seconds"])
    fig: dict[str, Any] = {
        "mode": mode,
        "tasks": n,
        "differing": differ,
        "read_qps": args.read_qps,
        "emulator_read_limit": limits.get("GetSegmentTask"),
        "emulator_update_limit": limits.get("UpdateSegment"),
        "update_calls": n_writes,
        "update_calls_ok": writes.get("ok", 0),
        "update_throttled": writes.get(THROTTLED, 0),
        "reads": n_reads,
        "reads_ok": reads.get("ok", 0),
        "reads_throttled": reads.get(THROTTLED, 0),
        "limit_s": round(limit, 2),
        "ratio": round(seconds / limit, 3) if limit else None,
        **judged,
        **result,
    }
    figure(
        "emulator limits GetSegmentTask / UpdateSegment",
        f"{fig['emulator_read_limit']} / {fig['emulator_update_limit']} /s",
    )
    figure("UpdateSegment calls", f"{n_writes}", f"{differ}", ok=n_writes == differ)
    figure(
        "  differing tasks with exactly one call",
        f"{judged['differing_with_one_call']}/{differ}",
        f"{differ}",
        ok=judged["differing_with_one_call"] == differ,
    )
    figure(
        "  calls to matching tasks",
        f"{judged['calls_to_matching_tasks']}",
        "0",
        ok=judged["calls_to_matching_tasks"] == 0,
    )
    figure(
        "calls carrying an unchanged Duration",
        f"{judged['unchanged_duration_calls']}",
        "0",
        ok=judged["unchanged_duration_calls"] == 0,
    )
    figure(
        "  first bodies carrying a field live had",
        f"{judged['bodies_with_field_live_had']}",
        "0",
        ok=judged["bodies_with_field_live_had"] == 0,
    )
    figure(
        "tasks holding the desired values",
        f"{judged['tasks_at_desired']}/{n}",
        f"{n}",
        ok=judged["tasks_at_desired"] == n,
    )
    figure("GetSegmentTask reads (all answers)", f"{n_reads}", f"{n} (one per task)")
    figure(
        "  of which throttled (429)",
        f"{fig['reads_throttled']}",
        "0",
        ok=fig["reads_throttled"] == 0,
    )
    figure(
        "UpdateSegment throttled (429)",
        f"{fig['update_throttled']}",
        "0",
        ok=fig["update_throttled"] == 0,
    )
    if mode == "apply":
        figure("apply exit code", f"{result['exit_code']}", "0", ok=result["exit_code"] == 0)
        figure("apply wall time (process start to exit)", f"{seconds:.2f} s")
    else:
        figure("daemon: all differing at desired after", f"{result['emulator_converged_s']:.2f} s")
        figure("daemon: reconcile.completed seen after", f"{result['completed_seen_s']:.2f} s")
        figure("  logged at (its timestamp)", f"{result['completed_at_s']:.2f} s")
        figure("  its own 'seconds' field (pass only)", f"{result['completed_pass_s']:.2f} s")
        figure("daemon: last call at the emulator after", f"{result['last_call_s']:.2f} s")
        figure(
            "daemon: status no Pending/New after",
            f"{seconds:.2f} s",
            f"counts {result['status_counts']}",
        )
        figure("daemon: reads made by then", f"{result['reads_by_converged']}")
        figure(
            "  its log: tasks read / repeat reads",
            f"{result['tasks_read']} / {result['reads_repeated']}",
        )
        figure(
            "  repeats before every task was read once",
            f"{result['reads_repeated_before_all_read']}",
            "0",
            ok=result["reads_repeated_before_all_read"] == 0,
        )
        figure("daemon: reads until it exited", f"{result['reads_until_exit']}")
        figure("daemon: SIGTERM to exit", f"{result['stop_s']:.2f} s (exit {result['exit_code']})")
    figure(
        "physical limit reads/read-qps + calls/150",
        f"{limit:.2f} s",
        f"{n_reads}/{args.read_qps} + {n_writes}/{WRITE_QPS}",
    )
    figure("time / limit", f"{seconds / limit:.2f}" if limit else "n/a")
    # Reads and calls have budgets of their own, so calls can go while reads do:
    # the floor when they overlap fully is the longer of the two.
    floor = max(n_reads / args.read_qps, n_writes / WRITE_QPS)
    fig["overlap_floor_s"] = round(floor, 2)
    fig["ratio_to_overlap_floor"] = round(seconds / floor, 3) if floor else None
    figure("floor if both budgets overlap: max(...)", f"{floor:.2f} s")
    figure("time / that floor", f"{seconds / floor:.2f}" if floor else "n/a")
    return fig


def mixed_apply(work: Path, emulator: EmulatorProcess, args: argparse.Namespace) -> dict[str, Any]:
    code, seconds, _ = run_cli(
        work,
        "apply",
        "desired",
        "--state",
        "state.db",
        "--endpoint",
        emulator.url,
        "--read-qps",
        str(args.read_qps),
        log_name="apply.log",
        timeout=args.tasks / args.read_qps * 5 + 120,
    )
    stats = emulator.stats()
    if code != 0:
        print(tail(work / "apply.log"), flush=True)
    with Store.open(work / "state.db") as store:
        counts = {str(k): v for k, v in store.counts().items()}
    figure("store after apply", json.dumps(counts))
    return {"_stats": stats, "seconds": round(seconds, 3), "exit_code": code, "store": counts}


def mixed_run(
    work: Path,
    emulator: EmulatorProcess,
    tasks: Mapping[TaskKey, DesiredTask],
    args: argparse.Namespace,
) -> dict[str, Any]:
    flags = ["desired", "--state", "state.db", "--read-qps", str(args.read_qps)]
    timeout = args.tasks / args.read_qps * 5 + 120
    wanted = {key: dict(t.fields) for key, t in tasks.items()}
    t_wall = time.time()
    t0 = time.monotonic()
    with Daemon(work, *flags, endpoint=emulator.url, log_level="info") as daemon:
        emu_s: float | None = None
        completed_s: float | None = None
        while emu_s is None or completed_s is None:
            now = time.monotonic() - t0
            if now > timeout:
                raise RuntimeError(
                    f"daemon did not converge within {timeout:.0f} s:\n{daemon.tail()}"
                )
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({daemon.proc.returncode}):\n{daemon.tail()}")
            # Each poll is stamped when its answer is in (0.25 s resolution).
            if emu_s is None and all(
                all(
                    r[f] == v
                    for f, v in wanted[TaskKey(r["AppId"], r["RoomId"], r["TaskId"])].items()
                )
                for r in emulator.live_tasks()
            ):
                emu_s = time.monotonic() - t0
            if completed_s is None and daemon.events("reconcile.completed"):
                completed_s = time.monotonic() - t0
            time.sleep(0.25)
        while True:  # the store: nothing Pending, every task recorded
            counts = status_counts(work)
            seconds = time.monotonic() - t0
            if counts.get("Pending", 0) == 0 and counts.get("New", 0) == 0:
                break
            if seconds > timeout:
                raise RuntimeError(f"status still shows {counts} after {seconds:.0f} s")
        stats_then = emulator.stats()
        completed = daemon.events("reconcile.completed")[0]
        read_log = daemon_reads(daemon.events("call.succeeded"))
        t_stop = time.monotonic()
        code = daemon.stop(timeout=120)
        stop_s = time.monotonic() - t_stop
    stamps = [t for r in emulator.live_tasks() for t in r["UpdateTimes"]]
    stats = emulator.stats()
    return {
        "_stats": stats_then,
        "seconds": round(seconds, 3),
        "emulator_converged_s": round(emu_s, 3),
        "completed_seen_s": round(completed_s, 3),
        "completed_pass_s": float(completed.get("seconds", 0.0)),
        # The event's own timestamp, on the same wall clock as the emulator's stamps.
        "completed_at_s": round(event_time(completed) - t_wall, 3),
        "last_call_s": round(max(stamps) - t_wall, 3) if stamps else 0.0,
        "status_counts": counts,
        "reads_by_converged": sum(action_counts(stats_then, "GetSegmentTask").values()),
        "reads_until_exit": sum(action_counts(stats, "GetSegmentTask").values()),
        "calls_until_exit": sum(action_counts(stats, "UpdateSegment").values()),
        "stop_s": round(stop_s, 3),
        "exit_code": code,
        **read_log,
    }


def event_time(event: Mapping[str, Any]) -> float:
    """An event's ``timestamp`` (ISO-8601 UTC) as epoch seconds."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def daemon_reads(succeeded: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """From the daemon's ``call.succeeded`` events: its reads by convergence, per task.

    ``reads_repeated``: reads of a task already read once; ``..._before_all_read``:
    those made before every task had had its first read (a first-contact read
    should never wait behind a repeat).
    """
    seen: set[tuple[str, str, str]] = set()
    logged = repeated = repeated_early = 0
    reads = [e for e in succeeded if e.get("action") == "GetSegmentTask"]
    for e in reads:
        q = e.get("query") or {}
        key = (str(q.get("AppId")), str(q.get("RoomId")), str(q.get("TaskId")))
        logged += 1
        if key in seen:
            repeated += 1
        else:
            seen.add(key)
    firsts_done = len(seen)
    seen.clear()
    for e in reads:
        q = e.get("query") or {}
        key = (str(q.get("AppId")), str(q.get("RoomId")), str(q.get("TaskId")))
        if key in seen and len(seen) < firsts_done:
            repeated_early += 1
        seen.add(key)
    return {
        "reads_logged": logged,
        "tasks_read": firsts_done,
        "reads_repeated": repeated,
        "reads_repeated_before_all_read": repeated_early,
    }


# --------------------------------------------------------------------------- 2. large fleet


def large(args: argparse.Namespace) -> dict[str, Any]:
    n = args.large
    print(
        f"\n== large matching fleet: {n} live tasks all at the tree's values, empty store, "
        f"apply --read-qps {args.read_qps}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-first-large-") as tmp:
        work = Path(tmp)
        t_prep = time.monotonic()
        tasks = make_tree(work, n)
        with start_emulator(work, args.latency_ms) as emulator:
            limits = emulator_limits(emulator)
            emulator.seed(seed_rows(tasks, {k: dict(t.fields) for k, t in tasks.items()}))
            del tasks
            figure("prepared (tree + emulator) in", f"{time.monotonic() - t_prep:.1f} s")
            base = emulator.stats()
            cmd = reconciler_cmd(
                "apply",
                "desired",
                "--state",
                "state.db",
                "--endpoint",
                emulator.url,
                "--read-qps",
                str(args.read_qps),
            )
            timeout = n / args.read_qps * 2 + 600
            with (work / "apply.log").open("ab") as err:
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=cli_env(RECONCILER_LOG_LEVEL="info"),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
                next_report = t0 + args.progress
                while proc.poll() is None:
                    time.sleep(0.5)
                    now = time.monotonic()
                    if now - t0 > timeout:
                        proc.kill()
                        proc.wait()
                        raise RuntimeError(f"apply still running after {timeout:.0f} s")
                    if now >= next_report:
                        next_report += args.progress
                        s = emulator.stats()
                        r = sum(counts_delta(s, base, "GetSegmentTask").values())
                        w = sum(counts_delta(s, base, "UpdateSegment").values())
                        print(
                            f"  ... {now - t0:6.0f} s: {r} reads ({r / (now - t0):.1f}/s), "
                            f"{w} calls",
                            flush=True,
                        )
                seconds = time.monotonic() - t0
                code = proc.returncode
            stats = emulator.stats()
            if code != 0:
                print(tail(work / "apply.log"), flush=True)
        with Store.open(work / "state.db") as store:
            counts = {str(k): v for k, v in store.counts().items()}
    reads = counts_delta(stats, base, "GetSegmentTask")
    writes = counts_delta(stats, base, "UpdateSegment")
    n_reads, n_writes = sum(reads.values()), sum(writes.values())
    limit = n / args.read_qps
    measured_limit = n_reads / args.read_qps + n_writes / WRITE_QPS
    fig = {
        "tasks": n,
        "read_qps": args.read_qps,
        "emulator_read_limit": limits.get("GetSegmentTask"),
        "exit_code": code,
        "seconds": round(seconds, 2),
        "reads": n_reads,
        "reads_ok": reads.get("ok", 0),
        "reads_throttled": reads.get(THROTTLED, 0),
        "update_calls": n_writes,
        "limit_s": round(limit, 2),
        "measured_limit_s": round(measured_limit, 2),
        "ratio": round(seconds / limit, 3),
        "store": counts,
    }
    figure("apply exit code", f"{code}", "0", ok=code == 0)
    figure("apply wall time (process start to exit)", f"{seconds:.1f} s")
    figure("GetSegmentTask reads (all answers)", f"{n_reads}", f"{n} (one per task)")
    figure(
        "  of which throttled (429)",
        f"{fig['reads_throttled']}",
        "0",
        ok=fig["reads_throttled"] == 0,
    )
    figure("UpdateSegment calls", f"{n_writes}", "0", ok=n_writes == 0)
    figure(f"physical limit {n}/{args.read_qps}", f"{limit:.1f} s")
    figure("  from measured reads + calls", f"{measured_limit:.1f} s")
    figure("time / limit", f"{seconds / limit:.3f}")
    figure("store after apply", json.dumps(counts))
    return fig


# --------------------------------------------------------------------------- 3. routine plan


def routine_plan(args: argparse.Namespace) -> dict[str, Any]:
    n, changed_n = args.plan_tasks, args.plan_changed
    print(
        f"\n== routine plan: {n} tasks applied, {changed_n} get a new Duration in the tree",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-first-plan-") as tmp:
        work = Path(tmp)
        t_prep = time.monotonic()
        tasks = make_tree(work, n)
        with start_emulator(work, args.latency_ms) as emulator:
            emulator.seed(seed_rows(tasks, {k: dict(t.fields) for k, t in tasks.items()}))
            time.sleep(0.05)  # applied strictly after these incarnations started
            with Store.open(work / "state.db") as store:
                with store.bulk():
                    for key, task in tasks.items():
                        store.record_success(
                            key,
                            fields=task.fields,
                            business_id=task.business_id,
                            request_id="bench-prefill",
                            source=task.source,
                        )
                store.record_tree_root(str((work / "desired").absolute()))
                prefilled = {str(k): v for k, v in store.counts().items()}
            recorded = time.monotonic()
            del tasks
            # The changed tasks: task 0 of files spread evenly over the tree.
            files = n // PER_FILE
            step = max(1, files // changed_n)
            changed_files = [i * step for i in range(changed_n)]
            for f in changed_files:
                save(
                    work / "desired",
                    rel_of(f),
                    file_text(f, per_file=PER_FILE, durations={0: NEW_DURATION}),
                )
            figure("prepared (tree, emulator, store) in", f"{time.monotonic() - t_prep:.1f} s")
            # A routine plan comes long after the apply: let the settle window of the
            # prefilled "calls" pass, or a read of them would not count as live.
            time.sleep(max(0.0, recorded + SETTLE_S + 1.0 - time.monotonic()))
            figure("store before plan", json.dumps(prefilled))
            runs: dict[str, dict[str, Any]] = {}
            for label, extra in (("default", ()), ("no_refresh", ("--no-refresh",))):
                runs[label] = one_plan(work, emulator, extra, timeout=600)
    fig: dict[str, Any] = {"tasks": n, "changed": changed_n, **runs}
    d, nr = runs["default"], runs["no_refresh"]
    figure(
        "plan (targeted refresh): reads",
        f"{d['reads']}",
        f"{changed_n}",
        ok=d["reads"] == changed_n,
    )
    figure("  calls planned", f"{d['to_update']}", f"{changed_n}", ok=d["to_update"] == changed_n)
    figure(
        "  observed (compared with live) / settling",
        f"{d['observed']} / {d['settling']}",
        f"{changed_n} / 0",
        ok=d["observed"] == changed_n,
    )
    figure("  restarts reported", f"{d['restarted']}", "0", ok=d["restarted"] == 0)
    figure("  its refresh (plan JSON)", json.dumps(d["refresh"]))
    figure("  wall time (process start to exit)", f"{d['seconds']:.2f} s")
    figure("plan --no-refresh: reads", f"{nr['reads']}", "0", ok=nr["reads"] == 0)
    figure("  its refresh (plan JSON)", json.dumps(nr["refresh"]))
    figure("  calls planned", f"{nr['to_update']}", f"{changed_n}", ok=nr["to_update"] == changed_n)
    figure("  wall time (process start to exit)", f"{nr['seconds']:.2f} s")
    figure("targeted refresh costs beyond --no-refresh", f"{d['seconds'] - nr['seconds']:+.2f} s")
    figure(
        "UpdateSegment calls by either plan",
        f"{d['update_calls'] + nr['update_calls']}",
        "0",
        ok=d["update_calls"] + nr["update_calls"] == 0,
    )
    return fig


def one_plan(
    work: Path, emulator: EmulatorProcess, extra: Sequence[str], *, timeout: float
) -> dict[str, Any]:
    before = emulator.stats()
    code, seconds, out = run_cli(
        work,
        "plan",
        "desired",
        "--state",
        "state.db",
        "--endpoint",
        emulator.url,
        "-o",
        "json",
        *extra,
        log_name="plan.log",
        timeout=timeout,
    )
    after = emulator.stats()
    if code != 0:
        raise RuntimeError(f"plan exited {code}:\n{tail(work / 'plan.log')}")
    doc = json.loads(out)
    reads = counts_delta(after, before, "GetSegmentTask")
    return {
        "exit_code": code,
        "seconds": round(seconds, 3),
        "reads": sum(reads.values()),
        "reads_throttled": reads.get(THROTTLED, 0),
        "update_calls": sum(counts_delta(after, before, "UpdateSegment").values()),
        "to_update": int(doc["summary"]["to_update"]),
        "observed": doc.get("observed"),
        "refreshed": doc.get("refreshed"),
        "refresh": doc.get("refresh"),
        "settling": doc.get("settling"),
        "restarted": doc["summary"].get("restarted"),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        action="append",
        choices=["mixed", "large", "plan"],
        help="run only this scenario (repeatable; default: all three)",
    )
    ap.add_argument("--tasks", type=int, default=1000, help="mixed fleet: live tasks")
    ap.add_argument("--differ", type=int, default=300, help="mixed fleet: tasks that differ")
    ap.add_argument("--large", type=int, default=100_000, help="large fleet: tasks")
    ap.add_argument("--plan-tasks", type=int, default=100_000, help="routine plan: tasks")
    ap.add_argument("--plan-changed", type=int, default=10, help="routine plan: tasks changed")
    ap.add_argument("--read-qps", type=int, default=API_READ_QPS, help="apply/run --read-qps")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="the emulator's latency")
    ap.add_argument("--progress", type=float, default=60.0, help="large: seconds between lines")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    for name in ("tasks", "large", "plan_tasks"):
        value = getattr(args, name)
        if value < PER_FILE or value % PER_FILE:
            ap.error(f"--{name.replace('_', '-')} must be a positive multiple of {PER_FILE}")
    if not 0 < args.differ <= args.tasks:
        ap.error("need 0 < --differ <= --tasks")
    if not 0 < args.plan_changed <= args.plan_tasks // PER_FILE:
        ap.error("need 0 < --plan-changed <= --plan-tasks / 100 (one per file)")
    events.configure(level="warning")  # the bench's own store writes need no events
    only = set(args.only or ["mixed", "large", "plan"])
    result: dict[str, Any] = {"bench": "first_contact", "latency_ms": args.latency_ms}
    if "mixed" in only:
        result["mixed"] = {mode: mixed(args, mode) for mode in ("apply", "run")}
    if "plan" in only:
        result["plan"] = routine_plan(args)
    if "large" in only:
        result["large"] = large(args)
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
