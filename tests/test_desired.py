"""One desired file: every format rule, each with its message and file:line:column."""

from __future__ import annotations

import json
import re

import pytest

from reconciler.core.task import DesiredTask, Source, TaskKey
from reconciler.tree.desired import FileResult, Problem, is_candidate, parse_file


def parse(text: str, path: str = "app/rooms.yaml") -> FileResult:
    return parse_file(path, text.encode("utf-8"))


def problems(text: str, path: str = "app/rooms.yaml") -> list[str]:
    result = parse(text, path)
    if result.problems:
        assert result.tasks == ()  # a file with any problem contributes nothing
    return [str(p) for p in result.problems]


def one_problem(text: str, path: str = "app/rooms.yaml") -> str:
    found = problems(text, path)
    assert len(found) == 1, found
    return found[0]


def task_with(line: str) -> str:
    """A single-task file whose fourth line is ``line``."""
    return f'AppId: "661e4a7b9c0d1e2f"\nRoomId: "room-1"\nTaskId: "seg"\n{line}\n'


# -- shapes that declare tasks ---------------------------------------------------


def test_single_task_file() -> None:
    result = parse(
        "# a lecture hall\n"
        'AppId: "661e4a7b9c0d1e2f"\n'
        'BusinessId: "edu"\n'
        'RoomId: "hall-1"\n'
        'TaskId: "seg"\n'
        "Duration: 30\n"
        'Identifier: "edu-hall-1"\n'
        "Handle: false\n"
    )
    assert result.problems == ()
    assert result.tasks == (
        DesiredTask(
            key=TaskKey("661e4a7b9c0d1e2f", "hall-1", "seg"),
            business_id="edu",
            fields={"Identifier": "edu-hall-1", "Handle": False, "Duration": 30},
            source=Source("app/rooms.yaml", 2, 1),
        ),
    )
    # Managed fields come in MANAGED_FIELDS order, whatever the file's order.
    assert list(result.tasks[0].fields) == ["Identifier", "Handle", "Duration"]


def test_defaults_and_tasks_merge_with_task_keys_winning() -> None:
    result = parse(
        "defaults:\n"
        '  AppId: "app-1"\n'
        "  Duration: 20\n"
        "  Handle: true\n"
        "tasks:\n"
        '  - RoomId: "r1"\n'
        '    TaskId: "t"\n'
        "  - RoomId: r2\n"
        "    TaskId: t\n"
        "    Duration: 45\n"
        '    Identifier: "id-2"\n'
        '    AppId: "app-2"\n'
    )
    assert result.problems == ()
    first, second = result.tasks
    assert first.key == TaskKey("app-1", "r1", "t")
    assert first.business_id is None
    assert dict(first.fields) == {"Handle": True, "Duration": 20}
    assert first.source == Source("app/rooms.yaml", 6, 5)
    assert second.key == TaskKey("app-2", "r2", "t")
    assert list(second.fields.items()) == [
        ("Identifier", "id-2"),
        ("Handle", True),
        ("Duration", 45),
    ]
    assert second.source == Source("app/rooms.yaml", 8, 5)


def test_unset_fields_are_not_managed() -> None:
    (task,) = parse(task_with("Handle: true")).tasks
    assert dict(task.fields) == {"Handle": True}
    (task,) = parse(task_with("# nothing managed")).tasks
    assert dict(task.fields) == {}


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("a.yaml", ""),
        ("a.yaml", "# only a comment\n\n# and another\n"),
        ("a.yaml", "---\n"),
        ("a.yaml", "tasks: []\n"),
        ("a.yaml", 'defaults: {AppId: "x"}\ntasks: []\n'),
        ("a.json", ""),
        ("a.json", " \n"),
        ("a.json", '{"tasks": []}'),
    ],
)
def test_files_that_declare_nothing(path: str, text: str) -> None:
    assert parse(text, path) == FileResult(path, (), ())


def test_flow_style_tasks() -> None:
    result = parse('tasks: [{AppId: "a", RoomId: "r", TaskId: "t", Duration: 5}]\n')
    assert [t.key for t in result.tasks] == [TaskKey("a", "r", "t")]
    assert result.tasks[0].source == Source("app/rooms.yaml", 1, 9)


