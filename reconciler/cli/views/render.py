"""Human-readable output: plans like Terraform's, status like ``kubectl get``.

``status`` shows two axes per task side by side, as Argo CD shows sync and
health: SYNC (what the store recorded) and LIVE (what GetSegmentTask last
showed, with READ, how long ago). A cell that has a long and a short form
(LIVE) shows the longest that fits the column, so a narrow table drops the
detail, not the state.

Rendering is pure: a function of a value to a string. Colour is added with
click's styles and stripped by ``click.echo`` when the output is not a
terminal, so piping a plan into a file or a PR comment gives plain text.

Every value that comes from outside (file names, ids, problems, errors,
live values, reasons) is passed through
:func:`~reconciler.core.printable.printable` before it is laid out: a newline or
an ANSI escape in a file name cannot forge a line or restyle the screen.
The JSON shapes (:func:`validation_json`) keep values exactly.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from reconciler.core.live import LiveStatus
from reconciler.core.plan import SETTLE_S, Plan
from reconciler.core.printable import printable
from reconciler.core.task import FieldValue, SyncStatus, TaskKey
from reconciler.serve.status import NEW, LiveView, NextAction, StatusReport, TaskStatus, TreeStatus
from reconciler.tree.desired import DesiredIndex, Problem

if TYPE_CHECKING:
    from reconciler.core.rollout import Waiting

_STATUS_COLOURS: dict[str, str] = {
    SyncStatus.SYNCED: "green",
    SyncStatus.PENDING: "yellow",
    SyncStatus.NOT_RUNNING: "magenta",
    SyncStatus.FAILED: "red",
    NEW: "cyan",
    SyncStatus.OUT_OF_SYNC: "yellow",
}

_LIVE_COLOURS: dict[LiveStatus, str] = {
    LiveStatus.RUNNING: "green",
    LiveStatus.ENDED: "magenta",
    LiveStatus.NOT_FOUND: "magenta",
    LiveStatus.UNKNOWN: "yellow",
}


def value(v: FieldValue | None) -> str:
    """A field value as the files spell it (JSON: strings quoted, true/false)."""
    return "(unknown)" if v is None else printable(json.dumps(v, ensure_ascii=False))


def where(root: str, location: object) -> str:
    """``root/path:line:col`` so editors and CI annotations can jump to it."""
    return f"{root.rstrip('/')}/{location}" if root else str(location)


def at(root: str, location: object) -> str:
    """:func:`where`, for a text view (control characters escaped)."""
    return printable(where(root, location))


def problems(root: str, found: Sequence[Problem]) -> str:
    lines = []
    for p in found:
        field = f" {printable(p.field)}:" if p.field else ""
        lines.append(f"{click.style(at(root, p.source), bold=True)}:{field} {printable(p.message)}")
    return "\n".join(lines)


def validation_json(index: DesiredIndex, *, given: str, root: str) -> dict[str, object]:
    """``validate --output json`` (docs/desired-files.md: "validate --output json").

    ``given`` is the tree or file as the user named it; ``root`` is what paths
    are relative to ("" for a single file), so every ``path`` is the one the
    text output shows and can be opened from where the command ran.
    """
    found = index.problems
    return {
        "format_version": 1,
        "valid": not found,
        "root": given,
        "files": len(index.paths),
        "tasks": len(index.tasks),
        "invalid_files": [where(root, path) for path in sorted(index.invalid_files)],
        "problems": [
            {
                "path": where(root, p.source.path),
                "line": p.source.line,
                "column": p.source.column,
                "field": p.field,
                "message": p.message,
            }
            for p in found
        ],
    }


def plan_text(
    plan: Plan,
    *,
    root: str = "",
    forgets_refused: bool = False,
    waiting: Mapping[TaskKey, Waiting] | None = None,
) -> str:
    """``forgets_refused``: the forget guard refuses this plan; its forgets are marked so.
    ``waiting``: calls change control holds (a sync window, a mass change), with why."""
    out: list[str] = []
    held = waiting or {}
    if plan.calls:
        out.append("The reconciler will make these calls:\n")
    restarted = {r.key for r in plan.restarts}
    drifted = {d.key for d in plan.drifts}
    for call in plan.calls:
        basis = ""
        if call.basis == "live":
            why = (
                "restarted"
                if call.key in restarted
                else "drift"
                if call.key in drifted
                else "compared with live"
            )
            basis = click.style(f"  {why}", fg="magenta")
        out.append(
            click.style(f"  # {printable(call.key)}", bold=True)
            + click.style(f"  ({at(root, call.source)})", dim=True)
            + (click.style("  first sync", fg="cyan") if call.first else "")
            + basis
            + (click.style(f"  {UNREAD_WHY[call.unread]}", fg="yellow") if call.unread else "")
        )
        if (why_held := held.get(call.key)) is not None:
            out.append(click.style(f"  ⏸ {printable(why_held.message)}", fg="blue"))
        out.append(click.style(f"  ~ {call.action}", fg="yellow") + " {")
        width = max(len(n) for n in call.body)
        changed = {c.field: c for c in call.changes}
        for name, v in call.body.items():
            change = changed.get(name)
            if change is None:
                out.append(f"        {name:<{width}} = {value(v)}")
            elif change.old is None:
                out.append(click.style(f"      + {name:<{width}} = {value(v)}", fg="green"))
            else:
                out.append(
                    click.style(f"      ~ {name:<{width}} = ", fg="yellow")
                    + f"{value(change.old)} → {value(change.new)}"
                )
        out.append("    }\n")
    for r in plan.releases:
        released = ", ".join(f"{n} (last applied {value(r.last[n])})" for n in r.fields)
        out.append(
            click.style(f"  - {printable(r.key)}", fg="cyan")
            + f": no longer managed: {released}; left as it is, not reset"
        )
    for f in plan.forgotten:
        fate = (
            "would be forgotten: REFUSED, too many forgets at once"
            if forgets_refused
            else "forgotten, no call made, the task keeps running"
        )
        out.append(
            click.style(f"  - {printable(f.key)}", fg="red")
            + f": removed from the tree ({printable(f.source_path or 'unknown file')}); {fate}"
        )
    for h in plan.held:
        out.append(
            click.style(f"  = {printable(h.key)}", fg="magenta")
            + f": held as it is while {at(root, h.source_path)} is invalid"
        )
    for b in plan.blocked:
        out.append(
            click.style(f"  ! {printable(b.task.key)}", fg="red")
            + f": blocked ({at(root, b.task.source)}): {printable(b.reason)}"
        )
    for again in plan.restarts:
        out.append(
            click.style(f"  ↻ {printable(again.key)}", fg="magenta")
            + f": restarted (StartTime {_ms(again.old_incarnation)} → "
            f"{_ms(again.new_incarnation)}); "
            "a new incarnation has StartSegment's values, so it gets the fields it lacks"
        )
    for d in plan.drifts:
        moved = ", ".join(
            f"{n} {value(last)} → {value(live)}" for n, (last, live) in d.fields.items()
        )
        fate = (
            "set back by the call above"
            if d.healed
            else "left as it is (--drift report): OutOfSync"
        )
        out.append(
            click.style(f"  ≠ {printable(d.key)}", fg="magenta")
            + f" ({at(root, d.source)}): drift, changed live by another client: {moved}; {fate}"
        )
    for e in plan.ended:
        obs = e.observation
        if obs.stop_reason:
            how = f"ended at {_ms(obs.end_time_ms)}: {printable(obs.stop_reason)}"
        else:
            how = "no longer found by GetSegmentTask"
        out.append(
            click.style(f"  - {printable(e.task.key)}", fg="magenta")
            + f": not running ({how}); no call until it runs again"
        )
    for key in plan.unread:
        out.append(
            click.style(f"  ? {printable(key)}", fg="yellow")
            + ": never confirmed and could not be read; no call until it is read"
        )
    for w in plan.warnings:
        loc = f" ({at(root, w.source)})" if w.source else ""
        out.append(
            click.style(f"  ! warning {printable(w.key)}", fg="yellow")
            + f"{loc}: {printable(w.message)}"
        )
    if len(out) and not out[-1].endswith("\n"):
        out.append("")
    s = plan.summary()
    tail = (
        f"Plan: {s['to_update']} to update, {s['in_sync']} in sync, "
        f"{s['fields_released']} fields released, {s['tasks_forgotten']} tasks forgotten"
        + (" (refused)" if forgets_refused else "")
    )
    extras = [
        f"{s[k]} {k.replace('_', ' ')}"
        for k in ("restarted", "drifted", "not_running", "unread", "held", "blocked", "warnings")
        if s[k]
    ]
    if held:
        extras.insert(0, f"{len(held)} waiting")
    if extras:
        tail += " (" + ", ".join(extras) + ")"
    if not plan.calls and not plan.releases and not plan.forgotten:
        out.append(click.style("No changes. " + _matches(plan), fg="green"))
    elif plan.refresh is not None:
        out.append(click.style(printable(plan.refresh.describe()), dim=True))
    out.append(click.style(tail + ".", bold=True))
    return "\n".join(out)


def _matches(plan: Plan) -> str:
    """What "no changes" was checked against: never claim live tasks unless they were read."""
    if plan.refresh is not None and plan.refresh.mode == "none":
        return (
            "The desired tree matches the last-applied state "
            f"(live tasks were not read: {printable(plan.refresh.reason)}; --refresh reads them)."
        )
    if not plan.refreshed:
        return (
            "The desired tree matches the last-applied state "
            "(live tasks were not read; --refresh reads them)."
        )
    if plan.refresh is not None and plan.refresh.mode == "targeted":
        if not plan.observed:
            return (
                "The desired tree matches the last-applied state; no task needed a read "
                "(only tasks a call would go to, or never confirmed, are read; --refresh "
                "reads every task to find drift and restarts)."
            )
        return (
            f"Live already matches the desired tree for the {plan.observed} task(s) read; the "
            "others match the last-applied state (--refresh reads every task)."
        )
    declared = len(plan.in_sync) + len(plan.calls) + len(plan.blocked) + len(plan.drifts)
    declared += len(plan.ended)
    if plan.observed >= declared:
        return f"Live tasks match the desired tree ({plan.observed} read just now)."
    parts = [f"Live tasks match the desired tree for the {plan.observed} compared with live"]
    if plan.settling:
        parts.append(
            f"{plan.settling} were read within {SETTLE_S:g} s of our own call to them, too soon "
            "to show it, and match the last-applied state"
        )
    rest = declared - plan.observed - plan.settling
    if rest > 0:
        parts.append(
            f"{rest} could not be read (or are not visible to GetSegmentTask) and match the "
            "last-applied state"
        )
    return "; ".join(parts) + "."


#: Why a first call carries every managed field (:attr:`~reconciler.core.plan.Call.unread`).
UNREAD_WHY: dict[str, str] = {
    "unreadable": "every field: GetSegmentTask cannot see it (started > 72 h ago?)",
    "not_read": "every field: live not read",
}


def _ms(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


ELLIPSIS = "…"


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS if width > 0 else ""


def clip_middle(text: str, width: int) -> str:
    """``text`` cut in the middle: ids differ at their ends (``hall-a-0901``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    head = (width - 1 + 1) // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def short_key(key: TaskKey, width: int) -> str:
    """``app/room/task`` within ``width``: the longest ids are cut in the middle first,
    so every part stays recognisable by its start and end."""
    parts = [printable(p) for p in key]
    room = width - 2  # the two slashes
    sizes = [len(p) for p in parts]
    while sum(sizes) > room and max(sizes) > 3:
        sizes[sizes.index(max(sizes))] -= 1
    return "/".join(clip_middle(p, n) for p, n in zip(parts, sizes, strict=True))


def ago(seconds: float) -> str:
    """A duration as ``kubectl get`` shows ages: ``45s``, ``12m``, ``3h12m``, ``2d5h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def _since(t: TaskStatus, now: datetime) -> str:
    since = t.status_since
    return "-" if since is None else ago((now - since).total_seconds())


def _last_call(t: TaskStatus, now: datetime) -> str:
    at = None if t.record is None else t.record.last_call_at
    # Like SINCE and READ, an age: RETRY's "in 4m" is the only time ahead.
    return "-" if at is None else ago((now - at).total_seconds())


def _read(t: TaskStatus) -> str:
    age = t.live.age_s
    return "never" if age is None else ago(age)


def _clock(ms: int) -> str:
    """An API time for a narrow column, to the minute (UTC; the JSON has it in full)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%MZ")


def live_texts(view: LiveView) -> tuple[str, str, str]:
    """The LIVE cell of a task in its full, medium and short forms; the table
    shows the longest that fits, and shrinks the column to the medium, then
    the short forms of its rows."""
    o = view.observation
    if o is None:
        return ("Unknown", "Unknown", "Unknown")  # READ says "never"
    if o.state is LiveStatus.RUNNING:
        if o.start_time_ms is None:
            return ("Running", "Running", "Running")
        at = _clock(o.start_time_ms)
        return (f"Running since {at}", f"Running {at}", "Running")
    if o.state is LiveStatus.ENDED:
        why = f"Ended: {printable(o.stop_reason)}" if o.stop_reason else "Ended"
        full = why if o.end_time_ms is None else f"{why} at {_clock(o.end_time_ms)}"
        return (full, why, "Ended")
    if o.state is LiveStatus.NOT_FOUND:
        return ("Not found", "Not found", "Not found")
    # GetSegmentTask sees only tasks started within 72 h: this one may well run.
    return ("Unknown: not visible", "Unknown: not visible", "Unknown")


def _longest_fitting(forms: Sequence[str], width: int) -> str:
    for text in forms:
        if len(text) <= width:
            return text
    return clip(forms[-1], width)


def _retry(t: TaskStatus, now: datetime) -> str:
    at = t.next_retry_at
    if at is None:
        return "-"
    left = (at - now).total_seconds()
    if left >= 1:
        return f"in {ago(left)}"
    return "due" if left > -60 else f"overdue {ago(-left)}"


def _tree(t: TaskStatus) -> str:
    if t.tree is TreeStatus.HELD:
        return f"held: {printable(t.held_by)}"  # the invalid files are listed below the table
    if t.tree is TreeStatus.NOT_IN_TREE:
        return "not in tree: to forget"
    if t.next_action is NextAction.CALL and t.call is not None:
        fields = ", ".join(t.call.fields)
        return f"first call: {fields}" if t.call.first else f"call: {fields}"
    if t.next_action is NextAction.BLOCKED:
        return "blocked: change the spec"
    return "in tree" if t.tree is TreeStatus.IN_TREE else "-"


def _short_path(path: str, width: int) -> str:
    """A path within ``width``: whole, else its file name (``…/lectures.yaml``)."""
    if len(path) <= width:
        return path
    name = path.rsplit("/", 1)[-1]
    return f"{ELLIPSIS}/{name}" if len(name) + 2 <= width else clip_middle(name, width)


def _fit(natural: dict[str, int], budget: int, steps: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Shrink columns, in the order of ``steps`` and never below each floor, to ``budget``."""
    widths = dict(natural)
    for column, floor in steps:
        excess = sum(widths.values()) - budget
        if excess <= 0:
            break
        widths[column] = min(widths[column], max(floor, widths[column] - excess))
    return widths


def _shrink_steps(live_medium: int, live_short: int) -> tuple[tuple[str, int], ...]:
    """Which flexible column gives way first, and down to what: the error first
    (it is in the JSON in full), then the tree note, then the task, then the
    live detail (to its medium, then short forms, widest of the rows), then all.
    Task ids keep 40 columns (a dozen characters of each id) while the error
    goes: an id cut too short cannot be told from its neighbours."""
    return (
        ("error", 30),
        ("tree", 22),
        ("task", 52),
        ("error", 16),
        ("live", live_medium),
        ("tree", 16),
        ("task", 40),
        ("error", 0),
        ("task", 36),
        ("live", live_short),
        ("tree", 12),
        ("task", 11),
    )


#: The narrowest LAST ERROR column worth showing (``ErrorActiveTask…``); below, it is dropped.
_MIN_ERROR = 16
#: Columns whose text is short and always shown whole.
_FIXED = ("status", "since", "read", "call", "retry")


def _layout(
    columns: Sequence[str],
    natural: dict[str, int],
    width: int,
    steps: Sequence[tuple[str, int]],
) -> dict[str, int]:
    """Each column's width: the fixed ones whole, the flexible ones shrunk by ``steps``."""
    budget = width - 2 * (len(columns) - 1) - sum(natural[c] for c in columns if c in _FIXED)
    flexible = {c: natural[c] for c in columns if c not in _FIXED}
    return {
        **{c: natural[c] for c in columns},
        **_fit(flexible, budget, [(c, f) for c, f in steps if c in flexible]),
    }


def status_table(report: StatusReport, *, root: str = "", width: int = 120) -> str:
    """The report as a table no wider than ``width``, then invalid files and counts.

    Long ids are cut in the middle and long errors at the end; ``-o json``
    has every value in full.
    """
    now = report.generated_at
    show_tree = report.tree_read
    lives = [live_texts(t.live) for t in report.tasks]
    rows = [
        {
            "task": printable(t.key),
            "status": t.status,
            "since": _since(t, now),
            "live": forms[0],
            "read": _read(t),
            "call": _last_call(t, now),
            "retry": _retry(t, now),
            "tree": _tree(t),
            "error": printable(t.last_error or ""),
        }
        for t, forms in zip(report.tasks, lives, strict=True)
    ]
    header = {
        "task": "TASK",
        "status": "SYNC",
        "since": "SINCE",
        "live": "LIVE",
        "read": "READ",
        "call": "CALLED",
        "retry": "RETRY",
        "tree": "TREE",
        "error": "LAST ERROR",
    }
    wanted = {
        "tree": show_tree,
        "error": any(r["error"] for r in rows),
        # Only NotRunning and failed tasks are retried: no column of dashes.
        "retry": any(t.next_retry_at is not None for t in report.tasks),
    }
    columns = [c for c in header if wanted.get(c, True)]
    natural = {c: max(len(r[c]) for r in [header, *rows]) for c in columns}
    live_medium = max([len(header["live"])] + [len(f[1]) for f in lives])
    live_short = max([len(header["live"])] + [len(f[2]) for f in lives])
    steps = _shrink_steps(live_medium, live_short)
    widths = _layout(columns, natural, width, steps)
    if "error" in columns and widths["error"] < _MIN_ERROR:
        # A sliver of an error says nothing; its room serves the task ids better.
        columns.remove("error")
        widths = _layout(columns, natural, width, steps)
    # LIVE shows whole forms only: what its widest fitting cell leaves over goes
    # to the first column still cut.
    used = max([len(header["live"])] + [len(_longest_fitting(f, widths["live"])) for f in lives])
    slack, widths["live"] = widths["live"] - used, used
    for c in ("task", "tree", "error"):
        if c in columns and slack > 0:
            given = min(slack, natural[c] - widths[c])
            widths[c] += given
            slack -= given

    lines = []
    entries = [(header, None, ("", "", "")), *zip(rows, report.tasks, lives, strict=True)]
    for row, task, forms in entries:
        cells = []
        for c in columns:
            w = widths[c]
            if task is not None and c == "task":
                text = short_key(task.key, w)
            elif c == "tree" and task is not None and task.held_by is not None:
                text = "held: " + _short_path(printable(task.held_by), w - len("held: "))
            elif c == "live" and task is not None:
                text = _longest_fitting(forms, w)
            else:
                text = clip(row[c], w)
            cell = text if c == columns[-1] else text.ljust(w)
            if task is not None and c == "status":
                cell = click.style(cell, fg=_STATUS_COLOURS.get(task.status))
            elif task is not None and c == "live":
                cell = click.style(cell, fg=_LIVE_COLOURS.get(task.live.state))
            cells.append(cell)
        lines.append("  ".join(cells).rstrip())
    if not report.tasks:
        lines = ["No tasks."]

    if report.invalid_files:
        lines.append("")
        lines.append("Invalid files (their recorded tasks are held as they are until fixed):")
        for f in report.invalid_files:
            p = f.first_problem
            field = f" {printable(p.field)}:" if p.field else ""
            lines.append(clip(f"  {at(root, p.source)}:{field} {printable(p.message)}", width))
            more = f"; {f.problems - 1} more problem(s)" if f.problems > 1 else ""
            lines.append(f"    holds {f.held_tasks} recorded task(s){more}")

    lines.extend(_heals(report, width))

    counts = report.counts()
    total = ", ".join(f"{n} {s}" for s, n in counts.items())
    shown = f"{len(report.tasks)} tasks"
    if report.filtered:
        shown += f" shown of {report.total}"
    summary = f"{shown}: {total}."
    if show_tree:
        trees = report.tree_counts()
        summary = summary[:-1] + (
            f"; {trees[TreeStatus.HELD]} held, {trees[TreeStatus.NOT_IN_TREE]} not in tree."
        )
    lines.append("")
    lines.append(summary)
    lines.append(_live_summary(report))
    if report.shared:
        lines.append(_leader_summary(report))
    return "\n".join(lines)


#: Heals listed below the status table; ``-o json`` has every task's.
HEALS_SHOWN = 10


def _heals(report: StatusReport, width: int) -> list[str]:
    """When and why the shown tasks were last healed, latest first (none: no lines)::

    Last healed (a call set back a restart or drift), latest first:
      661e4a7b9c0d1e2f/hall-b-0902/asr-segment  2m ago  restart: Duration 20 → 60
    """
    healed = report.healed()
    if not healed:
        return []
    lines = ["", "Last healed (a call set back a restart or drift), latest first:"]
    for t in healed[:HEALS_SHOWN]:
        assert t.last_heal_at is not None
        age = ago((report.generated_at - t.last_heal_at).total_seconds())
        head, why = f"  {short_key(t.key, 52)}  {age} ago", printable(t.last_heal_reason or "-")
        if len(head) + 2 + len(why) <= width:
            lines.append(f"{head}  {why}")
        else:  # the reason whole on lines of its own, rather than cut short
            lines.append(head)
            lines += textwrap.wrap(
                why,
                max(20, width),
                initial_indent="    ",
                subsequent_indent="      ",
                break_on_hyphens=False,
            )
    if len(healed) > HEALS_SHOWN:
        lines.append(f"  … and {len(healed) - HEALS_SHOWN} more (-o json has every task's)")
    return lines


def _leader_summary(report: StatusReport) -> str:
    """``Leader: pod-a/7 (epoch 3) since 12-01 21:04Z, heartbeat 1s ago.``"""
    row = report.leader
    if row is None or row.holder is None:
        return "Leader: none elected yet (no replica has run on this database)."
    since = "?" if row.since is None else row.since.astimezone(UTC).strftime("%m-%d %H:%MZ")
    if row.released_at is not None:
        return f"Leader: none; {printable(row.holder)} (epoch {row.epoch}) released the lead."
    beat = ""
    if row.heartbeat is not None:
        age = max(0.0, (report.generated_at - row.heartbeat).total_seconds())
        beat = f", heartbeat {ago(age)} ago"
    return f"Leader: {printable(row.holder)} (epoch {row.epoch}) since {since}{beat}."


def _live_summary(report: StatusReport) -> str:
    """``Live: 8 running, 1 ended, 0 not found, 1 unknown (1 never read); oldest read 12s ago.``"""
    counts = ", ".join(f"{n} {s.value.replace('_', ' ')}" for s, n in report.live_counts().items())
    line = f"Live: {counts}"
    if never := report.never_read():
        line += f" ({never} never read)"
    if (oldest := report.oldest_read_age_s()) is not None:
        line += f"; oldest read {ago(oldest)} ago"
    return line + "."


# --- plans as pull-request comments ----------------------------------------------------

#: GitHub refuses a comment over 65,536 characters; the Markdown plan stays well under.
MARKDOWN_LIMIT = 60_000
#: Tables longer than this many rows are folded in a <details> block.
MARKDOWN_FOLD_ROWS = 20
#: A call whose body carries this field cuts the task's live slice.
SLICE_FIELD = "Duration"
_MD_SPECIAL = frozenset("\\`*_[]<>|~&")


def md(text: object) -> str:
    """Text for a Markdown table cell: escaped, so a file name or a value cannot add
    markup, HTML, a link or a cell (and control characters are already escaped)."""
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in printable(str(text)))


def plan_markdown(
    plan: Plan,
    *,
    root: str = "",
    refusals: Sequence[str] = (),
    waiting: Mapping[TaskKey, Waiting] | None = None,
    limit: int = MARKDOWN_LIMIT,
) -> str:
    """``plan --output markdown``: the plan as a pull-request comment.

    A headline of counts, then one table row per call (its field changes
    ``old → new``; a call that carries ``Duration``, which cuts the live
    slice, is marked ✂), then the held, forgotten, released, blocked and
    waiting tasks, and the refusals. Sections longer than
    :data:`MARKDOWN_FOLD_ROWS` rows are folded in ``<details>``; rows that
    would take the comment past ``limit`` characters are left out, and a line
    says how many (the full plan: ``plan --output json``).
    """
    held_calls = waiting or {}
    cuts = sum(1 for c in plan.calls if SLICE_FIELD in c.fields)
    s = plan.summary()
    counts = [
        f"**{s['to_update']}** to update" + (f" (**{cuts}** cut a slice ✂)" if cuts else ""),
        f"{s['in_sync']} in sync",
    ]
    for label, n in (
        ("waiting", len(held_calls)),
        ("held", s["held"]),
        ("forgotten", s["tasks_forgotten"]),
        ("fields released", s["fields_released"]),
        ("blocked", s["blocked"]),
        ("restarted", s["restarted"]),
        ("drifted", s["drifted"]),
        ("not running", s["not_running"]),
        ("unread", s["unread"]),
        ("warnings", s["warnings"]),
    ):
        if n:
            counts.append(f"{n} {label}")
    head = ["### reconciler plan", "", ", ".join(counts) + "."]
    if refusals:
        head += ["", *(f"> **Refused:** {md(r)}" for r in refusals)]
    if not plan.calls and not plan.releases and not plan.forgotten:
        head += ["", "No UpdateSegment calls: merging this sends nothing."]
    elif plan.refresh is not None:
        head += ["", f"_{md(plan.refresh.describe())}_"]

    sections: list[tuple[str, list[str], list[str]]] = []
    if plan.calls:
        rows = []
        for call in plan.calls:
            changes = ", ".join(
                f"{md(c.field)} {md(value(c.new))}"
                if c.old is None
                else f"{md(c.field)} {md(value(c.old))} → {md(value(c.new))}"
                for c in call.changes
            )
            notes = [n for n in ("first sync" if call.first else "", call.cause) if n]
            if (w := held_calls.get(call.key)) is not None:
                notes.append(f"⏸ {w.message}")
            mark = "✂" if SLICE_FIELD in call.fields else ""
            rows.append(
                f"| {mark} | {md(call.key)} | {changes} | {md(at(root, call.source))} "
                f"| {md('; '.join(notes))} |"
            )
        sections.append(
            (
                f"Calls ({len(plan.calls)})",
                ["| ✂ | Task | Changes (old → new) | Source | Note |", "|---|---|---|---|---|"],
                rows,
            )
        )
    listed: list[tuple[str, list[str]]] = [
        (
            "Held: their file is invalid, nothing is sent or forgotten",
            [f"- {md(h.key)} ({md(at(root, h.source_path))})" for h in plan.held],
        ),
        (
            "Forgotten: removed from the tree, no call; the task keeps running",
            [f"- {md(f.key)} ({md(f.source_path or 'unknown file')})" for f in plan.forgotten],
        ),
        (
            "Released: no longer managed, left as they are",
            [f"- {md(r.key)}: {md(', '.join(r.fields))}" for r in plan.releases],
        ),
        (
            "Blocked",
            [f"- {md(b.task.key)}: {md(b.reason)}" for b in plan.blocked],
        ),
        (
            "Warnings",
            [f"- {md(w.key)}: {md(w.message)}" for w in plan.warnings],
        ),
    ]
    for title, items in listed:
        if items:
            sections.append((f"{title} ({len(items)})", [], items))

    legend = "✂ the call carries Duration, which cuts the task's live slice."
    out = [*head]
    budget = limit - sum(len(line) + 1 for line in out) - len(legend) - 200
    left_out = 0
    for title, header, rows in sections:
        fold = len(rows) > MARKDOWN_FOLD_ROWS
        block = (
            ["", f"<details><summary>{md(title)}</summary>", ""]
            if fold
            else ["", f"**{md(title)}**", ""]
        )
        block += header
        budget -= sum(len(line) + 1 for line in block) + 20
        shown = 0
        for row in rows:
            if budget - len(row) - 1 < 0:
                break
            block.append(row)
            budget -= len(row) + 1
            shown += 1
        left_out += len(rows) - shown
        if shown < len(rows):
            block += ["", f"_…and {len(rows) - shown} more not shown here._"]
        if fold:
            block += ["", "</details>"]
        out += block
    if plan.calls and cuts:
        out += ["", legend]
    if left_out:
        out += [
            "",
            f"**{left_out} rows were left out** to fit a pull-request comment; "
            "`reconciler plan --output json` has the whole plan.",
        ]
    return "\n".join(out) + "\n"
