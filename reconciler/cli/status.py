"""``reconciler status``: per task, what the store recorded and live last showed."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from reconciler.cli.options import (
    SectionedCommand,
    dir_argument,
    env_option,
    file_limits,
    limit_options,
    output_option,
    state_option,
)
from reconciler.cli.shell import fail, operation_errors
from reconciler.cli.views import render
from reconciler.core.guard import tree_root
from reconciler.core.live import LiveStatus
from reconciler.core.printable import printable
from reconciler.engine.operations.common import open_store, store_exists
from reconciler.serve.status import build_report, parse_live_states, parse_statuses, report_statuses
from reconciler.store.base import PostgresURL, StoreLocation
from reconciler.tree.desired import DesiredIndex, load_tree

if TYPE_CHECKING:
    from reconciler.store.leader import LeaderRow


def _check_statuses(
    _: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> frozenset[str]:
    try:
        return parse_statuses(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def _check_live_states(
    _: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> frozenset[LiveStatus]:
    try:
        return parse_live_states(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


@click.command(cls=SectionedCommand)
@dir_argument
@state_option
@env_option(
    "--status",
    "statuses",
    env="STATUS",
    multiple=True,
    metavar="STATUS",
    callback=_check_statuses,
    help=f"Only tasks in this sync status: {', '.join(report_statuses())} (any case; "
    "repeat it or give a comma list).",
)
@env_option(
    "--live",
    "lives",
    env="LIVE",
    multiple=True,
    metavar="STATE",
    callback=_check_live_states,
    help="Only tasks whose latest read found them running, ended, not-found or unknown "
    "(never read included; repeat it or give a comma list).",
)
@env_option(
    "--app",
    "apps",
    env="APP",
    multiple=True,
    metavar="APPID",
    help="Only tasks of this AppId (repeatable).",
)
@output_option("status")
@limit_options
def status(
    directory: Path,
    state: StoreLocation,
    statuses: frozenset[str],
    lives: frozenset[LiveStatus],
    apps: tuple[str, ...],
    output: str,
) -> None:
    """Per task: sync status and since when, the live task as last read and how long ago,
    the last call, next retry, and its place in the tree (read-only)."""
    with operation_errors():
        if not store_exists(state):
            fail(
                f"state store {state} does not exist: nothing has been applied with it "
                "(give the store with --state, or run apply first)"
            )
        index: DesiredIndex | None = None
        if directory.is_dir():
            # An invalid file is part of the report, not an error.
            index = load_tree(directory, limits=file_limits())
        elif click.get_current_context().get_parameter_source("directory") not in (
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        ):
            fail(f"desired tree {directory} does not exist or is not a directory")
        with open_store(state, create=False, read_only=True) as store:
            rows = store.all()
            observations = store.observations()
            recorded_root = store.tree_root()
        report = build_report(
            rows,
            index=index,
            now=datetime.now(UTC),
            observations=observations,
            tree_path=str(directory),
            tree_root=tree_root(directory),
            recorded_root=recorded_root,
            statuses=statuses,
            apps=frozenset(apps),
            lives=lives,
        )
        if isinstance(state, PostgresURL):
            report = dataclasses.replace(report, shared=True, leader=read_leader_or_fail(state))
        for note in report.notes():
            click.echo(click.style("note: ", fg="yellow") + printable(note), err=True)
        if output == "json":
            click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        else:
            click.echo(render.status_table(report, root=str(directory)))


def read_leader_or_fail(url: PostgresURL) -> LeaderRow | None:
    """Who leads the replicas sharing the store at ``url`` (``None``: none ever ran)."""
    import psycopg

    from reconciler.store.leader import read_leader
    from reconciler.store.postgres import SCHEMA

    try:
        return read_leader(url.conninfo(), schema=SCHEMA)
    except psycopg.Error as exc:
        fail(f"state store {url}: cannot read who leads: {url.scrub(str(exc))}")
