"""The cyclic collector around bulk work on acyclic objects.

Tasks, records and the index are acyclic and long-lived, made by the hundred
thousand; the cyclic collector can free none of them, yet each of its full
passes walks them all (and, in the daemon, stops the event loop meanwhile).
Two tools, for every layer that builds them in bulk:

* :func:`gc_paused` holds the collector off while a bulk load runs (loading a
  tree, reading the store's rows): left on, it rescans the growing heap again
  and again and costs about as much as the load itself;
* :func:`settle` moves what is alive now out of its sight (``gc.freeze``)
  after a large load, so later passes walk only what was made since.

Reference counting still frees every object at once in both cases.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Final

__all__ = ["LARGE", "gc_paused", "settle"]

#: Objects made in one go above which :func:`settle` freezes the heap.
LARGE: Final = 2_000


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold the cyclic collector off for the duration (restored as it was)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle(changed: int) -> None:
    """After a load or plan of ``changed`` tasks, freeze the heap if that was large
    (at 100,000 tasks a full collection stood the daemon's loop still for 0.4 s)."""
    if changed > LARGE:
        gc.freeze()
