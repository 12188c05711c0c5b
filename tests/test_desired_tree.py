"""The whole tree: cross-file rules, incremental updates, the disk, the sample tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.task import DesiredTask, Source, TaskKey
from reconciler.tree.desired import (
    DesiredIndex,
    FileResult,
    Problem,
    discover,
    load_tree,
    parse_file,
    read_file,
)

SAMPLE = Path(__file__).resolve().parent.parent / "desired"


def yaml_file(path: str, *rooms: str, app: str = "app", identifiers: bool = True) -> FileResult:
    """A defaults+tasks file with one task per room (Identifier = room name)."""
    lines = [f'defaults: {{AppId: "{app}", TaskId: "seg", Duration: 20}}', "tasks:"]
    for room in rooms:
        ident = f', Identifier: "{room}"' if identifiers else ""
        lines.append(f'  - {{RoomId: "{room}"{ident}}}')
    result = parse_file(path, "\n".join(lines).encode())
    assert result.problems == ()
    return result


def key(room: str, app: str = "app") -> TaskKey:
    return TaskKey(app, room, "seg")


# -- cross-file rules ---------------------------------------------------------------


def test_same_task_in_two_files_holds_both_and_names_both_places() -> None:
    index = DesiredIndex.build(
        [yaml_file("a.yaml", "r1", "r2"), yaml_file("b.yaml", "r3", identifiers=False)]
    )
    assert set(index.tasks) == {key("r1"), key("r2"), key("r3")}

    changed = index.put(yaml_file("b.yaml", "r3", "r1", identifiers=False))
    # b's new task collides with a's r1: both files are held, every task of both changes.
    assert changed == {key("r1"), key("r2"), key("r3")}
    assert index.tasks == {}
    assert index.invalid_files == {"a.yaml", "b.yaml"}
    assert [str(p) for p in index.problems] == [
        "a.yaml:3:5: task app/r1/seg is declared more than once; also at b.yaml:4:5",
        "b.yaml:4:5: task app/r1/seg is declared more than once; also at a.yaml:3:5",
    ]

    # Fixing either side releases both.
    changed = index.put(yaml_file("b.yaml", "r3", "r4", identifiers=False))
    assert changed == {key("r1"), key("r2"), key("r3"), key("r4")}
    assert set(index.tasks) == {key("r1"), key("r2"), key("r3"), key("r4")}
    assert index.invalid_files == frozenset()
    assert index.problems == []


def test_identifier_shared_across_files() -> None:
    index = DesiredIndex.build([yaml_file("a.yaml", "r1"), yaml_file("b.yaml", "r2")])
    clash = parse_file("b.yaml", b'{AppId: "app", RoomId: "r2", TaskId: "seg", Identifier: "r1"}\n')
    assert index.put(clash) == {key("r1"), key("r2")}
    assert index.invalid_files == {"a.yaml", "b.yaml"}
    assert [str(p) for p in index.problems] == [
        "a.yaml:3:5: Identifier: 'r1' is used by more than one task, so their slice files "
        "would overwrite each other; also used by app/r2/seg at b.yaml:1:1",
        "b.yaml:1:1: Identifier: 'r1' is used by more than one task, so their slice files "
        "would overwrite each other; also used by app/r1/seg at a.yaml:3:5",
    ]
    assert index.remove("b.yaml") == {key("r1")}
    assert set(index.tasks) == {key("r1")}
    assert index.problems == []


def test_three_way_conflict_names_the_other_two() -> None:
    index = DesiredIndex.build([yaml_file(f"{n}.yaml", "r", identifiers=False) for n in "abc"])
    assert [str(p) for p in index.problems] == [
        "a.yaml:3:5: task app/r/seg is declared more than once; also at b.yaml:3:5, c.yaml:3:5",
        "b.yaml:3:5: task app/r/seg is declared more than once; also at a.yaml:3:5, c.yaml:3:5",
        "c.yaml:3:5: task app/r/seg is declared more than once; also at a.yaml:3:5, b.yaml:3:5",
    ]
    # Removing one still leaves a conflict between the other two.
    assert index.remove("c.yaml") == set()
    assert index.invalid_files == {"a.yaml", "b.yaml"}
    assert index.remove("b.yaml") == {key("r")}
    assert index.tasks[key("r")].source == Source("a.yaml", 3, 5)


def test_invalid_file_withdraws_its_tasks_and_keeps_its_problems() -> None:
    index = DesiredIndex.build([yaml_file("a.yaml", "r1", "r2"), yaml_file("b.yaml", "r3")])
    broken = parse_file("a.yaml", b'defaults: {AppId: "app", TaskId: "seg"}\ntasks: [{RoomId: 7}]')
    assert index.put(broken) == {key("r1"), key("r2")}
    assert set(index.tasks) == {key("r3")}
    assert index.invalid_files == {"a.yaml"}
    assert index.tasks_of("a.yaml") == ()
    assert [str(p) for p in index.problems] == [
        'a.yaml:2:18: RoomId: value 7 reads as a number; quote it: RoomId: "7"'
    ]
    # Another broken version changes nothing that counts.
    assert index.put(parse_file("a.yaml", b"tasks: {}\n")) == set()
    assert index.put(yaml_file("a.yaml", "r1")) == {key("r1")}
    assert index.invalid_files == frozenset()


def test_a_locally_invalid_file_takes_no_part_in_conflicts() -> None:
    broken = parse_file("a.yaml", b'{AppId: "app", RoomId: "r1", TaskId: "seg", Duraton: 5}')
    index = DesiredIndex.build([broken, yaml_file("b.yaml", "r1")])
    assert set(index.tasks) == {key("r1")}
    assert index.invalid_files == {"a.yaml"}


def test_put_reports_only_tasks_that_changed() -> None:
    index = DesiredIndex.build([yaml_file("a.yaml", "r1", "r2", "r3")])
    edited = parse_file(
        "a.yaml",
        b'defaults: {AppId: "app", TaskId: "seg", Duration: 20}\n'
        b"tasks:\n"
        b'  - {RoomId: "r1", Identifier: "r1"}\n'
        b'  - {RoomId: "r2", Identifier: "r2", Duration: 30}\n'
        b'  - {RoomId: "r4", Identifier: "r4"}\n',
    )
    assert index.put(edited) == {key("r2"), key("r3"), key("r4")}
    assert index.tasks[key("r2")].fields == {"Identifier": "r2", "Duration": 30}
    assert key("r3") not in index.tasks
    assert index.put(edited) == set()
    assert index.remove("a.yaml") == {key("r1"), key("r2"), key("r4")}
    assert index.remove("a.yaml") == set()
    assert index.paths == frozenset()


def test_views() -> None:
    a, b = yaml_file("a.yaml", "r1"), yaml_file("b.yaml", "r2", "r3")
    index = DesiredIndex()
    assert index.put(a) == {key("r1")}
    assert index.put(b) == {key("r2"), key("r3")}
    assert index.paths == {"a.yaml", "b.yaml"}
    assert index.tasks_of("b.yaml") == b.tasks
    assert index.tasks_of("nope.yaml") == ()
    view = index.tasks
    with pytest.raises(TypeError):
        view[key("r9")] = a.tasks[0]  # type: ignore[index]


# -- incremental updates agree with a fresh build ---------------------------------------

PATHS = ["a.yaml", "b.yaml", "c/d.yml", "e.json"]
ROOMS = ["r0", "r1", "r2"]
IDENTS = [None, "i0", "i1", "i2"]


@st.composite
def file_results(draw: st.DrawFn, path: str) -> FileResult:
    if draw(st.integers(0, 5)) == 0:
        problem = Problem(Source(path, 1, 1), None, "broken")
        return FileResult(path, (), (problem,))
    tasks: dict[TaskKey, DesiredTask] = {}
    used: set[str] = set()
    for line, (app, room, ident, duration) in enumerate(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["x", "y"]),
                    st.sampled_from(ROOMS),
                    st.sampled_from(IDENTS),
                    st.sampled_from([10, 20]),
                ),
                max_size=4,
            )
        ),
        start=1,
    ):
        k = TaskKey(app, room, "t")
        if k in tasks or (ident is not None and ident in used):
            continue  # parse_file reports these inside the file: not a valid result
        fields: dict[str, str | bool | int] = {"Duration": duration}
        if ident is not None:
            used.add(ident)
            fields = {"Identifier": ident, **fields}
        tasks[k] = DesiredTask(k, None, fields, Source(path, line, 3))
    return FileResult(path, tuple(tasks.values()), ())


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, FileResult | None]]:
    ops: list[tuple[str, FileResult | None]] = []
    for _ in range(draw(st.integers(1, 12))):
        path = draw(st.sampled_from(PATHS))
        ops.append((path, None if draw(st.booleans()) else draw(file_results(path))))
    return ops


def snapshot(index: DesiredIndex) -> tuple[object, ...]:
    return (
        dict(index.tasks),
        index.invalid_files,
        index.paths,
        sorted(str(p) for p in index.problems),
        {p: index.tasks_of(p) for p in index.paths},
    )


@settings(max_examples=300, deadline=None)
@given(operations())
def test_incremental_updates_match_a_fresh_build(ops: list[tuple[str, FileResult | None]]) -> None:
    index = DesiredIndex()
    files: dict[str, FileResult] = {}
    for path, result in ops:
        before = dict(index.tasks)
        if result is None:
            changed = index.remove(path)
            files.pop(path, None)
        else:
            changed = index.put(result)
            files[path] = result
        after = dict(index.tasks)
        assert changed == {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert snapshot(index) == snapshot(DesiredIndex.build(files.values()))
        # Valid files' tasks are exactly the published ones.
        published = {t.key for p in index.paths - index.invalid_files for t in index.tasks_of(p)}
        assert published == set(index.tasks)


# -- the disk ---------------------------------------------------------------------------

TASK = '{{AppId: "app", RoomId: "{room}", TaskId: "seg"}}\n'


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_discover_counts_only_desired_files(tmp_path: Path) -> None:
    for rel in [
        "b/rooms.yaml",
        "a.yml",
        "b/c/deep.json",
        "b/rooms.yaml~",
        "b/.rooms.yaml.swp",
        "b/rooms.yaml.swp",
        "b/.#rooms.yaml",
        ".git/config.yaml",
        "b/.hidden/x.yaml",
        "notes.txt",
        "README.md",
    ]:
        write(tmp_path, rel, TASK.format(room=rel.replace("/", "-").strip(".")))
    (tmp_path / "empty-dir.yaml").mkdir()
    assert discover(tmp_path) == (["a.yml", "b/c/deep.json", "b/rooms.yaml"], [])


def test_load_tree_reads_everything_and_reports_every_file(tmp_path: Path) -> None:
    write(tmp_path, "ok.yaml", TASK.format(room="r1"))
    write(tmp_path, "app/bad.yaml", 'AppId: "app"\nRoomId: 0123\nTaskId: "t"\nDuraton: 1\n')
    write(tmp_path, "app/worse.json", "{")
    index = load_tree(tmp_path)
    assert set(index.tasks) == {key("r1")}
    assert index.paths == {"ok.yaml", "app/bad.yaml", "app/worse.json"}
    assert index.invalid_files == {"app/bad.yaml", "app/worse.json"}
    assert [str(p) for p in index.problems] == [
        'app/bad.yaml:2:9: RoomId: value 0123 reads as a number; quote it: RoomId: "0123"',
        "app/bad.yaml:4:1: unknown field 'Duraton' — did you mean 'Duration'?",
        "app/worse.json:1:2: invalid JSON: Expecting property name enclosed in double quotes",
    ]


def test_symlinks_inside_the_tree(tmp_path: Path) -> None:
    root, outside = tmp_path / "tree", tmp_path / "outside"
    write(root, "real/a.yaml", TASK.format(room="r1"))
    write(outside, "secret.yaml", TASK.format(room="r9"))
    write(outside, "dir/x.yaml", TASK.format(room="r8"))
    (root / "link.yaml").symlink_to(root / "real" / "a.yaml")  # inside: read (and clashes)
    (root / "escape.yaml").symlink_to(outside / "secret.yaml")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / "alias").symlink_to(root / "real")  # inside: not read twice
    (root / "gone.yaml").symlink_to(root / "missing.yaml")
    (root / "other.txt").symlink_to(outside / "secret.yaml")  # not a candidate: ignored

    paths, found = discover(root)
    assert paths == ["gone.yaml", "link.yaml", "real/a.yaml"]
    assert sorted(str(p) for p in found) == [
        "escape-dir:1:1: refused: a symlink that leads outside the desired tree",
        "escape.yaml:1:1: refused: a symlink that leads outside the desired tree",
    ]
    index = load_tree(root)
    assert [str(p) for p in index.problems] == [
        "escape-dir:1:1: refused: a symlink that leads outside the desired tree",
        "escape.yaml:1:1: refused: a symlink that leads outside the desired tree",
        "gone.yaml:1:1: cannot read: No such file or directory",
        "link.yaml:1:1: task app/r1/seg is declared more than once; also at real/a.yaml:1:1",
        "real/a.yaml:1:1: task app/r1/seg is declared more than once; also at link.yaml:1:1",
    ]


def test_read_file_refuses_paths_leading_out(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write(root, "a.yaml", TASK.format(room="r1"))
    write(tmp_path, "outside.yaml", TASK.format(room="r2"))
    (root / "escape.yaml").symlink_to(tmp_path / "outside.yaml")
    for rel in ["../outside.yaml", "escape.yaml"]:
        result = read_file(root, rel)
        assert result.tasks == ()
        assert [str(p) for p in result.problems] == [
            f"{rel}:1:1: refused: it leads outside the desired tree"
        ]
    assert [t.key for t in read_file(root, "a.yaml").tasks] == [key("r1")]


def test_read_file_turns_io_errors_into_problems(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    assert [str(p) for p in read_file(tmp_path, "nope.yaml").problems] == [
        "nope.yaml:1:1: cannot read: No such file or directory"
    ]
    assert [str(p) for p in read_file(tmp_path, "dir.yaml").problems] == [
        "dir.yaml:1:1: cannot read: Is a directory"
    ]
    os.mkfifo(tmp_path / "fifo.yaml")
    assert [str(p) for p in read_file(tmp_path, "fifo.yaml").problems] == [
        "fifo.yaml:1:1: cannot read: not a regular file"
    ]


def test_root_symlink_swapped_atomically(tmp_path: Path) -> None:
    write(tmp_path, "rev1/app/a.yaml", TASK.format(room="old"))
    write(tmp_path, "rev2/app/a.yaml", TASK.format(room="new"))
    root = tmp_path / "current"
    root.symlink_to("rev1")
    assert set(load_tree(root).tasks) == {key("old")}
    assert read_file(root, "app/a.yaml").tasks[0].key == key("old")

    (tmp_path / "next").symlink_to("rev2")
    os.replace(tmp_path / "next", root)  # how git-sync swaps revisions
    assert set(load_tree(root).tasks) == {key("new")}
    assert read_file(root, "app/a.yaml").tasks[0].key == key("new")


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    write(tmp_path, "file.yaml", "")
    for root in (tmp_path / "missing", tmp_path / "file.yaml"):
        with pytest.raises(NotADirectoryError, match="is not a directory"):
            load_tree(root)
        with pytest.raises(NotADirectoryError):
            discover(root)


# -- the sample tree ----------------------------------------------------------------


def test_sample_tree_is_valid_and_shows_every_form() -> None:
    index = load_tree(SAMPLE)
    assert index.problems == []
    assert index.invalid_files == frozenset()
    tasks = index.tasks
    assert len(tasks) >= 8
    assert len({k.app_id for k in tasks}) >= 2
    assert any(p.endswith(".json") and index.tasks_of(p) for p in index.paths)
    texts = {p: (SAMPLE / p).read_text(encoding="utf-8") for p in index.paths}
    assert any("defaults:" in t and "tasks:" in t for p, t in texts.items() if p.endswith("yaml"))
    assert any(len(index.tasks_of(p)) == 1 and "tasks" not in t for p, t in texts.items())
    # The sample teaches every managed field.
    for name in ("Identifier", "Handle", "Duration"):
        assert any(name in t.fields for t in tasks.values())
