"""Scale of the offline core: 100,000 tasks in 1,000 YAML files (100 each, with defaults).

Prints, for one run on this machine:

- cold load + validate + plan, as a ratio to a bare ``yaml.load(CSafeLoader)``
  of the same files (target <= 1.5x);
- the plan step alone for 100k tasks, against no records, records all in
  sync, and records with 10 % drift (target <= 300 ms);
- after one file changes: re-load that file only and re-plan its tasks
  (target <= 50 ms);
- peak RSS of a fresh process doing load + validate + plan (target <= 400 MB).

Timings are the best of ``--repeat`` runs, alternating the two contenders so
machine noise hits both alike.

    python bench/plan_scale.py [--files 1000] [--per-file 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconciler.core.plan import compute_plan
from reconciler.core.task import AppliedRecord, DesiredTask, TaskKey
from reconciler.tree.desired import load_tree, read_file


def generate(root: Path, *, files: int, per_file: int) -> None:
    for f in range(files):
        app = f"app{f % 20:02d}{'a' * 10}"
        lines = [
            "# generated for bench/plan_scale.py",
            "defaults:",
            f'  AppId: "{app}"',
            "  Handle: true",
            "  Duration: 30",
            "tasks:",
        ]
        for t in range(per_file):
            lines += [
                f'  - RoomId: "room-{f:04d}-{t:03d}"',
                '    TaskId: "seg-main"',
                f'    Identifier: "slice-{f:04d}-{t:03d}"',
            ]
            if t % 3 == 0:
                lines.append(f"    Duration: {10 + t % 50}")
        folder = root / f"team-{f % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rooms-{f:04d}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def bare_yaml(root: Path) -> int:
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as fh:
                doc = yaml.load(fh.read(), Loader=yaml.CSafeLoader)
            n += len(doc["tasks"])
    return n


def ours(root: Path) -> int:
    index = load_tree(root)
    assert not index.problems, index.problems[:3]
    plan = compute_plan(index.tasks, {}, held_files=index.invalid_files)
    return len(plan.calls)


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_plan(
    tasks: dict[TaskKey, DesiredTask], applied: dict[TaskKey, AppliedRecord], repeat: int
) -> tuple[float, int]:
    return best(lambda: compute_plan(tasks, applied), repeat), len(
        compute_plan(tasks, applied).calls
    )


def rss_child(root: Path) -> None:
    n = ours(root)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{n} {peak_kb}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--per-file", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "desired"
        generate(root, files=args.files, per_file=args.per_file)
        total = args.files * args.per_file
        print(f"tree: {args.files} files x {args.per_file} tasks = {total} tasks")

        bare_t, ours_t = [], []
        for _ in range(args.repeat):
            bare_t.append(best(lambda: bare_yaml(root), 1))
            ours_t.append(best(lambda: ours(root), 1))
        b, o = min(bare_t), min(ours_t)
        print(f"bare yaml.load(CSafeLoader):      {b * 1000:8.0f} ms")
        print(f"load + validate + plan (cold):    {o * 1000:8.0f} ms")
        print(f"  ratio: {o / b:.2f}x   (target <= 1.5x)")

        index = load_tree(root)
        tasks = dict(index.tasks)
        in_sync = {
            k: AppliedRecord(k, t.business_id, dict(t.fields), source=t.source.path)
            for k, t in tasks.items()
        }
        drift = dict(in_sync)
        for i, (k, rec) in enumerate(in_sync.items()):
            if i % 10 == 0:
                drift[k] = AppliedRecord(
                    k, None, {**(rec.fields or {}), "Duration": 599}, source=rec.source
                )
        for label, applied in (("no records", {}), ("all in sync", in_sync), ("10% drift", drift)):
            t, calls = time_plan(tasks, applied, args.repeat)
            ms = t * 1000
            print(f"plan step alone, {label:<12} {ms:8.1f} ms  ({calls} calls; target <= 300 ms)")

        # One file changes (its defaults' Duration, so about 2/3 of its tasks need a
        # call); each round flips it back and forth so every put sees a real change.
        changed = sorted(index.paths)[len(index.paths) // 2]
        path = root / changed
        original = path.read_text(encoding="utf-8")
        edited = original.replace("Duration: 30", "Duration: 31", 1)
        incremental: list[float] = []
        affected: set[TaskKey] = set()
        calls = 0
        for i in range(max(args.repeat, 5) * 2):
            path.write_text(edited if i % 2 == 0 else original, encoding="utf-8")
            t0 = time.perf_counter()
            affected = index.put(read_file(root, changed))
            plan = compute_plan(index.tasks, in_sync, held_files=index.invalid_files, only=affected)
            incremental.append(time.perf_counter() - t0)
            if i % 2 == 0:
                calls = len(plan.calls)
        print(
            f"one file changed: re-load + re-plan {min(incremental) * 1000:8.1f} ms "
            f"(best; worst {max(incremental) * 1000:.1f} ms; {len(affected)} tasks re-planned, "
            f"{calls} calls; target <= 50 ms)"
        )
        del index, tasks, in_sync, drift

        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(root)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        print(
            f"peak RSS, fresh process load + validate + plan: {int(out[1]) / 1024:.0f} MB "
            f"({out[0]} calls; target <= 400 MB)"
        )


if __name__ == "__main__":
    main()
