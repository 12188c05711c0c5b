"""Saved plans: ``plan --save FILE`` now, ``apply FILE`` later, exactly those calls.

The review flow of Terraform: CI plans a change and keeps the plan; people
review it; ``apply FILE`` makes exactly the reviewed calls, or refuses when
what the plan was made from has moved on since ("plan is stale: ...").

A saved plan is a JSON document (:class:`SavedPlan`) holding

- the plan itself, as ``plan --output json`` prints it (the calls with their
  exact bodies), for review;
- the desired tree's content digest (:class:`TreeDigest`: a SHA-256 of every
  desired file, and of them all), so a changed, added or removed file is named;
- the state store's *lineage* (its random id, made with it) and *generation*
  (bumped by every transaction that changes what the planner reads), like
  Terraform's lineage and serial: a store that recorded anything since, or
  another store, makes the plan stale;
- the options that shaped it (drift policy) and, for a ``--refresh`` plan,
  the live observations it compared with.

Applying re-plans from the same inputs (the planner is a pure function: same
tree, same records, same observations, same plan) and sends only if that
plan's calls are the saved ones, body for body (:func:`different_calls`). So
a hand-edited file, or a planner that would now decide otherwise, can never
send anything that was not reviewed. Checking the inputs first
(:func:`staleness`) is what lets the refusal say *why*.

This module is pure apart from :func:`digest_tree`, :func:`load` and
:func:`save`, which read and write files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import DriftPolicy, Plan
from reconciler.core.task import TaskKey

KIND: Final = "reconciler/saved-plan"
FORMAT_VERSION: Final = 1


class SavedPlanError(Exception):
    """A saved plan file that cannot be read or is not a saved plan."""


@dataclass(frozen=True, slots=True)
class TreeDigest:
    """SHA-256 of each desired file (by path relative to the root) and of them all."""

    files: Mapping[str, str]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.files):
            h.update(f"{path}\0{self.files[path]}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class StoreStamp:
    """Which store a plan was made from, and how far it had got."""

    path: str
    #: ``None``: the store did not exist yet, or had no lineage (an older schema).
    lineage: str | None
    generation: int


@dataclass(frozen=True, slots=True)
class SavedPlan:
    #: The tree root as given to ``plan`` (relative paths are relative to its folder).
    root: str
    tree: TreeDigest
    store: StoreStamp
    drift: DriftPolicy
    created_at: str
    #: ``plan --output json`` of the plan: what reviewers read, and the calls to make.
    plan: Mapping[str, Any]
    #: The live observations a ``--refresh`` plan compared with; ``None`` otherwise.
    observations: Mapping[TaskKey, Observation] | None = field(default=None)
    #: The folder ``plan`` ran in (a relative ``root`` is relative to it), for messages.
    made_in: str | None = None

    @property
    def calls(self) -> list[tuple[TaskKey, dict[str, Any]]]:
        return [(_key(c["task"]), dict(c["body"])) for c in self.plan["calls"]]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "made_in": self.made_in,
            "root": self.root,
            "tree": {"sha256": self.tree.sha256, "files": dict(sorted(self.tree.files.items()))},
            "state": {
                "path": self.store.path,
                "lineage": self.store.lineage,
                "generation": self.store.generation,
            },
            "options": {"drift": self.drift},
            "observations": None
            if self.observations is None
            else [{"task": k.identity(), **o.to_json()} for k, o in self.observations.items()],
            "plan": dict(self.plan),
        }


def make(
    plan: Plan,
    *,
    root: str,
    tree: TreeDigest,
    store: StoreStamp,
    drift: DriftPolicy,
    observations: Mapping[TaskKey, Observation] | None,
    now: datetime | None = None,
) -> SavedPlan:
    at = (now or datetime.now(UTC)).astimezone(UTC)
    return SavedPlan(
        root=root,
        tree=tree,
        store=store,
        drift=drift,
        created_at=at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        plan=plan.to_json(),
        observations=None if observations is None else dict(observations),
        made_in=os.getcwd(),
    )


def tree_staleness(saved: SavedPlan, tree: TreeDigest) -> list[str]:
    """Why ``saved`` no longer describes the tree (empty: it does)."""
    if tree.sha256 == saved.tree.sha256:
        return []
    return ["the desired tree changed since: " + _file_changes(saved.tree, tree)]


def store_staleness(saved: SavedPlan, store: StoreStamp, *, store_is_new: bool) -> list[str]:
    """Why ``saved`` no longer describes the store (empty: it does).

    ``store_is_new``: the store had no lineage before this open (it was just
    created, or migrated from an older schema), so a plan made from it when it
    had none still matches if nothing was recorded since.
    """
    reasons = []
    if saved.store.lineage is None:
        if not store_is_new:
            reasons.append(
                f"it was made before the state store {store.path} existed (or from an older "
                "schema of it), and the store has recorded results since"
            )
        elif store.generation != saved.store.generation:
            reasons.append(f"the state store {store.path} recorded results since")
    elif store.lineage != saved.store.lineage:
        hint = (
            "" if store.path == saved.store.path else f" (the plan used --state {saved.store.path})"
        )
        reasons.append(
            f"the state store {store.path} is not the one it was made from: lineage "
            f"{store.lineage}, the plan's {saved.store.lineage}{hint}"
        )
    elif store.generation != saved.store.generation:
        reasons.append(
            f"the state store {store.path} changed since: generation {store.generation}, the "
            f"plan was made at {saved.store.generation} (results were recorded since)"
        )
    return reasons


def different_calls(saved: SavedPlan, plan: Plan) -> list[str]:
    """How ``plan``'s calls differ from the saved ones, body for body (empty: they do not)."""
    want = dict(saved.calls)
    have = {c.key: c.body for c in plan.calls}
    out = []
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            out.append(f"{key}: the saved call is no longer needed")
        elif key not in want:
            out.append(f"{key}: a call the saved plan does not have")
        elif want[key] != have[key]:
            out.append(f"{key}: body {json.dumps(have[key])}, saved {json.dumps(want[key])}")
    if len(want) != len(saved.plan["calls"]):
        out.append("the saved plan names a task twice")
    return out


