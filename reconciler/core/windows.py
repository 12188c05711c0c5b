"""Sync windows: when a task's calls may go out, in Argo CD's model.

A window is a cron schedule (five fields, when it *opens*), a duration (how
long it stays open), an IANA time zone, and optional globs on the task's
``AppId`` (``apps``) and on the path of the desired file declaring it
(``paths``). A window with neither matches every task; with both, a task must
match both. The rules, for the windows matching a task:

- an open **deny** window holds the call, whatever else is open;
- if any **allow** window matches, the call goes only while one is open;
- otherwise the call goes.

Heals (a restarted task's missing fields, drift set back) are not gated by a
window unless it says ``heals: deny``: a restarted task running with
StartSegment's random ``Identifier`` writes its slices under the wrong name,
which is worse than one cut slice.

Everything here is pure: :func:`load_windows` parses a file's text into
:class:`SyncWindows` (a :class:`WindowConfigError` names ``file:line`` and
what is wrong), and :meth:`SyncWindows.verdict` decides for one task at a
given instant, so the planner's shells pass ``now`` in and tests need no clock.
A held call's verdict says when it may go next (:attr:`WindowVerdict.until`),
found by stepping through the windows' opening and closing times.

Schedules are read by ``cronsim`` (Debian cron semantics, daylight-saving
gaps and repeats handled for schedules at fixed times); times are aware
datetimes, durations are absolute (a 9 h window across a DST change lasts 9 h).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cronsim import CronSim, CronSimError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

WindowKind = Literal["allow", "deny"]

_KEYS: Final = ("name", "kind", "schedule", "duration", "timezone", "apps", "paths", "heals")
_REQUIRED: Final = ("kind", "schedule", "duration")
_DURATION: Final = re.compile(r"(\d+)([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: How far ahead :meth:`SyncWindows.verdict` looks for the next time a call may go.
HORIZON: Final = timedelta(days=400)
#: The longest a window may stay open (a year and a day: a freeze, never forever).
MAX_DURATION: Final = timedelta(days=366)
_STR: Final = "tag:yaml.org,2002:str"


class WindowConfigError(ValueError):
    """A sync-windows file that cannot be used; ``str()`` is ``file:line: what is wrong``."""

    def __init__(self, path: str, line: int, message: str) -> None:
        # Line 0: about the file as a whole (it cannot be read, say): no line to name.
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class SyncWindow:
    kind: WindowKind
    schedule: str
    duration: timedelta
    timezone: str = "UTC"
    apps: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    #: ``"deny"``: heals are gated by this window too; ``"allow"``: they are not.
    heals: WindowKind = "allow"
    name: str | None = None
    #: Where it was declared, ``file:line``.
    source: str = ""

    @property
    def label(self) -> str:
        """How messages name it: its ``name``, else ``kind "schedule" duration``."""
        if self.name:
            return self.name
        return f'{self.kind} "{self.schedule}" {_duration_text(self.duration)}'

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)

    def matches(self, *, app_id: str, path: str | None) -> bool:
        if self.apps and not any(fnmatch.fnmatchcase(app_id, g) for g in self.apps):
            return False
        if not self.paths:
            return True
        return path is not None and any(_glob(g).fullmatch(path) for g in self.paths)

    def gates(self, *, heal: bool) -> bool:
        """Whether this window decides for a call of this kind."""
        return not heal or self.heals == "deny"

    def opened_at(self, now: datetime) -> datetime | None:
        """The start of the occurrence open at ``now`` (UTC), if one is."""
        start = _last_start(self.schedule, self.timezone, _second(now))
        if start is not None and start <= now < start + self.duration:
            return start
        return None

    def next_start(self, after: datetime) -> datetime | None:
        """The first opening strictly after ``after`` (UTC), within :data:`HORIZON`."""
        return _next_start(self.schedule, self.timezone, _second(after))

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "schedule": self.schedule,
            "duration": _duration_text(self.duration),
            "timezone": self.timezone,
            "apps": list(self.apps),
            "paths": list(self.paths),
            "heals": self.heals,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class WindowVerdict:
    """May a call go now? If not, which windows hold it and when it may go."""

    allowed: bool
    #: Deny windows open now, or (no deny open) the allow windows, none open.
    holding: tuple[SyncWindow, ...] = ()
    #: When the call may go next (UTC); ``None`` if allowed, or not within the horizon.
    until: datetime | None = None

    def describe(self) -> str:
        """``deny window 'freeze' is open (closes 18:00 Asia/Shanghai)`` and the like."""
        if self.allowed:
            return "no window holds it"
        denies = [w for w in self.holding if w.kind == "deny"]
        if denies:
            what = ", ".join(f"deny window '{w.label}'" for w in denies)
            verb = "is open" if len(denies) == 1 else "are open"
        else:
            what = ", ".join(f"allow window '{w.label}'" for w in self.holding)
            verb = "is closed" if len(self.holding) == 1 else "are closed"
        when = "; no opening within 400 days"
        if self.until is not None:
            zone = self.holding[0].zone if self.holding else None
            when = f"; may go at {local_text(self.until, zone)}"
        return f"{what} {verb}{when}"


@dataclass(frozen=True, slots=True)
class SyncWindows:
    windows: tuple[SyncWindow, ...] = ()
    #: The file they came from, for messages.
    path: str | None = None

    def __bool__(self) -> bool:
        return bool(self.windows)

    def matching(self, *, app_id: str, path: str | None) -> tuple[SyncWindow, ...]:
        return tuple(w for w in self.windows if w.matches(app_id=app_id, path=path))

    def verdict(self, *, app_id: str, path: str | None, heal: bool, now: datetime) -> WindowVerdict:
        """Whether a call for this task (a heal or a change) may go at ``now`` (aware)."""
        if not self.windows:
            return WindowVerdict(True)
        now = now.astimezone(UTC)
        mine = self.matching(app_id=app_id, path=path)
        gating = tuple(w for w in mine if w.gates(heal=heal))
        holding = _holding(gating, now)
        if not holding:
            return WindowVerdict(True)
        return WindowVerdict(False, holding, _next_allowed(gating, _second(now)))


def _holding(gating: Sequence[SyncWindow], now: datetime) -> tuple[SyncWindow, ...]:
    denies = tuple(w for w in gating if w.kind == "deny" and w.opened_at(now) is not None)
    if denies:
        return denies
    allows = tuple(w for w in gating if w.kind == "allow")
    if allows and not any(w.opened_at(now) is not None for w in allows):
        return allows
    return ()


@lru_cache(maxsize=1024)
def _next_allowed(gating: tuple[SyncWindow, ...], now: datetime) -> datetime | None:
    """The first instant after ``now`` at which no window holds the call.

    Bounded by :data:`HORIZON` in time, not in steps: while an allow window
    must open, it jumps to the next opening; while deny windows are open, past
    the end of the longest open run (occurrences that overlap or touch are one
    run, found by :func:`_run_end` without visiting each occurrence). Cached,
    since the tasks a window set gates share the answer within one second.
    """
    end = now + HORIZON
    denies = [w for w in gating if w.kind == "deny"]
    allows = [w for w in gating if w.kind == "allow"]
    t = now
    while t <= end:
        if allows and not any(w.opened_at(t) is not None for w in allows):
            starts = [s for w in allows if (s := w.next_start(t)) is not None]
            if not starts:
                return None
            t = min(starts)
            continue
        open_denies = [w for w in denies if w.opened_at(t) is not None]
        if not open_denies:
            if t > now:
                return t
            t += timedelta(seconds=1)  # held within this (floored) second
            continue
        t = max(_run_end(w, t, end) for w in open_denies)
    return None


def _run_end(w: SyncWindow, t: datetime, end: datetime) -> datetime:
    """When ``w``, open at ``t``, next closes: the end of its run of overlapping occurrences.

    The run is followed on :func:`_coarse`'s schedule (an hour of every-minute
    openings is one opening of an hour), a step per coarse opening, each checked
    to be open by the real schedule; the last coarse stretch is then walked on
    the real schedule, so that daylight-saving days (where the coarse schedule
    can be off by the hour) end where the real one does.
    """
    opened = w.opened_at(t)
    assert opened is not None
    coarse, span = _coarse(w.schedule, w.duration)
    last, close = opened, opened + w.duration
    while close <= end:
        start = _last_start(coarse, w.timezone, _second(close))
        if start is None or start + span <= close or w.opened_at(start) is None:
            break
        last, close = start, start + span
    occurrence = w.opened_at(last)
    exact = (occurrence or last) + w.duration
    found = CronSim(w.schedule, last.astimezone(w.zone))
    while True:
        start = next(found, None)
        if start is None:
            return exact
        start = start.astimezone(UTC)
        if start > exact or start > close:
            return exact
        exact = max(exact, start + w.duration)


@lru_cache(maxsize=256)
def _coarse(schedule: str, duration: timedelta) -> tuple[str, timedelta]:
    """A schedule and duration open when ``schedule``'s are, with fewer openings.

    Openings within an hour whose gaps the duration covers are one opening at
    the hour's first minute (``* 9-17 * * *`` for 1m: ``0 9-17 * * *`` for
    1h); so are an opening a day's hours whose gaps the new duration covers
    (that, ``0 9 * * *`` for 9h).
    """
    fields = schedule.split()
    sim = CronSim(schedule, datetime(2026, 1, 1, tzinfo=UTC))
    minutes, hours = sorted(sim.minutes), sorted(sim.hours)
    span = duration
    if len(minutes) > 1:
        if max(b - a for a, b in pairwise(minutes)) * 60 > span.total_seconds():
            return schedule, duration
        span += timedelta(minutes=minutes[-1] - minutes[0])
        fields[0] = str(minutes[0])
    if len(hours) > 1 and (max(b - a for a, b in pairwise(hours)) * 3600 <= span.total_seconds()):
        span += timedelta(hours=hours[-1] - hours[0])
        fields[1] = str(hours[0])
    return " ".join(fields), span


# --- time helpers ---------------------------------------------------------------------


def _second(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(microsecond=0)


@lru_cache(maxsize=4096)
def _last_start(schedule: str, timezone: str, at: datetime) -> datetime | None:
    """The latest opening at or before ``at`` (a whole UTC second)."""
    local = (at + timedelta(seconds=1)).astimezone(_zone(timezone))
    try:
        found = next(CronSim(schedule, local, reverse=True))
    except StopIteration:
        return None
    start = found.astimezone(UTC)
    return start if at - start <= HORIZON else None


@lru_cache(maxsize=4096)
def _next_start(schedule: str, timezone: str, after: datetime) -> datetime | None:
    local = after.astimezone(_zone(timezone))
    try:
        found = next(CronSim(schedule, local))
    except StopIteration:
        return None
    start = found.astimezone(UTC)
    return start if start - after <= HORIZON else None


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """A path glob: ``*`` and ``?`` within one path segment, ``**`` across segments."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def local_text(t: datetime, zone: ZoneInfo | None) -> str:
    """``2026-12-01 18:00 Asia/Shanghai`` (minutes; seconds when they are not 0)."""
    local = t.astimezone(zone or UTC)
    fmt = "%Y-%m-%d %H:%M" if local.second == 0 else "%Y-%m-%d %H:%M:%S"
    return f"{local.strftime(fmt)} {zone.key if zone is not None else 'UTC'}"


