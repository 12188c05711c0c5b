"""Duplicate slice cuts under faults: ambiguous outcomes and black holes, before and after.

Every UpdateSegment that carries Duration cuts a live slice, so a call applied
twice is a slice cut for nothing. Scenarios (each from an empty state store,
``apply`` run as a subprocess against the emulator in its own process):

- ``slow``: 2,000 tasks, a server answering every request in 1.5 s, and
  ``apply --timeout 1``. Printed: UpdateSegment calls the server applied,
  their excess over the tasks (duplicate cuts), the exit status and time.
- ``drops``: 2,000 tasks, 20 % of connections dropped *after* the server
  applied the call (the answer is lost), cleared after 30 s; ``apply`` is
  run again until it exits 0. Printed: tasks applied more than once.
- ``blackhole``: 1,000 tasks and an endpoint that accepts connections and
  never answers, ``apply --timeout 1``. Printed: seconds until ``apply``
  exits, the lines it wrote, and the requests the endpoint received.
- ``twowriters``: 2,000 tasks and two ``run`` daemons started together on one
  SQLite store, until every task is called and the calls stop. Printed:
  calls applied, their excess over the tasks, and how each daemon ended.
- ``fulldisk``: 2,000 tasks, the store on a real 16 MiB tmpfs filled to
  160 kB free while ``apply`` runs; then the filler is removed and ``apply``
  runs again. Printed: the calls applied in all, their excess over the tasks.
  Needs root (``mount -t tmpfs``).

``--python`` runs another checkout's CLI (its venv's python, e.g. a worktree
of an older commit) for the "before" figures; the emulator and the black
hole are this checkout's.

    .venv/bin/python bench/faults.py [--only slow|drops|blackhole] [--tasks N] [--python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import EmulatorProcess, figure
from tests.conftest import cli_env
from tests.harness import BlackHole

APP = "661e4a7b9c0d1e2f"


def make_tree(root: Path, n: int, *, duration: int = 45) -> None:
    rows = "\n".join(f'  - RoomId: "room-{i:05d}"\n    TaskId: "seg"' for i in range(n))
    root.mkdir(parents=True, exist_ok=True)
    (root / "fleet.yaml").write_text(
        f'defaults:\n  AppId: "{APP}"\n  Duration: {duration}\ntasks:\n{rows}\n'
    )


def seed(emulator: EmulatorProcess, n: int) -> None:
    """Every task running with StartSegment's default Duration (20): each needs one call."""
    emulator.seed([{"AppId": APP, "RoomId": f"room-{i:05d}", "TaskId": "seg"} for i in range(n)])


