"""How ``plan`` prints its report: text like Terraform's, JSON, or a pull-request comment."""

from __future__ import annotations

import json
from collections.abc import Mapping

import click

from reconciler.cli.views import render
from reconciler.core.guard import MassForget
from reconciler.core.task import TaskKey
from reconciler.engine.operations.plan import PlanReport


def print_plan(report: PlanReport, *, output: str, root: str) -> None:
    """The plan on stdout, with the calls change control holds and the refusals."""
    result, gate, refusal = report.plan, report.gate, report.forget_refusal
    waiting = gate.waiting_by_key()
    if output == "json":
        doc = result.to_json()
        doc["refusals"] = [] if refusal is None else [_refusal_json(refusal)]
        if gate.mass_change is not None:
            doc["refusals"].append(gate.mass_change.to_json())
        for call in doc["calls"]:
            held = waiting.get(TaskKey(**_key_args(call["task"])))
            call["waiting"] = None if held is None else str(held.reason)
        doc["waiting"] = gate.waiting_json()
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    elif output == "markdown":
        click.echo(
            render.plan_markdown(result, root=root, refusals=report.refusals, waiting=waiting),
            nl=False,
        )
    else:
        click.echo(
            render.plan_text(result, root=root, forgets_refused=bool(refusal), waiting=waiting)
        )


def _key_args(identity: Mapping[str, str]) -> dict[str, str]:
    return {
        "app_id": identity["AppId"],
        "room_id": identity["RoomId"],
        "task_id": identity["TaskId"],
    }


def _refusal_json(refusal: MassForget) -> dict[str, object]:
    return {
        "code": "MassForget",
        "message": str(refusal),
        "forget": refusal.forget,
        "known": refusal.known,
        "allowed": refusal.allowed,
        "max_forget": str(refusal.limit),
    }
