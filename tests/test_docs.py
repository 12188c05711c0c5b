"""The manual (``README.md`` and ``docs/``) stays true to the code.

Three checks, each against the real thing:

- every ``reconciler ...`` command the manual shows, in a shell block or as
  inline code (``reconciler plan DIR --out FILE``, or ``apply --override-window``
  after a command's name), names a command that exists, and each long option
  shown with it is one that command's ``--help`` lists. The help comes from the
  CLI run as subprocesses, each command's once, a level of the command tree at
  a time in parallel;
- every relative link resolves to a file of the tree, and its anchor, if any,
  to a heading of that file (GitHub's anchors);
- every ``json`` block parses, and one that shows a shape the code produces
  (``validate``, ``plan`` or ``status --output json``, by its
  ``format_version`` and keys, or part of a plan) has the keys a real run of
  that command prints, at every level: the commands run against the emulator
  on loopback, on a copy of the sample tree.

The parsers here are small on purpose: fenced blocks, paragraphs, code spans
and links as CommonMark writes them, enough for this manual.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from reconciler.emulator import EmulatorHandle
from tests.conftest import REPO, cli_env, reconciler_cmd

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( {0,3})(`{3,})\s*([\w-]*)\s*$")
SHELL = {"", "sh", "bash", "shell", "console"}
# Names of the API's fields: a JSON object keyed by them holds data (a call's
# body, a task's values), so examples and real runs may differ in which keys.
API_FIELDS = {"AppId", "BusinessId", "RoomId", "TaskId", "Identifier", "Handle", "Duration"}


# --- markdown -------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language and text, and where it starts."""

    where: str
    lang: str
    text: str


@dataclass(frozen=True)
class Paragraph:
    """Consecutive non-blank lines outside fences (a table is one)."""

    where: str
    text: str


def parse(text: str, name: str) -> tuple[list[Block], list[Paragraph]]:
    blocks: list[Block] = []
    paragraphs: list[Paragraph] = []
    lines = text.splitlines()
    i = 0
    para: list[str] = []
    start = 0

    def end_paragraph() -> None:
        if para:
            paragraphs.append(Paragraph(f"{name}:{start}", "\n".join(para)))
            para.clear()

    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            end_paragraph()
            indent, ticks, lang = len(m[1]), m[2], m[3]
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(ticks):
                body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
                j += 1
            blocks.append(Block(f"{name}:{i + 2}", lang, "\n".join(body)))
            i = j + 1
            continue
        if lines[i].strip():
            if not para:
                start = i + 1
            para.append(lines[i])
        else:
            end_paragraph()
        i += 1
    end_paragraph()
    return blocks, paragraphs


CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def code_spans(paragraph: str) -> list[str]:
    # In a table cell a pipe inside code is written \|.
    return [" ".join(m[2].replace("\\|", "|").split()) for m in CODE_SPAN.finditer(paragraph)]


def without_code(paragraph: str) -> str:
    return CODE_SPAN.sub("code", paragraph)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    _, paragraphs = parse(text, "")
    for p in paragraphs:
        for line in p.text.splitlines():
            m = re.match(r"^#{1,6} (.*?)\s*#*\s*$", line)
            if m:
                base = slug(m[1])
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
    return found


# --- the command line as its help shows it ---------------------------------


@dataclass
class Help:
    """What ``reconciler ... --help`` lists: long options (taking a value?) and subcommands."""

    options: dict[str, bool] = field(default_factory=dict)
    commands: set[str] = field(default_factory=set)


def parse_help(text: str) -> Help:
    h = Help()
    section = ""
    for line in text.splitlines():
        if re.match(r"^[A-Z][\w ]*:$", line):
            section = line[:-1]
        elif section not in ("", "Commands") and re.match(r"^  -", line):
            # Options come under "Options:" and the command's own headings (API:, Budget: ...).
            declared = re.split(r"\s{2,}", line.strip())[0]
            metavar = re.sub(r"(?<![\w-])-{1,2}[\w-]+|[,/]", "", declared).strip()
            for name in re.findall(r"(?<![\w-])--[\w-]+", declared):
                h.options[name] = bool(metavar)
        elif section == "Commands" and re.match(r"^  \w", line):
            h.commands.add(line.split()[0])
    return h


