"""The command line: one module per command over the engine, shared options,
and the views that print reports."""
