"""Console lines for people: the terminal rendering of events.

JSON lines are for machines and keep every field. In a terminal a person
wants one short line per thing that happened, above all one line per task
outcome, with ``old → new`` for what changed::

    20:06:31 ✓ synced 661e4a7b9c0d1e2f/hall-b-0902/asr-segment  Duration 60 → 90
    20:06:31 ✗ failed 661e4a7b9c0d1e2f/hall-c-0904/asr-segment  InvalidParameter: ...
    20:06:32 info  desired.changed  1 file changed, 1 task to re-plan

Per-call and per-attempt detail that a task line already says
(:data:`DETAIL_EVENTS`: ``call.succeeded`` next to ``task.synced``,
``call.failed``, ``task.queued`` ...) is left out unless the level is
``debug`` (:func:`drop_detail`). Lifecycle events have a sentence of
their own; any other event is its name and ``key=value`` pairs, values as
compact JSON (never a Python ``repr``). The important part comes first (the
task and what changed); a line longer than the terminal is wide is wrapped at
word boundaries, continuation lines indented under the mark, so nothing is cut
off at 80 columns and no line is broken mid-word by the terminal.

Rendering is a pure function of the event (and the width and colour given),
so it is tested without a terminal. What an event carries is escaped
(:func:`~reconciler.core.printable.printable`): a newline or an ANSI escape in a
file name, an id or a message cannot forge a line or restyle the terminal.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import Any, Final

import click
import structlog

from reconciler.core.printable import printable

#: Shown only at ``--log-level debug`` in a terminal; always kept in JSON.
#: ``call.failed``/``call.retried`` are followed by the task's own line (or, for
#: credentials and an unreachable endpoint, by the run's error or ``daemon.paused``).
DETAIL_EVENTS: Final = frozenset(
    {
        "call.sending",
        "call.succeeded",
        "call.retried",
        "call.failed",
        "task.queued",
        "task.requeued",
    }
)

_TASK_KEYS: Final = ("app_id", "room_id", "task_id")
_IDENTITY: Final = frozenset({"AppId", "RoomId", "TaskId", "BusinessId"})
_LEVEL_STYLE: Final = {
    "debug": ("debug", "blue"),
    "info": ("info ", "green"),
    "warning": ("warn ", "yellow"),
    "error": ("error", "red"),
    "critical": ("crit ", "red"),
}
#: Fields that say nothing to a person reading a console line.
_QUIET_FIELDS: Final = frozenset({"timestamp", "level", "event"})
#: A call this slow gets its latency on the task line.
_SLOW_MS: Final = 1000.0


def drop_detail(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: leave out :data:`DETAIL_EVENTS` (console, below debug)."""
    if event.get("event") in DETAIL_EVENTS:
        raise structlog.DropEvent
    return event


def value(v: object) -> str:
    """A value as a config file would spell it: JSON, strings quoted, true/false."""
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)


def _bare(v: object) -> str:
    """A value in ``key=value``: plain when it is one word, JSON otherwise."""
    if isinstance(v, str) and v and not any(c.isspace() or c in '"=' for c in v):
        return v
    return value(v)


def task_key(event: Mapping[str, Any]) -> str | None:
    parts = [event.get(k) for k in _TASK_KEYS]
    return "/".join(map(str, parts)) if all(p is not None for p in parts) else None


def _sent(event: Mapping[str, Any]) -> str:
    """What a task line says was set: ``old → new`` per change, else ``Field=value``."""
    changes = event.get("changes")
    if isinstance(changes, Mapping) and changes:
        parts = []
        for name, change in changes.items():
            old, new = change.get("old"), change.get("new")
            parts.append(
                f"{name}={value(new)}" if old is None else f"{name} {value(old)} → {value(new)}"
            )
        return " ".join(parts) if all("=" in p for p in parts) else ", ".join(parts)
    fields = event.get("fields")
    if isinstance(fields, Mapping):
        return " ".join(f"{k}={value(v)}" for k, v in fields.items() if k not in _IDENTITY)
    return ""


def _problem(event: Mapping[str, Any]) -> str:
    code, message = event.get("code"), event.get("message") or event.get("error") or ""
    return f"{code}: {message}" if code else str(message)


def _latency(event: Mapping[str, Any]) -> str:
    ms = event.get("latency_ms")
    return f" ({ms / 1000:.1f} s)" if isinstance(ms, int | float) and ms >= _SLOW_MS else ""


