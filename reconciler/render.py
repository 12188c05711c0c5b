"""Human-readable output: plans like Terraform's, status like ``kubectl get``.

Rendering is pure: a function of a value to a string. Colour is added with
click's styles and stripped by ``click.echo`` when the output is not a
terminal, so piping a plan into a file or a PR comment gives plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import click

from reconciler.desired import Problem
from reconciler.plan import Plan
from reconciler.state import TaskState
from reconciler.task import FieldValue, SyncStatus

_STATUS_COLOURS = {
    SyncStatus.SYNCED: "green",
    SyncStatus.PENDING: "yellow",
    SyncStatus.NOT_RUNNING: "magenta",
    SyncStatus.FAILED: "red",
}


def value(v: FieldValue | None) -> str:
    """A field value as the files spell it (JSON: strings quoted, true/false)."""
    return "(unknown)" if v is None else json.dumps(v, ensure_ascii=False)


def where(root: str, location: object) -> str:
    """``root/path:line:col`` so editors and CI annotations can jump to it."""
    return f"{root.rstrip('/')}/{location}" if root else str(location)


def problems(root: str, found: Sequence[Problem]) -> str:
    lines = []
    for p in found:
        field = f" {p.field}:" if p.field else ""
        lines.append(f"{click.style(where(root, p.source), bold=True)}:{field} {p.message}")
    return "\n".join(lines)


def plan_text(plan: Plan, *, root: str = "") -> str:
    out: list[str] = []
    if plan.calls:
        out.append("The reconciler will make these calls:\n")
    for call in plan.calls:
        out.append(
            click.style(f"  # {call.key}", bold=True)
            + click.style(f"  ({where(root, call.source)})", dim=True)
            + (click.style("  first sync", fg="cyan") if call.first else "")
        )
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
            click.style(f"  - {r.key}", fg="cyan")
            + f": no longer managed: {released}; left as it is, not reset"
        )
    for f in plan.forgotten:
        out.append(
            click.style(f"  - {f.key}", fg="red")
            + f": removed from the tree ({f.source_path or 'unknown file'}); forgotten, "
            "no call made, the task keeps running"
        )
    for h in plan.held:
        out.append(
            click.style(f"  = {h.key}", fg="magenta")
            + f": held as it is while {where(root, h.source_path)} is invalid"
        )
    for b in plan.blocked:
        out.append(
            click.style(f"  ! {b.task.key}", fg="red")
            + f": blocked ({where(root, b.task.source)}): {b.reason}"
        )
    for w in plan.warnings:
        loc = f" ({where(root, w.source)})" if w.source else ""
        out.append(click.style(f"  ! warning {w.key}", fg="yellow") + f"{loc}: {w.message}")
    if len(out) and not out[-1].endswith("\n"):
        out.append("")
    s = plan.summary()
    tail = (
        f"Plan: {s['to_update']} to update, {s['in_sync']} in sync, "
        f"{s['fields_released']} fields released, {s['tasks_forgotten']} tasks forgotten"
    )
    extras = [f"{s[k]} {k}" for k in ("held", "blocked", "warnings") if s[k]]
    if extras:
        tail += " (" + ", ".join(extras) + ")"
    if not plan.calls and not plan.releases and not plan.forgotten:
        out.append(click.style("No changes. Live tasks match the desired tree.", fg="green"))
    out.append(click.style(tail + ".", bold=True))
    return "\n".join(out)


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%SZ")


def status_table(rows: Iterable[TaskState], counts: Mapping[SyncStatus, int]) -> str:
    header = ("TASK", "STATUS", "LAST CALL", "ATTEMPTS", "REQUEST ID", "SOURCE", "LAST ERROR")
    table: list[tuple[str, ...]] = [header]
    colours: list[str | None] = [None]
    for r in rows:
        err = "" if not r.last_error else f"{r.last_error_code or ''} {r.last_error}".strip()
        table.append(
            (
                str(r.key),
                r.status.value,
                _when(r.last_call_at),
                str(r.attempts),
                r.request_id or "-",
                r.source or "-",
                err[:120],
            )
        )
        colours.append(_STATUS_COLOURS[r.status])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row, colour in zip(table, colours, strict=True):
        cells = [row[i].ljust(widths[i]) for i in range(len(widths))]
        if colour:
            cells[1] = click.style(cells[1], fg=colour)
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    total = ", ".join(f"{counts.get(s, 0)} {s.value}" for s in SyncStatus)
    lines.append(f"\n{sum(counts.values())} tasks: {total}.")
    return "\n".join(lines)
