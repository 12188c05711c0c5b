"""Fault injection: each request's fate and added latency, drawn from a seeded RNG.

A request that reached a segment action gets one :class:`Fate`:

* ``ANSWER`` — applied and answered normally;
* ``ERROR`` — an injected ``InternalError`` (HTTP 500) decided *before*
  applying, so the task is untouched and a retry is safe;
* ``DROP_BEFORE`` / ``DROP_AFTER`` — the connection is closed without any
  answer, before or after applying. After (the default) is the nasty case: the
  change stands but the client cannot know it.

:func:`draw_fate` always consumes exactly two draws (drop, then error), so
turning one rate up or down does not shift the other's sequence, and a seed
reproduces the same fates for the same request order. :func:`draw_delay` adds
``latency_ms`` plus a uniform ``[0, jitter_ms)`` to every answer on ``/``.
Both are plain functions of the RNG and the settings; the server owns the RNG.
"""

from __future__ import annotations

import random
from enum import Enum

from reconciler.emulator.config import EmulatorConfig
from reconciler.emulator.errors import ApiFault

__all__ = ["Fate", "draw_delay", "draw_fate", "injected_error"]


class Fate(Enum):
    ANSWER = "answer"
    ERROR = "error"
    DROP_BEFORE = "before"
    DROP_AFTER = "after"

    @property
    def dropped(self) -> bool:
        return self in (Fate.DROP_BEFORE, Fate.DROP_AFTER)


def draw_fate(rng: random.Random, config: EmulatorConfig) -> Fate:
    """This request's fate under ``config``'s ``drop_rate``, ``drop_phase`` and ``error_rate``."""
    drop_roll, error_roll = rng.random(), rng.random()
    if drop_roll < config.drop_rate:
        return Fate.DROP_BEFORE if config.drop_phase == "before" else Fate.DROP_AFTER
    if error_roll < config.error_rate:
        return Fate.ERROR
    return Fate.ANSWER


def injected_error() -> ApiFault:
    """The 5xx an ``ERROR`` fate answers with."""
    return ApiFault(
        "InternalError",
        "The service encountered an internal error; the request was not applied.",
        status=500,
    )


def draw_delay(rng: random.Random, config: EmulatorConfig) -> float:
    """Seconds to wait before answering; no draw is taken without jitter."""
    delay = config.latency_ms
    if config.jitter_ms:
        delay += rng.uniform(0.0, config.jitter_ms)
    return delay / 1000
