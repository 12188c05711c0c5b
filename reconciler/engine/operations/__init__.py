"""The one-shot operations behind ``plan`` and ``apply``: what they do, apart from how
the command line spells their options and prints their results.

Each takes a typed argument dataclass and a view (a protocol the command line
implements: notes, warnings, progress displays), and returns a report value
the views print. A refusal is a precise :class:`~.common.OperationError`
whose message the command prints as its one ``error:`` line (exit 1). No
click here: the layers contract keeps the engine below the command line.
"""
