"""``validate`` on a hostile file of duplicates: output, memory and time must stay linear.

Scenarios (each a tree of one file, ``reconciler validate`` run as a subprocess):

- ``copies N``: one task pasted N times (8,000 and 200,000 by default);
- ``aliases N``: one anchored task and N YAML alias lines (``- *t``) naming it,
  the cheapest way to write a large group of duplicates (200,000 lines, 1.6 MB).

For each: the file's size, the bytes ``validate`` wrote (text and JSON), its
peak RSS and its wall time. Output, memory and time per duplicate should stay
flat as N grows.

    .venv/bin/python bench/validate_duplicates.py [--sizes 8000,200000]
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

from bench._common import figure
from tests.conftest import cli_env, reconciler_cmd

TASK = '  - RoomId: "r1"\n    TaskId: "seg"\n    Identifier: "same"\n    Duration: 30\n'


def copies(n: int) -> str:
    return 'defaults:\n  AppId: "app"\ntasks:\n' + TASK * n


def aliases(n: int) -> str:
    anchored = '  - &t\n    RoomId: "r1"\n    TaskId: "seg"\n    Identifier: "same"\n'
    return 'defaults:\n  AppId: "app"\ntasks:\n' + anchored + "  - *t\n" * n


def measure(text: str, *args: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "desired"
        root.mkdir()
        (root / "a.yaml").write_text(text)
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        started = time.monotonic()
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                reconciler_cmd("validate", "desired", *args),
                cwd=tmp,
                env=cli_env(),
                stdout=stdout,
                stderr=stderr,
            )
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        took = time.monotonic() - started
        written = out.stat().st_size + err.stat().st_size
    return {
        "file_kb": round(len(text.encode()) / 1024, 1),
        "exit": os.waitstatus_to_exitcode(status),
        "output_bytes": written,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(took, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8000,200000")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for n in sorted(int(x) for x in args.sizes.split(",")):
        for name, make in (("copies", copies), ("aliases", aliases)):
            for fmt in ("text", "json"):
                extra = ("-o", "json") if fmt == "json" else ()
                got = measure(make(n), *extra)
                label = f"{name} {n:,} ({fmt})"
                results[label] = got
                figure(
                    f"{label}: output / rss / time",
                    f"{got['output_bytes']:,} B / {got['peak_rss_mb']} MB / {got['seconds']} s",
                )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
