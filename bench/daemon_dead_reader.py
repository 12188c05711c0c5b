"""SIGTERM to exit, for a daemon whose stdout reader died (``make demo | tee``, then Ctrl-C).

Each round starts ``reconciler run desired --emulator`` (the sample tree) with
stdout on a pipe (stderr too with ``--both``), reads its events until the
first sync is done, closes the pipe's read end, saves a desired file so the
daemon has something to log into the dead pipe, then sends the signal and
times how long the process takes to exit (killed after ``--give-up`` s).

``--repo DIR`` runs another checkout's code, for a before/after comparison.

    python bench/daemon_dead_reader.py [--rounds 5] [--signal TERM|INT] [--both] [--repo DIR]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, free_port
from tests.conftest import cli_env, reconciler_cmd


def one_round(work: Path, *, repo: Path, sig: signal.Signals, both: bool, give_up: float) -> float:
    tree = work / "desired"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(repo / "desired", tree)
    args = ("run", tree, "--emulator", "--emulator-port", "0", "--health-port", str(free_port()))
    with (work / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(
            reconciler_cmd(*args, "--state", work / f"s-{time.monotonic_ns()}.db"),
            cwd=work,
            env=cli_env(PYTHONPATH=str(repo)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if both else err,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if b"reconcile.completed" in line:
                    break
            proc.stdout.close()  # the reader dies
            lectures = tree / "edu-live" / "lectures.yaml"
            lectures.write_text(lectures.read_text().replace("Duration: 60", "Duration: 61"))
            time.sleep(1.0)  # the change is logged into the dead pipe
            sent = time.monotonic()
            proc.send_signal(sig)
            try:
                proc.wait(give_up)
            except subprocess.TimeoutExpired:
                return float("inf")
            return time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    parser.add_argument("--both", action="store_true", help="stderr on the same dead pipe")
    parser.add_argument("--give-up", type=float, default=15.0)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    args = parser.parse_args()
    sig = signal.Signals[f"SIG{args.signal}"]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            times.append(
                one_round(
                    Path(tmp),
                    repo=args.repo.resolve(),
                    sig=sig,
                    both=args.both,
                    give_up=args.give_up,
                )
            )
    exited = [t for t in times if t != float("inf")]
    where = "stdout and stderr" if args.both else "stdout"
    print(f"checkout: {args.repo}; {sig.name} after the reader of {where} died")
    print(
        "  seconds to exit per round: "
        + ", ".join("never" if t == float("inf") else f"{t:.2f}" for t in times)
    )
    if exited:
        print(
            f"  exited {len(exited)}/{len(times)}; "
            f"p50 {statistics.median(exited):.2f} s, max {max(exited):.2f} s"
        )
    else:
        print(f"  exited 0/{len(times)} within {args.give_up:g} s (killed with SIGKILL)")


if __name__ == "__main__":
    main()