def run_help(path: tuple[str, ...]) -> tuple[tuple[str, ...], int, str]:
    proc = subprocess.run(
        reconciler_cmd(*path, "--help"),
        env=cli_env(COLUMNS="100"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return path, proc.returncode, proc.stdout + proc.stderr


def command_tree() -> dict[tuple[str, ...], Help]:
    """Every command's help, a level of the tree at a time (each level in parallel)."""
    helps: dict[tuple[str, ...], Help] = {}
    level: list[tuple[str, ...]] = [()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        while level:
            found: list[tuple[str, ...]] = []
            for path, code, out in pool.map(run_help, level):
                assert code == 0, f"reconciler {' '.join(path)} --help exited {code}:\n{out}"
                helps[path] = parse_help(out)
                found += [(*path, c) for c in sorted(helps[path].commands)]
            level = found
    return helps


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], Help]:
    return command_tree()


@dataclass(frozen=True)
class Shown:
    """A command line the manual shows: where, and the words after ``reconciler``."""

    where: str
    args: tuple[str, ...]


def shell_invocations(block: Block) -> Iterator[Shown]:
    """``reconciler`` (or ``.../reconciler``) where a shell runs a command: a line's
    start, after ``|``, ``&&``, ``;`` or ``$(``, past ``VAR=value`` assignments."""
    text = block.text.replace("\\\n", " ")
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        for part in re.split(r"&&|\|\||[|;]|\$\(", line):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            while words and re.match(r"^\w+=", words[0]):
                words.pop(0)
            if words and PurePosixPath(words[0]).name == "reconciler":
                args = []
                for w in words[1:]:
                    if re.match(r"^\d?[<>]", w):
                        break
                    args.append(w)
                yield Shown(block.where, tuple(args))


def inline_invocations(p: Paragraph, commands: set[str]) -> Iterator[Shown]:
    """Code spans that start with ``reconciler``, or with a command's name and show
    a long option (``apply --override-window``, ``state migrate --from/--to``)."""
    for span in code_spans(p.text):
        words = span.split()
        if not words:
            continue
        if PurePosixPath(words[0]).name == "reconciler":
            yield Shown(p.where, tuple(words[1:]))
        elif words[0] in commands and any(w.startswith("--") for w in words[1:]):
            yield Shown(p.where, tuple(words))


def manual_invocations(pages: Mapping[str, str], commands: set[str]) -> list[Shown]:
    shown: list[Shown] = []
    for name, text in pages.items():
        blocks, paragraphs = parse(text, name)
        for b in blocks:
            if b.lang in SHELL:
                shown += shell_invocations(b)
        for p in paragraphs:
            shown += inline_invocations(p, commands)
    return shown


LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def invocation_errors(shown: Shown, helps: Mapping[tuple[str, ...], Help]) -> list[str]:
    """The command it names must exist, and each long option be in that command's help."""
    path: tuple[str, ...] = ()
    errors: list[str] = []
    args = list(shown.args)
    while helps[path].commands and args:
        word = args.pop(0)
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            if name.startswith("--") and name not in helps[path].options:
                errors.append(f"{shown.where}: reconciler {' '.join(path)} has no option {name}")
            if helps[path].options.get(name) and "=" not in word and args:
                args.pop(0)
            continue
        if word not in helps[path].commands:
            cmd = " ".join(("reconciler", *path, word))
            return [f"{shown.where}: `{cmd}` is no command (`{' '.join(shown.args)}`)"]
        path = (*path, word)
    for word in args:
        for name in LONG_OPTION.findall(word):
            if name not in helps[path].options:
                cmd = " ".join(("reconciler", *path))
                errors.append(f"{shown.where}: `{cmd}` has no option {name} (its --help)")
    return errors


def read_pages() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in PAGES}


def test_every_command_the_manual_shows_exists_with_its_options(
    helps: dict[tuple[str, ...], Help],
) -> None:
    shown = manual_invocations(read_pages(), helps[()].commands)
    # The manual shows every command; a parser that found none would check nothing.
    named = {s.args[0] for s in shown if s.args and not s.args[0].startswith("-")}
    assert named >= helps[()].commands, sorted(helps[()].commands - named)
    errors = [e for s in shown for e in invocation_errors(s, helps)]
    assert not errors, "\n".join(errors)


