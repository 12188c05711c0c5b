"""A local stand-in for the RTC audio-segment OpenAPI, for tests, demos and benches.

It serves StartSegment, UpdateSegment, StopSegment and GetSegmentTask the way
the API's documentation describes them, so the client and the
daemon can be exercised end to end without the real service.

Design: a functional core and an imperative shell, one job per module.

* :mod:`.errors` — :class:`ApiFault`, a refusal with its code, message and HTTP status.
* :mod:`.config` — :class:`EmulatorConfig`, the actions, versions and QPS defaults.
* :mod:`.auth` — the V4 signature check, a pure function of the request.
* :mod:`.params` — validation and normalisation of request bodies.
* :mod:`.qps` — :class:`SlidingWindowLimiter`, admission over any one-second window.
* :mod:`.faults` — each request's fate (answer, 5xx, drop) and latency, from a seeded RNG.
* :mod:`.tasks` — :class:`TaskTable`, the tasks and the server's rules for them:
  incarnations, ended tasks that stay readable, the 72 h read window, and what
  the service or another client does to a task on its own.
* :mod:`.stats` — :class:`EmulatorStats`, request counters by action and outcome.
* :mod:`.server` — :class:`Emulator`, the aiohttp application wiring all of the above.
* :mod:`.admin` — the unsigned, loopback-only admin API under ``/_emulator/``.
* :mod:`.runner` — :func:`running_emulator` (a thread, for tests) and :func:`serve`.

Everything importers use is re-exported here, so ``from reconciler.emulator
import ...`` needs no knowledge of the layout.
"""

from reconciler.emulator.auth import (
    CLOCK_SKEW,
    Authorization,
    parse_authorization,
    verify_signature,
)
from reconciler.emulator.config import ACTIONS, DEFAULT_QPS, VERSIONS, EmulatorConfig
from reconciler.emulator.errors import ApiFault
from reconciler.emulator.params import (
    DURATION_DEFAULT,
    MAX_IDLE_DEFAULT,
    StartParams,
    UpdateParams,
    normalise_duration,
    normalise_max_idle_time,
    parse_body,
    parse_key,
    parse_start,
    parse_update,
)
from reconciler.emulator.qps import SlidingWindowLimiter
from reconciler.emulator.runner import EmulatorHandle, running_emulator, serve
from reconciler.emulator.server import Emulator
from reconciler.emulator.stats import EmulatorStats
from reconciler.emulator.tasks import (
    LAST_BODIES,
    READ_WINDOW_MS,
    STOP_REASONS,
    LiveTask,
    TaskNotRunningError,
    TaskTable,
    UnknownTaskError,
)

__all__ = [
    "ACTIONS",
    "CLOCK_SKEW",
    "DEFAULT_QPS",
    "DURATION_DEFAULT",
    "LAST_BODIES",
    "MAX_IDLE_DEFAULT",
    "READ_WINDOW_MS",
    "STOP_REASONS",
    "VERSIONS",
    "ApiFault",
    "Authorization",
    "Emulator",
    "EmulatorConfig",
    "EmulatorHandle",
    "EmulatorStats",
    "LiveTask",
    "SlidingWindowLimiter",
    "StartParams",
    "TaskNotRunningError",
    "TaskTable",
    "UnknownTaskError",
    "UpdateParams",
    "normalise_duration",
    "normalise_max_idle_time",
    "parse_authorization",
    "parse_body",
    "parse_key",
    "parse_start",
    "parse_update",
    "running_emulator",
    "serve",
    "verify_signature",
]
