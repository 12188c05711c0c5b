"""The JSON Schema of a desired file, shipped as package data for editors.

The schema is data, not code: ``desired.schema.json`` beside this module is
the published artefact (``reconciler schema`` prints it byte for byte, and
editors point ``$schema`` at a copy of it). It is read through
:mod:`importlib.resources`, so it is found in an installed wheel as well as
in a checkout. The loader in :mod:`reconciler.tree.desired`, not this schema, is
the authority; ``tests/test_desired_schema.py`` checks that the two agree
wherever a schema can decide, and lists where it cannot.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["desired_schema", "desired_schema_text"]

_NAME = "desired.schema.json"


def desired_schema_text() -> str:
    """The schema as shipped (JSON text)."""
    return resources.files(__name__).joinpath(_NAME).read_text(encoding="utf-8")


def desired_schema() -> dict[str, Any]:
    """The schema, parsed."""
    schema: dict[str, Any] = json.loads(desired_schema_text())
    return schema
