"""Watching the desired tree for changes, as GitOps checkouts make them.

``watchfiles`` (Rust ``notify``) watches the *resolved* root, debounced, and
reports which candidate files changed. Anything else it reports that is not
ignored (a directory created, renamed or removed) asks for a rescan of the
tree's file list, because a directory event does not say which files came or
went.

git-sync publishes a new revision by atomically swapping the root symlink to
a new directory. No event inside the old directory says so, so the root's
target is also polled (a ``realpath`` call, cheap): when it changes, the
watcher moves to the new target and asks for a rescan.

Repeated saves of one file are coalesced by :class:`Settler`. ``watchfiles``
yields a batch whenever its set of distinct changes stops growing, and saving
the same file again adds nothing new to that set, so an editor or a script that
saves a file ten times a second would otherwise get a batch, hence a call, about
every 100 ms. The first change to a file still goes out at once (latency is
unchanged); a file that changes again within ``settle`` seconds is held until
it has been quiet for ``quiet`` seconds (at most ``debounce``), then goes out
once with whatever it holds by then.

The watcher only says *what may have changed*; the daemon re-reads those files
and decides everything else from their content (level-based).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from watchfiles import Change, awatch

from reconciler.eventlog import setup as events
from reconciler.tree.desired import is_candidate


@dataclass(frozen=True, slots=True)
class TreeChange:
    #: Candidate files (relative posix paths) added, modified or deleted.
    paths: frozenset[str]
    #: The file list itself may have changed: re-discover the tree.
    rescan: bool
    #: Files still being saved repeatedly: a rescan leaves them for a later batch.
    settling: frozenset[str] = frozenset()


class Settler:
    """Coalesces repeated changes of one file; pure, with an explicit clock."""

    def __init__(self, *, settle: float = 1.0, quiet: float = 0.25, cap: float = 1.6) -> None:
        self.settle, self.quiet, self.cap = settle, quiet, cap
        self._emitted: dict[str, float] = {}
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}

    @property
    def holding(self) -> frozenset[str]:
        return frozenset(self._first)

    def admit(self, change: TreeChange, now: float) -> TreeChange | None:
        """Pass on what can go now; hold files that changed again too soon."""
        ready = set()
        for path in change.paths:
            if path in self._first or now - self._emitted.get(path, -1e18) < self.settle:
                self._first.setdefault(path, now)
                self._last[path] = now
            else:
                ready.add(path)
                self._emitted[path] = now
        if not ready and not change.rescan:
            return None
        return TreeChange(frozenset(ready), change.rescan, self.holding)

    def flush(self, now: float) -> TreeChange | None:
        """Release held files that went quiet, or were held for ``cap``."""
        due = {
            p
            for p, first in self._first.items()
            if now - self._last[p] >= self.quiet or now - first >= self.cap
        }
        if not due:
            return None
        for path in due:
            del self._first[path], self._last[path]
            self._emitted[path] = now
        return TreeChange(frozenset(due), False, self.holding)

    def deadline(self) -> float | None:
        """When the next held file falls due, if any is held."""
        if not self._first:
            return None
        return min(min(self._last[p] + self.quiet, f + self.cap) for p, f in self._first.items())


def is_ignored_name(name: str) -> bool:
    """Names the desired tree ignores: hidden, and editor leftovers."""
    return name.startswith(".") or name.endswith(("~", ".swp")) or name.startswith(".#")


def _relevant(rel: str) -> bool:
    return not any(is_ignored_name(part) for part in rel.split("/"))


def _classify(target: str, changes: set[tuple[Change, str]]) -> TreeChange | None:
    paths: set[str] = set()
    rescan = False
    for _, raw in changes:
        rel = os.path.relpath(raw, target).replace(os.sep, "/")
        if rel.startswith("..") or not _relevant(rel):
            continue
        if is_candidate(rel):
            paths.add(rel)
        else:
            rescan = True
    if not paths and not rescan:
        return None
    return TreeChange(frozenset(paths), rescan)


async def watch_tree(
    root: Path,
    *,
    stop: asyncio.Event,
    step_ms: int = 50,
    debounce_ms: int = 1600,
    root_poll: float = 0.5,
    settle: float = 1.0,
    quiet: float = 0.25,
) -> AsyncIterator[TreeChange]:
    """Yield batches of changes under ``root`` until ``stop`` is set."""
    log = events.get_logger()
    out: asyncio.Queue[TreeChange] = asyncio.Queue()
    settler = Settler(settle=settle, quiet=quiet, cap=debounce_ms / 1000)

    async def pump(target: str, done: asyncio.Event) -> None:
        def keep(_: Change, path: str) -> bool:
            return _relevant(os.path.relpath(path, target).replace(os.sep, "/"))

        try:
            async for batch in awatch(
                target,
                watch_filter=keep,
                stop_event=done,
                step=step_ms,
                debounce=debounce_ms,
                recursive=True,
            ):
                change = _classify(target, batch)
                if change is not None:
                    out.put_nowait(change)
        except (FileNotFoundError, RuntimeError) as exc:
            # The target vanished (an old git-sync revision being cleaned up);
            # the root poll moves us to the new one.
            log.warning("watch.target_lost", target=target, error=str(exc))

    target = os.path.realpath(root)
    done = asyncio.Event()
    pumping = asyncio.create_task(pump(target, done))
    stopping = asyncio.create_task(stop.wait())
    next_poll = time.monotonic() + root_poll
    try:
        while not stop.is_set():
            wake = min(next_poll, settler.deadline() or next_poll)
            getting = asyncio.create_task(out.get())
            await asyncio.wait(
                {getting, stopping},
                timeout=max(0.0, wake - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            getting.cancel()
            try:
                batch: TreeChange | None = await getting
            except asyncio.CancelledError:
                batch = None  # the queue keeps an item whose get was cancelled
            if batch is not None and (admitted := settler.admit(batch, time.monotonic())):
                yield admitted
            if (flushed := settler.flush(time.monotonic())) is not None:
                yield flushed
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + root_poll
            now = os.path.realpath(root)
            swapped = now != target
            if swapped or pumping.done():
                if swapped:
                    log.info("watch.root_swapped", old=target, new=now)
                done.set()
                await pumping
                target, done = now, asyncio.Event()
                pumping = asyncio.create_task(pump(target, done))
                if swapped:
                    yield TreeChange(frozenset(), rescan=True, settling=settler.holding)
    finally:
        done.set()
        stopping.cancel()
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
