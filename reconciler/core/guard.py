"""Guards against what a wrong or empty tree would do to the state store.

Forgetting a task makes no call, so nothing stops it by itself: point ``plan``
at ``desired/edu-live`` instead of ``desired``, or let a bad merge empty the
tree, and every task outside it is planned "forgotten". Its last-applied
record is deleted, so when it is declared again every managed field is sent
once more, and each ``Duration`` sent cuts a slice. Two pure checks catch
that; the shells decide what refusing means for them (``plan`` and ``apply``
exit 1, the daemon holds the records and carries on):

- :func:`check_root`: the store records the tree root it was applied from
  (:func:`tree_root`: absolute, symlinks unresolved, since git-sync swaps a
  symlinked root on every revision). A plan of another root is refused until
  the caller says the tree has moved.
- :func:`check_forgets`: a plan that forgets more than
  :meth:`ForgetLimit.allowed` of the known tasks is refused, in the spirit of
  Argo CD refusing an automated sync that would prune everything. Forgetting
  up to :data:`FORGET_FLOOR` tasks at once is always allowed, so removing one
  file from a small tree (one task of three is a third) needs no flag.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from reconciler.core.plan import Plan

#: The share of known tasks one plan may forget unless told otherwise.
DEFAULT_MAX_FORGET: Final = 0.10
#: Forgetting at most this many tasks at once is never a mass forget.
FORGET_FLOOR: Final = 5

_LIMIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*")


def parse_share(text: str) -> float:
    """``"10%"`` or ``"0.1"`` → ``0.1``; a :class:`ValueError` says what to write instead.

    The one parser of a share of the known tasks: ``--max-forget`` here,
    ``--max-change`` in :mod:`reconciler.core.rollout`.
    """
    match = _LIMIT.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a percentage such as 10% or a fraction such as 0.1")
    number, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        if number > 100:
            raise ValueError(f"{text!r} is more than 100%")
        return number / 100
    if number > 1:
        raise ValueError(f"{text!r} is more than 1: write {match.group(1)}% for a percentage")
    return number


#: The name ``--max-forget`` was parsed by first.
parse_max_forget = parse_share


def allowed_at_once(fraction: float, floor: int, known: int) -> int:
    """The most of ``known`` tasks one plan may touch: a share, never below ``floor``."""
    # The epsilon keeps 10% of 50 at 5, not 4, despite 0.1 * 50 in floats.
    return max(floor, math.floor(fraction * known + 1e-9))


def format_fraction(fraction: float) -> str:
    """``0.1`` → ``"10%"``."""
    return f"{fraction * 100:g}%"


@dataclass(frozen=True, slots=True)
class ForgetLimit:
    """How many known tasks one plan may forget: a share, never below a floor."""

    fraction: float = DEFAULT_MAX_FORGET
    floor: int = FORGET_FLOOR

    def allowed(self, known: int) -> int:
        """The most tasks of ``known`` that one plan may forget."""
        return allowed_at_once(self.fraction, self.floor, known)

    def __str__(self) -> str:
        return format_fraction(self.fraction)


@dataclass(frozen=True, slots=True)
class MassForget:
    """A plan refused because it forgets too many of the known tasks."""

    forget: int
    known: int
    limit: ForgetLimit

    @property
    def allowed(self) -> int:
        return self.limit.allowed(self.known)

    def __str__(self) -> str:
        share = 100 * self.forget / self.known
        return (
            f"refusing to forget {self.forget} of {self.known} known tasks ({share:.0f}%): "
            f"more than --max-forget {self.limit} allows ({self.allowed} at once)"
        )


def check_forgets(plan: Plan, *, known: int, limit: ForgetLimit) -> MassForget | None:
    """A :class:`MassForget` if ``plan`` forgets more than ``limit`` allows of ``known``."""
    forget = len(plan.forgotten)
    if forget <= limit.allowed(known):
        return None
    return MassForget(forget=forget, known=max(known, forget), limit=limit)


def tree_root(directory: Path) -> str:
    """The root as recorded: absolute (against the current folder), symlinks kept.

    ``os.path.abspath`` only joins and normalises text, so ``desired``,
    ``./desired`` and ``/srv/x/desired`` name one root, while a git-sync link
    stays the link whichever revision it points at today.
    """
    return os.path.abspath(directory)


@dataclass(frozen=True, slots=True)
class RootMismatch:
    """The store was applied from another tree root than the one given."""

    store: str
    recorded: str
    root: str

    def __str__(self) -> str:
        return (
            f"state store {self.store} was applied from the tree {self.recorded}, not "
            f"{self.root}: planning this tree against it would forget every task declared "
            f"outside it. Give the recorded tree, or another --state for this tree, or "
            f"--allow-root-change if the tree has moved for good"
        )


def check_root(recorded: str | None, root: str, *, store: str) -> RootMismatch | None:
    """A :class:`RootMismatch` when a recorded root differs from ``root``; none recorded is fine."""
    if recorded is None or recorded == root:
        return None
    return RootMismatch(store=store, recorded=recorded, root=root)
