"""``python -m reconciler`` runs the command line (Ctrl-C safe from the first moment)."""

from reconciler.cli.interrupt import main

main()