def test_a_utf8_byte_order_mark_is_accepted() -> None:
    result = parse_file("a.yaml", b"\xef\xbb\xbf" + task_with("Duration: 5").encode())
    assert result.problems == ()
    assert result.tasks[0].fields == {"Duration": 5}


# -- shapes that do not -----------------------------------------------------------


def test_top_level_list() -> None:
    assert one_problem("- AppId: a\n- AppId: b\n") == (
        "app/rooms.yaml:1:1: the top level is a list; a file holds one task "
        "(a mapping of task fields) or a mapping with 'defaults' and 'tasks'"
    )


def test_top_level_scalar() -> None:
    assert one_problem("hello\n").startswith("app/rooms.yaml:1:1: the top level is a scalar;")


def test_tasks_must_be_a_list() -> None:
    assert one_problem("tasks:\n  AppId: a\n") == (
        "app/rooms.yaml:2:3: 'tasks' must be a list of tasks, not a mapping"
    )


def test_defaults_must_be_a_mapping() -> None:
    # The tasks' missing AppId is not reported too: it was surely meant for defaults.
    assert one_problem('defaults: ["a"]\ntasks:\n  - RoomId: "r"\n    TaskId: "t"\n') == (
        "app/rooms.yaml:1:11: 'defaults' must be a mapping of task fields, not a list"
    )


def test_defaults_without_tasks() -> None:
    assert one_problem('defaults:\n  AppId: "a"\n') == (
        "app/rooms.yaml:1:1: 'defaults' without 'tasks' declares nothing; add a 'tasks' list"
    )


def test_task_keys_beside_tasks() -> None:
    assert one_problem('AppId: "a"\ntasks:\n  - {RoomId: "r", TaskId: "t"}\n') == (
        "app/rooms.yaml:1:1: task field 'AppId' cannot sit beside 'tasks' or 'defaults' at "
        "the top level; put it under 'defaults' or in each task"
    )


def test_other_top_level_keys_beside_tasks() -> None:
    assert problems("tasks: []\nversion: 2\ndefault: {}\n") == [
        "app/rooms.yaml:2:1: unknown top-level key 'version'; valid: defaults, tasks",
        "app/rooms.yaml:3:1: unknown top-level key 'default' — did you mean 'defaults'?",
    ]


def test_task_items_must_be_mappings() -> None:
    assert one_problem('tasks:\n  - {AppId: "a", RoomId: "r", TaskId: "t"}\n  - "r2"\n') == (
        "app/rooms.yaml:3:5: each item of 'tasks' must be a task mapping, not a scalar"
    )


def test_a_second_yaml_document_is_refused() -> None:
    assert one_problem(task_with("") + "---\n" + task_with("")) == (
        "app/rooms.yaml:5:1: a second YAML document ('---') starts here; a file holds one document"
    )


def test_yaml_syntax_error_has_the_parsers_position() -> None:
    assert one_problem(task_with('Identifier: "unterminated\n')) == (
        "app/rooms.yaml:6:1: YAML syntax error: found unexpected end of stream "
        "(while scanning a quoted scalar)"
    )
    assert one_problem('AppId: "a"\n  RoomId: "r"\n') == (
        "app/rooms.yaml:2:3: YAML syntax error: did not find expected key "
        "(while parsing a block mapping)"
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # a mapping line indented with a tab, at the top level and under defaults
        ('AppId: "a"\n\tRoomId: "r"\nTaskId: "t"\n', "2:1"),
        ('\tAppId: "a"\n', "1:1"),
        ('defaults:\n\tAppId: "a"\ntasks: []\n', "2:1"),
        # inside a tasks list: before the dash, after spaces, after the dash
        ('tasks:\n\t- AppId: "a"\n', "2:1"),
        ('tasks:\n  - AppId: "a"\n  \tRoomId: "r"\n', "3:3"),
        ('tasks:\n  - AppId: "a"\n\t  RoomId: "r"\n', "3:1"),
        ('tasks:\n-\tAppId: "a"\n', "2:2"),
        # libyaml's other wordings: a plain scalar going on, a block scalar
        ("Identifier: abc\n\tdef\n", "2:1"),
        ("Identifier: |\n\tabc\n", "2:1"),
        # a line of only a tab among the tasks
        ('tasks:\n  - AppId: "a"\n\t\n', "3:1"),
    ],
)
def test_a_tab_in_indentation_is_named(text: str, where: str) -> None:
    assert one_problem(text) == (
        f"app/rooms.yaml:{where}: YAML forbids tabs for indentation: "
        "replace the tab here with spaces"
    )


