"""Scale of the daemon: 100,000 tasks (1,000 files x 100) held in sync, then a big pull.

Targets, for the daemon process (``reconciler run``):

- idle CPU over 60 s with every task in sync: <= 5 % of one core while the
  observer reads live tasks at the default ``--read-qps 20`` (<= 2 % with
  ``--no-observe``), utime + stime from ``/proc/PID/stat``; the reads made
  meanwhile are counted at the emulator;
- memory: VmRSS and VmHWM (peak) from ``/proc/PID/status``: <= 500 MB;
- a ``git pull`` that changes 5,000 tasks (50 files of 100 tasks get a new
  default Duration, each written to a temporary file and all renamed into
  place at once, as ``git checkout`` does) -> all 5,000 UpdateSegment calls
  received by the server within 5000 / 150 s x 1.1 = 36.7 s;
- also shown: the daemon's start-up time to ``/readyz`` with 100k tasks.

No initial rollout is made (11 minutes at 150/s): the bench loads the tree
itself, writes every task into the state store as Synced at its desired
values (``Store.bulk`` + ``record_in_sync``), and starts the same tasks
in an emulator process with those values (admin API, in chunks). The
emulator runs in its own process so the daemon's CPU and memory are its own.
The changed files are all the files of a few apps, so the emulator's admin
view can be asked for exactly those tasks afterwards: the rollout time is
the emulator's wall-clock stamp of the last applied call minus the wall clock
just before the first rename.

The daemon runs with its default ``--resync 300`` (no resync falls in the
idle window) and ``--log-level warning`` unless told otherwise; pass
``--log-level info`` to include the cost of writing events, as a log shipper
would bear it in production. At any level the bench counts what the daemon
wrote: lines and bytes up to ``/readyz``, lines per minute over the idle
window (with the most frequent events), and lines during the pull.

    .venv/bin/python bench/daemon_scale.py [--files 1000] [--per-file 100]
        [--changed-files 50] [--idle-seconds 60]
    .venv/bin/python bench/daemon_scale.py --quick   # 100 x 100 tasks, 5 files, 10 s idle
    .venv/bin/python bench/daemon_scale.py --log-level info   # log lines a minute at info
"""

from __future__ import annotations

import argparse
import collections
import gc
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
    app_of,
    cpu_seconds,
    figure,
    file_text,
    generate,
    memory_mb,
    rel_of,
    wait_quiet,
    wait_until,
)
from reconciler.eventlog import setup as events
from reconciler.store.base import Store
from reconciler.tree.desired import load_tree

