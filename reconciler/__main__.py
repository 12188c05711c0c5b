"""``python -m reconciler`` runs the command line."""

from reconciler.cli import entry_point

entry_point()
