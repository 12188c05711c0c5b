"""Throughput and fault tolerance of ``apply`` against the emulator.

Scenario (issue "Talk to the API"): 3,000 tasks each needing one UpdateSegment;
the emulator enforces 150/s over any one-second window and answers after 40 ms.

- **throughput**: achieved calls/s as a fraction of 150 (target >= 0.95) with
  zero ``FlowLimitExceeded`` answers, and, in the same run, the wall time of a
  plain sequential loop sending the same 3,000 calls one after another, as a
  ratio;
- **faults**: the same 3,000 with 10 % of calls answered 500 and 3 % dropped
  (after the server applied them, so the outcome is unknown to the client):
  every task ends Synced, total calls <= 1.25 x 3,000, none Failed.

The emulator runs as its own process (``reconciler emulator``) so it does not
share a GIL with the client; ``apply`` runs in this process through the same
``apply_plan`` / ``TaskReconciler`` / ``RtcClient`` path the CLI uses, and a
real SQLite store in a temp dir records every result. With ``--state-url URL``
(an empty PostgreSQL database) or ``--postgres`` (a server started for the
run, from the tests' harness, fsync on) the throughput run is repeated with a
PostgreSQL store, in the same run: recording must not be the bottleneck.

    python bench/apply_throughput.py [--tasks 3000] [--skip-sequential] [--only throughput|faults]
                                     [--postgres | --state-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.api.client import ClientConfig, RtcClient
from reconciler.api.credentials import Credentials
from reconciler.core.plan import Plan, compute_plan
from reconciler.core.task import SyncStatus
from reconciler.engine.apply import apply_plan
from reconciler.engine.reconcile import Outcome, TaskReconciler
from reconciler.eventlog.setup import configure
from reconciler.store.base import Store
from reconciler.store.recorder import Recorder
from reconciler.tree.desired import load_tree

AK, SK = "AKLTbenchAccessKey", "YmVuY2gtc2VjcmV0LWtleS1mb3ItdGhlLWVtdWxhdG9y"
APP = "661e4a7b9c0d1e2f"


def make_tree(root: Path, n: int) -> None:
    per_file = 100
    for f in range(0, n, per_file):
        lines = ["defaults:", f'  AppId: "{APP}"', "  Duration: 45", "tasks:"]
        for i in range(f, min(n, f + per_file)):
            lines += [f'  - RoomId: "room-{i:05d}"', '    TaskId: "seg"']
        (root / f"rooms-{f // per_file:03d}.yaml").write_text("\n".join(lines) + "\n")


class EmulatorProcess:
    def __init__(self, tree: Path, *extra: str) -> None:
        env = {**os.environ, "VOLC_ACCESSKEY": AK, "VOLC_SECRETKEY": SK}
        env["RECONCILER_LOG_LEVEL"] = "warning"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reconciler",
                "emulator",
                "--port",
                "0",
                "--tasks",
                str(tree),
                "--latency-ms",
                "40",
                "--update-qps",
                "150",
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        self.url = ""
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "emulator listening on " in line:
                self.url = line.split("emulator listening on ", 1)[1].strip()
        if not self.url:
            self.proc.kill()
            raise RuntimeError("emulator did not start")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/_emulator/stats").json()
        return data

    def reset(self) -> None:
        httpx.post(self.url + "/_emulator/reset-stats", json={})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fresh_plan(tree: Path, store: Store) -> tuple[Plan, Recorder]:
    index = load_tree(tree)
    recorder = Recorder(store)
    return compute_plan(index.tasks, recorder.applied), recorder


async def concurrent_apply(plan: Plan, recorder: Recorder, url: str) -> tuple[float, Any]:
    config = ClientConfig(endpoint=url, timeout=5.0)
    async with RtcClient(Credentials(AK, SK), config=config) as client:
        reconciler = TaskReconciler(client=client, recorder=recorder)
        t0 = time.perf_counter()
        report = await apply_plan(
            plan, reconciler=reconciler, recorder=recorder, workers=config.max_in_flight
        )
        return time.perf_counter() - t0, report


async def sequential(plan: Plan, url: str) -> float:
    config = ClientConfig(endpoint=url, timeout=5.0, max_in_flight=1)
    async with RtcClient(Credentials(AK, SK), config=config) as client:
        t0 = time.perf_counter()
        for call in plan.calls:
            await client.update_segment(call.body)
        return time.perf_counter() - t0


def update_counts(stats: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = stats["by_action"].get("UpdateSegment", {})
    return counts


@contextmanager
def sqlite_store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "s.db") as store:
        yield store


Stores = list[tuple[str, Callable[[], AbstractContextManager[Store]]]]


def throughput(tree: Path, n: int, *, skip_sequential: bool, stores: Stores) -> None:
    emulator = EmulatorProcess(tree)
    try:
        for label, open_store in stores:
            emulator.reset()
            with open_store() as store:
                plan, recorder = fresh_plan(tree, store)
                assert len(plan.calls) == n
                seconds, report = asyncio.run(concurrent_apply(plan, recorder, emulator.url))
                stats = emulator.stats()
                rate = n / seconds
                print(f"throughput ({label} store): {n} calls in {seconds:.2f} s = {rate:.1f}/s")
                print(f"  fraction of 150/s: {rate / 150:.3f}   (target >= 0.95)")
                print(f"  FlowLimitExceeded answers: {stats['throttled']}   (target 0)")
                print(f"  synced: {report.count(Outcome.SYNCED)} / {n}")
                print(f"  recorded Synced: {store.counts()[SyncStatus.SYNCED]} / {n}")
        if not skip_sequential:
            with sqlite_store() as store:
                plan, _ = fresh_plan(tree, store)
                emulator.reset()
                seq = asyncio.run(sequential(plan, emulator.url))
                print(f"sequential loop, same {n} calls: {seq:.1f} s ({n / seq:.1f} calls/s)")
    finally:
        emulator.close()


def faults(tree: Path, n: int) -> None:
    emulator = EmulatorProcess(
        tree, "--error-rate", "0.1", "--drop-rate", "0.03", "--drop-phase", "after", "--seed", "1"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "s.db") as store:
            plan, recorder = fresh_plan(tree, store)
            seconds, report = asyncio.run(concurrent_apply(plan, recorder, emulator.url))
            stats = emulator.stats()
            counts = store.counts()
            total = stats["total_requests"]
            updates = update_counts(stats)
            print(f"faults (10% 500, 3% dropped): {seconds:.2f} s")
            print(
                f"  answers: {updates.get('ok', 0)} ok, {updates.get('InternalError', 0)} 500, "
                f"{updates.get('Dropped', 0)} dropped, {stats['throttled']} throttled"
            )
            print(f"  total calls: {total} = {total / n:.3f} x {n}   (target <= 1.25 x)")
            print(
                f"  synced {counts[SyncStatus.SYNCED]}, failed {counts[SyncStatus.FAILED]}, "
                f"pending {counts[SyncStatus.PENDING]}   (target: all {n} synced, none failed)"
            )
            print(f"  apply outcomes ok: {report.ok}")
    finally:
        emulator.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--only", choices=["throughput", "faults"])
    pg = ap.add_mutually_exclusive_group()
    pg.add_argument("--state-url", help="also measure with this empty PostgreSQL database")
    pg.add_argument("--postgres", action="store_true", help="also measure with a server of its own")
    args = ap.parse_args()
    configure(fmt="json", level="error")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "desired"
        tree.mkdir()
        make_tree(tree, args.tasks)
        if args.only in (None, "throughput"):
            stores: Stores = [("SQLite", sqlite_store)]
            with contextlib.ExitStack() as stack:
                url = args.state_url
                if args.postgres:
                    from tests.postgres import PostgresServer

                    server = PostgresServer.start(fsync=True)
                    stack.callback(server.stop)
                    url = server.create_database()
                if url:
                    stores.append(("PostgreSQL", lambda: Store.open(url)))
                throughput(tree, args.tasks, skip_sequential=args.skip_sequential, stores=stores)
        if args.only in (None, "faults"):
            faults(tree, args.tasks)


if __name__ == "__main__":
    main()