def test_tabs_between_tokens_are_fine() -> None:
    (task,) = parse('AppId:\t"a"\nRoomId: "r"  \t# room\nTaskId: "t"\t\n').tasks
    assert task.key == TaskKey("a", "r", "t")


def test_undecodable_bytes_point_at_the_bad_byte() -> None:
    data = b'AppId: "a"\nRoomId: "caf\xc3\xa9-\xff"\n'
    result = parse_file("app/rooms.yaml", data)
    assert [str(p) for p in result.problems] == [
        "app/rooms.yaml:2:15: not UTF-8 text (invalid start byte)"
    ]
    assert result.tasks == ()


def test_control_characters_are_refused_with_their_position() -> None:
    assert one_problem('AppId: "é"\nRoomId: "r\x07"\n') == (
        "app/rooms.yaml:2:11: character U+0007 is not allowed in YAML"
    )


# -- keys ---------------------------------------------------------------------


def test_unknown_field_names_the_closest_valid_one() -> None:
    assert one_problem(task_with("Duraton: 20")) == (
        "app/rooms.yaml:4:1: unknown field 'Duraton' — did you mean 'Duration'?"
    )


def test_unknown_field_catches_case_differences() -> None:
    assert one_problem(task_with('identifier: "x"')) == (
        "app/rooms.yaml:4:1: unknown field 'identifier' — did you mean 'Identifier'?"
    )
    assert one_problem(task_with('TASKID: "x"')) == (
        "app/rooms.yaml:4:1: unknown field 'TASKID' — did you mean 'TaskId'?"
    )


def test_unknown_field_with_nothing_close_lists_the_valid_keys() -> None:
    assert one_problem(task_with("Zebra: 1")) == (
        "app/rooms.yaml:4:1: unknown field 'Zebra'; valid: AppId, BusinessId, RoomId, "
        "TaskId, Identifier, Handle, Duration, defaults, tasks"
    )


def test_unknown_field_in_defaults_and_in_a_task() -> None:
    assert problems(
        'defaults:\n  AppId: "a"\n  Handel: true\ntasks:\n  - RoomId: "r"\n    TaskID: "t"\n'
    ) == [
        "app/rooms.yaml:3:3: unknown field 'Handel' — did you mean 'Handle'?",
        "app/rooms.yaml:5:5: TaskId: missing required field TaskId "
        "(set it in the task or in defaults)",
        "app/rooms.yaml:6:5: unknown field 'TaskID' — did you mean 'TaskId'?",
    ]


def test_merge_keys_are_not_supported() -> None:
    text = 'base: &b {Handle: true}\ntasks:\n  - <<: *b\n    AppId: "a"\n'
    assert "app/rooms.yaml:3:5: merge keys (<<) are not supported; use defaults" in (
        "\n".join(problems(text))
    )


def test_duplicate_key_in_a_task() -> None:
    assert one_problem(task_with('RoomId: "room-2"')) == (
        "app/rooms.yaml:4:1: RoomId: duplicate key (first at line 2, column 1); "
        "YAML would silently keep only the last"
    )


def test_duplicate_key_in_defaults_and_at_top_level() -> None:
    assert problems(
        "defaults:\n  Duration: 5\n  Duration: 6\ntasks: []\ntasks:\n  - AppId: a\n"
    ) == [
        "app/rooms.yaml:3:3: Duration: duplicate key (first at line 2, column 3); "
        "YAML would silently keep only the last",
        "app/rooms.yaml:5:1: tasks: duplicate key (first at line 4, column 1); "
        "YAML would silently keep only the last",
    ]


def test_duplicate_key_in_json() -> None:
    text = '{"AppId": "a", "RoomId": "r", "TaskId": "t",\n "RoomId": "r2"}'
    assert one_problem(text, "app/rooms.json") == (
        "app/rooms.json:2:2: RoomId: duplicate key (first at line 1, column 16); "
        "YAML would silently keep only the last"
    )


