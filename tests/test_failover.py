"""Two ``reconciler run`` replicas on one PostgreSQL store, against the emulator.

Real processes, a real server, signals; no mocks. Each replica signs with an
access key of its own, so the emulator's per-key, per-second counts
(``by_key``) say which replica called when. The tree is written once both
replicas run (the leader first, the standby warm); every task is read
before its first call (first contact), so the rollout is paced by
``--read-qps`` and a kill, or a freeze (SIGSTOP), at the 100th call lands
mid-rollout (the bench, bench/failover.py, runs 3,000 tasks, ten kills, and
with ``--freeze`` ten freezes).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler.emulator import EmulatorConfig, EmulatorHandle, running_emulator
from tests.conftest import tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

TASKS = 450
PER_FILE = 50
QPS = 150
IN_FLIGHT = 64
KEYS = {
    "a": ("AKLTreplicaA000000001", "c2VjcmV0LXJlcGxpY2EtYQ=="),
    "b": ("AKLTreplicaB000000002", "c2VjcmV0LXJlcGxpY2EtYg=="),
    "c": ("AKLTreplicaC000000003", "c2VjcmV0LXJlcGxpY2EtYw=="),
}


@pytest.fixture
def emulator() -> Iterator[EmulatorHandle]:
    config = EmulatorConfig(
        credentials=dict(KEYS.values()), qps={"UpdateSegment": 0}, latency_ms=20.0, seed=3
    )
    with running_emulator(config) as h:
        yield h


def tree(root: Path, h: EmulatorHandle, *, duration: int) -> None:
    """Start the tasks in the emulator, then declare them (the daemons watch the tree)."""
    for f in range(TASKS // PER_FILE):
        rows = [
            {"RoomId": f"room-{f}-{t:03d}", "TaskId": "seg", "Identifier": f"slice-{f}-{t:03d}"}
            for t in range(PER_FILE)
        ]
        for r in rows:
            h.start_task(app_id="failoverapp", room_id=r["RoomId"], task_id="seg")
        write(root, f"f{f}.yaml", tasks_yaml("failoverapp", rows, {"Duration": duration}))


def replica(cwd: Path, name: str, url: str, endpoint: str, *extra: str) -> DaemonProcess:
    ak, sk = KEYS[name]
    return DaemonProcess(
        cwd,
        "desired",
        "--state",
        url,
        "--endpoint",
        endpoint,
        "--replica",
        name,
        "--qps",
        str(QPS),
        "--max-in-flight",
        str(IN_FLIGHT),
        "--resync",
        "3600",
        "--health-port",
        "0",
        "--allow-mass-change",
        *extra,
        name=name,
        env={"VOLC_ACCESSKEY": ak, "VOLC_SECRETKEY": sk},
    )


def seconds(h: EmulatorHandle, name: str) -> dict[int, int]:
    """UpdateSegment requests of one replica by wall-clock second."""
    by_key: dict[str, Any] = h.stats_snapshot()["by_key"]
    per_second = by_key.get(KEYS[name][0], {}).get("UpdateSegment", {})
    return {int(t): n for t, n in per_second.items()}


def updates_ok(h: EmulatorHandle) -> int:
    return int(h.stats_snapshot()["by_action"].get("UpdateSegment", {}).get("ok", 0))


def synced_at(d: DaemonProcess) -> list[float]:
    return sorted(
        datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        for e in d.events("task.synced")
    )


def all_live(h: EmulatorHandle, duration: int) -> bool:
    return all(t.duration == duration for t in h.tasks())


def test_kill_9_of_the_leader_mid_rollout_the_standby_finishes_it(
    tmp_path: Path, emulator: EmulatorHandle, postgres_url: str
) -> None:
    (tmp_path / "desired").mkdir()
    with replica(tmp_path, "a", postgres_url, emulator.url) as a:
        a.wait_event("leader.elected")
        with replica(tmp_path, "b", postgres_url, emulator.url) as b:
            b.wait_event("leader.standby")
            assert b.health("/readyz").text.startswith("standby: leader is a/")
            assert b.metric("reconciler_leader", 'replica="b"') == 0
            tree(tmp_path / "desired", emulator, duration=30)
            wait_for(lambda: updates_ok(emulator) >= 100, timeout=20, interval=0.005)
            a.kill()  # SIGKILL, mid-rollout
            killed = time.time()
            at_kill = updates_ok(emulator)
            assert at_kill < TASKS - 100, "the kill came too late to be mid-rollout"
            # The standby made no request at all while it stood by, reads included.
            assert not seconds(emulator, "b")
            assert KEYS["b"][0] not in emulator.stats_snapshot()["by_key"]

            (elected,) = b.wait_event("leader.elected", timeout=10)
            assert elected["epoch"] == 2 and elected["grace_s"] > 0  # a never let go
            wait_for(lambda: all_live(emulator, 30), timeout=30, interval=0.1)
            first_b = min(synced_at(b))
            assert first_b - killed <= 10.0
            b.wait_ready(timeout=10)
            assert b.metric("reconciler_leader", 'replica="b"') == 1
            assert b.metric("reconciler_leader_epoch") == 2

            time.sleep(1.0)  # nothing left to send: no trickle of late calls
            extra = updates_ok(emulator) - TASKS
            assert 0 <= extra <= IN_FLIGHT
            a_secs, b_secs = seconds(emulator, "a"), seconds(emulator, "b")
            assert not set(a_secs) & set(b_secs), "both replicas called in one second"
            assert min(b_secs) > max(a_secs)
    assert all(t.update_calls >= 1 for t in emulator.tasks())


def test_sigterm_of_the_leader_hands_over_without_a_gap(
    tmp_path: Path, emulator: EmulatorHandle, postgres_url: str
) -> None:
    (tmp_path / "desired").mkdir()
    with replica(tmp_path, "a", postgres_url, emulator.url) as a:
        a.wait_event("leader.elected")
        with replica(tmp_path, "c", postgres_url, emulator.url) as c:
            c.wait_event("leader.standby")
            tree(tmp_path / "desired", emulator, duration=30)
            wait_for(lambda: updates_ok(emulator) >= 100, timeout=20, interval=0.005)
            assert a.stop(signal.SIGTERM, timeout=30) == 0
            (elected,) = c.wait_event("leader.elected", timeout=10)
            assert elected["grace_s"] == 0  # a released the lead: nothing to wait for
            wait_for(lambda: all_live(emulator, 30), timeout=30, interval=0.1)
            gap = min(synced_at(c)) - max(synced_at(a))
            assert gap <= 5.0, gap
            assert a.events("leader.released")
            a_secs, c_secs = seconds(emulator, "a"), seconds(emulator, "c")
            assert min(c_secs) >= max(a_secs)
            assert len(set(a_secs) & set(c_secs)) <= 1  # at most the handover's second
            assert updates_ok(emulator) - TASKS <= IN_FLIGHT
    assert len({t.key for t in emulator.tasks()}) == TASKS


def requests_of(h: EmulatorHandle, name: str, action: str) -> dict[int, int]:
    """Signed requests of one replica for ``action`` by wall-clock second."""
    by_key: dict[str, Any] = h.stats_snapshot()["by_key"]
    per_second = by_key.get(KEYS[name][0], {}).get(action, {})
    return {int(t): n for t, n in per_second.items()}


def made_requests(h: EmulatorHandle, name: str) -> bool:
    return KEYS[name][0] in h.stats_snapshot()["by_key"]


def test_a_frozen_leader_sends_nothing_after_the_standby_took_over(
    tmp_path: Path, emulator: EmulatorHandle, postgres_url: str
) -> None:
    """SIGSTOP of the leader mid-rollout (a long GC pause, a hung VM: its sockets stay
    open and its sessions alive), the standby takes over, then SIGCONT: the old
    leader wakes with its timers overdue and calls queued, and sends nothing."""
    (tmp_path / "desired").mkdir()
    fast_reads = ("--read-qps", "60")  # first contact reads every task: 8 s, not 23
    with replica(tmp_path, "a", postgres_url, emulator.url, *fast_reads) as a:
        a.wait_event("leader.elected")
        with replica(tmp_path, "b", postgres_url, emulator.url, *fast_reads) as b:
            b.wait_event("leader.standby")
            tree(tmp_path / "desired", emulator, duration=30)
            wait_for(lambda: updates_ok(emulator) >= 100, timeout=20, interval=0.005)
            # Early in a second, so that what a wrote before the freeze is counted
            # in that second: every request of a counted in a later one was written
            # after the SIGCONT, which comes after b's first request.
            wait_for(lambda: time.time() % 1 < 0.6, timeout=2, interval=0.005)
            a.proc.send_signal(signal.SIGSTOP)
            frozen = time.time()
            try:
                assert updates_ok(emulator) < TASKS - 100, "the freeze came too late"
                wait_for(lambda: made_requests(emulator, "b"), timeout=15, interval=0.01)
                taken = time.time()
            finally:
                a.proc.send_signal(signal.SIGCONT)
            assert taken - frozen <= 10.0
            (elected,) = b.wait_event("leader.elected", timeout=5)
            assert elected["epoch"] == 2 and elected["grace_s"] >= 2.5  # lease + margin
            assert elected["ended_sessions"] >= 1  # a's sessions, locks and all
            (lost,) = a.wait_event("leader.lost", timeout=10)
            # Its sessions were ended while it slept: it learns that from the dead
            # connection, from the moved epoch, or (a loaded machine) from a keepalive
            # the terminated backend never answers.
            assert any(w in lost["why"] for w in ("connection", "took over", "no answer"))
            wait_for(lambda: all_live(emulator, 30), timeout=30, interval=0.1)
            time.sleep(1.0)  # a had every chance to send what it held
            late = {
                action: sum(n for s, n in requests_of(emulator, "a", action).items() if s > frozen)
                for action in ("UpdateSegment", "GetSegmentTask")
            }
            assert late == {"UpdateSegment": 0, "GetSegmentTask": 0}, late
            # Woken, a learnt it was deposed (its sessions were ended) and stands by.
            a.wait_event("leader.standby", lambda e: e["leader"].startswith("b/"))
            assert b.metric("reconciler_leader", 'replica="b"') == 1
