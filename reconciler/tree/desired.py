"""The desired tree: find, parse and check the files ops teams edit.

Layers, from pure to effectful:

* :func:`parse_file` turns one file's bytes into a :class:`FileResult` (the
  tasks it declares and every local problem) without touching the disk.
* :func:`read_file`, :func:`discover` and the loaders built on them
  (:func:`load_tree`, :func:`load_file` for one file checked on its own) are
  the only code that does I/O; they turn every failure (unreadable file,
  symlink leaving the tree) into a :class:`Problem` instead of an exception.
* :class:`DesiredIndex` holds the whole tree and applies the rules that span
  files (one declaration per task, one task per ``Identifier``). It is updated
  one file at a time so the daemon never rescans the tree for one edit.

Parsing. YAML is read with PyYAML's C parser and composer (libyaml), which
yield a node tree with source marks. PyYAML's resolver and constructor are not
used: every untagged scalar stays text and is typed here, while walking the
nodes, by rules that cover YAML 1.1 and 1.2 at once. That is what lets the
loader tell ``RoomId: 0123`` (a plain scalar some YAML reads as a number) from
``RoomId: "0123"``, see duplicate keys PyYAML would silently collapse, put a
``line:column`` on every problem, and still cost less than a bare
``yaml.load`` of the same files. The parser's own words are kept for syntax
errors, except where they hide a common cause: a tab in indentation is named
as such.

An id (``AppId``, ``BusinessId``, ``RoomId``, ``TaskId``, ``Identifier``)
written as a plain scalar that YAML 1.1 *or* YAML 1.2 would read as anything
but a string -- a number (``0123``, ``1e5``, ``0o17``, ``.5``), a bool
(``yes``, ``on``, ``y``), a date or null -- is refused with the quoted form to
write instead (when that form is a valid id); it is never converted. A null
(``~``, ``null``, nothing) gets what to write instead, or what removing the
key does; never a quoted example, which would not be a valid id. An explicit
``!!str`` tag also makes it a string. ``Handle`` accepts only ``true`` and
``false`` (``True``/``TRUE``/``False``/``FALSE`` too, which every YAML reads
alike); ``yes``/``no``/``on``/``off`` are refused because YAML 1.2 reads them
as strings. ``Duration`` is a plain decimal integer in [1, 600]; leading
zeros (octal in YAML 1.1), hex, ``1_000``, sexagesimal forms, ``30.0`` and
``3e1`` are refused as ambiguous. Other explicit tags and YAML merge keys
(``<<``) are not supported: ``defaults`` is the one way to share values.

JSON. A ``.json`` file must be strict JSON (checked with :func:`json.loads`,
which also gives the line and column of a syntax error; a trailing comma, which
it calls a missing value, is named as such). Its nodes then come
from the same composer (JSON is YAML), so it gets the same checks and
positions. A few valid JSON texts are not valid YAML 1.1 (a tab at the start
of a line outside brackets, an escaped surrogate pair such as
``"\\ud83d\\ude00"``); those are re-read by a small JSON reader here that builds
the same kind of nodes with positions. An empty ``.json`` file, like an empty
YAML file, declares nothing.

A file with any local problem contributes no tasks (``FileResult.tasks`` is
then empty): the daemon holds that file's tasks as they were until it is
fixed. Files in a cross-file conflict are likewise held, on both sides.

Limits (:class:`FileLimits`). What one file may cost is bounded, so that no
pull request can make a reader's memory, time or output grow faster than the
tree: a file over ``max_bytes`` is refused from its size alone (never read
whole), one whose ``tasks`` list is longer than ``max_tasks`` is refused
before any task in it is checked, and at most ``max_problems`` problems are
reported per file, then a count of the rest. Each refusal names the limit and
the option that raises it; the file is invalid like any other, so its tasks
are held.
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
import stat
import types
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.core.heap import gc_paused
from reconciler.core.task import (
    DURATION_MAX,
    DURATION_MIN,
    IDENTITY_FIELDS,
    MANAGED_FIELDS,
    TASK_KEYS,
    DesiredTask,
    FieldValue,
    Source,
    TaskKey,
)

__all__ = [
    "SUFFIXES",
    "DesiredIndex",
    "FileLimits",
    "FileResult",
    "Problem",
    "discover",
    "is_candidate",
    "load_file",
    "load_tree",
    "parse_file",
    "read_file",
]

#: What a desired file's name ends with.
SUFFIXES: Final = (".yaml", ".yml", ".json")

_STR: Final = "tag:yaml.org,2002:str"
_MAP: Final = "tag:yaml.org,2002:map"
_SEQ: Final = "tag:yaml.org,2002:seq"
_DEFAULT_TAGS: Final[dict[type[Node], str]] = {
    ScalarNode: _STR,
    SequenceNode: _SEQ,
    MappingNode: _MAP,
}


class _Untyped:
    """Resolver for the composer: every untagged scalar is text, typed later by us.

    PyYAML's resolver runs a Python regex cascade on every scalar, and its
    answer (YAML 1.1 only) is not the one we need anyway; :func:`_plain_kind`
    applies both YAML 1.1 and 1.2 rules, and only to values that need it.
    """

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
        return _DEFAULT_TAGS[kind]

    def descend_resolver(self, parent: Any, index: Any) -> None:
        pass

    def ascend_resolver(self) -> None:
        pass


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _Composer(_Untyped, CParser):
        """libyaml's parser and composer, nothing else."""

else:  # pragma: no cover - every supported install ships libyaml

    class _Composer(  # type: ignore[no-redef]
        _Untyped,
        yaml.reader.Reader,
        yaml.scanner.Scanner,
        yaml.parser.Parser,
        yaml.composer.Composer,
    ):
        """The pure-Python parser and composer."""

        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)


_ID_PATTERN: Final = r"[a-zA-Z0-9_@\-\.]{1,128}"
_ID_RE: Final = re.compile(_ID_PATTERN)
_ID_CHAR_RE: Final = re.compile(r"[^a-zA-Z0-9_@\-\.]")
_ID_RULE: Final = "1 to 128 characters from a-z A-Z 0-9 _ @ - ."