def test_missing_required_ids_are_reported_at_the_task() -> None:
    assert problems("tasks:\n  - Duration: 5\n") == [
        f"app/rooms.yaml:2:5: {f}: missing required field {f} (set it in the task or in defaults)"
        for f in ("AppId", "RoomId", "TaskId")
    ]
    assert problems('Identifier: "x"\n') == [
        f"app/rooms.yaml:1:1: {f}: missing required field {f} (set it in the task or in defaults)"
        for f in ("AppId", "RoomId", "TaskId")
    ]


# -- id values ------------------------------------------------------------------

NOT_STRINGS = [
    ("0123", "a number"),
    ("089", "a number"),
    ("1e5", "a number"),
    ("1.5e5", "a number"),
    ("0x1F", "a number"),
    ("0o17", "a number"),
    ("0b101", "a number"),
    ("1_000", "a number"),
    (".5", "a number"),
    ("-7", "a number"),
    (".inf", "a number"),
    ("-.INF", "a number"),
    (".NaN", "a number"),
    ("yes", "a bool"),
    ("No", "a bool"),
    ("on", "a bool"),
    ("OFF", "a bool"),
    ("y", "a bool"),
    ("true", "a bool"),
    ("False", "a bool"),
    ("2024-01-01", "a date"),
]
ID = r"[a-zA-Z0-9_@\-\.]{1,128}"
RULE = "ids are 1 to 128 characters from a-z A-Z 0-9 _ @ - ."


@pytest.mark.parametrize(("value", "kind"), NOT_STRINGS)
@pytest.mark.parametrize("field", ["AppId", "RoomId", "TaskId", "BusinessId", "Identifier"])
def test_plain_id_that_yaml_reads_as_another_type_is_refused(
    field: str, value: str, kind: str
) -> None:
    ids = {"AppId": '"a"', "RoomId": '"r"', "TaskId": '"t"', field: value}
    text = "".join(f"{k}: {v}\n" for k, v in ids.items())
    line = list(ids).index(field) + 1
    assert one_problem(text) == (
        f"app/rooms.yaml:{line}:{len(field) + 3}: {field}: value {value} reads as {kind}; "
        f'quote it: {field}: "{value}"'
    )


@pytest.mark.parametrize(
    ("value", "kind", "why"),
    [
        ("1:20", "a number", "character ':' is not allowed"),
        ("2024-1-1 10:00:00", "a date", "character ' ' is not allowed"),
    ],
)
def test_no_quoted_form_is_suggested_when_it_would_not_be_an_id(
    value: str, kind: str, why: str
) -> None:
    found = one_problem(f'AppId: "a"\nRoomId: {value}\nTaskId: "t"\n')
    assert found == (
        f"app/rooms.yaml:2:9: RoomId: value {value} reads as {kind}; "
        f"quoted, it would not be a valid id either: {why}; {RULE}"
    )
    assert f'"{value}"' not in found


NULLS = [
    ("~", "has no value (YAML reads ~ as null)"),
    ("null", "has no value (null)"),
    ("NULL", "has no value (null)"),
    ("", "has no value (YAML reads an empty value as null)"),
]
WRITE_ID = f"write the id as a quoted string ({RULE})"


def quoted_suggestions(message: str) -> list[str]:
    return re.findall(r'"([^"]*)"', message)


@pytest.mark.parametrize(("value", "what"), NULLS)
@pytest.mark.parametrize(
    ("field", "hint"),
    [
        ("AppId", f"AppId is required: {WRITE_ID}"),
        ("RoomId", f"RoomId is required: {WRITE_ID}"),
        ("TaskId", f"TaskId is required: {WRITE_ID}"),
        ("BusinessId", f"remove the key to set no BusinessId, or {WRITE_ID}"),
        ("Identifier", f"remove the key to leave Identifier unmanaged, or {WRITE_ID}"),
        ("Handle", "remove the key to leave Handle unmanaged, or write true or false"),
        (
            "Duration",
            "remove the key to leave Duration unmanaged, "
            "or write an integer number of seconds from 1 to 600",
        ),
    ],
)
def test_a_null_value_says_what_to_write_and_never_an_invalid_id(
    field: str, hint: str, value: str, what: str
) -> None:
    ids = {"AppId": '"a"', "RoomId": '"r"', "TaskId": '"t"', field: value}
    text = "".join(f"{k}: {v}\n" for k, v in ids.items()).replace(": \n", ":\n")
    line = list(ids).index(field) + 1
    column = len(field) + (2 if value == "" else 3)  # an empty value sits right after the colon
    found = one_problem(text)
    assert found == f"app/rooms.yaml:{line}:{column}: {field}: {what}; {hint}"
    for suggested in quoted_suggestions(found):
        assert re.fullmatch(ID, suggested), found


