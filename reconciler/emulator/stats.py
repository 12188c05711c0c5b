"""Request counters for tests and benches: :class:`EmulatorStats`.

Every request on ``/`` is counted once, after its fate is known, under its
action and outcome (``"ok"``, the error code it was answered with, or
``"Dropped"``), so a test can assert "60 reads answered, 15 throttled" and a
bench can read throughput without parsing logs. The admin API is not counted.

Requests whose signature checked out are also counted per access key and
wall-clock second (``by_key[ak][action]["<epoch second>"]``): tests tell
replicas apart by giving each its own key, and can then see which one made
calls in which second (two daemon replicas must never both call in one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from reconciler.emulator.params import JsonObject

__all__ = ["EmulatorStats"]


@dataclass
class EmulatorStats:
    """Counters for tests and benches.

    ``by_action[action][outcome]``: outcome is ``"ok"``, an error code
    (``"FlowLimitExceeded.QPSOverLimit"``, ``"InternalError"``, ...) or
    ``"Dropped"``. ``action`` is the request's Action as sent ("" if none).
    """

    total_requests: int = 0
    throttled: int = 0
    dropped: int = 0
    by_action: dict[str, Counter[str]] = field(default_factory=dict)
    by_key: dict[str, dict[str, Counter[int]]] = field(default_factory=dict)

    def record(self, action: str, outcome: str) -> None:
        self.by_action.setdefault(action, Counter())[outcome] += 1

    def record_key(self, access_key: str, action: str, at: float) -> None:
        """A signed request of ``access_key`` arrived at wall-clock time ``at``."""
        self.by_key.setdefault(access_key, {}).setdefault(action, Counter())[int(at)] += 1

    def count(self, action: str, outcome: str) -> int:
        return self.by_action.get(action, Counter())[outcome]

    def reset(self) -> None:
        self.total_requests = self.throttled = self.dropped = 0
        self.by_action = {}
        self.by_key = {}

    def snapshot(self) -> JsonObject:
        """A JSON-ready copy (what ``GET /_emulator/stats`` returns)."""
        return {
            "total_requests": self.total_requests,
            "throttled": self.throttled,
            "dropped": self.dropped,
            "by_action": {a: dict(c) for a, c in sorted(self.by_action.items())},
            "by_key": {
                ak: {a: {str(t): n for t, n in sorted(c.items())} for a, c in sorted(acts.items())}
                for ak, acts in sorted(self.by_key.items())
            },
        }