def _duration_text(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_duration(text: str) -> timedelta:
    """``9h``, ``90m``, ``1h30m``, ``45s``, ``2d`` → a timedelta; :class:`ValueError` if not."""
    spec = text.strip()
    parts = _DURATION.findall(spec)
    if not spec or "".join(n + u for n, u in parts) != spec:
        raise ValueError(
            f"duration {text!r} is not a number of s, m, h or d (such as 9h, 90m or 1h30m)"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than 0")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"duration {text!r} is longer than {_duration_text(MAX_DURATION)}")
    return timedelta(seconds=seconds)


# --- loading ----------------------------------------------------------------------------


def load_windows_file(path: Path) -> SyncWindows:
    """Read and check a sync-windows file; :class:`WindowConfigError` names what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WindowConfigError(str(path), 0, f"cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise WindowConfigError(str(path), 0, "is not UTF-8 text") from exc
    return load_windows(text, path=str(path))


def load_windows(text: str, *, path: str) -> SyncWindows:
    """Parse a sync-windows document (``windows: [...]``); an empty file has none."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise WindowConfigError(path, line, f"not valid YAML: {exc.problem}") from exc
    if root is None:
        return SyncWindows((), path=path)
    if not isinstance(root, MappingNode):
        raise WindowConfigError(path, _line(root), "the file must be a mapping with 'windows:'")
    windows: list[SyncWindow] = []
    for key, value in root.value:
        name = _text(path, key, "a key")
        if name != "windows":
            raise WindowConfigError(
                path, _line(key), f"unknown key {name!r}: the file holds 'windows:' only"
            )
        if isinstance(value, ScalarNode) and value.tag == "tag:yaml.org,2002:null":
            continue
        if not isinstance(value, SequenceNode):
            raise WindowConfigError(path, _line(value), "'windows' must be a list of windows")
        windows.extend(_window(path, node) for node in value.value)
    return SyncWindows(tuple(windows), path=path)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _text(path: str, node: Node, what: str) -> str:
    if not isinstance(node, ScalarNode) or node.tag != _STR or not node.value.strip():
        raise WindowConfigError(path, _line(node), f"{what} must be a non-empty string")
    return str(node.value)


def _globs(path: str, node: Node, key: str) -> tuple[str, ...]:
    if isinstance(node, ScalarNode) and node.tag == _STR:
        return (_text(path, node, f"'{key}'"),)
    if not isinstance(node, SequenceNode) or not node.value:
        raise WindowConfigError(path, _line(node), f"'{key}' must be a non-empty list of globs")
    return tuple(_text(path, item, f"each of '{key}'") for item in node.value)


def _choice(path: str, node: Node, key: str, allowed: Iterable[str]) -> str:
    options = tuple(allowed)
    value = _text(path, node, f"'{key}'")
    if value not in options:
        raise WindowConfigError(
            path, _line(node), f"'{key}' is {value!r}; it must be {' or '.join(options)}"
        )
    return value


def _window(path: str, node: Node) -> SyncWindow:
    if not isinstance(node, MappingNode):
        raise WindowConfigError(path, _line(node), "each window must be a mapping")
    seen: dict[str, Node] = {}
    for key, value in node.value:
        name = _text(path, key, "a key")
        if name not in _KEYS:
            close = _closest(name)
            hint = f" — did you mean {close!r}?" if close else f"; keys: {', '.join(_KEYS)}"
            raise WindowConfigError(path, _line(key), f"unknown key {name!r}{hint}")
        if name in seen:
            raise WindowConfigError(path, _line(key), f"{name!r} is given twice")
        seen[name] = value
    for name in _REQUIRED:
        if name not in seen:
            raise WindowConfigError(path, _line(node), f"the window has no {name!r}")
    where = f"{path}:{_line(node)}"
    kind = _choice(path, seen["kind"], "kind", ("allow", "deny"))
    schedule = _text(path, seen["schedule"], "'schedule'").strip()
    if len(schedule.split()) != 5:
        raise WindowConfigError(
            path,
            _line(seen["schedule"]),
            f"schedule {schedule!r} must be a 5-field cron expression "
            "(minute hour day-of-month month day-of-week), such as '0 9 * * 1-5'",
        )
    try:
        CronSim(schedule, datetime(2026, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError) as exc:
        raise WindowConfigError(
            path, _line(seen["schedule"]), f"schedule {schedule!r} is not a valid cron: {exc}"
        ) from exc
    try:
        duration = parse_duration(_text(path, seen["duration"], "'duration'"))
    except ValueError as exc:
        raise WindowConfigError(path, _line(seen["duration"]), str(exc)) from exc
    timezone = "UTC"
    if "timezone" in seen:
        timezone = _text(path, seen["timezone"], "'timezone'").strip()
        try:
            _zone(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise WindowConfigError(
                path,
                _line(seen["timezone"]),
                f"timezone {timezone!r} is not an IANA time zone name (such as Asia/Shanghai)",
            ) from exc
    return SyncWindow(
        kind="allow" if kind == "allow" else "deny",
        schedule=schedule,
        duration=duration,
        timezone=timezone,
        apps=_globs(path, seen["apps"], "apps") if "apps" in seen else (),
        paths=_globs(path, seen["paths"], "paths") if "paths" in seen else (),
        heals="deny"
        if "heals" in seen and _choice(path, seen["heals"], "heals", ("allow", "deny")) == "deny"
        else "allow",
        name=_text(path, seen["name"], "'name'") if "name" in seen else None,
        source=where,
    )


def _closest(name: str) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, _KEYS, n=1, cutoff=0.6)
    return found[0] if found else None


#: No windows: every call may go.
NO_WINDOWS: Final = SyncWindows()

__all__ = [
    "NO_WINDOWS",
    "SyncWindow",
    "SyncWindows",
    "WindowConfigError",
    "WindowVerdict",
    "load_windows",
    "load_windows_file",
    "local_text",
    "parse_duration",
]
