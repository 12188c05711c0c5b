"""The published JSON Schema of a desired file, checked against the loader.

The loader (:func:`reconciler.tree.desired.parse_file`) is the authority; the schema
exists so editors can flag mistakes while typing. Over a table of cases and
over documents hypothesis generates, the two must agree wherever a schema can
decide. Where it cannot, the case is a known gap (``GAPS``): the test asserts
that the gap is still there and goes the documented way (the loader refuses
what the schema lets through), so a change to either side that closes or
widens one shows up here.

The schema sees what one parser made of a file: ``json.loads`` for JSON and
PyYAML's ``safe_load`` (YAML 1.1) for YAML. Editors mostly read YAML 1.2,
which misreads other plain scalars than 1.1 does; the loader refuses what
either would misread, which is why those gaps exist at all.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reconciler.core.task import IDENTITY_FIELDS, TASK_KEYS
from reconciler.tree.desired import parse_file
from reconciler.tree.schema import desired_schema, desired_schema_text
from tests.conftest import REPO, run_cli

SCHEMA = desired_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def loader_accepts(path: str, text: str) -> bool:
    return not parse_file(path, text.encode("utf-8")).problems


def schema_accepts(path: str, text: str) -> bool:
    doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return VALIDATOR.is_valid(doc)


# -- shipping ---------------------------------------------------------------------


def test_the_schema_is_package_data_and_a_2020_12_schema() -> None:
    shipped = resources.files("reconciler.tree.schema").joinpath("desired.schema.json")
    assert shipped.is_file()
    schema = json.loads(shipped.read_text(encoding="utf-8"))
    assert schema == SCHEMA
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    # The description tells editors' users what only `reconciler validate` checks.
    for rule in ("unique", "Handle: yes", "duplicate keys", "30.0"):
        assert rule in schema["description"]


def test_reconciler_schema_prints_it_and_the_sample_tree_passes(tmp_path: Path) -> None:
    r = run_cli("schema", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == desired_schema_text()
    validator = jsonschema.Draft202012Validator(json.loads(r.stdout))
    samples = sorted((REPO / "desired").rglob("*.y*ml"))
    assert samples
    for sample in samples:
        doc = yaml.safe_load(sample.read_text(encoding="utf-8"))
        assert not list(validator.iter_errors(doc)), sample


@pytest.mark.build
def test_the_wheel_ships_the_schema(tmp_path: Path) -> None:
    """Built offline from the sources, like the image build (see test_deploy)."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "reconciler", src / "reconciler", ignore=shutil.ignore_patterns("*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index"),
            *("--no-build-isolation", "--quiet", "-w", str(dist), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("reconciler/tree/schema/desired.schema.json").decode("utf-8")
    assert shipped == desired_schema_text()


# -- the loader and the schema agree -------------------------------------------------

IDS = 'AppId: "app"\nRoomId: "room"\nTaskId: "seg"\n'
JSON_IDS = '"AppId": "app", "RoomId": "room", "TaskId": "seg"'

# (name, file name, text, whether the loader accepts it)
AGREED: list[tuple[str, str, str, bool]] = [
    # shapes
    ("empty file", "a.yaml", "", True),
    ("only comments", "a.yaml", "# nothing yet\n", True),
    ("empty task list", "a.yaml", "tasks: []\n", True),
    ("empty json task list", "a.json", '{"tasks": []}', True),
    (
        "single task, every field",
        "a.yaml",
        IDS + 'BusinessId: "edu"\nIdentifier: "lec-1"\nHandle: false\nDuration: 30\n',
        True,
    ),
    ("single task in json", "a.json", "{" + JSON_IDS + ', "Handle": true, "Duration": 600}', True),
    (
        "defaults give the ids",
        "a.yaml",
        'defaults: {AppId: "app", TaskId: "seg"}\ntasks:\n  - RoomId: "r1"\n  - RoomId: "r2"\n',
        True,
    ),
    (
        "defaults give every id",
        "a.yaml",
        'defaults: {AppId: "a", RoomId: "r", TaskId: "t"}\ntasks: [{}]\n',
        True,
    ),
    ("tasks give every id", "a.yaml", 'tasks: [{AppId: "a", RoomId: "r", TaskId: "t"}]\n', True),
    ("defaults without tasks", "a.yaml", 'defaults: {AppId: "a"}\n', False),
    ("defaults not a mapping", "a.yaml", 'defaults: ["a"]\ntasks: []\n', False),
    ("defaults null", "a.yaml", "defaults:\ntasks: []\n", False),
    ("tasks not a list", "a.yaml", 'tasks: {AppId: "a"}\n', False),
    ("tasks null", "a.yaml", "tasks:\n", False),
    ("a task that is not a mapping", "a.yaml", "tasks: [3]\n", False),
    ("top level list", "a.yaml", "- " + IDS.replace("\n", "\n  "), False),
    ("top level string", "a.yaml", "hello\n", False),
    ("top level number in json", "a.json", "5", False),
    # required ids, with and without defaults
    ("single task without RoomId", "a.yaml", 'AppId: "a"\nTaskId: "t"\n', False),
    ("a task without TaskId, no defaults", "a.yaml", 'tasks: [{AppId: "a", RoomId: "r"}]\n', False),
    (
        "defaults lack RoomId and one task too",
        "a.yaml",
        'defaults: {AppId: "a", TaskId: "t"}\ntasks: [{RoomId: "r"}, {Duration: 5}]\n',
        False,
    ),
    ("empty defaults, incomplete task", "a.yaml", 'defaults: {}\ntasks: [{AppId: "a"}]\n', False),
    # keys
    ("unknown task key", "a.yaml", IDS + "Duraton: 30\n", False),
    ("lower-case key", "a.yaml", IDS + 'identifier: "x"\n', False),
    ("unknown top-level key", "a.yaml", "tasks: []\nextra: 1\n", False),
    ("task key beside tasks", "a.yaml", 'AppId: "a"\ntasks: []\n', False),
    ("unknown key in defaults", "a.yaml", "defaults: {Handel: true}\ntasks: []\n", False),
    ("unknown key in a task", "a.json", '{"tasks": [{' + JSON_IDS + ', "x": 1}]}', False),
    # ids
    ("quoted digits are a string", "a.yaml", IDS.replace('"room"', '"0123"'), True),
    ("every allowed character", "a.yaml", IDS.replace('"room"', '"aZ09_@-.x"'), True),
    ("128 characters", "a.yaml", IDS.replace('"room"', '"' + "r" * 128 + '"'), True),
    ("129 characters", "a.yaml", IDS.replace('"room"', '"' + "r" * 129 + '"'), False),
    ("empty id", "a.yaml", IDS.replace('"room"', '""'), False),
    ("space in an id", "a.yaml", IDS.replace('"room"', '"lecture hall"'), False),
    ("non-ASCII id", "a.yaml", IDS.replace('"room"', '"räum"'), False),
    (
        "newline at the end of an id",
        "a.json",
        "{" + JSON_IDS.replace('"room"', '"room\\n"') + "}",
        False,
    ),
    ("id as a JSON number", "a.json", "{" + JSON_IDS.replace('"room"', "12") + "}", False),
    ("id as a YAML int", "a.yaml", IDS.replace('"room"', "12"), False),
    ("id as a bool", "a.yaml", IDS.replace('"room"', "true"), False),
    ("id null", "a.yaml", IDS.replace('"room"', "~"), False),
    ("id empty value", "a.yaml", IDS.replace(' "room"', ""), False),
    ("id a list", "a.yaml", IDS.replace('"room"', '["r"]'), False),
    ("id a date", "a.yaml", IDS.replace('"room"', "2024-01-01"), False),
    ("Identifier null", "a.yaml", IDS + "Identifier: ~\n", False),
    # Handle
    ("Handle quoted", "a.yaml", IDS + 'Handle: "true"\n', False),
    ("Handle 1", "a.yaml", IDS + "Handle: 1\n", False),
    ("Handle null", "a.json", "{" + JSON_IDS + ', "Handle": null}', False),
    # Duration
    ("Duration 1", "a.yaml", IDS + "Duration: 1\n", True),
    ("Duration 0", "a.yaml", IDS + "Duration: 0\n", False),
    ("Duration 601", "a.yaml", IDS + "Duration: 601\n", False),
    ("Duration -1", "a.json", "{" + JSON_IDS + ', "Duration": -1}', False),
    ("Duration true", "a.yaml", IDS + "Duration: true\n", False),
    ("Duration quoted", "a.yaml", IDS + 'Duration: "30"\n', False),
    ("Duration 1.5", "a.json", "{" + JSON_IDS + ', "Duration": 1.5}', False),
    ("Duration null", "a.yaml", IDS + "Duration:\n", False),
    ("Duration a list", "a.yaml", IDS + "Duration: [30]\n", False),
    (
        "Duration in defaults out of range",
        "a.yaml",
        "defaults: {Duration: 700}\ntasks: []\n",
        False,
    ),
]

# Known gaps: the loader refuses these, the schema (as one parser reads the file) cannot.
GAPS: list[tuple[str, str, str]] = [
    # Uniqueness: JSON Schema cannot compare fields across items (and defaults merge first).
    (
        "same task twice",
        "a.yaml",
        'defaults: {AppId: "a", TaskId: "t"}\ntasks: [{RoomId: "r"}, {RoomId: "r"}]\n',
    ),
    (
        "same Identifier twice",
        "a.yaml",
        'defaults: {AppId: "a", TaskId: "t", Identifier: "x"}\n'
        'tasks: [{RoomId: "r1"}, {RoomId: "r2"}]\n',
    ),
    # Plain scalars YAML 1.2 reads as numbers, which PyYAML (YAML 1.1) reads as strings.
    ("RoomId: 089", "a.yaml", IDS.replace('"room"', "089")),
    ("RoomId: 1e5", "a.yaml", IDS.replace('"room"', "1e5")),
    # YAML 1.1 bools and integer notations YAML 1.2 reads otherwise.
    ("Handle: yes", "a.yaml", IDS + "Handle: yes\n"),
    ("Duration: 010", "a.yaml", IDS + "Duration: 010\n"),
    ("Duration: 0x1E", "a.yaml", IDS + "Duration: 0x1E\n"),
    ("Duration: 1_0", "a.yaml", IDS + "Duration: 1_0\n"),
    # What a parser silently resolves before any schema sees the data.
    ("duplicate key", "a.yaml", IDS + 'RoomId: "other"\n'),
    (
        "merge key",
        "a.yaml",
        'defaults: &b {AppId: "a"}\ntasks: [{<<: *b, RoomId: "r", TaskId: "t"}]\n',
    ),
    ("explicit tag", "a.yaml", IDS + 'Duration: !!int "30"\n'),
    # JSON Schema's integer is a mathematical value: 30.0 is one.
    ("Duration 30.0", "a.json", "{" + JSON_IDS + ', "Duration": 30.0}'),
    ("Duration 3e1", "a.json", "{" + JSON_IDS + ', "Duration": 3e1}'),
    # A document that is only null: to a schema, the same as an empty file.
    ("null document", "a.yaml", "~\n"),
    ("null json document", "a.json", "null"),
]


@pytest.mark.parametrize(("name", "path", "text", "accepted"), AGREED, ids=[c[0] for c in AGREED])
def test_schema_and_loader_agree(name: str, path: str, text: str, accepted: bool) -> None:
    assert loader_accepts(path, text) is accepted, parse_file(path, text.encode()).problems
    assert schema_accepts(path, text) is accepted


@pytest.mark.parametrize(("name", "path", "text"), GAPS, ids=[c[0] for c in GAPS])
def test_known_gaps_go_the_documented_way(name: str, path: str, text: str) -> None:
    assert not loader_accepts(path, text)
    assert schema_accepts(path, text), "the schema catches this now: move it to AGREED"


def _drop(at: str, key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(schema: dict[str, Any]) -> None:
        node = schema
        for part in at.split("/"):
            node = node[part]
        del node[key]

    return mutate


def _set_max(schema: dict[str, Any]) -> None:
    schema["$defs"]["fields"]["properties"]["Duration"]["maximum"] = 601


def _single_task_ids_optional(schema: dict[str, Any]) -> None:
    schema["$defs"]["singleTask"] = {"$ref": "#/$defs/fields"}


@pytest.mark.parametrize(
    "weaken",
    [
        _drop("$defs/fields", "additionalProperties"),
        _drop("$defs/tasksFile", "additionalProperties"),
        _single_task_ids_optional,
        _drop("$defs/tasksFile", "allOf"),
        _drop("$defs/tasksFile", "required"),
        _drop("$defs/id", "pattern"),
        _drop("$defs/fields/properties/Handle", "type"),
        _set_max,
    ],
    ids=[
        "fields open",
        "top level open",
        "ids not required",
        "ids not required after defaults",
        "tasks not required",
        "any id characters",
        "Handle any type",
        "Duration 601",
    ],
)
def test_the_table_catches_a_weakened_schema(weaken: Callable[[dict[str, Any]], None]) -> None:
    schema = copy.deepcopy(SCHEMA)
    weaken(schema)
    validator = jsonschema.Draft202012Validator(schema)
    disagree = []
    for name, path, text, accepted in AGREED:
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        if validator.is_valid(doc) is not accepted:
            disagree.append(name)
    assert disagree, "no case tells this schema from the published one"


# -- generated documents ----------------------------------------------------------------

VALID_ID = st.from_regex(r"[a-zA-Z0-9_@.\-]{1,128}", fullmatch=True)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(TASK_KEYS, VALID_ID),
    "Handle": st.booleans(),
    "Duration": st.integers(1, 600),
}
# Boundary values first: the table above pins each one, these find them in combinations.
BAD: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(
        TASK_KEYS,
        st.one_of(
            st.sampled_from(["", "a b", "r" * 129, "room\n", "räum", "~", 12, True, None, ["r"]]),
            st.text(max_size=4).filter(lambda v: not re.fullmatch(r"[a-zA-Z0-9_@.\-]+", v)),
        ),
    ),
    "Handle": st.sampled_from(["true", 1, None]),
    "Duration": st.sampled_from([0, 601, True, "30", 1.5, None]),
}
ODD_SHAPE = st.one_of(
    st.lists(st.integers(), max_size=2), st.text(max_size=3), st.integers(), st.none()
)
ODD_KEY = st.sampled_from(["Duraton", "appid", "tasks", "defaults", "extra", ""])