@pytest.mark.parametrize("field", ["AppId", "RoomId", "TaskId", "BusinessId", "Identifier"])
def test_a_json_null_id_says_what_to_write(field: str) -> None:
    ids = {"AppId": "a", "RoomId": "r", "TaskId": "t", field: None}
    found = one_problem(json.dumps(ids), "a.json")
    assert f"{field}: has no value (null); " in found
    assert found.endswith(f"write the id as a JSON string ({RULE})")
    assert quoted_suggestions(found) == []


def test_a_null_under_defaults_says_removing_the_key_takes_the_default() -> None:
    text = (
        'defaults:\n  AppId: "a"\n  Identifier: "lec"\n'
        'tasks:\n  - RoomId: "r"\n    TaskId: "t"\n    AppId: ~\n    Identifier: ~\n'
        "    Handle: ~\n"
    )
    assert problems(text) == [
        f"app/rooms.yaml:7:12: AppId: has no value (YAML reads ~ as null); "
        f"remove the key to take AppId from defaults, or {WRITE_ID}",
        f"app/rooms.yaml:8:17: Identifier: has no value (YAML reads ~ as null); "
        f"remove the key to take Identifier from defaults, or {WRITE_ID}",
        "app/rooms.yaml:9:13: Handle: has no value (YAML reads ~ as null); "
        "remove the key to leave Handle unmanaged, or write true or false",
    ]


@pytest.mark.parametrize("value", [v for v, _ in NOT_STRINGS])
def test_the_same_values_quoted_are_strings(value: str) -> None:
    for quoted in (f'"{value}"', f"'{value}'"):
        (task,) = parse(f'AppId: "a"\nRoomId: {quoted}\nTaskId: "t"\n').tasks
        assert task.key.room_id == value


def test_explicit_str_tag_makes_a_string() -> None:
    (task,) = parse('AppId: "a"\nRoomId: !!str 0123\nTaskId: "t"\n').tasks
    assert task.key.room_id == "0123"


def test_plain_ids_that_cannot_be_read_otherwise_are_fine() -> None:
    (task,) = parse("AppId: 661e4a7b9c0d1e2f\nRoomId: 1001-hall\nTaskId: seg.v2@x\n").tasks
    assert task.key == TaskKey("661e4a7b9c0d1e2f", "1001-hall", "seg.v2@x")


@pytest.mark.parametrize(
    ("literal", "kind"),
    [("12", "a number"), ("1.5", "a number"), ("true", "a bool")],
)
def test_json_id_that_is_not_a_string(literal: str, kind: str) -> None:
    text = f'{{"AppId": "a", "RoomId": {literal}, "TaskId": "t"}}'
    assert one_problem(text, "app/rooms.json") == (
        f'app/rooms.json:1:26: RoomId: value {literal} is {kind}; quote it: "RoomId": "{literal}"'
    )


@pytest.mark.parametrize(("value", "kind"), [('["r"]', "a list"), ("{a: 1}", "a mapping")])
def test_id_must_be_a_scalar(value: str, kind: str) -> None:
    assert one_problem(f'AppId: "a"\nRoomId: {value}\nTaskId: "t"\n') == (
        f"app/rooms.yaml:2:9: RoomId: must be a string, not {kind}"
    )


def test_id_with_a_character_outside_the_rule() -> None:
    assert one_problem(task_with('Identifier: "lecture hall"')) == (
        "app/rooms.yaml:4:13: Identifier: value 'lecture hall' is not a valid id: "
        f"character ' ' is not allowed; {RULE}"
    )
    assert one_problem('AppId: "a"\nRoomId: "r"\nTaskId: "täsk"\n') == (
        "app/rooms.yaml:3:9: TaskId: value 'täsk' is not a valid id: "
        f"character 'ä' is not allowed; {RULE}"
    )