def apply(python: str, work: Path, endpoint: str, *extra: str) -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [
            python,
            "-m",
            "reconciler",
            "apply",
            "desired",
            "--state",
            "state.db",
            "--endpoint",
            endpoint,
            *extra,
        ],
        cwd=work,
        env={**cli_env(), "RECONCILER_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr


def applied_calls(emulator: EmulatorProcess) -> list[int]:
    return [int(t["UpdateCalls"]) for t in emulator.tasks_of(APP)]


def slow(python: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tree(work / "desired", n)
        with EmulatorProcess(work, latency_ms=1500) as emulator:
            seed(emulator, n)
            code, took, _ = apply(python, work, emulator.url, "--timeout", "1")
            time.sleep(3)  # whatever is still being worked on lands
            calls = applied_calls(emulator)
            # Then as the user told to raise --timeout would: every task converges.
            code2, took2, _ = apply(python, work, emulator.url, "--timeout", "5")
            time.sleep(3)
            after = applied_calls(emulator)
    applied = sum(calls)
    out: dict[str, object] = {
        "tasks": n,
        "exit": code,
        "seconds": round(took, 1),
        "applied_calls": applied,
        "duplicate_cuts": max(0, applied - sum(1 for c in calls if c)),
        "tasks_applied_twice_or_more": sum(1 for c in calls if c > 1),
        "then_timeout_5": {
            "exit": code2,
            "seconds": round(took2, 1),
            "applied_calls": sum(after),
            "duplicate_cuts": sum(after) - sum(1 for c in after if c),
            "converged": sum(1 for c in after if c),
        },
    }
    figure("slow server: UpdateSegment applied", str(applied), f"<= {n}")
    figure("slow server: duplicate cuts", str(out["duplicate_cuts"]), "0")
    figure("slow server: apply exit / seconds", f"{code} / {took:.1f}")
    figure("then --timeout 5: exit / seconds", f"{code2} / {took2:.1f}")
    figure("then --timeout 5: applied in all / tasks", f"{sum(after)} / {n}", f"{n} / {n}")
    return out


def drops(python: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tree(work / "desired", n)
        extra = ("--drop-rate", "0.2", "--drop-phase", "after", "--seed", "5")
        with EmulatorProcess(work, latency_ms=40, extra=extra) as emulator:
            seed(emulator, n)
            runs: list[tuple[int, float]] = []
            cleared = time.monotonic() + 30
            while True:
                code, took, _ = apply(python, work, emulator.url)
                runs.append((code, took))
                if code == 0 or len(runs) >= 10:
                    break
                if time.monotonic() >= cleared:
                    emulator._http.post(
                        emulator.url + "/_emulator/faults", json={"drop_rate": 0.0}
                    ).raise_for_status()
            calls = applied_calls(emulator)
    twice = sum(1 for c in calls if c > 1)
    out: dict[str, object] = {
        "tasks": n,
        "runs": [{"exit": c, "seconds": round(t, 1)} for c, t in runs],
        "applied_calls": sum(calls),
        "tasks_applied_twice_or_more": twice,
        "duplicate_cuts": sum(calls) - sum(1 for c in calls if c),
        "converged": sum(1 for c in calls if c >= 1),
    }
    figure("drops: tasks applied 2+ times", str(twice), "0")
    figure("drops: duplicate cuts", str(out["duplicate_cuts"]), "0")
    figure("drops: runs until exit 0", str(len(runs)))
    return out


def blackhole(python: str, n: int) -> dict[str, object]:
    hole = BlackHole()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_tree(work / "desired", n)
            code, took, text = apply(python, work, hole.url, "--timeout", "1")
    finally:
        hole.close()
    lines = text.count("\n")
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    out: dict[str, object] = {
        "tasks": n,
        "exit": code,
        "seconds": round(took, 1),
        "lines": lines,
        "requests_received": hole.requests,
        "error": errors[-1] if errors else None,
    }
    figure("black hole: seconds to stop", f"{took:.1f}", "about 2 timeouts")
    figure("black hole: lines written", str(lines))
    figure("black hole: requests received", str(hole.requests))
    print(f"  error line: {out['error']}")
    return out


def start_daemon(python: str, work: Path, endpoint: str, name: str) -> subprocess.Popen[bytes]:
    log = (work / f"{name}.log").open("wb")
    return subprocess.Popen(
        [
            *(python, "-m", "reconciler", "run", "desired", "--state", "state.db"),
            *("--endpoint", endpoint, "--health-port", "0", "--read-qps", "60"),
        ],
        cwd=work,
        env={**cli_env(), "RECONCILER_LOG_LEVEL": "warning"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def quiet(emulator: EmulatorProcess, n: int, *, settle: float = 5.0, limit: float = 180) -> float:
    """Wait until every task was called and no call came for ``settle`` s; the seconds it took."""
    started = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - started < limit:
        calls = applied_calls(emulator)
        total = sum(calls)
        if total != last:
            last, since = total, time.monotonic()
        elif sum(1 for c in calls if c) >= n and time.monotonic() - since >= settle:
            break
        time.sleep(0.5)
    return time.monotonic() - started


def twowriters(python: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tree(work / "desired", n)
        with EmulatorProcess(work, latency_ms=40) as emulator:
            seed(emulator, n)
            first = start_daemon(python, work, emulator.url, "first")
            second = start_daemon(python, work, emulator.url, "second")
            took = quiet(emulator, n)
            ended = []
            for proc in (first, second):
                if proc.poll() is None:
                    proc.terminate()
                ended.append(proc.wait(60))
            calls = applied_calls(emulator)
            second_log = (work / "second.log").read_text(errors="replace")
    refused = [line for line in second_log.splitlines() if "error" in line.lower()][:1]
    out: dict[str, object] = {
        "tasks": n,
        "seconds": round(took, 1),
        "applied_calls": sum(calls),
        "duplicate_cuts": sum(calls) - sum(1 for c in calls if c),
        "exit_codes": ended,
        "second_said": refused[0][:300] if refused else None,
    }
    figure("two writers: UpdateSegment applied", str(sum(calls)), f"{n}")
    figure("two writers: duplicate cuts", str(out["duplicate_cuts"]), "0")
    print(f"  the second daemon said: {out['second_said']}")
    return out


def fulldisk(python: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        disk = work / "disk"
        disk.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(disk)], check=True
        )
        try:
            with EmulatorProcess(work, latency_ms=40) as emulator:
                seed(emulator, n)
                make_tree(work / "desired", 1)
                state = ("--state", str(disk / "state.db"))
                code0, _, _ = apply(python, work, emulator.url, *state)  # the store exists
                make_tree(work / "desired", n)
                filler = disk / "filler"
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                filler.write_bytes(b"\0" * max(0, free - 160_000))
                code1, took1, text1 = apply(python, work, emulator.url, *state)
                filler.unlink()
                code2, took2, _ = apply(python, work, emulator.url, *state)
                calls = applied_calls(emulator)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    out: dict[str, object] = {
        "tasks": n,
        "setup_exit": code0,
        "full": {"exit": code1, "seconds": round(took1, 1), "traceback": "Traceback" in text1},
        "rerun": {"exit": code2, "seconds": round(took2, 1)},
        "applied_calls": sum(calls),
        "duplicate_cuts": sum(calls) - sum(1 for c in calls if c),
        "converged": sum(1 for c in calls if c),
    }
    figure("full disk: first apply exit / traceback", f"{code1} / {'Traceback' in text1}")
    figure("full disk: UpdateSegment applied in all", str(sum(calls)), f"{n}")
    figure("full disk: duplicate cuts", str(out["duplicate_cuts"]), "0")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        choices=["slow", "drops", "blackhole", "twowriters", "fulldisk"],
        action="append",
    )
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--python", default=sys.executable, help="the CLI's python (a checkout)")
    args = ap.parse_args()
    chosen = args.only or ["slow", "drops", "blackhole", "twowriters", "fulldisk"]
    results: dict[str, object] = {"python": args.python}
    for name in chosen:
        print(f"== {name}")
        if name == "slow":
            results[name] = slow(args.python, args.tasks)
        elif name == "drops":
            results[name] = drops(args.python, args.tasks)
        elif name == "twowriters":
            results[name] = twowriters(args.python, args.tasks)
        elif name == "fulldisk":
            results[name] = fulldisk(args.python, args.tasks)
        else:
            results[name] = blackhole(args.python, max(1, args.tasks // 2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