# Plain scalars YAML 1.1 or 1.2 reads as something other than text.
_WORD_KIND: Final[dict[str, str]] = {
    **dict.fromkeys(
        [
            "y",
            "Y",
            "yes",
            "Yes",
            "YES",
            "n",
            "N",
            "no",
            "No",
            "NO",
            "true",
            "True",
            "TRUE",
            "false",
            "False",
            "FALSE",
            "on",
            "On",
            "ON",
            "off",
            "Off",
            "OFF",
        ],
        "a bool",
    ),
    **dict.fromkeys(["", "~", "null", "Null", "NULL"], "null"),
}
_NUMBER: Final = re.compile(
    # YAML 1.1 ints: binary, octal, decimal, hex, sexagesimal; "_" allowed
    r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
    r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+"
    # YAML 1.1 floats
    r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*"
    # YAML 1.2 core numbers (1e5, 0o17, 089)
    r"|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_DATE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?"
    r"(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?"
)
# Numbers and dates all start with one of these: a cheap gate before the regexes.
_NUMBER_START: Final = frozenset("0123456789+-.")
_DECIMAL: Final = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
# Whole numbers in a notation other than plain decimal digits (octal, hex, 1_000, 1:20).
_OTHER_INTEGER: Final = re.compile(
    r"[-+]?(?:0b[0-1_]+|0o[0-7]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*(?::[0-5]?[0-9])*)"
)
_TRUE: Final = frozenset({"true", "True", "TRUE"})
_FALSE: Final = frozenset({"false", "False", "FALSE"})


def _plain_kind(value: str) -> str | None:
    """What YAML 1.1 or 1.2 reads this plain scalar as, or ``None`` for text."""
    kind = _WORD_KIND.get(value)
    if kind is None and value[:1] in _NUMBER_START:
        if _NUMBER.fullmatch(value):
            return "a number"
        if _DATE.fullmatch(value):
            return "a date"
    return kind


def _not_an_id(value: str) -> str | None:
    """Why a string is not a valid id, or ``None`` if it is one."""
    if _ID_RE.fullmatch(value):
        return None
    if not value:
        return "it is empty"
    if len(value) > 128:
        return f"it is {len(value)} characters long"
    bad = _ID_CHAR_RE.search(value)
    return f"character {bad.group()!r} is not allowed" if bad else "it does not match"


def _whole_number(value: str) -> int | None:
    """The integer a number such as ``30.0`` or ``3e1`` equals, or ``None``."""
    try:
        number = float(value)
    except ValueError:  # YAML spellings Python lacks (.inf, 1:20.5)
        return None
    return int(number) if number.is_integer() else None


_ENVELOPE_KEYS: Final = ("defaults", "tasks")
_MAX_SHOWN: Final = 40


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the desired tree, at the node that is wrong."""

    source: Source
    #: The task field concerned, or ``None`` for file-level problems.
    field: str | None
    message: str

    def __str__(self) -> str:
        if self.field:
            return f"{self.source}: {self.field}: {self.message}"
        return f"{self.source}: {self.message}"


@dataclass(frozen=True, slots=True)
class FileResult:
    """What one file declares. ``tasks`` is empty whenever ``problems`` is not."""

    path: str
    tasks: tuple[DesiredTask, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True, slots=True)
class FileLimits:
    """What one desired file may cost; the defaults leave room for any real tree.

    A file of 50,000 tasks in the usual layout is about 4.5 MB; the byte limit
    also bounds the parser's memory (about 40 bytes of nodes per byte of YAML).
    """

    #: Bytes one file may hold (``--max-file-bytes``).
    max_bytes: int = 8 * 1024 * 1024
    #: Tasks one file may declare (``--max-file-tasks``).
    max_tasks: int = 50_000
    #: Problems reported for one file; the rest are counted (``--max-file-problems``).
    max_problems: int = 100

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tasks", "max_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


#: The limits used when none are given.
DEFAULT_LIMITS: Final = FileLimits()


def _size(n: int) -> str:
    """``n`` bytes for a person: ``8 MiB``, ``61.0 MB`` (binary units for limits, which
    are set in them, and decimal megabytes for a file's size, as ``ls -lh --si``)."""
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n:,} bytes"


def is_candidate(rel_path: str) -> bool:
    """Whether a path (posix, relative to the root) is a desired-state file."""
    if not rel_path.endswith(SUFFIXES):
        return False
    parts = rel_path.split("/")
    name = parts[-1]
    if name.endswith(("~", ".swp")) or name.startswith(".#"):
        return False
    return not any(part.startswith(".") for part in parts)


# --------------------------------------------------------------------------
# Parsing one file (pure)


class _InvalidValue:
    """Marks a field whose value was refused, so it is neither used nor missing."""

    __slots__ = ()


_INVALID: Final = _InvalidValue()

# Checked fields of one mapping: a value, or _INVALID where it was refused.
_Values = dict[str, Any]
# One declared task: its fields (defaults merged in), whether all are valid, its node.
_Declared = tuple[_Values, bool, MappingNode]


def _shown(value: str) -> str:
    """A value for a message: quoted, and cut when long."""
    if len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN] + "…") + f" ({len(value)} characters)"
    return repr(value)


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a scalar"


def _suggest(name: str, valid: Iterable[str], *, what: str) -> str:
    """'unknown field ... — did you mean ...?' with the closest valid name."""
    valid = tuple(valid)
    by_lower = {v.lower(): v for v in valid}
    hit = by_lower.get(name.lower())
    if hit is None:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        if not close:
            close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
            close = [by_lower[c] for c in close]
        hit = close[0] if close else None
    if hit is not None:
        return f"unknown {what} {_shown(name)} — did you mean {hit!r}?"
    return f"unknown {what} {_shown(name)}; valid: {', '.join(valid)}"