@st.composite
def clean_fields(draw: st.DrawFn, *, ids: float) -> dict[str, Any]:
    """Task fields with good values; each id present with probability ``ids``."""
    fields: dict[str, Any] = {}
    for key in TASK_KEYS:
        chance = ids if key in IDENTITY_FIELDS else 0.4
        if draw(st.floats(0, 1)) < chance:
            fields[key] = draw(GOOD[key])
    return fields


@st.composite
def clean_documents(draw: st.DrawFn, *, complete: bool | None = None) -> Any:
    """Good values; unless ``complete``, some tasks lack ids (in the task and in defaults)."""
    if complete is None:
        complete = draw(st.integers(0, 4)) > 0
    if draw(st.booleans()):
        fields = draw(clean_fields(ids=0.8))
        for key in IDENTITY_FIELDS if complete else ():
            fields.setdefault(key, draw(VALID_ID))
        return fields
    doc: dict[str, Any] = {}
    defaults = draw(clean_fields(ids=0.5))
    keep_empty: bool = draw(st.booleans())
    if defaults or keep_empty:
        doc["defaults"] = defaults
    doc["tasks"] = draw(st.lists(clean_fields(ids=0.7), max_size=3))
    for key in IDENTITY_FIELDS if complete else ():
        if key not in defaults:
            for task in doc["tasks"]:
                task.setdefault(key, draw(VALID_ID))
    return doc