def test_id_too_long_is_shown_cut() -> None:
    long = "x" * 129
    assert one_problem(f'AppId: "{long}"\nRoomId: "r"\nTaskId: "t"\n') == (
        f"app/rooms.yaml:1:8: AppId: value '{'x' * 40}…' (129 characters) is not a valid id: "
        f"it is 129 characters long; {RULE}"
    )
    (task,) = parse(f'AppId: "{"x" * 128}"\nRoomId: "r"\nTaskId: "t"\n').tasks
    assert len(task.key.app_id) == 128


def test_empty_quoted_id() -> None:
    assert one_problem('AppId: ""\nRoomId: "r"\nTaskId: "t"\n') == (
        f"app/rooms.yaml:1:8: AppId: value '' is not a valid id: it is empty; {RULE}"
    )


# -- Handle ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "value"),
    [("true", True), ("false", False), ("True", True), ("FALSE", False)],
)
def test_handle_accepts_true_and_false(literal: str, value: bool) -> None:
    (task,) = parse(task_with(f"Handle: {literal}")).tasks
    assert task.fields == {"Handle": value}


@pytest.mark.parametrize("literal", ["yes", "No", "on", "off", "y"])
def test_handle_refuses_yaml11_only_bools(literal: str) -> None:
    assert one_problem(task_with(f"Handle: {literal}")) == (
        f"app/rooms.yaml:4:9: Handle: value {literal} is not accepted "
        "(YAML 1.2 reads it as a string); write true or false"
    )


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ('"true"', "must be true or false, not the string 'true'; write it without quotes"),
        ("1", "must be true or false, not 1"),
        ("maybe", "must be true or false, not 'maybe'"),
        ("[true]", "must be true or false, not a list"),
    ],
)
def test_handle_refuses_anything_else(literal: str, message: str) -> None:
    found = one_problem(task_with(f"Handle: {literal}"))
    assert found == f"app/rooms.yaml:4:9: Handle: {message}"


def test_handle_in_json() -> None:
    text = '{"AppId": "a", "RoomId": "r", "TaskId": "t", "Handle": false}'
    assert parse(text, "a.json").tasks[0].fields == {"Handle": False}
    text = '{"AppId": "a", "RoomId": "r", "TaskId": "t", "Handle": "false"}'
    assert one_problem(text, "a.json") == (
        "a.json:1:56: Handle: must be true or false, not the string 'false'; "
        "write it without quotes"
    )


# -- Duration ---------------------------------------------------------------------

DURATION_RULE = "it must be an integer number of seconds from 1 to 600"


@pytest.mark.parametrize("value", [1, 20, 600])
def test_duration_in_range(value: int) -> None:
    (task,) = parse(task_with(f"Duration: {value}")).tasks
    assert task.fields == {"Duration": value}
    assert type(task.fields["Duration"]) is int


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ("0", f"value 0 is out of range; {DURATION_RULE}"),
        ("601", f"value 601 is out of range; {DURATION_RULE}"),
        ("-5", f"value -5 is out of range; {DURATION_RULE}"),
        ("1.5", f"value 1.5 is not a whole number; {DURATION_RULE}"),
        (
            "20.0",
            "value 20.0 has a fraction or an exponent; write it in plain decimal digits (20); "
            f"{DURATION_RULE}",
        ),
        (
            "1e2",
            "value 1e2 has a fraction or an exponent; write it in plain decimal digits (100); "
            f"{DURATION_RULE}",
        ),
        ("true", f"value true is a bool, not an integer; {DURATION_RULE}"),
        ("abc", f"value 'abc' is not a number; {DURATION_RULE}"),
        (
            '"30"',
            "must be an integer number of seconds from 1 to 600, not the string '30'; "
            "write it without quotes",
        ),
        ("[30]", "must be an integer number of seconds from 1 to 600, not a list"),
    ],
)
def test_duration_refused(literal: str, message: str) -> None:
    assert one_problem(task_with(f"Duration: {literal}")) == (
        f"app/rooms.yaml:4:11: Duration: {message}"
    )


@pytest.mark.parametrize("literal", ["030", "0x1E", "0o36", "1_000", "1:20"])
def test_duration_in_an_ambiguous_notation(literal: str) -> None:
    assert one_problem(task_with(f"Duration: {literal}")) == (
        f"app/rooms.yaml:4:11: Duration: value {literal} is not written in plain decimal "
        "digits (YAML versions disagree on leading zeros, 0x, 0o, _ and :); "
        f"{DURATION_RULE}"
    )


