"""``reconciler completion``: the shell completion script."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import click

from reconciler.cli.options import SectionedCommand
from reconciler.cli.shell import fail

#: The shells click completes, and the variable its completion is keyed on.
COMPLETION_SHELLS: Final = ("bash", "zsh", "fish")


COMPLETE_VAR: Final = "_RECONCILER_COMPLETE"


@click.command(cls=SectionedCommand)
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS), required=False)
def completion(shell: str | None) -> None:
    """Print the completion script for SHELL (default: the one $SHELL names).

    Load it from the shell's start-up file, e.g. in ~/.bashrc:
    eval "$(reconciler completion bash)"; or save it once for speed:
    reconciler completion fish > ~/.config/fish/completions/reconciler.fish
    """
    from click.shell_completion import get_completion_class

    if shell is None:
        shell = Path(os.environ.get("SHELL", "")).name
        if shell not in COMPLETION_SHELLS:
            fail(
                f"cannot tell the shell from SHELL={os.environ.get('SHELL', '')!r}: "
                f"name it ({', '.join(COMPLETION_SHELLS)})"
            )
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        fail(f"click has no completion for {shell}")
    group = click.get_current_context().find_root().command
    click.echo(cls(group, {}, "reconciler", COMPLETE_VAR).source(), nl=False)
