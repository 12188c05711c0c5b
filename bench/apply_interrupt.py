"""Ctrl-C during a 3,000-task ``apply``: calls the server accepted vs calls recorded.

Scenario (issue "Fix what a new user hit", item 1): 3,000 tasks each need one
UpdateSegment; the emulator (its own process) answers after 40 ms and holds
150/s. ``reconciler apply`` runs as a subprocess with a fresh state store and
gets SIGINT at a random moment of the ~20 s run, ``--rounds`` times. Per round:

- **accepted**: UpdateSegment calls the emulator applied during the round;
- **recorded**: tasks the store holds as Synced (each had exactly one call);
- **pending**: tasks left Pending (a call in flight whose answer was lost);
- the exit status, and seconds from the signal to the exit.

``accepted == recorded`` every round is the target. ``--repo DIR`` runs the
code of another checkout (a ``git worktree`` of an older commit) for a
before/after comparison in one run.

    python bench/apply_interrupt.py [--rounds 5] [--tasks 3000] [--seed 1] [--repo DIR]
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, EmulatorProcess, generate
from reconciler.core.task import SyncStatus
from reconciler.store.base import Store
from tests.conftest import cli_env, reconciler_cmd


def applied(emulator: EmulatorProcess) -> int:
    return sum(int(t["UpdateCalls"]) for t in emulator.live_tasks())


def one_round(
    work: Path, emulator: EmulatorProcess, *, root: Path, repo: Path, at: float, n: int
) -> dict[str, float]:
    store = work / f"state-{time.monotonic_ns()}.db"
    before = applied(emulator)
    env = cli_env(PYTHONPATH=str(repo))
    with (work / "apply.out").open("wb") as out, (work / "apply.err").open("wb") as err:
        proc = subprocess.Popen(
            reconciler_cmd("apply", root, "--state", store, "--endpoint", emulator.url),
            cwd=work,
            env=env,
            stdout=out,
            stderr=err,
        )
        time.sleep(at)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
        exited = time.monotonic() - signalled
    accepted = applied(emulator) - before
    with Store.open(store, create=False, read_only=True) as s:
        counts = s.counts()
    return {
        "at_s": at,
        "accepted": accepted,
        "recorded": counts[SyncStatus.SYNCED],
        "pending": counts[SyncStatus.PENDING],
        "not_made": n - accepted,
        "exit": code,
        "exit_s": exited,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    per_file = 100
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "desired"
        generate(root, files=args.tasks // per_file, per_file=per_file)
        n = (args.tasks // per_file) * per_file
        with EmulatorProcess(work, tasks=root, latency_ms=40) as emulator:
            print(f"checkout: {args.repo}; {n} tasks, 40 ms latency, 150/s; SIGINT once per round")
            print(
                f"{'round':>5} {'at s':>6} {'accepted':>9} {'recorded':>9} {'pending':>8} "
                f"{'exit':>5} {'exit s':>7}  equal"
            )
            equal = 0
            for i in range(args.rounds):
                at = round(rng.uniform(1.0, 0.9 * n / 150), 2)
                r = one_round(work, emulator, root=root, repo=args.repo.resolve(), at=at, n=n)
                same = r["accepted"] == r["recorded"]
                equal += same
                print(
                    f"{i + 1:>5} {r['at_s']:>6.2f} {r['accepted']:>9.0f} {r['recorded']:>9.0f} "
                    f"{r['pending']:>8.0f} {r['exit']:>5.0f} {r['exit_s']:>7.2f}  "
                    f"{'yes' if same else 'NO'}"
                )
            print(f"accepted == recorded in {equal} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