def test_duration_in_json() -> None:
    base = '{"AppId": "a", "RoomId": "r", "TaskId": "t", "Duration": '
    assert parse(base + "45}", "a.json").tasks[0].fields == {"Duration": 45}
    assert one_problem(base + "45.0}", "a.json") == (
        "a.json:1:58: Duration: value 45.0 has a fraction or an exponent; write it in plain "
        f"decimal digits (45); {DURATION_RULE}"
    )
    assert one_problem(base + "4.5e1}", "a.json") == (
        "a.json:1:58: Duration: value 4.5e1 has a fraction or an exponent; write it in plain "
        f"decimal digits (45); {DURATION_RULE}"
    )
    assert one_problem(base + "false}", "a.json") == (
        f"a.json:1:58: Duration: value false is a bool, not an integer; {DURATION_RULE}"
    )


# -- duplicates within one file --------------------------------------------------------


def test_same_task_twice_in_one_file_names_both_places() -> None:
    text = (
        'defaults: {AppId: "a", TaskId: "t"}\n'
        "tasks:\n"
        '  - RoomId: "r"\n'
        '  - RoomId: "other"\n'
        '  - RoomId: "r"\n'
    )
    assert problems(text) == [
        "app/rooms.yaml:3:5: task a/r/t is declared more than once; also at app/rooms.yaml:5:5",
        "app/rooms.yaml:5:5: task a/r/t is declared more than once; also at app/rooms.yaml:3:5",
    ]


def test_identifier_shared_in_one_file_names_both_places() -> None:
    text = (
        'defaults: {AppId: "a", TaskId: "t", Identifier: "shared"}\n'
        "tasks:\n"
        '  - RoomId: "r1"\n'
        '  - RoomId: "r2"\n'
        '    Identifier: "own"\n'
        '  - RoomId: "r3"\n'
    )
    overwrite = "'shared' is used by more than one task, so their slice files would overwrite"
    assert problems(text) == [
        f"app/rooms.yaml:3:5: Identifier: {overwrite} each other; "
        "also used by a/r3/t at app/rooms.yaml:6:5",
        f"app/rooms.yaml:6:5: Identifier: {overwrite} each other; "
        "also used by a/r1/t at app/rooms.yaml:3:5",
    ]


def test_every_problem_of_a_file_is_reported() -> None:
    text = (
        "defaults:\n"
        "  AppId: 0123\n"
        "  Duraton: 5\n"
        "tasks:\n"
        "  - RoomId: yes\n"
        '    TaskId: "t"\n'
        "    Duration: 900\n"
        '  - RoomId: "r"\n'
        "    Handle: on\n"
        '  - RoomId: "r2"\n'
        '    TaskId: "t2"\n'
    )
    assert [p.split(": ", 2)[:2] for p in problems(text)] == [
        ["app/rooms.yaml:2:10", "AppId"],
        ["app/rooms.yaml:3:3", "unknown field 'Duraton' — did you mean 'Duration'?"],
        ["app/rooms.yaml:5:13", "RoomId"],
        ["app/rooms.yaml:7:15", "Duration"],
        ["app/rooms.yaml:8:5", "TaskId"],
        ["app/rooms.yaml:9:13", "Handle"],
    ]


# -- JSON --------------------------------------------------------------------


def test_json_file_with_defaults_and_positions() -> None:
    text = json.dumps(
        {
            "defaults": {"AppId": "a", "Duration": 15},
            "tasks": [{"RoomId": "r1", "TaskId": "t"}, {"RoomId": "r2", "TaskId": "t"}],
        },
        indent=2,
    )
    result = parse(text, "vc/rooms.json")
    assert result.problems == ()
    assert [(t.key.room_id, t.source.line, t.source.column) for t in result.tasks] == [
        ("r1", 7, 5),
        ("r2", 11, 5),
    ]


