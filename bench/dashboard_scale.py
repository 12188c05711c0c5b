"""The dashboard at 100,000 tasks: server time per page, and what it costs the daemon's memory.

The tree and store are :mod:`bench.daemon_scale`'s (1,000 files x 100 tasks,
every task Synced in the store and running in an emulator process), plus
1,000 tasks recorded Failed (refused as bad input, so the daemon blocks
them and makes no call), so the needs-attention list and the status counts
have something to show. The daemon runs at ``--log-level info``, so its
recent-events buffer fills as it would in production.

Figures, each over ``--requests`` requests after one warm-up:

- server time of ``/`` (first page), a filtered page (status + free text),
  a deep page of a path glob, a live-state filter and a task page: p50 and
  max of the ``Server-Timing`` ``total`` the dashboard reports (the handler,
  SQL in its thread included), and of ``loop`` (the part that holds the
  event loop); target total <= 200 ms;
- VmRSS of the daemon from just before the first dashboard request to after
  all of them (``--requests`` x 5 pages, then as many task pages of
  different tasks): target growth <= 50 MB.

    .venv/bin/python bench/dashboard_scale.py [--files 1000] [--per-file 100] [--requests 20]
    .venv/bin/python bench/dashboard_scale.py --quick   # 100 x 100 tasks
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    Daemon,
    EmulatorProcess,
    app_of,
    figure,
    memory_mb,
    percentile,
    room_of,
)
from bench.daemon_scale import prepare
from reconciler.eventlog import setup as events
from reconciler.store.base import Store
from reconciler.tree.desired import load_tree

TARGET_MS = 200.0
TARGET_RSS_MB = 50.0
FAILED = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--per-file", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="100 files x 100 tasks")
    args = ap.parse_args()
    if args.quick:
        args.files = 100
    events.configure(level="warning")
    total = args.files * args.per_file
    print(f"tree: {args.files} files x {args.per_file} tasks = {total} tasks", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        with EmulatorProcess(work) as emulator:
            prepare(work, emulator, args)
            fail_some(work)
            measure(work, emulator, args)


def fail_some(work: Path) -> None:
    """Record every 100th task Failed, refused as bad input (its spec is blocked)."""
    index = load_tree(work / "desired")
    with Store.open(work / "state.db") as store, store.bulk():
        for i, (key, task) in enumerate(sorted(index.tasks.items())):
            if i % 100 == 7 and i // 100 < FAILED:
                store.record_failure(
                    key,
                    message="Duration is out of range for this room",
                    code="InvalidParameter.Duration",
                    request_id=f"bench-{i}",
                    source=task.source,
                    failed_spec=task.spec_hash(),
                )


def server_ms(resp: httpx.Response) -> tuple[float, float]:
    timing = resp.headers["Server-Timing"]
    total = float(re.search(r"total;dur=([\d.]+)", timing).group(1))  # type: ignore[union-attr]
    loop = float(re.search(r"loop;dur=([\d.]+)", timing).group(1))  # type: ignore[union-attr]
    return total, loop


def measure(work: Path, emulator: EmulatorProcess, args: argparse.Namespace) -> None:
    flags = ["desired", "--state", "state.db", "--resync", "3600"]
    with Daemon(work, *flags, endpoint=emulator.url, log_level="info") as daemon:
        pid = daemon.proc.pid
        daemon.wait_ready(timeout=600)
        time.sleep(3.0)  # let start-up work settle
        before = memory_mb(pid)["VmRSS"]
        figure("VmRSS before the first dashboard request", f"{before:.0f} MB")
        http = httpx.Client(base_url=daemon.health_url, timeout=60)
        pages = {
            "/ (first page)": {},
            "/?status=Failed&q=room-004": {"status": "Failed", "q": "room-004"},
            "/?path=team-3/*&page=40": {"path": "team-3/*", "page": "40"},
            "/?live=unknown&page=100": {"live": "unknown", "page": "100"},
            "/task (one task)": None,
        }
        task = {"app": app_of(42), "room": room_of(42, 7), "task": "seg-main"}
        for label, params in pages.items():
            route = "/task" if params is None else "/"
            query = task if params is None else params
            first = http.get(route, params=query)
            assert first.status_code == 200, first.text[:500]
            totals, loops = [], []
            for _ in range(args.requests):
                total, loop = server_ms(http.get(route, params=query))
                totals.append(total)
                loops.append(loop)
            p50, worst = percentile(totals, 50), max(totals)
            figure(
                f"{label}: server p50 / max",
                f"{p50:.0f} / {worst:.0f} ms",
                f"<= {TARGET_MS:.0f} ms",
                ok=worst <= TARGET_MS,
            )
            figure(
                "  of which on the event loop, p50 / max",
                f"{percentile(loops, 50):.0f} / {max(loops):.0f} ms",
            )
        files = args.files
        for i in range(args.requests * 5):
            f = i * 37 % files
            http.get(
                "/task", params={"app": app_of(f), "room": room_of(f, i % 100), "task": "seg-main"}
            )
        after = memory_mb(pid)["VmRSS"]
        growth = after - before
        figure("VmRSS after them all", f"{after:.0f} MB")
        figure(
            "VmRSS growth from the dashboard",
            f"{growth:.1f} MB",
            f"<= {TARGET_RSS_MB:.0f} MB",
            ok=growth <= TARGET_RSS_MB,
        )
        body = http.get("/").text
        figure("/ page size", f"{len(body) / 1024:.0f} KiB")
        http.close()
        daemon.stop(timeout=120)


if __name__ == "__main__":
    main()
