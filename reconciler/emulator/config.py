"""What the emulator serves and how badly it behaves: :class:`EmulatorConfig`.

One mutable dataclass holds credentials, QPS limits and fault settings. It is
checked on construction and again by :func:`dataclasses.replace` (which runs
``__post_init__``), so a run-time change through the admin API either yields a
valid config or changes nothing. Secrets stay out of its ``repr``, and so out
of tracebacks and logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ACTIONS",
    "DEFAULT_QPS",
    "FAULT_FIELDS",
    "IDEMPOTENT_START_VERSIONS",
    "VERSIONS",
    "DropPhase",
    "EmulatorConfig",
]

VERSIONS: Final = frozenset({"2020-12-01", "2022-06-01", "2023-11-01"})
#: Action → the HTTP method it is served over.
ACTIONS: Final[Mapping[str, str]] = {
    "StartSegment": "POST",
    "UpdateSegment": "POST",
    "StopSegment": "POST",
    "GetSegmentTask": "GET",
}
DEFAULT_QPS: Final[Mapping[str, int]] = {
    "StartSegment": 60,
    "UpdateSegment": 150,
    "StopSegment": 150,
    "GetSegmentTask": 60,
}
#: Versions on which StartSegment of a running TaskId succeeds and changes nothing.
IDEMPOTENT_START_VERSIONS: Final = frozenset({"2023-11-01"})
#: The settings ``POST /_emulator/faults`` may change besides ``qps``.
FAULT_FIELDS: Final = ("latency_ms", "jitter_ms", "error_rate", "drop_rate", "drop_phase")

DropPhase = Literal["before", "after"]


@dataclass
class EmulatorConfig:
    """What the emulator accepts and how badly it behaves.

    ``qps`` maps an action to its limit over any one-second window (0 means
    unlimited; an action left out keeps its :data:`DEFAULT_QPS`).
    ``error_rate`` and ``drop_rate`` are fractions of segment-action requests.
    """

    credentials: dict[str, str]
    region: str = "cn-north-1"
    service: str = "rtc"
    qps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QPS))
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    drop_rate: float = 0.0
    drop_phase: str = "after"
    seed: int | None = None
    #: AK → the session token a temporary credential must present.
    session_tokens: dict[str, str] = field(default_factory=dict)
    #: The AppIds the account owns; any other answers
    #: ``InvalidParameter.NotExistAppId`` (``None``: every AppId exists).
    app_ids: frozenset[str] | None = None

    def __repr__(self) -> str:
        # Secret keys and tokens stay out of reprs (and so out of tracebacks).
        return (
            f"EmulatorConfig(access_keys={sorted(self.credentials)!r}, region={self.region!r}, "
            f"service={self.service!r}, qps={self.qps!r}, latency_ms={self.latency_ms}, "
            f"jitter_ms={self.jitter_ms}, error_rate={self.error_rate}, "
            f"drop_rate={self.drop_rate}, drop_phase={self.drop_phase!r}, seed={self.seed})"
        )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueError` for a setting the emulator cannot honour."""
        for name in ("error_rate", "drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        for name in ("latency_ms", "jitter_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.drop_phase not in ("before", "after"):
            raise ValueError(f"drop_phase must be 'before' or 'after', got {self.drop_phase!r}")
        for action, limit in self.qps.items():
            if action not in ACTIONS:
                raise ValueError(f"qps names unknown action {action!r}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"qps[{action!r}] must be a non-negative integer")
        unknown = set(self.session_tokens) - set(self.credentials)
        if unknown:
            raise ValueError(f"session tokens for unknown access keys: {sorted(unknown)}")

    def limit_for(self, action: str) -> int:
        """The QPS limit in force for ``action`` (0: unlimited)."""
        return self.qps.get(action, DEFAULT_QPS[action])