def test_valid_json_that_yaml_refuses_still_parses_with_positions() -> None:
    # A tab starting a line outside brackets is valid JSON but not YAML 1.1,
    # and libyaml refuses escaped surrogate pairs.
    text = '\t{\n\t"AppId": "a",\n\t"RoomId":\t"r",\n\t"TaskId": "t", "Duration": 7}\n\t\n'
    result = parse(text, "a.json")
    assert result.problems == ()
    assert result.tasks[0].key == TaskKey("a", "r", "t")
    assert result.tasks[0].fields == {"Duration": 7}
    assert result.tasks[0].source == Source("a.json", 1, 2)

    text = '{"AppId": "a",\n "RoomId": "r\\ud83d\\ude00", "TaskId": 5}'
    assert problems(text, "a.json") == [
        "a.json:2:12: RoomId: value 'r😀' is not a valid id: character '😀' is not allowed; "
        f"{RULE}",
        'a.json:2:39: TaskId: value 5 is a number; quote it: "TaskId": "5"',
    ]


def test_json_fallback_keeps_every_check() -> None:
    text = (
        '\t{"tasks": [{"AppId": "a", "RoomId": "r", "TaskId": "t", "Duraton": 5},\n 3],\n "x": 1}'
    )
    assert problems(text, "a.json") == [
        "a.json:1:58: unknown field 'Duraton' — did you mean 'Duration'?",
        "a.json:2:2: each item of 'tasks' must be a task mapping, not a scalar",
        "a.json:3:2: unknown top-level key 'x'; valid: defaults, tasks",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"AppId": "a"\n "RoomId": "r"}', "a.json:2:2: invalid JSON: Expecting ',' delimiter"),
        ("AppId: a\n", "a.json:1:1: invalid JSON: Expecting value"),
        ('{"Duration": NaN}', "a.json:1:14: invalid JSON: NaN is not a JSON value"),
        ('{"a": 1}\n{"b": 2}', "a.json:2:1: invalid JSON: Extra data"),
    ],
)
def test_json_files_must_be_strict_json(text: str, message: str) -> None:
    assert one_problem(text, "a.json") == message


@pytest.mark.parametrize(
    ("text", "where", "closing"),
    [
        ('{"AppId": "a",}', "1:14", "}"),
        ('{"AppId": "a" ,\n  }', "1:15", "}"),
        ('{"tasks": [{"AppId": "a", "RoomId": "r", "TaskId": "t"},\n]}', "1:56", "]"),
        ('{"tasks": [{"AppId": "a", "RoomId": "r", "TaskId": "t", "Duration": 5,}]}', "1:70", "}"),
        ('{"tasks": [1,2,]}', "1:15", "]"),
    ],
)
def test_a_trailing_comma_in_json_is_named_at_the_comma(
    text: str, where: str, closing: str
) -> None:
    assert one_problem(text, "a.json") == (
        f"a.json:{where}: invalid JSON: trailing comma before '{closing}'; JSON allows none, "
        "remove it"
    )
    line, column = map(int, where.split(":"))
    assert text.splitlines()[line - 1][column - 1] == ","


# -- odds and ends ---------------------------------------------------------------


def test_problem_text() -> None:
    source = Source("desired/app-a/rooms.yaml", 12, 13)
    assert str(Problem(source, "RoomId", "bad")) == "desired/app-a/rooms.yaml:12:13: RoomId: bad"
    assert str(Problem(source, None, "bad")) == "desired/app-a/rooms.yaml:12:13: bad"


def test_parse_is_pure_and_repeatable() -> None:
    data = task_with("Duration: 30").encode()
    assert parse_file("x.yaml", data) == parse_file("x.yaml", data)
    assert parse_file("elsewhere/y.yml", data).tasks[0].source.path == "elsewhere/y.yml"


@pytest.mark.parametrize(
    ("path", "counts"),
    [
        ("rooms.yaml", True),
        ("app/rooms.yml", True),
        ("app/deep/rooms.json", True),
        ("rooms.yaml~", False),
        ("rooms.yaml.swp", False),
        ("app/.#rooms.yaml", False),
        ("app/.rooms.yaml", False),
        (".git/rooms.yaml", False),
        ("app/.hidden/rooms.yaml", False),
        ("rooms.txt", False),
        ("rooms.YAML", False),
        ("README.md", False),
        ("yaml", False),
    ],
)
def test_is_candidate(path: str, counts: bool) -> None:
    assert is_candidate(path) is counts