class _Checker:
    """Walks one file's nodes, collecting values and problems."""

    __slots__ = ("inherited", "is_json", "max_tasks", "path", "problems", "text")

    def __init__(self, path: str, text: str, *, max_tasks: int) -> None:
        self.path = path
        self.text = text
        self.max_tasks = max_tasks
        self.is_json = path.endswith(".json")
        self.problems: list[Problem] = []
        # Fields 'defaults' sets, while a task under it is checked: a hint about
        # removing a key must say the value then comes from defaults.
        self.inherited: frozenset[str] = frozenset()

    # -- reporting ---------------------------------------------------------

    def at(self, node: Node, field: str | None, message: str) -> _InvalidValue:
        mark = node.start_mark
        self.problems.append(
            Problem(Source(self.path, mark.line + 1, mark.column + 1), field, message)
        )
        return _INVALID

    def quoted(self, field: str, value: str) -> str:
        literal = json.dumps(value, ensure_ascii=False)
        return f'"{field}": {literal}' if self.is_json else f"{field}: {literal}"

    # -- values --------------------------------------------------------------

    def explicit_tag(self, node: ScalarNode) -> bool:
        """Whether the scalar carries its own tag (``!!str 0123``), so nothing is guessed."""
        index = node.start_mark.index
        return 0 <= index < len(self.text) and self.text[index] == "!"

    def tagged(self, node: ScalarNode, field: str, expected: str) -> _InvalidValue:
        return self.at(
            node, field, f"the tag {node.tag} is not supported here; write {expected} without a tag"
        )

    def check_id(self, node: Node, field: str) -> FieldValue | _InvalidValue:
        if node.__class__ is not ScalarNode:
            return self.at(node, field, f"must be a string, not {_node_kind(node)}")
        assert isinstance(node, ScalarNode)
        value: str = node.value
        if node.tag != _STR:
            return self.tagged(node, field, "a string")
        # Only plain scalars that look like a number, bool, date or null need a closer look.
        if not node.style and (value in _WORD_KIND or value[:1] in _NUMBER_START):
            kind = _plain_kind(value)
            if kind is not None and not self.explicit_tag(node):
                return self.not_a_string(node, field, value, kind)
        if _ID_RE.fullmatch(value):
            return value
        return self.bad_id(node, field, value)

    def not_a_string(self, node: Node, field: str, value: str, kind: str) -> _InvalidValue:
        if kind == "null":
            return self.no_value(node, field, value, self.write_id())
        verb = "is" if self.is_json else "reads as"
        why = _not_an_id(value)
        if why is None:
            hint = f"quote it: {self.quoted(field, value)}"
        else:
            # Quoting would only trade this error for another: say what is wrong with it.
            hint = f"quoted, it would not be a valid id either: {why}; ids are {_ID_RULE}"
        return self.at(node, field, f"value {value} {verb} {kind}; {hint}")

    def write_id(self) -> str:
        string = "a JSON string" if self.is_json else "a quoted string"
        return f"write the id as {string} (ids are {_ID_RULE})"

    def no_value(self, node: Node, field: str, value: str, write: str) -> _InvalidValue:
        """A null where a value belongs: say what to write, or what removing the key does.

        Never a quoted example: ``"~"``, ``""`` or ``"..."`` would not be valid ids.
        """
        if value == "~":
            what = "has no value (YAML reads ~ as null)"
        elif value:
            what = "has no value (null)"
        else:
            what = "has no value (YAML reads an empty value as null)"
        if field in self.inherited:
            hint = f"remove the key to take {field} from defaults, or {write}"
        elif field in IDENTITY_FIELDS:
            hint = f"{field} is required: {write}"
        elif field in MANAGED_FIELDS:
            hint = f"remove the key to leave {field} unmanaged, or {write}"
        else:
            hint = f"remove the key to set no {field}, or {write}"
        return self.at(node, field, f"{what}; {hint}")

    def bad_id(self, node: Node, field: str, value: str) -> _InvalidValue:
        why = _not_an_id(value) or "it does not match"
        return self.at(
            node, field, f"value {_shown(value)} is not a valid id: {why}; ids are {_ID_RULE}"
        )

    def check_handle(self, node: Node, field: str) -> FieldValue | _InvalidValue:
        if node.__class__ is not ScalarNode:
            return self.at(node, field, f"must be true or false, not {_node_kind(node)}")
        assert isinstance(node, ScalarNode)
        value: str = node.value
        if node.tag != _STR:
            return self.tagged(node, field, "true or false")
        if node.style or self.explicit_tag(node):
            return self.at(
                node,
                field,
                f"must be true or false, not the string {_shown(value)}; write it without quotes",
            )
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        if _plain_kind(value) == "a bool":
            return self.at(
                node,
                field,
                f"value {value} is not accepted (YAML 1.2 reads it as a string); "
                "write true or false",
            )
        kind = _plain_kind(value)
        if kind == "null":
            return self.no_value(node, field, value, "write true or false")
        if kind is not None:
            return self.at(node, field, f"must be true or false, not {value}")
        return self.at(node, field, f"must be true or false, not {_shown(value)}")

    def check_duration(self, node: Node, field: str) -> FieldValue | _InvalidValue:
        rule = f"an integer number of seconds from {DURATION_MIN} to {DURATION_MAX}"
        if node.__class__ is not ScalarNode:
            return self.at(node, field, f"must be {rule}, not {_node_kind(node)}")
        assert isinstance(node, ScalarNode)
        value: str = node.value
        if node.tag != _STR:
            return self.tagged(node, field, "a number")
        if node.style or self.explicit_tag(node):
            return self.at(
                node,
                field,
                f"must be {rule}, not the string {_shown(value)}; write it without quotes",
            )
        if _DECIMAL.fullmatch(value):
            number = int(value)
            if DURATION_MIN <= number <= DURATION_MAX:
                return number
            return self.at(node, field, f"value {value} is out of range; it must be {rule}")
        kind = _plain_kind(value)
        if kind == "a number":
            if not _OTHER_INTEGER.fullmatch(value):
                whole = _whole_number(value)
                if whole is None:
                    return self.at(
                        node, field, f"value {value} is not a whole number; it must be {rule}"
                    )
                # 30.0 or 3e1: the same number to JSON, but not the integer YAML reads.
                return self.at(
                    node,
                    field,
                    f"value {value} has a fraction or an exponent; write it in plain decimal "
                    f"digits ({whole}); it must be {rule}",
                )
            return self.at(
                node,
                field,
                f"value {value} is not written in plain decimal digits (YAML versions disagree "
                f"on leading zeros, 0x, 0o, _ and :); it must be {rule}",
            )
        if kind == "a bool":
            return self.at(
                node, field, f"value {value} is a bool, not an integer; it must be {rule}"
            )
        if kind == "null":
            return self.no_value(node, field, value, f"write {rule}")
        return self.at(node, field, f"value {_shown(value)} is not a number; it must be {rule}")

    # -- mappings ------------------------------------------------------------

    def fields(self, node: MappingNode, *, top_level: bool = False) -> tuple[_Values, bool]:
        """The checked fields of a task (or ``defaults``) mapping, and whether all were valid."""
        values: _Values = {}
        ok = True
        for key, value in node.value:
            if key.__class__ is not ScalarNode:
                self.at(key, None, f"a field name must be a plain word, not {_node_kind(key)}")
                continue
            name: str = key.value
            check = _CHECKS.get(name)
            if check is None:
                self.unknown_field(key, name, top_level=top_level)
            elif name in values:
                self.duplicate(node, key, name)
            else:
                checked = check(self, value, name)
                if checked is _INVALID:
                    ok = False
                values[name] = checked
        return values, ok

    def unknown_field(self, key: ScalarNode, name: str, *, top_level: bool) -> None:
        if name == "<<":
            self.at(key, None, "merge keys (<<) are not supported; use defaults to share values")
            return
        valid = (*TASK_KEYS, *_ENVELOPE_KEYS) if top_level else TASK_KEYS
        self.at(key, None, _suggest(name, valid, what="field"))

    def duplicate(self, mapping: MappingNode, key: Node, name: str) -> None:
        first = next(k for k, _ in mapping.value if k.__class__ is ScalarNode and k.value == name)
        mark = first.start_mark
        self.at(
            key,
            name,
            f"duplicate key (first at line {mark.line + 1}, column {mark.column + 1}); "
            "YAML would silently keep only the last",
        )

    # -- file structure --------------------------------------------------------

    def document(self, root: Node | None) -> list[_Declared]:
        """The tasks a document declares, defaults merged in."""
        if root is None:
            return []
        if root.__class__ is MappingNode:
            assert isinstance(root, MappingNode)
            names = {k.value for k, _ in root.value if k.__class__ is ScalarNode}
            if names.isdisjoint(_ENVELOPE_KEYS):
                values, ok = self.fields(root, top_level=True)
                return [(values, ok, root)]
            return self.envelope(root)
        if root.__class__ is ScalarNode and not root.value and not getattr(root, "style", ""):
            return []  # a bare "---" document
        shape = "list" if root.__class__ is SequenceNode else "scalar"
        self.at(
            root,
            None,
            f"the top level is a {shape}; a file holds one task (a mapping of task fields) "
            "or a mapping with 'defaults' and 'tasks'",
        )
        return []

    def envelope(self, root: MappingNode) -> list[_Declared]:
        defaults: _Values = {}
        defaults_ok = True
        defaults_usable = True
        items: list[Node] | None = None
        items_node: Node = root
        seen: set[str] = set()
        stray: _Values = {}
        for key, value in root.value:
            if key.__class__ is not ScalarNode:
                self.at(key, None, f"a top-level key must be a plain word, not {_node_kind(key)}")
                continue
            name: str = key.value
            if name in _ENVELOPE_KEYS:
                if name in seen:
                    self.duplicate(root, key, name)
                    continue
                seen.add(name)
                if name == "defaults":
                    if value.__class__ is MappingNode:
                        assert isinstance(value, MappingNode)
                        defaults, defaults_ok = self.fields(value)
                    else:
                        defaults_ok = defaults_usable = False
                        self.at(
                            value,
                            None,
                            f"'defaults' must be a mapping of task fields, not {_node_kind(value)}",
                        )
                elif value.__class__ is SequenceNode:
                    items, items_node = value.value, key  # named at 'tasks:'
                else:
                    self.at(
                        value, None, f"'tasks' must be a list of tasks, not {_node_kind(value)}"
                    )
                    items = []
            elif name in _CHECKS:
                # Counted as set (but unusable) in every task, so it is not also "missing".
                stray[name] = _INVALID
                self.at(
                    key,
                    None,
                    f"task field {name!r} cannot sit beside 'tasks' or 'defaults' at the top "
                    "level; put it under 'defaults' or in each task",
                )
            else:
                self.at(key, None, _suggest(name, _ENVELOPE_KEYS, what="top-level key"))
        inherited = frozenset(defaults)
        if stray:
            defaults = {**stray, **defaults}
            defaults_ok = False
        if items is None:
            self.at(root, None, "'defaults' without 'tasks' declares nothing; add a 'tasks' list")
            return []
        if len(items) > self.max_tasks:
            # Refused before any task is checked: the cost stays that of the parse.
            self.at(
                items_node,
                None,
                f"'tasks' has {len(items):,} tasks, over the limit of {self.max_tasks:,} "
                "per file; split the file, or raise the limit with --max-file-tasks",
            )
            return []
        tasks: list[_Declared] = []
        self.inherited = inherited
        for item in items:
            if item.__class__ is not MappingNode:
                self.at(
                    item,
                    None,
                    f"each item of 'tasks' must be a task mapping, not {_node_kind(item)}",
                )
                continue
            assert isinstance(item, MappingNode)
            own, ok = self.fields(item)
            if defaults:
                own = {**defaults, **own}
            if defaults_usable or _complete(own):
                # With broken defaults, missing ids were likely meant for them: say no more.
                tasks.append((own, ok and defaults_ok, item))
        self.inherited = frozenset()
        return tasks

    def build(self, declared: list[_Declared]) -> list[DesiredTask]:
        """Tasks from checked fields; missing ids and duplicates inside the file reported."""
        out: list[DesiredTask] = []
        by_key: dict[TaskKey, list[DesiredTask]] = {}
        by_identifier: dict[str, list[DesiredTask]] = {}
        path = self.path
        for values, ok, node in declared:
            if not ("AppId" in values and "RoomId" in values and "TaskId" in values):
                for field in IDENTITY_FIELDS:
                    if field not in values:
                        self.at(
                            node,
                            field,
                            f"missing required field {field} (set it in the task or in defaults)",
                        )
                continue
            if not ok:
                continue
            mark = node.start_mark
            key = TaskKey(values["AppId"], values["RoomId"], values["TaskId"])
            task = DesiredTask(
                key=key,
                business_id=values.get("BusinessId"),
                fields={f: values[f] for f in MANAGED_FIELDS if f in values},
                source=Source(path, mark.line + 1, mark.column + 1),
            )
            out.append(task)
            same = by_key.get(key)
            if same is None:
                by_key[key] = [task]
            else:
                same.append(task)
            identifier = values.get("Identifier")
            if identifier is not None:
                by_identifier.setdefault(identifier, []).append(task)
        for key, tasks in by_key.items():
            if len(tasks) > 1:
                self.problems.extend(_key_conflict(key, tasks))
        for identifier, tasks in by_identifier.items():
            if len(tasks) > 1:
                self.problems.extend(_identifier_conflict(identifier, tasks))
        return out


