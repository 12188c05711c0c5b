"""Regenerate ``docs/dashboard.png``: the dashboard of the demo, with something to attend to.

The sample tree ``desired/`` (copied to a temporary folder) plus two files
that go wrong, against an emulator on loopback:

- ``staging/trial.yaml`` names an AppId the account does not have: Failed
  (``InvalidParameter.NotExistAppId``);
- ``edu-live/seminars.yaml`` has a misspelt key and an unquoted id: an
  invalid file, reported with both problems;
- ``hall-b-0902`` is never started: NotRunning when its call is answered;
- ``lobby-02`` is ended by the service after its sync: NotRunning once the
  observer reads it.

The daemon runs as ``reconciler run --endpoint``; headless chromium takes
the picture (1280x900) of ``/?refresh=0``.

    .venv/bin/python bench/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, wait_until
from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorConfig, running_emulator
from reconciler.tree.desired import load_tree
from tests.conftest import ACCESS_KEY, SECRET_KEY
from tests.harness import DaemonProcess

EDU, VOICE = "661e4a7b9c0d1e2f", "5f8e2d1c3b4a6978"
UNSTARTED = TaskKey(EDU, "hall-b-0902", "asr-segment")
ENDED = TaskKey(VOICE, "lobby-02", "moderation")
TRIAL = """\
# A trial room under an AppId that does not exist (a typo of 5f8e2d1c3b4a6978).
AppId: "5f8e2d1c3b4a6979"
RoomId: "trial-01"
TaskId: "moderation"
Duration: 45
"""
SEMINARS = """\
defaults:
  AppId: "661e4a7b9c0d1e2f"
  Duraton: 30
tasks:
  - RoomId: 0904
    TaskId: "asr-segment"
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = ap.parse_args()
    browser = shutil.which("chromium")
    if browser is None:
        sys.exit("chromium is needed: make browser (or apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp:
        work = Path(tmp)
        tree = work / "desired"
        shutil.copytree(REPO / "desired", tree)
        (tree / "staging").mkdir()
        (tree / "staging" / "trial.yaml").write_text(TRIAL)
        (tree / "edu-live" / "seminars.yaml").write_text(SEMINARS)
        config = EmulatorConfig(
            credentials={ACCESS_KEY: SECRET_KEY}, app_ids=frozenset({EDU, VOICE}), seed=11
        )
        with running_emulator(config) as emulator:
            for key, task in load_tree(REPO / "desired").tasks.items():
                if key != UNSTARTED:
                    emulator.start_task(**key._asdict(), business_id=task.business_id)
            flags = ["--state", "state.db", "--observe-interval", "1"]
            with DaemonProcess(work, "desired", "--endpoint", emulator.url, *flags) as daemon:
                daemon.wait_ready()
                daemon.wait_event("task.synced", lambda e: e.get("room_id") == ENDED.room_id)
                emulator.end_task(ENDED)
                daemon.wait_event("task.not_running", lambda e: e.get("room_id") == ENDED.room_id)
                wait_until(
                    lambda: "<b>2</b>NotRunning" in daemon.health("/").text,
                    timeout=30,
                    what="both NotRunning tasks on the dashboard",
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(
                    [
                        browser,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--hide-scrollbars",
                        f"--user-data-dir={work / 'profile'}",
                        "--window-size=1280,900",
                        f"--screenshot={args.out}",
                        f"{daemon.health_url}/?refresh=0",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                daemon.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