def mappings(doc: Any) -> list[dict[str, Any]]:
    """Every mapping of a document a defect can go into."""
    if not isinstance(doc, dict):
        return []
    found = [doc]
    if isinstance(doc.get("defaults"), dict):
        found.append(doc["defaults"])
    if isinstance(doc.get("tasks"), list):
        found.extend(t for t in doc["tasks"] if isinstance(t, dict))
    return found


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Clean documents, and clean documents with one or two defects put in."""
    doc = draw(clean_documents())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        targets = mappings(doc)
        if not targets:
            break
        target = draw(st.sampled_from(targets))
        defect = draw(st.sampled_from(["value", "value", "value", "value", "key", "drop", "shape"]))
        if defect == "value":
            key = draw(st.sampled_from(TASK_KEYS))
            target[key] = draw(BAD[key])
        elif defect == "key":
            target[draw(ODD_KEY)] = draw(st.one_of(GOOD["Duration"], st.just([])))
        elif defect == "drop" and target:
            del target[draw(st.sampled_from(sorted(target)))]
        elif defect == "shape":
            if target is doc and draw(st.booleans()):
                doc = draw(ODD_SHAPE)
            else:
                target[draw(st.sampled_from(["defaults", "tasks"]))] = draw(ODD_SHAPE)
    return doc


def depends_on_uniqueness(doc: Any) -> bool:
    """Whether two tasks of ``doc`` could clash: the loader checks that, a schema cannot."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        return False
    defaults = doc.get("defaults")
    base = defaults if isinstance(defaults, dict) else {}
    merged = [{**base, **t} for t in doc["tasks"] if isinstance(t, dict)]
    keys = [json.dumps([t.get(f) for f in IDENTITY_FIELDS]) for t in merged]
    identifiers = [json.dumps(t["Identifier"]) for t in merged if "Identifier" in t]
    return len(set(keys)) < len(keys) or len(set(identifiers)) < len(identifiers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents(), as_yaml=st.booleans())
