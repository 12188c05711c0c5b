"""``reconciler validate``: check a desired tree, or one desired file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from reconciler.cli.options import (
    SectionedCommand,
    file_limits,
    limit_options,
    output_option,
    tree_or_file_argument,
)
from reconciler.cli.shell import configure_events, fail
from reconciler.cli.views import render
from reconciler.engine.operations.common import log_loaded
from reconciler.tree.desired import SUFFIXES, load_file, load_tree


@click.command(cls=SectionedCommand)
@tree_or_file_argument
@output_option("validate")
@limit_options
def validate(directory: str, output: str) -> None:
    """Check the desired tree, or one desired file; exit 1 and list every problem if invalid.

    PATH is a tree (a directory) or a single .yaml, .yml or .json file, which is
    checked on its own by the same rules: a task or Identifier declared twice in
    it is an error, clashes with other files are not looked for.
    """
    configure_events(report=True)
    path = Path(directory)
    if path.is_dir():
        what, root = "desired tree", directory
        index = load_tree(path, limits=file_limits())
    elif not path.exists():
        fail(f"{directory} does not exist: give a desired tree (a directory) or a desired file")
    elif not directory.endswith(SUFFIXES):
        fail(
            f"{directory} is not a desired file: only files ending in "
            f"{', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} are checked (or give a directory)"
        )
    else:
        # Paths in messages stay as the user wrote this one, hence no root.
        what, root = "desired file", ""
        index = load_file(directory, limits=file_limits())
    log_loaded(index, root=directory)
    found = index.problems
    if output == "json":
        doc = render.validation_json(index, given=directory, root=root)
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    elif found:
        click.echo(render.problems(root, found), err=True)
    if found:
        files = f" in {len(index.invalid_files) or 1} file(s)" if root else ""
        fail(f"{what} {directory} is invalid: {len(found)} problem(s){files}")
    if output == "text":
        files = f"{len(index.paths)} files under " if root else ""
        click.echo(
            click.style("valid: ", fg="green", bold=True)
            + f"{len(index.tasks)} tasks in {files}{directory}"
        )
