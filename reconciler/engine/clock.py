"""The daemon's clock, handed in rather than read from a global.

Two readings, as the standard library has them: the wall clock (epoch
seconds), for what is recorded and compared with other hosts' stamps, and
the monotonic clock, for intervals (backoff, a rate cap's tokens, how long a
pass took), which never jumps. A :class:`Moment` is both, read together, so a
decision made of several steps sees one time. Tests hand in a clock they
advance themselves instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final


@dataclass(frozen=True, slots=True)
class Moment:
    """One reading of both clocks."""

    wall: datetime
    monotonic: float


@dataclass(frozen=True, slots=True)
class Clock:
    """Where the time comes from: the real clocks unless told otherwise."""

    #: Epoch seconds.
    wall: Callable[[], float] = time.time
    #: Seconds from an arbitrary start; never goes back.
    monotonic: Callable[[], float] = time.monotonic

    def now(self) -> Moment:
        return Moment(datetime.fromtimestamp(self.wall(), UTC), self.monotonic())

    def utcnow(self) -> datetime:
        """The wall clock as an aware UTC datetime."""
        return datetime.fromtimestamp(self.wall(), UTC)


#: The real clocks.
REAL_CLOCK: Final = Clock()
