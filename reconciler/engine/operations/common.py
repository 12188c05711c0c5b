"""What ``plan`` and ``apply`` (and the daemon's start) share: loading the tree,
opening the store, credentials, reading live tasks, planning, the guards.

Messages are the operations' own: a refusal raises an :class:`OperationError`
(its text is the command's ``error:`` line), and what a person should see on
the way (a note, a warning, a read's progress) goes to the :class:`Notices`
the command passes in, so the same steps print the same lines in the same
order whichever command runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, Protocol, Self

from reconciler.api.credentials import Credentials, CredentialsError, load_credentials, too_open
from reconciler.core.errors import ApiError, FatalError
from reconciler.core.guard import DEFAULT_MAX_FORGET, ForgetLimit, MassForget, check_root, tree_root
from reconciler.core.live import Observation
from reconciler.core.plan import (
    DriftPolicy,
    Plan,
    Refresh,
    RefreshMode,
    compute_plan,
    keys_to_read,
    probe_plan,
)
from reconciler.core.task import AppliedRecord, DesiredTask, TaskKey
from reconciler.engine import savedplan
from reconciler.engine.clock import Clock
from reconciler.engine.savedplan import StoreStamp, TreeDigest
from reconciler.eventlog import setup as events
from reconciler.store.base import (
    Fencing,
    PostgresURL,
    Store,
    StoreError,
    StoreLocation,
    StoreWriteError,
)
from reconciler.tree.desired import DesiredIndex, FileLimits, Problem, discover, load_tree

if TYPE_CHECKING:
    # Imported where used: plan starts without httpx and aiohttp.
    from reconciler.api.client import ClientConfig
    from reconciler.core.rollout import ChangeControl, Gate


class OperationError(Exception):
    """An operation refused or could not go on; the message says why (exit 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTree(OperationError):
    """The desired tree has problems: nothing was planned. ``problems`` are listed
    (under ``root``) before the message."""

    def __init__(self, message: str, *, root: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.root = root
        self.problems = problems


class StalePlan(OperationError):
    """A saved plan no longer matches the tree or the store it was made from."""

    def __init__(self, path: str, reasons: Sequence[str]) -> None:
        super().__init__(
            f"plan {path} is stale: {'; '.join(reasons)}. Nothing was applied; "
            "make a new plan and review it."
        )
        self.reasons = tuple(reasons)


class MassForgetRefused(OperationError):
    """The plan forgets more of the known tasks than ``--max-forget`` allows."""

    def __init__(self, refusal: MassForget, *, directory: Path, what: str) -> None:
        super().__init__(
            f"{refusal}; {what}. Check that {directory} is the whole tree; to forget them on "
            "purpose, pass --allow-mass-forget (or a larger --max-forget)"
        )
        self.refusal = refusal


class MassChangeRefused(OperationError):
    """The plan changes more of the known tasks than ``--max-change`` allows."""


class ReadProgress(Protocol):
    """A display of reads as they land (nothing off a terminal)."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...
    def read(self, state: str | None) -> None: ...


class Notices(Protocol):
    """What an operation tells the person running it, on the way (stderr)."""

    def warning(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def say(self, text: str) -> None: ...
    def problems(self, root: str, problems: Sequence[Problem]) -> None: ...
    def read_progress(self, total: int) -> ReadProgress: ...


@dataclass(frozen=True, kw_only=True)
class Guards:
    """The guards against a wrong or emptied tree (``--allow-root-change``,
    ``--max-forget``, ``--allow-mass-forget``)."""

    allow_root_change: bool = False
    max_forget: ForgetLimit = dataclasses.field(
        default_factory=lambda: ForgetLimit(DEFAULT_MAX_FORGET)
    )
    allow_mass_forget: bool = False


def log_loaded(index: DesiredIndex, *, root: str) -> None:
    log = events.get_logger()
    for path in sorted(index.invalid_files):
        log.warning("desired.invalid_file", path=path)
    log.info(
        "desired.loaded",
        root=root,
        files=len(index.paths),
        tasks=len(index.tasks),
        problems=len(index.problems),
    )


def not_a_tree(directory: Path, *, what: str = "desired tree") -> OperationError:
    return OperationError(f"{what} {directory} does not exist or is not a directory")


def load_valid_tree(
    directory: Path, *, limits: FileLimits, what: str = "desired tree"
) -> DesiredIndex:
    """Load a tree for a one-shot command; an invalid tree ends the operation."""
    if not directory.is_dir():
        raise not_a_tree(directory, what=what)
    index = load_tree(directory, limits=limits)
    log_loaded(index, root=str(directory))
    if index.problems:
        raise InvalidTree(
            f"{what} {directory} is invalid: {len(index.problems)} problem(s) in "
            f"{len(index.invalid_files) or 1} file(s); nothing was planned",
            root=str(directory),
            problems=index.problems,
        )
    return index


def load_base_tree(
    base: Path, *, limits: FileLimits, notices: Notices
) -> Mapping[TaskKey, DesiredTask]:
    """The tree ``plan --base`` compares with. Unlike the tree under review, an
    invalid base does not stop the plan: a pull request that fixes a broken main
    must still get one. Tasks of its invalid files count as never applied."""
    if not base.is_dir():
        raise not_a_tree(base, what="base tree")
    index = load_tree(base, limits=limits)
    if index.problems:
        notices.problems(str(base), index.problems)
        notices.warning(
            f"base tree {base} has {len(index.problems)} problem(s); tasks of its "
            f"{len(index.invalid_files)} invalid file(s) are planned as first syncs"
        )
    return index.tasks


def open_store(
    path: StoreLocation,
    *,
    create: bool,
    read_only: bool = False,
    fencing: Fencing | None = None,
    command: str = "reconciler",
) -> Store:
    """Open the store; a writer (``command``) holds it alone."""
    try:
        return Store.open(
            path, create=create, read_only=read_only, fencing=fencing, command=command
        )
    except StoreError as exc:
        raise OperationError(str(exc)) from exc


@contextlib.contextmanager
def before_any_call() -> Iterator[None]:
    """A write the store refuses before any call was made ends the operation, saying so."""
    try:
        yield
    except StoreWriteError as exc:
        raise OperationError(f"{exc}; no call was sent") from exc


@contextlib.contextmanager
def one_writer(location: StoreLocation, *, command: str, force: bool = False) -> Iterator[None]:
    """``apply`` on a PostgreSQL store holds the replicas' election lock while it runs
    (:mod:`reconciler.store.lock`): refused while a daemon leads, unless ``force``. (A
    SQLite store's writer lock is taken by the writable open itself.)"""
    if not isinstance(location, PostgresURL):
        yield
        return
    from reconciler.store.lock import PostgresWriter

    try:
        writer = PostgresWriter.claim(location, command=command, force=force)
    except StoreError as exc:
        raise OperationError(str(exc)) from exc
    try:
        yield
    finally:
        writer.release()


def store_exists(location: StoreLocation) -> bool:
    """Whether there is a store at ``location`` (a PostgreSQL one is asked, and an
    unreachable server ends the operation)."""
    try:
        return location.exists()
    except StoreError as exc:
        raise OperationError(str(exc)) from exc


def read_applied(
    path: StoreLocation, *, notices: Notices
) -> tuple[dict[TaskKey, AppliedRecord], str | None, StoreStamp]:
    """Records, recorded tree root and the store's stamp (for a saved plan) for a
    dry run: read-only; a missing store is an empty one, not created."""
    if not store_exists(path):
        notices.note(f"no state store at {path}: every task is planned as a first sync")
        return {}, None, StoreStamp(str(path), None, 0)
    with open_store(path, create=False, read_only=True) as store:
        stamp = StoreStamp(str(path), store.lineage(), store.generation())
        return store.applied(), store.tree_root(), stamp


def digest_loaded_tree(directory: Path, index: DesiredIndex, *, before: TreeDigest) -> TreeDigest:
    """The digest of the files ``index`` was loaded from, which must be ``before``'s:
    a file saved while the plan was made would leave a plan of neither version."""
    after = savedplan.digest_tree(directory, sorted(index.paths))
    if after != before:
        raise OperationError(f"desired tree {directory} changed while it was read; plan again")
    return after


def digest_before_load(directory: Path) -> TreeDigest:
    if not directory.is_dir():
        raise not_a_tree(directory)
    try:
        paths, _ = discover(directory)
        return savedplan.digest_tree(directory, paths)
    except OSError as exc:
        raise OperationError(f"desired tree {directory}: cannot read: {exc}") from exc


def check_tree_root(
    recorded: str | None, directory: Path, *, store: StoreLocation, allow: bool, notices: Notices
) -> None:
    """Refuse a store applied from another tree, unless allowed (then warn)."""
    mismatch = check_root(recorded, tree_root(directory), store=str(store))
    if mismatch is None:
        return
    if not allow:
        raise OperationError(str(mismatch))
    notices.warning(
        f"the tree root changes from {mismatch.recorded} to {mismatch.root} (--allow-root-change)"
    )


def record_tree_root(store: Store, directory: Path) -> None:
    """``apply`` and ``run`` record the tree they reconcile, the first time or when moved."""
    root, previous = tree_root(directory), store.tree_root()
    if root != previous:
        try:
            store.record_tree_root(root)
        except StoreError as exc:
            raise OperationError(str(exc)) from exc
        events.get_logger().info(
            "state.tree_root_recorded", path=str(store.path), root=root, previous_root=previous
        )


def mass_forget_refused(refusal: MassForget, *, directory: Path, what: str) -> NoReturn:
    """Log and refuse: the plan forgets too much for the tree to be right."""
    events.get_logger().error(
        "plan.mass_forget_refused",
        root=str(directory),
        forget=refusal.forget,
        known=refusal.known,
        allowed=refusal.allowed,
        max_forget=str(refusal.limit),
    )
    raise MassForgetRefused(refusal, directory=directory, what=what)


def log_mass_change(gate: Gate, *, root: Path) -> None:
    refusal = gate.mass_change
    if refusal is None:
        return
    events.get_logger().error(
        "plan.mass_change_refused",
        root=str(root),
        changes=refusal.changes,
        known=refusal.known,
        allowed=refusal.allowed,
        max_change=str(refusal.limit),
    )


def make_plan(
    index: DesiredIndex,
    applied: dict[TaskKey, AppliedRecord],
    *,
    observations: dict[TaskKey, Observation] | None = None,
    drift: DriftPolicy = "heal",
    refresh: Refresh | None = None,
) -> Plan:
    plan = compute_plan(
        index.tasks,
        applied,
        held_files=index.invalid_files,
        observations=observations,
        drift=drift,
    )
    plan = dataclasses.replace(plan, refresh=refresh)
    events.get_logger().info("plan.computed", **plan.summary())
    for w in plan.warnings:
        events.get_logger().warning(
            "plan.warning",
            code=w.code,
            message=w.message,
            app_id=w.key.app_id,
            room_id=w.key.room_id,
            task_id=w.key.task_id,
        )
    return plan


def gate_or_refuse(
    plan: Plan,
    *,
    applied: Mapping[TaskKey, AppliedRecord],
    control: ChangeControl,
    tree: Path,
    clock: Clock,
    observations: Mapping[TaskKey, Observation] | None = None,
) -> Gate:
    """``apply``'s change control, for a plan of a tree or a saved plan alike.

    Refuses (nothing sent or recorded) a mass change not allowed; logs
    ``window.overridden`` for each call ``--override-window`` sends through a
    window; returns the :class:`~reconciler.core.rollout.Gate` whose ``send``
    calls may go (paced and canaried by the apply operation).
    """
    from reconciler.core.rollout import gate_plan

    gate = gate_plan(
        plan, applied=applied, control=control, now=clock.utcnow(), observations=observations
    )
    log = events.get_logger()
    if gate.mass_change is not None:
        log_mass_change(gate, root=tree)
        raise MassChangeRefused(
            f"{gate.mass_change}; nothing was applied. Check the change; to make it on "
            "purpose, pass --allow-mass-change (or a larger --max-change)"
        )
    for call, windows in gate.overridden:
        log.warning(
            "window.overridden",
            **call.key._asdict(),
            windows=[w.label for w in windows],
            sources=[w.source for w in windows],
        )
    return gate


def load_checked_credentials(*, notices: Notices, refuse_open: bool = False) -> Credentials:
    """The API credentials, their secrets registered for redaction; a file others may
    read is warned of, as ssh does of a private key (``refuse_open``: refused)."""
    try:
        creds = load_credentials()
    except CredentialsError as exc:
        raise OperationError(str(exc)) from exc
    events.register_secret(creds.secret_key)
    events.register_secret(creds.session_token)
    check_credentials_file(creds, notices=notices, refuse=refuse_open)
    return creds


def check_credentials_file(creds: Credentials, *, notices: Notices, refuse: bool = False) -> None:
    problem = None if creds.source is None else too_open(creds.source)
    if problem is None:
        return
    if refuse:
        raise OperationError(
            f"{problem}; run does not start with it (--allow-open-credentials or "
            "RECONCILER_ALLOW_OPEN_CREDENTIALS=1 starts it anyway)"
        )
    notices.warning(problem)


def read_live(
    index: DesiredIndex,
    applied: Mapping[TaskKey, AppliedRecord],
    *,
    mode: RefreshMode,
    config: ClientConfig,
    creds: Credentials | None,
    notices: Notices,
    last: dict[TaskKey, Observation] | None = None,
    offline_ok: bool = False,
    failures: dict[TaskKey, ApiError] | None = None,
    probe: Plan | None = None,
) -> tuple[dict[TaskKey, Observation] | None, Refresh]:
    """Read what the plan needs (``mode``), with the notices' progress display.

    Returns the observations to plan with (``None``: nothing read, plan against
    last-applied) and what was done. An endpoint that cannot be read ends the
    operation: a plan is never silently made from memory instead. ``offline_ok``
    (``plan`` by default): without credentials, plan against last-applied and
    say so, as a CI job reviewing a tree does. ``failures`` gets each failed
    read's error; ``probe``: the :func:`~reconciler.core.plan.probe_plan` if the caller
    made it already.
    """
    from reconciler.api.client import RtcClient
    from reconciler.engine.observe import observe_all

    if mode == "none":
        return None, Refresh("none", reason="--no-refresh")
    if mode == "full":
        keys = sorted(index.tasks)
    else:
        if probe is None:
            probe = probe_plan(index.tasks, applied, held_files=index.invalid_files)
        keys = keys_to_read(probe)
    if not keys:
        return {}, Refresh(mode)
    if creds is None and offline_ok:
        try:
            creds = load_credentials()
        except CredentialsError as exc:
            return None, Refresh("none", reason=f"{exc}; --refresh needs credentials")
        events.register_secret(creds.secret_key)
        events.register_secret(creds.session_token)
        check_credentials_file(creds, notices=notices)
    if creds is None:
        creds = load_checked_credentials(notices=notices)
    settle_for_doubt(applied, keys, notices=notices)
    what = "every desired task" if mode == "full" else "the tasks a call would go to"
    notices.say(
        f"Reading {len(keys)} live task(s) ({what}) at up to {config.limits.get}/s "
        f"(about {len(keys) / config.limits.get:.0f} s) ..."
    )
    progress = notices.read_progress(len(keys))
    reader = creds

    async def read_all() -> dict[TaskKey, Observation]:
        async with RtcClient(reader, config=config) as client:
            with progress:
                return await observe_all(
                    client,
                    keys,
                    last=last,
                    on_read=lambda _, obs: progress.read(None if obs is None else obs.state),
                    failures=failures,
                )

    try:
        found = asyncio.run(read_all())
    except* FatalError as group:
        raise OperationError(
            f"cannot read live tasks: {group.exceptions[0]}; nothing was planned or sent "
            "(--no-refresh plans against last-applied without reading)"
        ) from None
    unread = len(keys) - len(found)
    if unread:
        notices.warning(
            f"{unread} task(s) could not be read: one never confirmed gets no call until it "
            "is read, the others are planned against last-applied"
        )
    return found, Refresh(mode, read=len(found), failed=unread)


def settle_for_doubt(
    applied: Mapping[TaskKey, AppliedRecord], keys: Sequence[TaskKey], *, notices: Notices
) -> None:
    """Wait until a read can tell whether the calls in doubt among ``keys`` landed.

    A call left Pending (a run stopped a moment ago) may still be on its way: a
    read taken within the settle window after it does not count, and the task
    would be left unread.
    """
    from reconciler.core.plan import SETTLE_S

    doubts = [r.in_doubt_since for k in keys if (r := applied.get(k)) and r.in_doubt_since]
    wait = max(doubts, default=0.0) + SETTLE_S + 0.1 - time.time()
    if wait > 0:
        notices.say(
            f"Waiting {wait:.1f} s for {len(doubts)} call(s) in doubt to settle before "
            "reading them back ..."
        )
        time.sleep(min(wait, SETTLE_S + 0.1))


async def listen(start: Awaitable[str], *, what: str, host: str, port: int) -> str:
    """Start a server; a port in use is a clear refusal, not a traceback."""
    try:
        return await start
    except OSError as exc:
        raise OperationError(
            f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}"
        ) from exc
