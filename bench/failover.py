"""Failover: two ``run`` replicas on one PostgreSQL store; ``kill -9`` (or freeze) the leader.

3,000 tasks, ``--qps 150``, 40 ms emulator latency, ``--max-in-flight 64``.
The emulator runs in its own process and accepts two access keys, one per
replica, so its per-key, per-second counts tell the replicas apart. Each
round changes every task's Duration (3,000 calls, 20 s at 150/s; the first
round is the first sync, read first at ``--read-qps``), stops the leader at a
random moment between 10% and 80% of the rollout, waits for the standby to
take over and finish, and swaps the roles.

- Kill mode (the default): SIGKILL; the killed replica is started again as
  the new standby.
- ``--freeze``: SIGSTOP, as a long GC pause, a hung VM or a stalled disk
  would (its sockets stay open, its sessions alive); once the standby has
  made its first request, SIGCONT. The woken replica must send nothing and
  stand by. The freeze comes early in a wall-clock second, so each of its
  requests that the emulator counts in a later second was written after
  the SIGCONT, hence after the new leader's first request.

Figures:

- failover time: the kill (freeze) → the first call the new leader sends
  (kill mode: its first ``task.synced``; freeze mode: its first request of
  any kind; the answer's time minus that call's latency); target max <= 10 s.
  It is the takeover wait (the heartbeat unchanged for lease + margin,
  2.5 s, less the time since the last keepalive at the stop), then
  re-reading the store and re-planning;
- freeze mode: requests of the frozen leader after the new leader's first
  request, UpdateSegment and GetSegmentTask apart (target 0);
- extra calls per round: UpdateSegment answered ok minus tasks (<= the
  in-flight limit: only the calls in flight at the stop are sent twice);
- overlap seconds: wall-clock seconds, after the new leader's first call, in
  which both replicas' keys made UpdateSegment calls (target 0);
- lapses: ``leader.lapsed`` events other than a frozen replica's on waking
  (a running leader's event loop that stood still, a late keepalive);
- the SIGTERM handover: a last round stops the leader with SIGTERM instead;
  gap = the new leader's first call − the old leader's last (target <= 5 s).

    .venv/bin/python bench/failover.py [--tasks 3000] [--rounds 10] [--seed N] [--freeze]
    .venv/bin/python bench/failover.py --quick      # 600 tasks, 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    figure,
    file_text,
    identity,
    percentile,
    rel_of,
    save,
    wait_quiet,
    wait_until,
)
from tests.harness import DaemonProcess

PER_FILE = 100
KEYS = {
    "a": ("AKLTfailoverBenchA001", "c2VjcmV0LWZhaWxvdmVyLWE="),
    "b": ("AKLTfailoverBenchB002", "c2VjcmV0LWZhaWxvdmVyLWI="),
}


def serve_emulator(latency_ms: float) -> None:
    """The emulator with both replicas' keys, in this (child) process."""
    from reconciler.emulator import Emulator, EmulatorConfig

    async def serve() -> None:
        emulator = Emulator(
            EmulatorConfig(credentials=dict(KEYS.values()), latency_ms=latency_ms, seed=11)
        )
        url = await emulator.start(host="127.0.0.1", port=0)
        print(f"emulator listening on {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await emulator.stop()

    asyncio.run(serve())


class Emulator:
    def __init__(self, work: Path, latency_ms: float) -> None:
        import subprocess

        import httpx

        self.log = (work / "emulator.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-emulator", "--latency-ms", str(latency_ms)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(timeout=60.0)
        self.url = wait_until(
            lambda: next(
                (
                    line.split("on ", 1)[1].strip()
                    for line in (work / "emulator.log").read_text().splitlines()
                    if line.startswith("emulator listening on ")
                ),
                None,
            ),
            timeout=60,
            what="the emulator",
        )

    def seed(self, rows: list[dict[str, str]]) -> None:
        for i in range(0, len(rows), 5000):
            self.http.post(self.url + "/_emulator/tasks", json={"tasks": rows[i : i + 5000]})

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get(self.url + "/_emulator/stats").json())

    def reset_stats(self) -> None:
        self.http.post(self.url + "/_emulator/reset-stats", json={})

    def updates(self) -> int:
        return int(self.stats()["by_action"].get("UpdateSegment", {}).get("ok", 0))

    def seconds(self, name: str) -> set[int]:
        per = self.stats()["by_key"].get(KEYS[name][0], {}).get("UpdateSegment", {})
        return {int(t) for t in per}

    def requests(self, name: str, action: str) -> dict[int, int]:
        """``name``'s signed requests for ``action`` by wall-clock second."""
        per = self.stats()["by_key"].get(KEYS[name][0], {}).get(action, {})
        return {int(t): int(n) for t, n in per.items()}

    def made_requests(self, name: str) -> bool:
        return KEYS[name][0] in self.stats()["by_key"]

    def durations_are(self, duration: int) -> bool:
        rows = self.http.get(self.url + "/_emulator/tasks").json()["tasks"]
        return all(t["Duration"] == duration for t in rows)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.http.close()
        self.log.close()


def write_tree(root: Path, *, tasks: int, duration: int) -> None:
    for f in range(tasks // PER_FILE):
        save(root, rel_of(f), file_text(f, per_file=PER_FILE, default_duration=duration))


class Replica(DaemonProcess):
    """``run`` as one replica: its own name, access key and log."""

    def __init__(
        self, work: Path, name: str, url: str, endpoint: str, args: argparse.Namespace
    ) -> None:
        ak, sk = KEYS[name]
        super().__init__(
            work,
            "desired",
            "--state",
            url,
            "--endpoint",
            endpoint,
            "--replica",
            name,
            "--resync",
            "3600",
            "--max-in-flight",
            str(args.max_in_flight),
            "--allow-mass-change",
            "--read-qps",
            str(args.read_qps),
            "--health-port",
            "0",
            name=name,
            env={"VOLC_ACCESSKEY": ak, "VOLC_SECRETKEY": sk, "RECONCILER_LOG_LEVEL": "info"},
        )
        self.name = name


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def first_call(d: DaemonProcess, after: float, event: str = "task.synced") -> float:
    """When ``d`` sent its first call after ``after``: its answer's time minus its latency
    (``call.succeeded``: its first request of any kind)."""
    sent = [
        stamp(e) - float(e.get("latency_ms") or 0) / 1000
        for e in d.events(event)
        if stamp(e) > after
    ]
    return min(sent)


def led_by(name: str, event: dict[str, Any]) -> bool:
    return str(event.get("leader") or "").startswith(f"{name}/")


def early_in_a_second() -> bool:
    return time.time() % 1 < 0.6


def lapses(replicas: dict[str, Replica], woken: dict[str, list[float]]) -> list[str]:
    """Why the replicas' leases lapsed (``leader.lapsed``), but for a frozen one waking."""
    whys = []
    for name, r in replicas.items():
        elected = -1.0
        # The whole log: a killed replica's earlier runs wrote to it too.
        for line in r.log_path.read_text(errors="replace").splitlines():
            if '"leader.elected"' in line:
                elected = stamp(json.loads(line))
            if '"leader.lapsed"' not in line:
                continue
            e = json.loads(line)
            at = stamp(e)
            if not any(0 <= at - t < 1.0 for t in woken.get(name, [])):
                whys.append(f"{name}: {e['why']} ({at - elected:.2f} s after it was elected)")
    return whys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=3000, help="a multiple of 100")
    ap.add_argument("--rounds", "--kills", dest="rounds", type=int, default=10)
    ap.add_argument("--freeze", action="store_true", help="SIGSTOP/SIGCONT instead of kill -9")
    ap.add_argument("--latency-ms", type=float, default=40.0)
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--read-qps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="600 tasks, 3 rounds: a smoke run")
    ap.add_argument("--serve-emulator", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_emulator:
        serve_emulator(args.latency_ms)
        return
    if args.quick:
        args.tasks, args.rounds = 600, 3
    if args.tasks < PER_FILE or args.tasks % PER_FILE:
        ap.error(f"--tasks must be a positive multiple of {PER_FILE}")
    rng = random.Random(args.seed)
    print(
        f"{args.tasks} tasks, --qps 150, --read-qps {args.read_qps}, emulator latency "
        f"{args.latency_ms:g} ms, --max-in-flight {args.max_in_flight}, {args.rounds} "
        f"{'freezes' if args.freeze else 'kills'} (seed {args.seed})",
        flush=True,
    )
    from tests.postgres import PostgresServer

    server = PostgresServer.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
            rounds, handover = run(Path(tmp), server.create_database(), args, rng)
    finally:
        server.stop()
    report(rounds, handover, args)


def run(
    work: Path, url: str, args: argparse.Namespace, rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    emulator = Emulator(work, args.latency_ms)
    # The first round reads every task first, at --read-qps.
    budget = args.tasks / min(150, args.read_qps) * 1.5 + 60
    rounds: list[dict[str, Any]] = []
    replicas: dict[str, Replica] = {}
    woken: dict[str, list[float]] = {}
    try:
        rows = [identity(f, t) for f in range(args.tasks // PER_FILE) for t in range(PER_FILE)]
        emulator.seed(rows)
        duration = 30
        write_tree(work / "desired", tasks=args.tasks, duration=duration)
        replicas["a"] = Replica(work, "a", url, emulator.url, args)
        replicas["a"].wait_event("leader.elected", timeout=60)
        replicas["b"] = Replica(work, "b", url, emulator.url, args)
        replicas["b"].wait_event("leader.standby", timeout=60)
        leader, standby = "a", "b"
        for n in range(args.rounds + 1):
            sigterm = n == args.rounds
            if n:
                emulator.reset_stats()
                duration += 1
                write_tree(work / "desired", tasks=args.tasks, duration=duration)
            kill_at = int(args.tasks * rng.uniform(0.1, 0.8))
            wait_until(
                functools.partial(lambda k: emulator.updates() >= k, kill_at),
                timeout=budget,
                interval=0.01,
                what=f"{kill_at} calls",
            )
            old, new = replicas[leader], replicas[standby]
            elected_before = len(new.events("leader.elected"))
            freeze = args.freeze and not sigterm
            if freeze:
                # Early in a second: what the leader wrote before is counted in it.
                wait_until(early_in_a_second, timeout=2, interval=0.005, what="a second's start")
            killed = time.time()
            if sigterm:
                old.stop(signal.SIGTERM, timeout=60)
            elif freeze:
                old.proc.send_signal(signal.SIGSTOP)
                try:
                    wait_until(
                        functools.partial(emulator.made_requests, standby),
                        timeout=30,
                        interval=0.01,
                        what="the new leader's first request",
                    )
                finally:
                    old.proc.send_signal(signal.SIGCONT)
                    woken.setdefault(leader, []).append(time.time())
                frozen_s = woken[leader][-1] - killed
            else:
                old.kill()
            new.wait_event("leader.elected", timeout=30, count=elected_before + 1)
            wait_until(
                functools.partial(emulator.durations_are, duration),
                timeout=budget,
                interval=0.5,
                what="every task converged",
            )
            total = wait_quiet(emulator.updates, timeout=budget)
            first_new = first_call(new, killed - 1.0)
            old_seconds, new_seconds = emulator.seconds(leader), emulator.seconds(standby)
            taken = int(first_new)
            overlap = {s for s in old_seconds & new_seconds if s >= taken}
            result: dict[str, Any] = {
                "round": n,
                "kill_at": kill_at,
                "failover_s": first_new - killed,
                "extra": total - args.tasks,
                "overlap_s": len(overlap),
                "old": leader,
            }
            if sigterm:
                last_old = max(stamp(e) for e in old.events("task.synced"))
                result["gap_s"] = first_new - last_old
                print(
                    f"SIGTERM round: stopped at {kill_at} calls; handover gap "
                    f"{result['gap_s']:.2f} s; extra {result['extra']}",
                    flush=True,
                )
                result["lapses"] = lapses(replicas, woken)
                return rounds, result
            if freeze:
                first_any = first_call(new, killed - 1.0, "call.succeeded")
                result["failover_s"] = first_any - killed
                result["first_synced_s"] = first_new - killed
                result["frozen_s"] = frozen_s
                for action in ("UpdateSegment", "GetSegmentTask"):
                    per = emulator.requests(leader, action)
                    result[f"late_{action}"] = sum(c for s, c in per.items() if s > killed)
                old.wait_event("leader.standby", functools.partial(led_by, standby))
            rounds.append(result)
            if freeze:
                print(
                    f"round {n + 1}: freeze at {kill_at} calls, {frozen_s:.2f} s; failover "
                    f"{result['failover_s']:.2f} s (first UpdateSegment "
                    f"{result['first_synced_s']:.2f} s); from the frozen leader after: "
                    f"{result['late_UpdateSegment']} UpdateSegment, "
                    f"{result['late_GetSegmentTask']} GetSegmentTask; extra {result['extra']}; "
                    f"overlap {result['overlap_s']} s",
                    flush=True,
                )
            else:
                print(
                    f"round {n + 1}: kill -9 at {kill_at} calls; failover "
                    f"{result['failover_s']:.2f} s; extra {result['extra']}; "
                    f"overlap {result['overlap_s']} s",
                    flush=True,
                )
                replicas[leader] = Replica(work, leader, url, emulator.url, args)
                replicas[leader].wait_event("leader.standby", timeout=60)
            leader, standby = standby, leader
        raise AssertionError("unreachable")
    finally:
        for r in replicas.values():
            r.close()
        emulator.close()


def report(
    rounds: list[dict[str, Any]], handover: dict[str, Any], args: argparse.Namespace
) -> None:
    times = [r["failover_s"] for r in rounds]
    print(json.dumps({"rounds": rounds, "handover": handover}), flush=True)
    what = "freeze" if args.freeze else "kill"
    figure(f"{what}s", f"{len(rounds)}")
    figure(f"failover p50 ({what} -> first call)", f"{percentile(times, 50):.2f} s")
    figure("failover max", f"{max(times):.2f} s", "<= 10 s", ok=max(times) <= 10)
    if args.freeze:
        for action in ("UpdateSegment", "GetSegmentTask"):
            late = [r[f"late_{action}"] for r in rounds]
            figure(
                f"{action} of the deposed, after (sum)",
                f"{sum(late)}",
                "0",
                ok=sum(late) == 0,
            )
    extra = max(r["extra"] for r in rounds)
    figure(
        "extra calls per round (max)",
        f"{extra}",
        f"<= {args.max_in_flight}",
        ok=0 <= extra <= args.max_in_flight,
    )
    overlap = sum(r["overlap_s"] for r in rounds)
    figure("seconds both replicas called (after takeover)", f"{overlap}", "0", ok=overlap == 0)
    figure("leader.lapsed of a running leader", f"{len(handover['lapses'])}")
    for why in handover["lapses"]:
        print(f"  {why}", flush=True)
    figure(
        "SIGTERM handover gap", f"{handover['gap_s']:.2f} s", "<= 5 s", ok=handover["gap_s"] <= 5
    )
    figure("SIGTERM round extra calls", f"{handover['extra']}")


if __name__ == "__main__":
    main()