def test_the_command_check_catches_a_wrong_command_or_option(
    helps: dict[tuple[str, ...], Help],
) -> None:
    page = (
        "Run `reconciler plan desired --outt plan.json`, then `apply --override-windows`.\n\n"
        "```sh\nFOO=1 .venv/bin/reconciler stat --state s.db   # a typo\n"
        "reconciler state migrate --from a.db \\\n  --too b.db | tee log\n"
        "reconciler --log-level debug validate desired --log-level info > out\n```\n"
    )
    shown = manual_invocations({"page.md": page}, helps[()].commands)
    errors = [e for s in shown for e in invocation_errors(s, helps)]
    assert errors == [
        "page.md:4: `reconciler stat` is no command (`stat --state s.db`)",
        "page.md:4: `reconciler state migrate` has no option --too (its --help)",
        "page.md:1: `reconciler plan` has no option --outt (its --help)",
        "page.md:1: `reconciler apply` has no option --override-windows (its --help)",
    ]


# --- links ----------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_errors(name: str, text: str, *, root: Path) -> list[str]:
    errors: list[str] = []
    _, paragraphs = parse(text, name)
    for p in paragraphs:
        for target in LINK.findall(without_code(p.text)):
            if re.match(r"^[a-z][a-z+.-]*:", target):
                continue  # https:, mailto: ...
            file, _, anchor = target.partition("#")
            if not file:
                if anchor not in anchors(text):
                    errors.append(f"{p.where}: {target}: no heading #{anchor} in {name}")
                continue
            path = (root / name).parent / file
            if not path.resolve().is_relative_to(root.resolve()) or not path.exists():
                errors.append(f"{p.where}: {target}: no such file in the tree")
            elif (
                anchor
                and path.suffix == ".md"
                and anchor not in anchors(path.read_text(encoding="utf-8"))
            ):
                errors.append(f"{p.where}: {target}: no heading #{anchor} in {file}")
    return errors


def test_every_relative_link_resolves() -> None:
    pages = read_pages()
    errors = [e for name, text in pages.items() for e in link_errors(name, text, root=REPO)]
    assert not errors, "\n".join(errors)
    # The README's first screen leads to the page about the real API.
    first_screen = pages["README.md"].splitlines()[:25]
    assert any("(docs/real-api.md)" in line for line in first_screen)