def _plural(n: object, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _extras(event: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """``, 3 held, 1 blocked`` for the non-zero counts among ``names``."""
    found = [f"{event[n]} {n.replace('_', ' ')}" for n in names if event.get(n)]
    return ", " + ", ".join(found) if found else ""


# --- one line per task outcome -------------------------------------------------------

_OUTCOMES: Final[dict[str, tuple[str, str, Callable[[Mapping[str, Any]], str]]]] = {
    "task.synced": ("✓ synced", "green", lambda e: _sent(e) + _latency(e)),
    "task.not_running": (
        "– not running",
        "magenta",
        lambda e: (
            (
                f"ended: {e.get('stop_reason')}; no call until it runs again"
                if e.get("stop_reason")
                else "no longer found; no call until it runs again"
            )
            if e.get("source") == "observation"
            else "the task is not running; tried again later"
        ),
    ),
    "task.failed": (
        "✗ failed",
        "red",
        lambda e: (
            _problem(e)
            + ("; blocked until its spec changes" if e.get("terminal") else "; tried again later")
        ),
    ),
    "task.error": (
        "✗ error",
        "red",
        lambda e: f"{e.get('error')}; tried again in {e.get('retry_in_s')} s",
    ),
    "task.released": (
        "- released",
        "cyan",
        lambda e: "no longer managed: " + ", ".join(map(str, e.get("fields") or [])),
    ),
    "task.forgotten": (
        "- forgotten",
        "cyan",
        lambda e: f"removed from the tree ({e.get('source_path') or 'unknown file'}); no call",
    ),
    "task.restarted": (
        "↻ restarted",
        "magenta",
        lambda e: (
            "a new incarnation is running with "
            + " ".join(f"{k}={value(v)}" for k, v in (e.get("live") or {}).items())
        ),
    ),
    "task.drifted": (
        "≠ drifted",
        "magenta",
        lambda e: (
            ", ".join(
                f"{n} {value(c.get('last_applied'))} → {value(c.get('live'))}"
                for n, c in (e.get("fields") or {}).items()
            )
            + " by another client"
            + ("; setting it back" if e.get("policy") == "heal" else "; reported, left as it is")
        ),
    ),
    "task.requeued": (
        "↻ requeued",
        "blue",
        lambda e: f"{e.get('outcome')}: tried again in {e.get('after_s')} s",
    ),
    "task.waiting": ("⏸ waiting", "yellow", lambda e: str(e.get("message") or e.get("reason"))),
    "window.overridden": (
        "! override",
        "yellow",
        lambda e: "sent inside " + ", ".join(map(str, e.get("windows") or [])),
    ),
}

# --- sentences for lifecycle events ----------------------------------------------------

_SENTENCES: Final[dict[str, Callable[[Mapping[str, Any]], str]]] = {
    "daemon.started": lambda e: (
        f"{e.get('root')} → {e.get('endpoint')} ≤{e.get('qps')}/s, "
        f"health {e.get('health')}, state {e.get('state')}"
    ),
    "emulator.embedded": lambda e: (
        f"emulator on {e.get('url')} with {_plural(e.get('running_tasks'), 'task')} running"
        + (f", {e['matching_tree']} with the tree's values" if e.get("matching_tree") else "")
    ),
    "desired.loaded": lambda e: (
        f"{e.get('root')}: {_plural(e.get('tasks'), 'task')} in {_plural(e.get('files'), 'file')}"
        + _extras(e, ("invalid_files", "problems"))
    ),
    "plan.computed": lambda e: (
        f"{_plural(e.get('to_update'), 'call')} to make, {e.get('in_sync')} in sync"
        + _extras(e, ("held", "blocked", "fields_released", "tasks_forgotten", "warnings"))
    ),
    "observe.started": lambda e: (
        f"reading {_plural(e.get('tasks'), 'live task')}, each every {e.get('sweep_s')} s "
        f"({e.get('read_qps')} reads/s); drift: {e.get('drift')}"
        + (f" — {e['message']}" if e.get("message") else "")
    ),
    "observe.swept": lambda e: (
        f"a sweep: {_plural(e.get('reads'), 'read')} of {_plural(e.get('tasks'), 'live task')} "
        f"in {e.get('seconds')} s"
        + _extras(e, ("running", "ended", "not_found", "unknown", "failed"))
    ),
    "reconcile.started": lambda e: (
        f"{e.get('reason')}: {_plural(e.get('calls'), 'call')} to make"
        + (f", {e['unread']} to read first (first contact)" if e.get("unread") else "")
        + _extras(e, ("in_sync", "held", "blocked", "fields_released", "tasks_forgotten"))
    ),
    "reconcile.completed": lambda e: (
        f"every task handled in {e.get('seconds')} s: {_plural(e.get('desired_tasks'), 'task')}"
        + (
            f", {e['already_matching']} of {e['read_first']} read first already matched live"
            if e.get("read_first")
            else ""
        )
        + _extras(e, ("invalid_files",))
    ),
    "desired.changed": lambda e: (
        f"{_plural(e.get('files'), 'file')} changed, {_plural(e.get('tasks'), 'task')} to re-plan"
        + (" (rescanned)" if e.get("rescan") else "")
    ),
    "plan.mass_change_refused": lambda e: _mass_change(e, "refused: nothing is changed"),
    "plan.mass_change_held": lambda e: _mass_change(e, "held: heals and first syncs still go"),
    "plan.mass_change_cleared": lambda e: (
        f"{_plural(e.get('changes'), 'change')} pending, within --max-change: sending them"
    ),
    "rollout.started": lambda e: (
        f"{_plural(e.get('changes'), 'change')}; canaries first: {_keys(e.get('canaries'))}"
    ),
    "rollout.promoted": lambda e: (
        f"canaries {_keys(e.get('canaries'))} confirmed: sending "
        f"{_plural(e.get('changes'), 'more change')}"
    ),
    "rollout.completed": lambda e: "every change of the rollout is made",
    "rollout.cleared": lambda e: "the rollout ended: its changes are gone or changed again",
    "rollout.canary_failed": lambda e: (
        f"{e.get('reason')}; the rest of the rollout is held"
        + (f" ({_plural(e['held'], 'change')})" if e.get("held") else "")
        + " until the spec changes"
    ),
    "notify.sent": lambda e: f"{_plural(e.get('notices'), 'notice')} delivered to {e.get('url')}",
    "notify.retried": lambda e: (
        f"{e.get('url')} answered {e.get('status') or e.get('error')}; "
        f"retrying in {e.get('delay_s')} s (attempt {e.get('attempt')})"
    ),
    "notify.failed": lambda e: (
        f"{e.get('url')}: {_plural(e.get('notices'), 'notice')} not delivered after "
        f"{_plural(e.get('attempt'), 'attempt')} ({e.get('status') or e.get('error')})"
    ),
    "notify.dropped": lambda e: (
        f"{e.get('url')}: {_plural(e.get('notices'), 'notice')} dropped ({e.get('reason')})"
    ),
    "leader.elected": lambda e: (
        f"{e.get('holder')} leads (epoch {e.get('epoch')})"
        + (f", after {e['previous']}" if e.get("previous") else "")
    ),
    "leader.standby": lambda e: str(e.get("message") or f"standby; {e.get('leader')} leads"),
    "leader.lost": lambda e: f"{e.get('holder')} no longer leads: {e.get('why')}; calls stopped",
    "leader.lapsed": lambda e: (
        f"{e.get('holder')} holds its calls: {e.get('why')}; until a keepalive renews the lease"
    ),
    "leader.renewed": lambda e: f"lease renewed after {e.get('lapsed_s')} s: calls go again",
    "daemon.signal": lambda e: f"{e.get('signal')} received: {e.get('action') or 'stopping'}",
    "emulator.signal": lambda e: f"{e.get('signal')} received: stopping",
    "daemon.reloaded": lambda e: (
        f"tree read again ({_plural(e.get('files'), 'file')}, {e.get('changed')} tasks "
        "changed); every task re-planned"
    ),
    "daemon.draining": lambda e: (
        f"waiting for {_plural(e.get('in_flight'), 'call')} in flight; "
        f"{e.get('queued')} queued are left for next time"
    ),
    "daemon.stopped": lambda e: (
        "stopped"
        + (
            f"; {_plural(e['abandoned_in_flight'], 'call')} abandoned in flight"
            if e.get("abandoned_in_flight")
            else ""
        )
    ),
}


def _keys(keys: object, *, shown: int = 3) -> str:
    names = [str(k) for k in keys] if isinstance(keys, list | tuple) else []
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


def _mass_change(event: Mapping[str, Any], what: str) -> str:
    return (
        f"{_plural(event.get('changes'), 'change')} to {event.get('known')} applied tasks, over "
        f"--max-change {event.get('max_change')} ({event.get('allowed')} allowed); {what}; "
        "--allow-mass-change lets them go"
    )


class ConsoleRenderer:
    """A structlog renderer: the last processor in a terminal (see the module docs)."""

    def __init__(self, *, colors: bool, width: Callable[[], int] = lambda: 0) -> None:
        self.colors = colors
        self.width = width

    def _style(self, text: str, **style: Any) -> str:
        return click.style(text, **style) if self.colors else text

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> str:
        name = printable(event.get("event", ""))
        level = str(event.get("level", "info"))
        clock = printable(_clock(event.get("timestamp")))
        exception = event.pop("exception", None)
        key = task_key(event)
        key = None if key is None else printable(key)
        if name in _OUTCOMES and key is not None:
            mark, colour, detail = _OUTCOMES[name]
            head = f"{self._style(clock, dim=True)} {self._style(mark, fg=colour, bold=True)} {key}"
            plain = f"{clock} {mark} {key}"
            body = printable(detail(event))
        else:
            word, colour = _LEVEL_STYLE.get(level, (level, "white"))
            head = (
                f"{self._style(clock, dim=True)} {self._style(word, fg=colour)} "
                f"{self._style(name, bold=True)}"
            )
            plain = f"{clock} {word} {name}"
            if key is not None:
                head, plain = f"{head} {key}", f"{plain} {key}"
            sentence = _SENTENCES.get(name)
            body = printable(sentence(event) if sentence else self._pairs(event))
        line = f"{head}{self._wrap(plain, body)}" if body else head
        if exception:  # a traceback's own lines; within each, escaped like the rest
            line += "\n" + "\n".join(map(printable, str(exception).rstrip().splitlines()))
        return line

    @staticmethod
    def _pairs(event: Mapping[str, Any]) -> str:
        return " ".join(
            f"{k}={_bare(v)}"
            for k, v in event.items()
            if k not in _QUIET_FIELDS and k not in _TASK_KEYS and v is not None
        )

    def _wrap(self, head: str, body: str) -> str:
        """``body`` after ``head``, wrapped to the terminal's width.

        Breaks go after a comma first (``Identifier "a" → "b", Duration 20 → 60``
        keeps each change whole: one that does not fit beside the task starts on
        the next line), else between words; a word wider than a line is split.
        Continuation lines are indented under the mark, so they read as part of
        the line above. Nothing is dropped.
        """
        width = self.width()
        if width <= 0 or cells(head) + 2 + cells(body) <= width:
            return "  " + body
        room = width - _INDENT
        lines: list[str] = []
        line, left = "", width - cells(head) - 2
        if left < min(room, _MIN_ROOM):  # a long task key: the body starts below it
            lines.append("")
            left = room
        units = _units(body, room)
        units.reverse()
        while units:
            word = units.pop()
            while cells(word) > room:  # longer than any line: split it
                if line:
                    lines.append(line)
                    line, left = "", room
                head_part, word = _split_cells(word, left)
                lines.append(head_part)
                left = room
            if cells(line) + bool(line) + cells(word) > left:
                lines.append(line)
                line, left = word, room
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        first, *rest = lines
        pad = " " * _INDENT
        return ("  " + first if first else "") + "".join(f"\n{pad}{part}" for part in rest)


#: Continuation lines start under the mark, after ``HH:MM:SS``.
_INDENT: Final = 9
#: Room the body needs on the head's line; with less it starts on the next one.
_MIN_ROOM: Final = 24


def cells(text: str) -> int:
    """Terminal columns ``text`` takes: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _units(body: str, room: int) -> list[str]:
    """What a line may break between: the comma-separated parts that fit a line
    whole, the words of those that do not."""
    units: list[str] = []
    parts = body.split(", ")
    for i, part in enumerate(parts):
        part += "," if i < len(parts) - 1 else ""
        units.extend([part] if cells(part) <= room else part.split(" "))
    return units


def _split_cells(word: str, room: int) -> tuple[str, str]:
    """``word`` cut after at most ``room`` columns (at least one character)."""
    used = 0
    for i, c in enumerate(word):
        used += cells(c)
        if used > room:
            return word[: max(1, i)], word[max(1, i) :]
    return word, ""


def _clock(stamp: object) -> str:
    """``HH:MM:SS`` in local time from the event's ISO-8601 UTC timestamp."""
    if isinstance(stamp, str):
        try:
            return (
                datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                .astimezone()
                .strftime("%H:%M:%S")
            )
        except ValueError:
            return stamp
    return datetime.now().astimezone().strftime("%H:%M:%S")