def test_schema_and_loader_agree_on_generated_documents(doc: Any, as_yaml: bool) -> None:
    assume(doc is not None)  # a null document is a known gap
    assume(not depends_on_uniqueness(doc))
    # JSON text in a .yaml file too: JSON is YAML, and every string is quoted, so no
    # parser can misread a value (the gaps above are all about unquoted YAML).
    text = json.dumps(doc, indent=1)
    path = "a.yaml" if as_yaml else "a.json"
    problems = parse_file(path, text.encode("utf-8")).problems
    errors = [e.message for e in VALIDATOR.iter_errors(doc)]
    assert (not problems) == (not errors), (text, [str(p) for p in problems], errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=clean_documents(complete=True), data=st.data())
def test_one_bad_value_in_a_valid_document_is_refused_by_both(
    doc: Any, data: st.DataObject
) -> None:
    assume(not depends_on_uniqueness(doc))
    text = json.dumps(doc, indent=1)
    assert loader_accepts("a.json", text) and VALIDATOR.is_valid(doc), text
    target = data.draw(st.sampled_from(mappings(doc)))
    key = data.draw(st.sampled_from(TASK_KEYS))
    target[key] = data.draw(BAD[key])
    text = json.dumps(doc, indent=1)
    assert not loader_accepts("a.json", text), text
    assert not VALIDATOR.is_valid(doc), text