def _complete(values: _Values) -> bool:
    return all(f in values for f in IDENTITY_FIELDS)


_Check = Any  # a _Checker method taking (node, field) and returning a value or _INVALID
_CHECKS: Final[dict[str, _Check]] = {
    "AppId": _Checker.check_id,
    "BusinessId": _Checker.check_id,
    "RoomId": _Checker.check_id,
    "TaskId": _Checker.check_id,
    "Identifier": _Checker.check_id,
    "Handle": _Checker.check_handle,
    "Duration": _Checker.check_duration,
}
assert tuple(_CHECKS) == TASK_KEYS


def _by_place(tasks: list[DesiredTask]) -> list[DesiredTask]:
    """Tasks in source order, so messages do not depend on the order files were seen."""
    return sorted(tasks, key=lambda t: (t.source.path, t.source.line, t.source.column))


#: Places a duplicate's problem names besides its own; a larger group says how many more.
SHOWN_PLACES: Final = 3


def _key_conflict(key: TaskKey, tasks: list[DesiredTask]) -> list[Problem]:
    return _group_problems(
        tasks,
        None,
        f"task {key} is declared more than once",
        "also at",
        lambda t: str(t.source),
    )


def _identifier_conflict(identifier: str, tasks: list[DesiredTask]) -> list[Problem]:
    return _group_problems(
        tasks,
        "Identifier",
        f"{identifier!r} is used by more than one task, so their slice files would "
        "overwrite each other",
        "also used by",
        lambda t: f"{t.key} at {t.source}",
    )