def test_the_link_check_catches_a_missing_file_or_heading(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## `plan --output json`\n")
    page = (
        "See [A](docs/a.md#plan---output-json), [B](docs/b.md), [C](docs/a.md#nope),\n"
        "[D](#here), [E](#there) and [F](https://example.com/x#y); `[G](docs/none.md)`.\n\n"
        "# Here\n"
    )
    assert link_errors("README.md", page, root=tmp_path) == [
        "README.md:1: docs/b.md: no such file in the tree",
        "README.md:1: docs/a.md#nope: no heading #nope in docs/a.md",
        "README.md:1: #there: no heading #there in README.md",
    ]


# --- JSON examples ----------------------------------------------------------


def json_examples() -> list[tuple[str, Any]]:
    examples = []
    for name, text in read_pages().items():
        for b in parse(text, name)[0]:
            if b.lang == "json":
                try:
                    examples.append((b.where, json.loads(b.text)))
                except json.JSONDecodeError as exc:
                    pytest.fail(f"{b.where}: the JSON example does not parse: {exc}")
    return examples


def shape_errors(doc: Any, real: Any, where: str = "") -> list[str]:
    """Where ``doc`` (an example) has other keys than ``real`` (the code's output).

    Objects compare key for key, except objects keyed by the API's field names,
    which hold data; a list's items compare with the real list's first item.
    Values of other types are the example's to choose.
    """
    errors: list[str] = []
    if isinstance(doc, dict) and isinstance(real, dict):
        if not set(doc) | set(real) <= API_FIELDS:
            missing, extra = sorted(set(real) - set(doc)), sorted(set(doc) - set(real))
            if missing or extra:
                errors.append(f"{where or 'top level'}: lacks {missing}, has {extra} not produced")
        for k in sorted(set(doc) & set(real)):
            errors += shape_errors(doc[k], real[k], f"{where}.{k}")
    elif isinstance(doc, list) and isinstance(real, list) and real:
        for i, item in enumerate(doc):
            errors += shape_errors(item, real[0], f"{where}[{i}]")
    return errors


def kind(doc: Any) -> str | None:
    """Which command's ``--output json`` a complete example shows."""
    if not isinstance(doc, dict) or "format_version" not in doc:
        return None
    for name, keys in (
        ("validate", {"valid", "problems"}),
        ("plan", {"calls", "summary"}),
        ("status", {"tasks", "generated_at"}),
    ):
        if keys <= set(doc):
            return name
    return "unknown"


def sh(tmp: Path, *args: str, code: int = 0) -> str:
    proc = subprocess.run(
        reconciler_cmd(*args),
        cwd=tmp,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    return proc.stdout


def real_outputs(tmp: Path, endpoint: str) -> dict[str, Any]:
    """``validate``, ``plan`` and ``status --output json`` of real runs that fill their
    lists: a broken file, a call held by a sync window, tasks recorded and held."""
    shutil.copytree(REPO / "desired", tmp / "desired")
    shutil.copytree(REPO / "desired", tmp / "broken")
    lectures = tmp / "broken" / "edu-live" / "lectures.yaml"
    text = lectures.read_text(encoding="utf-8")
    lectures.write_text(text.replace('RoomId: "0903"', "RoomId: 0903"), encoding="utf-8")
    (tmp / "windows.yaml").write_text(
        'windows:\n  - name: always\n    kind: deny\n    schedule: "* * * * *"\n'
        "    duration: 1m\n    heals: deny\n",
        encoding="utf-8",
    )
    api = ("--endpoint", endpoint, "--read-qps", "60")

    def plan() -> str:
        args = "plan desired -o json --refresh --state plan.db --sync-windows windows.yaml"
        return sh(tmp, *args.split(), *api)

    def status() -> str:
        sh(tmp, "apply", "desired", "--state", "state.db", "--no-refresh", *api)
        return sh(tmp, "status", "broken", "--state", "state.db", "-o", "json")

    with ThreadPoolExecutor(max_workers=3) as pool:
        validate = pool.submit(sh, tmp, "validate", "broken", "-o", "json", code=1)
        outputs = {"plan": pool.submit(plan), "status": pool.submit(status)}
        docs = {name: json.loads(f.result()) for name, f in outputs.items()}
        docs["validate"] = json.loads(validate.result())
    return docs


def test_every_json_example_parses_and_has_the_codes_shape(
    tmp_path: Path, emulator: EmulatorHandle
) -> None:
    examples = json_examples()
    real = real_outputs(tmp_path, emulator.url)
    # The runs fill what the examples show, so items are compared too.
    assert real["validate"]["problems"] and real["plan"]["calls"][0]["waiting"] == "window"
    assert real["plan"]["waiting"] and real["status"]["tree"]["invalid_files"]
    checked: set[str] = set()
    errors: list[str] = []
    for where, doc in examples:
        name = kind(doc)
        assert name != "unknown", f"{where}: a format_version this test has no run for"
        if name is None:
            # Part of a document: the one whose keys hold all of its.
            wholes = [n for n, r in real.items() if isinstance(doc, dict) and set(doc) <= set(r)]
            if len(wholes) != 1:
                continue
            name = wholes[0]
            real_part = {k: real[name][k] for k in doc}
        else:
            assert doc["format_version"] == real[name]["format_version"], where
            real_part = real[name]
        checked.add(name)
        errors += [f"{where}: {name} --output json: {e}" for e in shape_errors(doc, real_part)]
    assert not errors, "\n".join(errors)
    assert checked == {"validate", "plan", "status"}


def test_the_shape_check_catches_a_missing_or_extra_key() -> None:
    real = {"a": 1, "calls": [{"task": {"AppId": "x", "BusinessId": "b"}, "x": 1}], "n": {"k": 1}}
    doc = {"a": 2, "calls": [{"task": {"AppId": "y"}, "y": 1}], "n": {"k": None, "j": 2}}
    assert shape_errors(doc, real) == [
        ".calls[0]: lacks ['x'], has ['y'] not produced",
        ".n: lacks [], has ['j'] not produced",
    ]
