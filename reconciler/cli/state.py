"""``reconciler state``: manage state stores (``state migrate``)."""

from __future__ import annotations

import click

from reconciler.cli.options import ReconcilerGroup, StoreLocationType, env_option
from reconciler.cli.shell import configure_events, fail, operation_errors
from reconciler.engine.operations.common import open_store, store_exists
from reconciler.store.base import StoreError, StoreLocation


@click.group("state", cls=ReconcilerGroup)
def state_group() -> None:
    """Manage state stores (SQLite files and PostgreSQL databases)."""


@state_group.command("migrate")
@env_option(
    "--from",
    "source",
    env="STATE_MIGRATE_FROM",
    type=StoreLocationType(),
    required=True,
    help="The store to copy (usually the SQLite file); only read, so a daemon may run on it.",
)
@env_option(
    "--to",
    "target",
    env="STATE_MIGRATE_TO",
    type=StoreLocationType(),
    required=True,
    help="The empty store to fill (usually a postgresql:// URL); a store with any record "
    "is refused.",
)
def state_migrate(source: StoreLocation, target: StoreLocation) -> None:
    """Copy a state store into an empty one: every task row, observation and the meta
    (lineage, generation, tree root) in one transaction, checked by counts and a
    digest of the rows before it commits. Stop the daemon first: results it records
    after the copy's snapshot stay behind (a warning says so)."""
    configure_events()
    with operation_errors():
        if str(source) == str(target):
            fail(f"--from and --to name the same store ({source})")
        if not store_exists(source):
            fail(f"state store {source} does not exist: nothing to migrate")
        with open_store(source, create=False, read_only=True) as store:
            snapshot = store.snapshot()
        with open_store(target, create=True, command="reconciler state migrate") as store:
            try:
                store.restore(snapshot)
            except StoreError as exc:
                fail(str(exc))
        with open_store(source, create=False, read_only=True) as store:
            generation = store.generation()
        meta = snapshot.meta
        click.echo(
            f"migrated {len(snapshot.tasks)} task(s), {len(snapshot.observations)} "
            f"observation(s) and the meta (lineage {meta.get('lineage')}, generation "
            f"{meta.get('generation', '0')}, tree root {meta.get('tree_root') or 'none'}) "
            f"from {source} to {target}; rows digest sha256:{snapshot.digest()}"
        )
        if str(generation) != meta.get("generation", "0"):
            click.echo(
                click.style("warning: ", fg="yellow", bold=True)
                + f"{source} recorded results while it was copied (generation "
                f"{meta.get('generation', '0')} then, {generation} now): stop the daemon and "
                "migrate again into an empty store",
                err=True,
            )