def _group_problems(
    tasks: list[DesiredTask],
    field: str | None,
    heading: str,
    also: str,
    place: Callable[[DesiredTask], str],
) -> list[Problem]:
    """The problems of one group of duplicates: linear in the group, whatever its size.

    A small group is reported at each of its places, naming the others. A larger
    one once per file it is in (at its first place there, so every file involved
    is shown invalid), naming the first few other places and how many more: one
    task pasted 8,000 times is one line, not 8,000 lines of 8,000 places each.
    """
    tasks = _by_place(tasks)
    if len(tasks) <= SHOWN_PLACES + 1:
        at = tasks
    else:
        firsts: dict[str, DesiredTask] = {}
        for task in tasks:
            firsts.setdefault(task.source.path, task)
        at = list(firsts.values())
    count = f" ({len(tasks):,} times)" if len(tasks) > SHOWN_PLACES + 1 else ""
    problems = []
    for task in at:
        others = [t for t in tasks[: SHOWN_PLACES + 1] if t is not task][:SHOWN_PLACES]
        more = len(tasks) - 1 - len(others)
        text = f"{heading}{count}; {also} " + ", ".join(place(t) for t in others)
        if more > 0:
            text += f" and {more:,} more"
        problems.append(Problem(task.source, field, text))
    return problems


def parse_file(path: str, data: bytes, *, limits: FileLimits = DEFAULT_LIMITS) -> FileResult:
    """Check one file's bytes; ``path`` (posix, relative to the root) is only used in sources."""
    if len(data) > limits.max_bytes:
        return _too_big(path, len(data), limits)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return _failed(path, _byte_position(data, e.start), f"not UTF-8 text ({e.reason})")
    checker = _Checker(path, text, max_tasks=limits.max_tasks)
    try:
        root = _compose(text, path)
    except _ParseError as e:
        return _failed(path, (e.line, e.column), e.message)
    tasks = checker.build(checker.document(root))
    if checker.problems:
        return FileResult(path, (), _capped(path, checker.problems, limits.max_problems))
    return FileResult(path, tuple(tasks), ())


def _failed(path: str, where: tuple[int, int], message: str) -> FileResult:
    return FileResult(path, (), (Problem(Source(path, *where), None, message),))


def _too_big(path: str, size: int, limits: FileLimits) -> FileResult:
    return _failed(
        path,
        (1, 1),
        f"the file is {_size(size)}, over the limit of {_size(limits.max_bytes)} per file; "
        "it was not read: split it, or raise the limit with --max-file-bytes",
    )


def _capped(path: str, problems: list[Problem], most: int) -> tuple[Problem, ...]:
    """The first ``most`` problems in file order, then one that counts the rest."""
    shown = _sorted(problems)
    if len(shown) <= most:
        return tuple(shown)
    more = len(shown) - most
    last = Problem(
        Source(path, shown[most - 1].source.line, shown[most - 1].source.column),
        None,
        f"and {more:,} more problem{'s' if more > 1 else ''} in this file (the first "
        f"{most:,} are shown; raise the limit with --max-file-problems)",
    )
    return (*shown[:most], last)