def digest_tree(root: Path, paths: Iterable[str]) -> TreeDigest:
    """Hash the desired files ``paths`` (relative to ``root``) as they are on disk."""
    files = {}
    for rel in paths:
        h = hashlib.sha256()
        with open(root / rel, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        files[rel] = h.hexdigest()
    return TreeDigest(files)


def save(path: Path, saved: SavedPlan) -> None:
    """Write ``saved`` to ``path`` atomically: a reader sees the old file or the new one."""
    text = json.dumps(saved.to_json(), indent=2, ensure_ascii=False) + "\n"
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> SavedPlan:
    """Read a saved plan; a :class:`SavedPlanError` names the file and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SavedPlanError(f"cannot read saved plan {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SavedPlanError(
            f"{path}:{exc.lineno}:{exc.colno}: not a saved plan: invalid JSON: {exc.msg}"
        ) from exc
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise SavedPlanError(
            f'{path}: not a saved plan (no "kind": "{KIND}"); make one with '
            "`reconciler plan DIR --save FILE`"
        )
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise SavedPlanError(
            f"{path}: saved plan format_version {version!r}; this reconciler reads "
            f"{FORMAT_VERSION}: plan again with this version"
        )
    try:
        return _from_json(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SavedPlanError(f"{path}: a damaged saved plan: {_what(exc)}") from exc


def _from_json(doc: Mapping[str, Any]) -> SavedPlan:
    tree = _typed(doc, "tree", dict)
    files = {str(p): str(h) for p, h in _typed(tree, "files", dict, at="tree").items()}
    digest = TreeDigest(files)
    if digest.sha256 != tree.get("sha256"):
        raise ValueError("tree.sha256 does not match tree.files")
    state = _typed(doc, "state", dict)
    lineage = _typed(state, "lineage", (str, type(None)), at="state")
    drift = _typed(doc, "options", dict).get("drift")
    if drift not in ("heal", "report"):
        raise ValueError(f"options.drift is {drift!r}, not heal or report")
    plan = _typed(doc, "plan", dict)
    for i, call in enumerate(_typed(plan, "calls", list, at="plan")):
        where = f"plan.calls[{i}]"
        if not isinstance(call, dict):
            raise TypeError(f"{where} is not an object")
        _key(_typed(call, "task", dict, at=where)), _typed(call, "body", dict, at=where)
    raw_obs = _typed(doc, "observations", (list, type(None)))
    observations = None if raw_obs is None else dict(_observation(o) for o in raw_obs)
    made_in = doc.get("made_in")
    return SavedPlan(
        root=_typed(doc, "root", str),
        tree=digest,
        store=StoreStamp(
            path=str(state["path"]),
            lineage=None if lineage is None else str(lineage),
            generation=int(state["generation"]),
        ),
        drift=drift,
        created_at=str(doc["created_at"]),
        plan=plan,
        observations=observations,
        made_in=made_in if isinstance(made_in, str) else None,
    )


def _typed(
    doc: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, at: str = ""
) -> Any:
    """``doc[name]``, which must be of ``kind``; the error names the field."""
    where = f"{at}.{name}" if at else name
    if name not in doc:
        raise KeyError(where)
    value = doc[name]
    if not isinstance(value, kind):
        raise TypeError(f"{where} is {type(value).__name__ if value is not None else 'null'}")
    return value


def _key(task: Mapping[str, Any]) -> TaskKey:
    return TaskKey(str(task["AppId"]), str(task["RoomId"]), str(task["TaskId"]))


def _observation(doc: Mapping[str, Any]) -> tuple[TaskKey, Observation]:
    key = _key(doc["task"])
    fields = doc["fields"]
    if not isinstance(fields, dict):
        raise TypeError("observation fields must be an object")
    return key, Observation(
        key=key,
        observed_at=float(doc["observed_at"]),
        state=LiveStatus(doc["state"]),
        start_time_ms=_opt_int(doc["start_time_ms"]),
        end_time_ms=_opt_int(doc["end_time_ms"]),
        stop_reason=None if doc["stop_reason"] is None else str(doc["stop_reason"]),
        status=_opt_int(doc["status"]),
        fields=fields,
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _file_changes(before: TreeDigest, now: TreeDigest) -> str:
    changed = sorted(
        p for p in before.files.keys() & now.files.keys() if before.files[p] != now.files[p]
    )
    added = sorted(now.files.keys() - before.files.keys())
    removed = sorted(before.files.keys() - now.files.keys())
    parts = [
        f"{len(names)} {what} ({listing(names)})"
        for what, names in (("changed", changed), ("added", added), ("removed", removed))
        if names
    ]
    return ", ".join(parts) or "its digest differs"


def listing(names: Sequence[str], *, shown: int = 5, sep: str = ", ") -> str:
    """The first ``shown`` of ``names``, and how many more there are."""
    head = sep.join(names[:shown])
    return head if len(names) <= shown else f"{head}{sep}and {len(names) - shown} more"


def _what(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc.args[0]!r}"
    return str(exc)
