"""The watcher: the pure settler by clock, and the real watcher on a real folder."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from reconciler.tree.watch import Settler, TreeChange, watch_tree


def change(*paths: str, rescan: bool = False) -> TreeChange:
    return TreeChange(frozenset(paths), rescan)


def test_first_change_goes_out_at_once() -> None:
    s = Settler(settle=1.0, quiet=0.25, cap=1.6)
    out = s.admit(change("a.yaml"), now=10.0)
    assert out is not None and out.paths == {"a.yaml"} and not out.settling
    assert s.deadline() is None


def test_repeated_saves_are_held_until_quiet_then_sent_once() -> None:
    s = Settler(settle=1.0, quiet=0.25, cap=1.6)
    s.admit(change("a.yaml"), now=0.0)
    for i in range(1, 10):  # saved again every 100 ms
        assert s.admit(change("a.yaml"), now=i * 0.1) is None
        assert s.flush(now=i * 0.1 + 0.05) is None
    assert s.holding == {"a.yaml"}
    assert s.deadline() == 0.9 + 0.25
    assert s.flush(now=1.1) is None
    out = s.flush(now=1.16)
    assert out is not None and out.paths == {"a.yaml"} and s.holding == frozenset()


def test_a_file_saved_forever_still_goes_out_at_the_cap() -> None:
    s = Settler(settle=1.0, quiet=0.25, cap=1.6)
    s.admit(change("a.yaml"), now=0.0)
    t, sent = 0.1, []
    while t < 5.0:
        s.admit(change("a.yaml"), now=t)
        if s.flush(now=t) is not None:
            sent.append(round(t, 1))
        t += 0.1
    assert sent and sent[0] <= 0.1 + 1.6 + 1e-9, "never starved"


def test_other_files_and_rescans_are_not_held_back() -> None:
    s = Settler()
    s.admit(change("a.yaml"), now=0.0)
    s.admit(change("a.yaml"), now=0.1)
    out = s.admit(change("b.yaml", rescan=True), now=0.2)
    assert out is not None and out.paths == {"b.yaml"} and out.rescan
    assert out.settling == {"a.yaml"}, "a rescan is told to leave the settling file alone"


def test_a_later_edit_after_the_settle_window_goes_out_at_once() -> None:
    s = Settler(settle=1.0)
    s.admit(change("a.yaml"), now=0.0)
    out = s.admit(change("a.yaml"), now=5.0)
    assert out is not None and out.paths == {"a.yaml"}


async def _collect(
    root: Path, actions: list[tuple[float, str, str]], seconds: float
) -> list[TreeChange]:
    stop = asyncio.Event()
    got: list[TreeChange] = []

    async def consume() -> None:
        async for c in watch_tree(root, stop=stop):
            got.append(c)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)  # the watch is set up
    for delay, rel, text in actions:
        await asyncio.sleep(delay)
        tmp = root / f".{rel}.tmp"
        tmp.write_text(text)
        os.replace(tmp, root / rel)
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)
    return got


def test_real_watcher_reports_candidates_and_ignores_hidden_files(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    got = asyncio.run(
        _collect(tmp_path, [(0, "a.yaml", "x: 1\n"), (0, ".hidden.yaml", "x\n")], 1.0)
    )
    paths = set().union(*(c.paths for c in got))
    assert paths == {"a.yaml"}


def test_real_watcher_coalesces_fifty_saves_in_a_second(tmp_path: Path) -> None:
    start = time.monotonic()
    saves = [(0.02, "a.yaml", f"Duration: {i}\n") for i in range(50)]
    got = asyncio.run(_collect(tmp_path, saves, 1.5))
    batches = [c for c in got if "a.yaml" in c.paths]
    assert 1 <= len(batches) <= 3, [sorted(c.paths) for c in got]
    assert time.monotonic() - start < 10
