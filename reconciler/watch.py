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

The watcher only says *what may have changed*; the daemon re-reads those files
and decides everything else from their content (level-based).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from watchfiles import Change, awatch

from reconciler import events
from reconciler.desired import is_candidate


@dataclass(frozen=True, slots=True)
class TreeChange:
    #: Candidate files (relative posix paths) added, modified or deleted.
    paths: frozenset[str]
    #: The file list itself may have changed: re-discover the tree.
    rescan: bool


def is_ignored_name(name: str) -> bool:
    """Names CONTRACT §1 ignores: hidden, and editor leftovers."""
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
) -> AsyncIterator[TreeChange]:
    """Yield batches of changes under ``root`` until ``stop`` is set."""
    log = events.get_logger()
    out: asyncio.Queue[TreeChange] = asyncio.Queue()

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
    try:
        while not stop.is_set():
            getting = asyncio.create_task(out.get())
            finished, _ = await asyncio.wait(
                {getting, stopping}, timeout=root_poll, return_when=asyncio.FIRST_COMPLETED
            )
            if getting in finished:
                yield getting.result()
                continue
            getting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getting
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
                    yield TreeChange(frozenset(), rescan=True)
    finally:
        done.set()
        stopping.cancel()
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