QPS = 150
TARGET_IDLE_CPU_PCT = {True: 5.0, False: 2.0}  # observing live tasks or not
TARGET_RSS_MB = 500.0
NEW_DURATION = 31


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--per-file", type=int, default=100)
    ap.add_argument("--changed-files", type=int, default=50)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--resync", type=float, default=300.0, help="the daemon's --resync")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    ap.add_argument(
        "--no-observe", action="store_true", help="run the daemon without reading live tasks"
    )
    ap.add_argument(
        "--quick", action="store_true", help="100 files x 100 tasks, 5 changed, 10 s idle"
    )
    args = ap.parse_args()
    if args.quick:
        args.files, args.per_file, args.changed_files, args.idle_seconds = 100, 100, 5, 10.0
    if not 0 < args.changed_files <= args.files or args.per_file < 1 or args.idle_seconds <= 0:
        ap.error("need 0 < --changed-files <= --files, --per-file >= 1, --idle-seconds > 0")

    events.configure(level="warning")  # the bench's own store writes need no events
    total = args.files * args.per_file
    changed = sorted(range(args.files), key=lambda f: (f % 20, f))[: args.changed_files]
    print(
        f"tree: {args.files} files x {args.per_file} tasks = {total} tasks; pull changes "
        f"{len(changed)} files = {len(changed) * args.per_file} tasks; daemon --log-level "
        f"{args.log_level}, --resync {args.resync:g}, "
        f"{'no observation' if args.no_observe else 'observing live tasks at 20 reads/s'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        with EmulatorProcess(work) as emulator:
            prepare(work, emulator, args)
            measure(work, emulator, args, changed)


def prepare(work: Path, emulator: EmulatorProcess, args: argparse.Namespace) -> None:
    """The tree on disk, every task Synced in the store and running in the emulator."""
    t0 = time.monotonic()
    root = work / "desired"
    generate(root, files=args.files, per_file=args.per_file)
    index = load_tree(root)
    if index.problems:
        raise RuntimeError(f"generated tree is invalid: {index.problems[:3]}")
    with Store.open(work / "state.db") as store, store.bulk():
        for key, task in index.tasks.items():
            store.record_in_sync(
                key, business_id=task.business_id, source=task.source, fields=task.fields
            )
    rows = [{**key.identity(), **dict(task.fields)} for key, task in index.tasks.items()]
    emulator.seed(rows)
    running = len(rows)
    del index, rows
    gc.collect()
    print(
        f"prepared in {time.monotonic() - t0:.1f} s: {running} tasks Synced in the store and "
        "running in the emulator",
        flush=True,
    )


def measure(
    work: Path, emulator: EmulatorProcess, args: argparse.Namespace, changed: list[int]
) -> None:
    root = work / "desired"
    expected = len(changed) * args.per_file
    flags = ["desired", "--state", "state.db", "--resync", str(args.resync)]
    if args.no_observe:
        flags.append("--no-observe")
    target_cpu = TARGET_IDLE_CPU_PCT[not args.no_observe]
    started = time.monotonic()
    with Daemon(work, *flags, endpoint=emulator.url, log_level=args.log_level) as daemon:
        pid = daemon.proc.pid
        daemon.wait_ready(timeout=600)
        ready_s = time.monotonic() - started
        figure("start-up to /readyz", f"{ready_s:.1f} s")
        log = LogCounter(daemon.log_path)
        lines, size, _ = log.since_last()
        figure("log written up to /readyz", f"{lines} lines, {size / 1e6:.1f} MB")
        mem = memory_mb(pid)
        figure("RSS when ready", f"{mem['VmRSS']:.0f} MB", f"<= {TARGET_RSS_MB:.0f} MB")
        calls_at_start = emulator.updates()
        figure(
            "calls made at start (all in sync)", f"{calls_at_start}", "0", ok=calls_at_start == 0
        )

        time.sleep(min(5.0, args.idle_seconds / 4))  # let start-up work settle first
        log.since_last()
        reads0 = _reads(emulator)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu, idle_wall = cpu_seconds(pid) - cpu0, time.monotonic() - t0
        reads = _reads(emulator) - reads0
        lines, size, by_event = log.since_last()
        pct = idle_cpu / idle_wall * 100
        figure(
            f"idle CPU over {idle_wall:.0f} s",
            f"{pct:.2f} %",
            f"<= {target_cpu:g} % of a core",
            ok=pct <= target_cpu,
        )
        figure("GetSegmentTask reads meanwhile", f"{reads / idle_wall:.1f} /s")
        figure("UpdateSegment calls while idle", f"{emulator.updates() - calls_at_start}", "0")
        figure(
            f"log lines a minute idle (--log-level {args.log_level})",
            f"{lines / idle_wall * 60:.1f}",
        )
        print(f"  {size / idle_wall * 60 / 1e3:.1f} kB a minute; most: {_most(by_event)}")
        mem = memory_mb(pid)
        figure(
            "VmRSS idle",
            f"{mem['VmRSS']:.0f} MB",
            f"<= {TARGET_RSS_MB:.0f} MB",
            ok=mem["VmRSS"] <= TARGET_RSS_MB,
        )

        pull = rollout(root, emulator, args, changed, pid=pid)
        limit = expected / QPS * 1.1
        figure("pull: first call received after", f"{pull['first_s']:.2f} s")
        figure(
            f"pull: all {expected} calls received after",
            f"{pull['last_s']:.1f} s",
            f"<= {limit:.1f} s ({expected}/{QPS} s x 1.1)",
            ok=pull["last_s"] <= limit,
        )
        figure("pull: call rate, first to last", f"{pull['rate']:.1f} /s", f"~{QPS} /s")
        figure("pull: daemon CPU during the rollout", f"{pull['cpu_pct']:.0f} % of a core")
        figure(
            "pull: tasks with exactly one call, new value",
            f"{pull['good']}/{expected}",
            f"{expected}",
            ok=pull["good"] == expected,
        )
        figure(
            "pull: calls beyond the changed tasks", f"{pull['extra']}", "0", ok=pull["extra"] == 0
        )
        figure("pull: throttled answers (429)", f"{pull['throttled']}")
        lines, size, by_event = log.since_last()
        figure(
            f"pull: log lines written (--log-level {args.log_level})",
            f"{lines}",
        )
        print(f"  {size / 1e6:.2f} MB; most: {_most(by_event)}")
        mem = memory_mb(pid)
        figure(
            "VmRSS after the pull",
            f"{mem['VmRSS']:.0f} MB",
            f"<= {TARGET_RSS_MB:.0f} MB",
            ok=mem["VmRSS"] <= TARGET_RSS_MB,
        )
        figure(
            "VmHWM (peak RSS, whole run)",
            f"{mem['VmHWM']:.0f} MB",
            f"<= {TARGET_RSS_MB:.0f} MB",
            ok=mem["VmHWM"] <= TARGET_RSS_MB,
        )

        t_stop = time.monotonic()
        code = daemon.stop(timeout=120)
        figure("SIGTERM to exit", f"{time.monotonic() - t_stop:.1f} s (exit {code})")


class LogCounter:
    """The lines the daemon appended to its log since the last look, by event name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def since_last(self) -> tuple[int, int, collections.Counter[str]]:
        by_event: collections.Counter[str] = collections.Counter()
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line being written counts next time
        self.offset += len(whole)
        lines = whole.splitlines()
        for raw in lines:
            try:
                by_event[str(json.loads(raw).get("event"))] += 1
            except (ValueError, AttributeError):
                by_event["(not an event)"] += 1
        return len(lines), len(whole), by_event


def _most(by_event: collections.Counter[str], shown: int = 3) -> str:
    return ", ".join(f"{name} {n}" for name, n in by_event.most_common(shown)) or "none"


def _reads(emulator: EmulatorProcess) -> int:
    return int(emulator.stats()["by_action"].get("GetSegmentTask", {}).get("ok", 0))


def rollout(
    root: Path,
    emulator: EmulatorProcess,
    args: argparse.Namespace,
    changed: list[int],
    *,
    pid: int,
) -> dict[str, Any]:
    """Rename the changed files into place at once; wait for and check every call."""
    expected = len(changed) * args.per_file
    base = emulator.updates()
    staged = []
    for f in changed:
        path = root / rel_of(f)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            file_text(f, per_file=args.per_file, default_duration=NEW_DURATION), encoding="utf-8"
        )
        staged.append((tmp, path))
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    pulled = time.time()
    for tmp, path in staged:
        tmp.replace(path)
    wait_until(
        lambda: emulator.updates() - base >= expected,
        timeout=expected / QPS * 3 + 60,
        interval=0.1,
        what=f"{expected} calls after the pull",
    )
    cpu_pct = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0) * 100
    total = wait_quiet(emulator.updates, timeout=60) - base

    wanted = {f"room-{f:04d}-" for f in changed}
    times: list[float] = []
    good = 0
    for app in sorted({app_of(f) for f in changed}):
        for row in emulator.tasks_of(app):
            if row["RoomId"][:10] not in wanted:
                continue
            times.extend(row["UpdateTimes"])
            good += row["UpdateCalls"] == 1 and row["Duration"] == NEW_DURATION
    first, last = min(times) - pulled, max(times) - pulled
    return {
        "first_s": first,
        "last_s": last,
        "rate": (len(times) - 1) / (last - first) if last > first else float("nan"),
        "cpu_pct": cpu_pct,
        "good": good,
        "extra": total - expected,
        "throttled": emulator.stats()["throttled"],
    }


if __name__ == "__main__":
    main()
