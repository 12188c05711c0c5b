"""What one desired file may cost, and a daemon that stays responsive whatever it loads.

The limits are checked through the real paths: the parser, ``validate`` as a
subprocess, and the daemon with a file dropped into its watched tree. The
daemon's responsiveness is checked the way a kubelet sees it: ``/healthz``
polled over HTTP while a big file is parsed, and SIGTERM sent mid-parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from reconciler.emulator import EmulatorHandle
from reconciler.tree.desired import FileLimits, load_tree, parse_file
from tests.conftest import cli_env, reconciler_cmd, tasks_yaml, write
from tests.harness import DaemonProcess
from tests.test_daemon_stop import free_port

APP = "5e1a7c9d2b4f6a8c"


def rows(count: int, *, room: str = "room") -> list[dict[str, object]]:
    return [{"RoomId": f"{room}-{i}", "TaskId": "seg", "Duration": 30} for i in range(count)]


def big_file(path: Path, tasks: int) -> int:
    """A file of ``tasks`` tasks in the usual layout, written at once; its size."""
    text = tasks_yaml(APP, rows(tasks, room="big"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return len(text)


# --- the limits, in the parser -------------------------------------------------------


def test_a_file_over_the_byte_limit_is_refused_naming_the_limit_and_option() -> None:
    data = tasks_yaml(APP, rows(50)).encode()
    result = parse_file("a.yaml", data, limits=FileLimits(max_bytes=1024))
    assert result.tasks == ()
    (problem,) = result.problems
    assert f"the file is {len(data):,} bytes, over the limit of 1 KiB per file" in str(problem)
    assert "--max-file-bytes" in problem.message
    assert parse_file("a.yaml", data, limits=FileLimits(max_bytes=len(data))).tasks


def test_a_file_with_too_many_tasks_is_refused_before_any_task_is_checked() -> None:
    # Every task is also invalid: none of that is reported, only the count.
    bad = [{"RoomId": f"r{i}", "TaskId": "seg", "Duration": 0} for i in range(11)]
    result = parse_file("a.yaml", tasks_yaml(APP, bad).encode(), limits=FileLimits(max_tasks=10))
    (problem,) = result.problems
    assert problem.message == (
        "'tasks' has 11 tasks, over the limit of 10 per file; split the file, or raise "
        "the limit with --max-file-tasks"
    )
    assert problem.source.line == 3  # the list itself
    ok = parse_file("a.yaml", tasks_yaml(APP, rows(10)).encode(), limits=FileLimits(max_tasks=10))
    assert len(ok.tasks) == 10


def test_problems_are_reported_up_to_the_limit_then_counted() -> None:
    bad = [{"RoomId": f"r{i}", "TaskId": "seg", "Duration": 0} for i in range(250)]
    data = tasks_yaml(APP, bad).encode()
    result = parse_file("a.yaml", data, limits=FileLimits(max_problems=100))
    assert len(result.problems) == 101
    last = result.problems[-1]
    assert last.message == (
        "and 150 more problems in this file (the first 100 are shown; raise the limit "
        "with --max-file-problems)"
    )
    assert all("out of range" in p.message for p in result.problems[:100])
    assert len(parse_file("a.yaml", data).problems) == 101  # the default is 100 too


def test_cross_file_conflicts_are_capped_per_file(tmp_path: Path) -> None:
    # 30 tasks declared in both files: 30 small groups, each reported at both places.
    write(tmp_path, "a.yaml", tasks_yaml(APP, rows(30)))
    write(tmp_path, "b.yaml", tasks_yaml(APP, rows(30)))
    index = load_tree(tmp_path, limits=FileLimits(max_problems=5))
    for path in ("a.yaml", "b.yaml"):
        mine = [p for p in index.problems if p.source.path == path]
        assert len(mine) == 6
        assert mine[-1].message.startswith("and 25 more problems in this file")
    assert len(load_tree(tmp_path).problems) == 60


# --- the limits, from the command line -------------------------------------------------


def test_validate_names_the_limit_and_takes_it_from_an_option_or_the_environment(
    tmp_path: Path,
) -> None:
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows(20)))

    def validate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            reconciler_cmd("validate", "desired", *args),
            cwd=tmp_path,
            env=cli_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = validate("--max-file-tasks", "19")
    assert refused.returncode == 1
    assert "'tasks' has 20 tasks, over the limit of 19 per file" in refused.stderr
    assert "--max-file-tasks" in refused.stderr
    assert validate("--max-file-tasks", "20").returncode == 0
    small = validate(RECONCILER_MAX_FILE_BYTES="1KiB")
    assert small.returncode == 1 and "over the limit of 1 KiB per file" in small.stderr
    typo = validate("--max-file-bytes", "lots")
    assert typo.returncode == 1 and "'lots' is not a size" in typo.stderr
    as_json = validate("--max-file-tasks", "19", "--output", "json")
    doc = json.loads(as_json.stdout)
    assert "over the limit of 19 per file" in json.dumps(doc)


# --- the daemon --------------------------------------------------------------------------


def test_the_daemon_refuses_a_file_over_the_limit_and_holds_its_tasks(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    for i in range(3):
        emulator.start_task(app_id=APP, room_id=f"room-{i}", task_id="seg")
    write(tmp_path, "desired/a.yaml", tasks_yaml(APP, rows(3)))
    with DaemonProcess(
        tmp_path,
        "desired",
        "--endpoint",
        emulator.url,
        "--state",
        "state.db",
        "--max-file-bytes",
        "4KiB",
    ) as d:
        d.wait_event("reconcile.completed")
        size = big_file(tmp_path / "desired" / "a.yaml", 200)
        (invalid,) = d.wait_event("desired.invalid_file")
        assert invalid["path"] == "a.yaml" and invalid["held_tasks"] == 3
        (problem,) = invalid["problems"]
        assert f"the file is {size:,} bytes, over the limit of 4 KiB per file" in problem
        assert d.health("/healthz").status_code == 200
        assert d.stop() == 0
    assert not [e for e in d.events("task.forgotten")]


def test_healthz_answers_and_sigterm_stops_the_daemon_while_a_huge_file_is_parsed(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    """A file that takes seconds to parse, its limits raised: the probes keep getting
    answers meanwhile, and SIGTERM mid-parse ends the daemon within its drain timeout
    (a parse on the event loop answered nothing and ignored SIGTERM until done)."""
    write(tmp_path, "desired/small.yaml", tasks_yaml(APP, rows(2)))
    for i in range(2):
        emulator.start_task(app_id=APP, room_id=f"room-{i}", task_id="seg")
    port = free_port()
    with DaemonProcess(
        tmp_path,
        "desired",
        "--endpoint",
        emulator.url,
        "--state",
        "state.db",
        "--no-observe",
        "--drain-timeout",
        "5",
        "--max-file-bytes",
        "64MiB",
        "--max-file-tasks",
        "1000000",
        health_port=port,
    ) as d:
        d.wait_event("reconcile.completed")
        latencies: list[float] = []
        failures: list[str] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(timeout=10.0) as http:
                while not done.is_set():
                    started = time.monotonic()
                    try:
                        if http.get(f"http://127.0.0.1:{port}/healthz").status_code != 200:
                            failures.append("not 200")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.05)

        big_file(tmp_path / "desired" / "huge.yaml", 300_000)  # 18 MB
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(3.0)  # well into the parse, whose tasks are still not loaded
        parsing = not d.events("desired.changed")
        sent = time.monotonic()
        done.set()
        poller.join(15)
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0
        stopped_in = time.monotonic() - sent
    assert parsing, "the parse ended before the signal: make the file bigger"
    assert stopped_in < 5, f"stopped {stopped_in:.1f} s after SIGTERM"
    assert not failures, failures
    # Every probe was answered, none waited for the parse (seconds of it).
    assert len(latencies) >= 10 and max(latencies) < 2.0, max(latencies)