def _byte_position(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", "replace"))
    return data.count(b"\n", 0, offset) + 1, column + 1


def _text_position(text: str, offset: int) -> tuple[int, int]:
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


class _ParseError(Exception):
    """The file is not YAML (or JSON): where, and the parser's own words."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message


def _compose(text: str, path: str) -> Node | None:
    if path.endswith(".json"):
        return _compose_json(text, path)
    return _compose_yaml(text)


def _compose_yaml(text: str) -> Node | None:
    try:
        composer = _Composer(text)
        try:
            node: Node | None = composer.get_single_node()
        finally:
            composer.dispose()
        return node
    except yaml.YAMLError as e:
        raise _yaml_error(text, e) from None
    except RecursionError:
        raise _ParseError(1, 1, "the document is nested too deeply") from None


def _yaml_error(text: str, error: yaml.YAMLError) -> _ParseError:
    if isinstance(error, yaml.reader.ReaderError):
        # libyaml counts bytes of the UTF-8 text; the pure-Python reader counts characters.
        if not yaml.__with_libyaml__:
            line, column = _text_position(text, error.position)
        else:
            line, column = _byte_position(text.encode("utf-8"), error.position)
        char = error.character
        code = char if isinstance(char, int) else ord(char)
        return _ParseError(line, column, f"character U+{code:04X} is not allowed in YAML")
    if isinstance(error, yaml.MarkedYAMLError):
        if error.problem == "but found another document":
            mark = error.problem_mark
            assert mark is not None
            return _ParseError(
                mark.line + 1,
                mark.column + 1,
                "a second YAML document ('---') starts here; a file holds one document",
            )
        mark = error.problem_mark or error.context_mark
        if isinstance(error, yaml.scanner.ScannerError) and _char_at(text, mark) == "\t":
            # libyaml's words ("found character that cannot start any token") hide the cause.
            assert mark is not None
            return _ParseError(
                mark.line + 1,
                mark.column + 1,
                "YAML forbids tabs for indentation: replace the tab here with spaces",
            )
        words = error.problem or "invalid YAML"
        if error.context:
            words = f"{words} ({error.context})"
        if mark is not None:
            return _ParseError(mark.line + 1, mark.column + 1, f"YAML syntax error: {words}")
        return _ParseError(1, 1, f"YAML syntax error: {words}")
    return _ParseError(1, 1, f"YAML syntax error: {error}")


# Line breaks as YAML 1.1 (and so libyaml's marks) counts them.
_YAML_LINE_BREAK: Final = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _char_at(text: str, mark: yaml.Mark | None) -> str | None:
    """The character a parser mark points at (marks count lines and characters)."""
    if mark is None:
        return None
    lines = _YAML_LINE_BREAK.split(text, maxsplit=mark.line + 1)
    if mark.line >= len(lines) or mark.column >= len(lines[mark.line]):
        return None
    return lines[mark.line][mark.column]


# --------------------------------------------------------------------------
# JSON the YAML 1.1 composer refuses


_JSON_SPACE: Final = re.compile(r"[ \t\n\r]*")
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_JSON_WORDS: Final = ("true", "false", "null")


class _NotJson(ValueError):
    """json.loads met NaN or Infinity, which it takes but JSON does not have."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(name)


def _compose_json(text: str, path: str) -> Node | None:
    """Nodes of a ``.json`` file, which must be strict JSON."""
    if not text.strip(" \t\n\r"):
        return None  # like an empty YAML file: declares nothing
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise _json_error(text, e) from None
    except _NotJson as e:
        line, column = _text_position(text, max(text.find(str(e)), 0))
        raise _ParseError(line, column, f"invalid JSON: {e} is not a JSON value") from None
    except RecursionError:
        raise _ParseError(1, 1, "the document is nested too deeply") from None
    try:
        return _compose_yaml(text)
    except _ParseError:
        # Valid JSON that YAML 1.1 refuses (a tab at a line start, escaped surrogates).
        return _JsonComposer(text, path).document()


def _json_error(text: str, error: json.JSONDecodeError) -> _ParseError:
    """json's own words, except for a trailing comma, which it reports as a missing value."""
    closing = text[error.pos : error.pos + 1]
    before = text[: error.pos].rstrip(" \t\n\r")
    if closing in ("}", "]") and before.endswith(","):
        line, column = _text_position(text, len(before) - 1)
        return _ParseError(
            line,
            column,
            f"invalid JSON: trailing comma before '{closing}'; JSON allows none, remove it",
        )
    return _ParseError(error.lineno, error.colno, f"invalid JSON: {error.msg}")


class _JsonComposer:
    """Builds YAML-style nodes with marks from text :func:`json.loads` accepted."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]

    def mark(self, index: int) -> yaml.Mark:
        line = bisect.bisect_right(self.line_starts, index) - 1
        return yaml.Mark(self.path, index, line, index - self.line_starts[line], None, None)  # type: ignore[arg-type]

    def space(self, index: int) -> int:
        match = _JSON_SPACE.match(self.text, index)
        assert match is not None
        return match.end()

    def document(self) -> Node:
        node, _ = self.value(self.space(0))
        return node

    def value(self, index: int) -> tuple[Node, int]:
        text = self.text
        start = self.mark(index)
        char = text[index]
        if char == "{":
            pairs: list[tuple[Node, Node]] = []
            index = self.space(index + 1)
            while text[index] != "}":
                key, index = self.value(index)
                index = self.space(self.space(index) + 1)  # past ':'
                value, index = self.value(index)
                pairs.append((key, value))
                index = self.space(index)
                if text[index] == ",":
                    index = self.space(index + 1)
            return MappingNode(_MAP, pairs, start, self.mark(index + 1), True), index + 1
        if char == "[":
            items: list[Node] = []
            index = self.space(index + 1)
            while text[index] != "]":
                item, index = self.value(index)
                items.append(item)
                index = self.space(index)
                if text[index] == ",":
                    index = self.space(index + 1)
            return SequenceNode(_SEQ, items, start, self.mark(index + 1), True), index + 1
        if char == '"':
            string, end = json.decoder.scanstring(text, index + 1)  # type: ignore[attr-defined]
            return ScalarNode(_STR, string, start, self.mark(end), '"'), end
        number = _JSON_NUMBER.match(text, index)
        if number is not None:
            end = number.end()
            return ScalarNode(_STR, number.group(), start, self.mark(end), ""), end
        for word in _JSON_WORDS:
            if text.startswith(word, index):
                end = index + len(word)
                return ScalarNode(_STR, word, start, self.mark(end), ""), end
        raise AssertionError(f"unexpected JSON at offset {index}")  # json.loads accepted it


# --------------------------------------------------------------------------
# The disk


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base if base.endswith(os.sep) else base + os.sep)


def _problem_at(path: str, message: str) -> Problem:
    return Problem(Source(path, 1, 1), None, message)


def read_file(root: Path, rel: str, *, limits: FileLimits = DEFAULT_LIMITS) -> FileResult:
    """Read and check ``root/rel``; every failure becomes a :class:`Problem`.

    The root is resolved first, so ``rel`` is read inside the tree the root
    points to now; a path or symlink that leads outside it is refused.
    """
    return _read(os.path.realpath(root), rel, contained=False, limits=limits)


def _read(base: str, rel: str, *, contained: bool, limits: FileLimits) -> FileResult:
    full = os.path.join(base, *rel.split("/"))
    if not contained and not _inside(os.path.realpath(full), base):
        return FileResult(
            rel, (), (_problem_at(rel, "refused: it leads outside the desired tree"),)
        )
    return _read_at(full, rel, limits=limits)


def _read_at(full: str, rel: str, *, limits: FileLimits) -> FileResult:
    """Read and check the file at ``full``, naming it ``rel`` in every problem."""
    try:
        # Non-blocking open: a FIFO named like a desired file must not hang the scan.
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", closefd=True) as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return FileResult(rel, (), (_problem_at(rel, "cannot read: not a regular file"),))
            if st.st_size > limits.max_bytes:
                return _too_big(rel, st.st_size, limits)
            # One byte past the limit at most, should the file grow meanwhile.
            data = handle.read(limits.max_bytes + 1)
    except OSError as e:
        return FileResult(rel, (), (_problem_at(rel, f"cannot read: {e.strerror or e}"),))
    return parse_file(rel, data, limits=limits)


def discover(root: Path) -> tuple[list[str], list[Problem]]:
    """The candidate files under ``root`` (sorted posix paths) and the problems met.

    ``root`` is resolved once, so a root symlink swapped during the scan does
    not mix two trees. Inside the tree, a symlink to a file is followed if it
    stays inside; a symlink that leads outside is a problem; a symlink to a
    directory inside the tree is not followed (its files are read where they
    really are, and reading them twice would declare every task twice).
    Raises :class:`NotADirectoryError` if ``root`` is not a directory.
    """
    base = os.path.realpath(root)
    if not os.path.isdir(base):
        raise NotADirectoryError(f"desired tree {root} is not a directory")
    return _discover(base)


def _discover(base: str) -> tuple[list[str], list[Problem]]:
    found: list[str] = []
    problems: list[Problem] = []
    pending: list[tuple[str, str]] = [(base, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            problems.append(
                _problem_at(prefix.rstrip("/") or ".", f"cannot list: {e.strerror or e}")
            )
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = prefix + name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                is_dir = os.path.isdir(target)
                if not _inside(target, base):
                    if is_dir or is_candidate(rel):
                        problems.append(
                            _problem_at(
                                rel, "refused: a symlink that leads outside the desired tree"
                            )
                        )
                elif not is_dir and is_candidate(rel):
                    found.append(rel)
            elif entry.is_dir():
                pending.append((entry.path, rel + "/"))
            elif is_candidate(rel):
                found.append(rel)
    found.sort()
    return found, problems


def load_tree(root: Path, *, limits: FileLimits = DEFAULT_LIMITS) -> DesiredIndex:
    """Discover, read and check a whole tree; discovery problems are in ``.problems``.

    Raises :class:`NotADirectoryError` if ``root`` is not a directory.
    """
    base = os.path.realpath(root)
    if not os.path.isdir(base):
        raise NotADirectoryError(f"desired tree {root} is not a directory")
    paths, problems = _discover(base)
    # discover() refused every symlink leading out, so the files need no second check.
    results = (_read(base, rel, contained=True, limits=limits) for rel in paths)
    with gc_paused():
        return DesiredIndex.build(results, scan_problems=problems, max_problems=limits.max_problems)


def load_file(path: str, *, limits: FileLimits = DEFAULT_LIMITS) -> DesiredIndex:
    """Check one file on its own, as if it were the whole tree.

    Its rules are a tree's, so a task or ``Identifier`` declared twice in it is
    an error; problems name the file exactly as ``path`` is written (neither
    resolved nor normalised), so they point where the user looked. Raises
    :class:`ValueError` if ``path`` does not end in a counted suffix.
    """
    if not path.endswith(SUFFIXES):
        raise ValueError(f"{path} does not end in {', '.join(SUFFIXES)}")
    return DesiredIndex.build(
        [_read_at(path, path, limits=limits)], max_problems=limits.max_problems
    )


# --------------------------------------------------------------------------
# The whole tree


def _sorted(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.source.path, p.source.line, p.source.column))


def _identifier(task: DesiredTask) -> str | None:
    value = task.fields.get("Identifier")
    return value if isinstance(value, str) else None


_Entry = tuple[str, DesiredTask]


class DesiredIndex:
    """Incremental, whole-tree view. Mutable on purpose: the daemon replaces one file at a time.

    Bookkeeping is per task key and per ``Identifier`` (which files declare
    it), so replacing a file costs time in proportion to that file and to the
    files it shares a key or Identifier with, never to the size of the tree.
    """

    __slots__ = (
        "_by_identifier",
        "_by_key",
        "_conflicted",
        "_dup_identifiers",
        "_dup_keys",
        "_files",
        "_local_invalid",
        "_max_problems",
        "_problems",
        "_scan_problems",
        "_tasks",
    )

    def __init__(self, *, max_problems: int = DEFAULT_LIMITS.max_problems) -> None:
        #: Problems reported per file for cross-file conflicts (:class:`FileLimits`).
        self._max_problems = max_problems
        self._files: dict[str, FileResult] = {}
        # Who declares what, from files without local problems only.
        self._by_key: dict[TaskKey, list[_Entry]] = {}
        self._by_identifier: dict[str, list[_Entry]] = {}
        # The entries of the two tables above with more than one declaration.
        self._dup_keys: set[TaskKey] = set()
        self._dup_identifiers: set[str] = set()
        self._local_invalid: set[str] = set()
        self._conflicted: set[str] = set()
        self._tasks: dict[TaskKey, DesiredTask] = {}
        self._scan_problems: tuple[Problem, ...] = ()
        self._problems: list[Problem] | None = None

    @classmethod
    def build(
        cls,
        results: Iterable[FileResult],
        *,
        scan_problems: Iterable[Problem] = (),
        max_problems: int = DEFAULT_LIMITS.max_problems,
    ) -> DesiredIndex:
        """An index of many files at once (a later result for the same path wins).

        ``scan_problems`` are problems met while finding the files (see
        :func:`discover`); they are reported with the rest and stay until the
        next build.
        """
        index = cls(max_problems=max_problems)
        index._scan_problems = tuple(scan_problems)
        files = index._files
        for result in results:
            files[result.path] = result
        by_key = index._by_key
        by_identifier = index._by_identifier
        for path, result in files.items():
            if result.problems:
                index._local_invalid.add(path)
                continue
            for task in result.tasks:
                entry = (path, task)
                same = by_key.get(task.key)
                if same is None:
                    by_key[task.key] = [entry]
                else:
                    same.append(entry)
                identifier = _identifier(task)
                if identifier is not None:
                    by_identifier.setdefault(identifier, []).append(entry)
        for key, entries in by_key.items():
            if len(entries) > 1:
                index._dup_keys.add(key)
                index._conflicted.update(p for p, _ in entries)
        for identifier, entries in by_identifier.items():
            if len(entries) > 1:
                index._dup_identifiers.add(identifier)
                index._conflicted.update(p for p, _ in entries)
        tasks = index._tasks
        for path, result in files.items():
            if path not in index._conflicted:
                for task in result.tasks:
                    tasks[task.key] = task
        return index

    # -- updates ---------------------------------------------------------------

    def put(self, result: FileResult) -> set[TaskKey]:
        """Add or replace one file; the task keys whose desired state may have changed.

        That includes tasks of other files whose validity flipped because a
        conflict with this file appeared or went away.
        """
        return _run(self.put_steps(result))

    def remove(self, path: str) -> set[TaskKey]:
        """Forget a deleted file; the task keys whose desired state may have changed."""
        return _run(self.remove_steps(path))

    def put_steps(self, result: FileResult) -> Generator[None, None, set[TaskKey]]:
        """:meth:`put` in steps of about :data:`STEP` tasks, for a caller that must
        not stop for long (the daemon's event loop runs between steps).

        Between steps the public views (:attr:`tasks`, :attr:`invalid_files`,
        :attr:`paths`, :attr:`problems`, :meth:`tasks_of`) still show the index
        as it was: the new file is committed at once, after the last step. Only
        one update may be in progress at a time.
        """
        return self._replace(result.path, result)

    def remove_steps(self, path: str) -> Generator[None, None, set[TaskKey]]:
        """:meth:`remove` in steps, as :meth:`put_steps`."""
        if path not in self._files:
            return _nothing()
        return self._replace(path, None)

    def _replace(self, path: str, new: FileResult | None) -> Generator[None, None, set[TaskKey]]:
        # The problems of the index as it was, kept for readers between steps.
        _ = self.problems
        old_tasks = self._declared(path)
        new_tasks = new.tasks if new is not None and not new.problems else ()
        keys: set[TaskKey] = set()
        identifiers: set[str] = set()
        for n, task in enumerate((*old_tasks, *new_tasks), 1):
            keys.add(task.key)
            if (i := _identifier(task)) is not None:
                identifiers.add(i)
            if n % STEP == 0:
                yield
        # Files sharing a key or an Identifier with this one may flip validity.
        involved = {path}
        for n, key in enumerate(keys, 1):
            involved.update(p for p, _ in self._by_key.get(key, ()))
            if n % STEP == 0:
                yield
        for n, identifier in enumerate(identifiers, 1):
            involved.update(p for p, _ in self._by_identifier.get(identifier, ()))
            if n % STEP == 0:
                yield
        counted_before = {p: self._counts(p) for p in involved}
        yield

        for n, task in enumerate(old_tasks, 1):
            _drop(self._by_key, task.key, path)
            if (named := _identifier(task)) is not None:
                _drop(self._by_identifier, named, path)
            if n % STEP == 0:
                yield
        for n, task in enumerate(new_tasks, 1):
            self._by_key.setdefault(task.key, []).append((path, task))
            if (named := _identifier(task)) is not None:
                self._by_identifier.setdefault(named, []).append((path, task))
            if n % STEP == 0:
                yield
        for n, key in enumerate(keys, 1):
            _mark(self._dup_keys, key, len(self._by_key.get(key, ())) > 1)
            if n % STEP == 0:
                yield
        for n, identifier in enumerate(identifiers, 1):
            _mark(
                self._dup_identifiers, identifier, len(self._by_identifier.get(identifier, ())) > 1
            )
            if n % STEP == 0:
                yield
        conflicted: dict[str, bool] = {}
        for p in involved:
            conflicted[p] = yield from self._in_conflict(p, replaced=path, new=new_tasks)

        # What the views will hold, worked out before they change.
        local_invalid = new is not None and bool(new.problems)

        def counts_after(p: str) -> bool:
            if p == path:
                return new is not None and not local_invalid and not conflicted[p]
            return p not in self._local_invalid and not conflicted[p]

        # Withdraw first, then add: two counted files never share a key.
        was: dict[TaskKey, DesiredTask] = {}
        now: dict[TaskKey, DesiredTask] = {}
        for p in involved:
            counted = counts_after(p)
            moves: list[tuple[dict[TaskKey, DesiredTask], tuple[DesiredTask, ...]]] = []
            if p == path:
                if counted_before[p]:
                    moves.append((was, old_tasks))
                if counted:
                    moves.append((now, new_tasks))
            elif counted != counted_before[p]:
                moves.append((now if counted else was, self._files[p].tasks))
            for into, tasks in moves:
                for start in range(0, len(tasks), STEP):
                    into.update((t.key, t) for t in tasks[start : start + STEP])
                    yield
        gone = [k for k in was if k not in now]
        changed: set[TaskKey] = set()
        for n, k in enumerate((*was, *now), 1):
            if was.get(k) != now.get(k):
                changed.add(k)
            if n % STEP == 0:
                yield

        # Commit, all at once: the views change here and nowhere else.
        if new is None:
            del self._files[path]
        else:
            self._files[path] = new
        _mark(self._local_invalid, path, local_invalid)
        for p, flag in conflicted.items():
            _mark(self._conflicted, p, flag)
        self._problems = None
        for key in gone:
            del self._tasks[key]
        self._tasks.update(now)
        return changed

    def _declared(self, path: str) -> tuple[DesiredTask, ...]:
        result = self._files.get(path)
        return result.tasks if result is not None else ()

    def _counts(self, path: str) -> bool:
        """Whether the file's tasks count: indexed, no local problem, no conflict."""
        return (
            path in self._files and path not in self._local_invalid and path not in self._conflicted
        )

    def _in_conflict(
        self, path: str, *, replaced: str, new: tuple[DesiredTask, ...]
    ) -> Generator[None, None, bool]:
        """Whether ``path`` clashes with another file, once ``replaced`` declares ``new``
        (its tables are updated already; its entry in ``_files`` is not yet)."""
        declared = new if path == replaced else self._declared(path)
        for n, task in enumerate(declared, 1):
            if task.key in self._dup_keys:
                return True
            identifier = _identifier(task)
            if identifier is not None and identifier in self._dup_identifiers:
                return True
            if n % STEP == 0:
                yield
        return False

    # -- views -------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[TaskKey, DesiredTask]:
        """Tasks of valid files only (a live, read-only view)."""
        return types.MappingProxyType(self._tasks)

    @property
    def invalid_files(self) -> frozenset[str]:
        """Files with local problems or in a cross-file conflict: their tasks are held."""
        return frozenset(self._local_invalid | self._conflicted)

    @property
    def paths(self) -> frozenset[str]:
        """Files currently indexed."""
        return frozenset(self._files)

    def tasks_of(self, path: str) -> tuple[DesiredTask, ...]:
        """The tasks a file declares (none if it has local problems or is not indexed).

        Whether they count is ``path not in invalid_files``.
        """
        return self._declared(path)

    @property
    def problems(self) -> list[Problem]:
        """Every problem in the tree, sorted by (path, line, column)."""
        if self._problems is None:
            found = list(self._scan_problems)
            for path in self._local_invalid:
                found.extend(self._files[path].problems)  # capped when parsed
            conflicts: dict[str, list[Problem]] = {}
            for key in self._dup_keys:
                for p in _key_conflict(key, [t for _, t in self._by_key[key]]):
                    conflicts.setdefault(p.source.path, []).append(p)
            for identifier in self._dup_identifiers:
                entries = self._by_identifier[identifier]
                for p in _identifier_conflict(identifier, [t for _, t in entries]):
                    conflicts.setdefault(p.source.path, []).append(p)
            for path, problems in conflicts.items():
                found.extend(_capped(path, problems, self._max_problems))
            self._problems = _sorted(found)
        return list(self._problems)


#: Tasks handled between two steps of :meth:`DesiredIndex.put_steps` (about 10 ms).
STEP: Final = 2_000


def _run(steps: Generator[None, None, set[TaskKey]]) -> set[TaskKey]:
    """Run an update's steps through; what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: set[TaskKey] = done.value
            return result


def _nothing() -> Generator[None, None, set[TaskKey]]:
    return set()
    yield  # a generator that returns at once


def _drop(table: dict[Any, list[_Entry]], name: Any, path: str) -> None:
    entries = [e for e in table[name] if e[0] != path]
    if entries:
        table[name] = entries
    else:
        del table[name]


def _mark(members: set[Any], member: Any, present: bool) -> None:
    if present:
        members.add(member)
    else:
        members.discard(member)
