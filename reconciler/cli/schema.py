"""``reconciler schema``: the JSON Schema of a desired file."""

from __future__ import annotations

import click

from reconciler.cli.options import SectionedCommand
from reconciler.tree.schema import desired_schema_text


@click.command(cls=SectionedCommand)
def schema() -> None:
    """Print the JSON Schema of a desired file, for editors (docs/desired-files.md)."""
    click.echo(desired_schema_text(), nl=False)
