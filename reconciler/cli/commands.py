"""The ``reconciler`` command line, built on click.

Each command is a thin shell: parse options, call the functional core or the
right long-running piece, print, exit with the documented status. Every
option can also come from an environment variable (see :class:`EnvOption`):
``RECONCILER_<OPTION>``, or ``RECONCILER_<COMMAND>_<OPTION>`` where the bare
name would mean different things in different commands; the desired tree
argument from ``RECONCILER_DIR``.

Exit statuses: 0 success; 1 an error (invalid tree, unreadable store, failed
call, missing credentials); ``plan --detailed-exitcode`` adds 2 for "calls
pending".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TextIO, TypeVar

import click

from reconciler.api.credentials import Credentials, CredentialsError, load_credentials, too_open
from reconciler.api.ratelimit import READ_QPS_MAX, RateLimits
from reconciler.cli.views import render
from reconciler.core.errors import ApiError, BadInputError, FatalError
from reconciler.core.guard import (
    DEFAULT_MAX_FORGET,
    FORGET_FLOOR,
    ForgetLimit,
    MassForget,
    check_forgets,
    check_root,
    format_fraction,
    parse_max_forget,
    parse_share,
    tree_root,
)
from reconciler.core.live import LiveStatus, Observation
from reconciler.core.plan import (
    DriftPolicy,
    Plan,
    Refresh,
    RefreshMode,
    compute_plan,
    keys_to_read,
    probe_plan,
    records_from_tree,
)
from reconciler.core.printable import printable
from reconciler.core.task import AppliedRecord, DesiredTask, SyncStatus, TaskKey
from reconciler.engine import savedplan
from reconciler.engine.savedplan import SavedPlan, StoreStamp, TreeDigest
from reconciler.eventlog import setup as events
from reconciler.serve.status import build_report, parse_live_states, parse_statuses, report_statuses
from reconciler.store.base import (
    SCHEMA_VERSION,
    Fencing,
    PostgresURL,
    Store,
    StoreError,
    StoreLocation,
    StoreWriteError,
    parse_location,
)
from reconciler.tree.desired import (
    DEFAULT_LIMITS,
    SUFFIXES,
    DesiredIndex,
    FileLimits,
    discover,
    load_file,
    load_tree,
)
from reconciler.tree.schema import desired_schema_text

if TYPE_CHECKING:
    # Imported where used: validate, plan and status start without httpx,
    # aiohttp, prometheus-client, watchfiles and rich (about 0.7 s a run).
    from reconciler.api.client import ClientConfig
    from reconciler.cli.views.progress import ApplyProgress
    from reconciler.core.rollout import ChangeControl, Gate, Waiting
    from reconciler.emulator import Emulator
    from reconciler.engine.apply import ApplyReport
    from reconciler.engine.daemon import DaemonConfig
    from reconciler.engine.reconcile import Result
    from reconciler.serve.health import HealthAccess
    from reconciler.store.leader import LeaderRow, Leadership
    from reconciler.store.recorder import Recorder

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STATE = Path(".reconciler") / "state.db"
DEFAULT_ENDPOINT = "https://rtc.volcengineapi.com"
# The distribution (what pip installs), not the command: `reconciler` on the public
# package index is an unrelated project.
DISTRIBUTION = "rtc-segment-reconciler"


class EnvOption(click.Option):
    """An option read from ``RECONCILER_<NAME>``, and perhaps from a deprecated name.

    Variables are named once per meaning: an option several commands share with
    one meaning has one name (``RECONCILER_STATE``), one whose bare name would
    mean different things in different commands carries its command
    (``RECONCILER_PLAN_OUTPUT``, ``RECONCILER_EMULATOR_PORT``). A renamed
    variable's old name still works when the new one is not set, with a warning
    on stderr; set both and the new one wins.
    """

    def __init__(self, *args: Any, deprecated_envvar: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deprecated_envvar = deprecated_envvar

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is not None or self.deprecated_envvar is None:
            return value
        value = os.environ.get(self.deprecated_envvar) or None  # empty means unset, as click
        if value is not None:
            ctx.meta[self._from_deprecated] = True
            if not ctx.resilient_parsing:  # not while completing a command line
                click.echo(
                    click.style("warning: ", fg="yellow", bold=True)
                    + f"{self.deprecated_envvar} is deprecated: use {self.envvar} "
                    f"(which wins when both are set)",
                    err=True,
                )
        return value

    def get_error_hint(self, ctx: click.Context | None) -> str:
        # A bad value from the old name must name the old name, not the one unset.
        if ctx is not None and ctx.meta.get(self._from_deprecated):
            names = " / ".join(f"'{opt}'" for opt in self.opts)
            return f"{names} (env var: '{self.deprecated_envvar}')"
        return super().get_error_hint(ctx)

    @property
    def _from_deprecated(self) -> str:
        return f"{__name__}.deprecated_envvar.{id(self)}"


def _option(
    *names: str, env: str, deprecated_env: str | None = None, **kwargs: Any
) -> Callable[[F], F]:
    """``RECONCILER_{env}``; ``deprecated_env``: the variable's old name, still read."""
    return click.option(
        *names,
        cls=EnvOption,
        envvar=f"RECONCILER_{env}",
        deprecated_envvar=f"RECONCILER_{deprecated_env}" if deprecated_env else None,
        show_envvar=True,
        **kwargs,
    )


def dir_argument(f: F, *, file_okay: bool = False) -> F:
    return click.argument(
        "directory",
        default="desired",
        envvar="RECONCILER_DIR",
        metavar="[PATH]" if file_okay else None,
        # A str when a file is allowed: messages name it as written (Path drops "./").
        type=click.Path(path_type=str)
        if file_okay
        else click.Path(file_okay=False, path_type=Path),
    )(f)


def tree_or_file_argument(f: F) -> F:
    """The tree argument of ``validate``, which may also name a single file."""
    return dir_argument(f, file_okay=True)


class StoreLocationType(click.ParamType[StoreLocation]):
    """``--state``: a SQLite file path, or a ``postgresql://`` URL or libpq connection
    string (kept whole: a path type would fold its ``//``). A password typed on the
    command line is warned of: ``ps`` shows it to every user of the machine."""

    name = "PATH|URL"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> StoreLocation:
        if isinstance(value, PostgresURL):
            return value
        try:
            location = parse_location(value if isinstance(value, Path) else str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if (
            isinstance(location, PostgresURL)
            and location.password
            and ctx is not None
            and param is not None
            and param.name is not None
            and not ctx.resilient_parsing
            and ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE
        ):
            events.register_secret(location.password)
            name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
            click.echo(
                click.style("warning: ", fg="yellow", bold=True)
                + f"{name} {location} carries a password on the command line, where other "
                "users may read it (ps); give it in RECONCILER_STATE, PGPASSWORD or a password "
                "file (~/.pgpass) instead",
                err=True,
            )
        return location


def state_option(f: F) -> F:
    return _option(
        "--state",
        env="STATE",
        type=StoreLocationType(),
        default=DEFAULT_STATE,
        show_default=True,
        help="State store: a SQLite file, or a postgresql:// URL or libpq string that "
        "replicas of run share (its password in RECONCILER_STATE, PGPASSWORD or ~/.pgpass).",
    )(f)


# The commands that read the one RECONCILER_OUTPUT before each got its own.
_SHARED_OUTPUT_BEFORE = frozenset({"plan", "status"})


class OutputFormat(click.Choice):  # type: ignore[type-arg]
    """``-o/--output``: a format. A file name given to it (``plan -o plan.json``, as
    other tools name their output file) is refused with the option that takes one."""

    def __init__(self, formats: Sequence[str], *, file_option: str | None = None) -> None:
        super().__init__(list(formats))
        self.file_option = file_option

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as exc:
            if self.file_option and any(c in str(value) for c in "./"):
                raise click.BadParameter(
                    f"{exc.message.rstrip('.')}: -o/--output is the format; to save the plan "
                    f"to a file, use {self.file_option} {value}",
                    ctx=ctx,
                    param=param,
                ) from None
            raise


def output_option(
    command: str, *, formats: Sequence[str] = ("text", "json"), file_option: str | None = None
) -> Callable[[F], F]:
    """``-o/--output`` of ``command``, from ``RECONCILER_<COMMAND>_OUTPUT``: JSON for
    one command must not change what another prints."""
    if not isinstance(command, str):
        raise TypeError("output_option needs the command's name: @output_option('plan')")
    return _option(
        "--output",
        "-o",
        env=f"{command.upper()}_OUTPUT",
        deprecated_env="OUTPUT" if command in _SHARED_OUTPUT_BEFORE else None,
        type=OutputFormat(formats, file_option=file_option),
        default="text",
        show_default=True,
        help="Output format; the JSON shapes are documented in the manual (docs/)."
        + (" markdown: a pull-request comment." if "markdown" in formats else ""),
    )


def fail(message: str) -> NoReturn:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)
    sys.exit(1)


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


def load_valid_tree(directory: Path, *, what: str = "desired tree") -> DesiredIndex:
    """Load a tree for a one-shot command; an invalid tree ends the command."""
    if not directory.is_dir():
        fail(f"{what} {directory} does not exist or is not a directory")
    index = load_tree(directory, limits=file_limits())
    log_loaded(index, root=str(directory))
    if index.problems:
        click.echo(render.problems(str(directory), index.problems), err=True)
        fail(
            f"{what} {directory} is invalid: {len(index.problems)} problem(s) in "
            f"{len(index.invalid_files) or 1} file(s); nothing was planned"
        )
    return index


def load_base_tree(base: Path) -> Mapping[TaskKey, DesiredTask]:
    """The tree ``plan --base`` compares with. Unlike the tree under review, an
    invalid base does not stop the plan: a pull request that fixes a broken main
    must still get one. Tasks of its invalid files count as never applied."""
    if not base.is_dir():
        fail(f"base tree {base} does not exist or is not a directory")
    index = load_tree(base, limits=file_limits())
    if index.problems:
        click.echo(render.problems(str(base), index.problems), err=True)
        click.echo(
            click.style("warning: ", fg="yellow", bold=True)
            + f"base tree {base} has {len(index.problems)} problem(s); tasks of its "
            f"{len(index.invalid_files)} invalid file(s) are planned as first syncs",
            err=True,
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
    """Open the store or end the command; a writer (``command``) holds it alone."""
    try:
        return Store.open(
            path, create=create, read_only=read_only, fencing=fencing, command=command
        )
    except StoreError as exc:
        fail(str(exc))


@contextlib.contextmanager
def before_any_call() -> Iterator[None]:
    """A write the store refuses before any call was made ends the command, saying so."""
    try:
        yield
    except StoreWriteError as exc:
        fail(f"{exc}; no call was sent")


@contextlib.contextmanager
def one_writer_or_fail(
    location: StoreLocation, *, command: str, force: bool = False
) -> Iterator[None]:
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
        fail(str(exc))
    try:
        yield
    finally:
        writer.release()


def store_exists(location: StoreLocation) -> bool:
    """Whether there is a store at ``location`` (a PostgreSQL one is asked, and an
    unreachable server ends the command)."""
    try:
        return location.exists()
    except StoreError as exc:
        fail(str(exc))


def read_applied(
    path: StoreLocation,
) -> tuple[dict[TaskKey, AppliedRecord], str | None, StoreStamp]:
    """Records, recorded tree root and the store's stamp (for a saved plan) for a
    dry run: read-only; a missing store is an empty one, not created."""
    if not store_exists(path):
        click.echo(
            click.style("note: ", fg="yellow")
            + f"no state store at {path}: every task is planned as a first sync",
            err=True,
        )
        return {}, None, StoreStamp(str(path), None, 0)
    with open_store(path, create=False, read_only=True) as store:
        stamp = StoreStamp(str(path), store.lineage(), store.generation())
        return store.applied(), store.tree_root(), stamp


def digest_loaded_tree(directory: Path, index: DesiredIndex, *, before: TreeDigest) -> TreeDigest:
    """The digest of the files ``index`` was loaded from, which must be ``before``'s:
    a file saved while the plan was made would leave a plan of neither version."""
    after = savedplan.digest_tree(directory, sorted(index.paths))
    if after != before:
        fail(f"desired tree {directory} changed while it was read; plan again")
    return after


def digest_before_load(directory: Path) -> TreeDigest:
    if not directory.is_dir():
        fail(f"desired tree {directory} does not exist or is not a directory")
    try:
        paths, _ = discover(directory)
        return savedplan.digest_tree(directory, paths)
    except OSError as exc:
        fail(f"desired tree {directory}: cannot read: {exc}")


def _stacked(f: F, decorators: Sequence[Callable[[Any], Any]]) -> F:
    """Apply ``decorators`` as if written above ``f`` in this order."""
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def guard_options(f: F) -> F:
    """The guards against a wrong or emptied tree, shared by ``plan``, ``apply`` and ``run``."""
    decorators = [
        _option(
            "--allow-root-change",
            env="ALLOW_ROOT_CHANGE",
            is_flag=True,
            help="Accept a tree other than the one the state store was applied from "
            "(apply and run then record the new one).",
        ),
        _option(
            "--max-forget",
            env="MAX_FORGET",
            metavar="SHARE",
            default=format_fraction(DEFAULT_MAX_FORGET),
            show_default=True,
            callback=_check_max_forget,
            help="The most of the known tasks one plan may forget, as a percentage (10%) or "
            f"a fraction (0.1); up to {FORGET_FLOOR} tasks at once are always allowed.",
        ),
        _option(
            "--allow-mass-forget",
            env="ALLOW_MASS_FORGET",
            is_flag=True,
            help="Forget more tasks than --max-forget allows.",
        ),
    ]
    return _stacked(f, decorators)


_CONTROL = f"{__name__}.change_control"


def _remember_control(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta.setdefault(_CONTROL, {})[param.name] = value


def _load_sync_windows(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    from reconciler.core.windows import NO_WINDOWS, WindowConfigError, load_windows_file

    windows = NO_WINDOWS
    if value is not None and not ctx.resilient_parsing:
        try:
            windows = load_windows_file(value)
        except WindowConfigError as exc:
            fail(f"--sync-windows: {exc}")
    _remember_control(ctx, param, windows)


def _check_max_change(ctx: click.Context, param: click.Parameter, value: str) -> None:
    from reconciler.core.rollout import ChangeLimit

    try:
        _remember_control(ctx, param, ChangeLimit(parse_share(value)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def change_control_options(*, pacing: bool = False, override: bool = False) -> Callable[[F], F]:
    """Change control (sync windows, mass changes; with ``pacing`` the rate cap and the
    canary; with ``override`` ``--override-window``): read back by :func:`change_control`."""
    from reconciler.core.rollout import CHANGE_FLOOR, DEFAULT_MAX_CHANGE

    common: dict[str, Any] = {"expose_value": False, "callback": _remember_control}
    decorators = [
        _option(
            "--sync-windows",
            env="SYNC_WINDOWS",
            metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            expose_value=False,
            callback=_load_sync_windows,
            help="YAML file of sync windows: when calls may go out (docs/change-control.md).",
        ),
        _option(
            "--max-change",
            env="MAX_CHANGE",
            metavar="SHARE",
            default=format_fraction(DEFAULT_MAX_CHANGE),
            show_default=True,
            expose_value=False,
            callback=_check_max_change,
            help="The most of the known tasks one plan may change, as a percentage or a "
            f"fraction; up to {CHANGE_FLOOR} at once are always allowed.",
        ),
        _option(
            "--allow-mass-change",
            env="ALLOW_MASS_CHANGE",
            is_flag=True,
            help="Change more tasks at once than --max-change allows.",
            **common,
        ),
    ]
    if pacing:
        decorators += [
            _option(
                "--max-changes-per-minute",
                env="MAX_CHANGES_PER_MINUTE",
                metavar="N",
                type=click.IntRange(1, 100_000),
                default=None,
                help="Pace changes (not heals) to at most N a minute, evenly spaced.",
                **common,
            ),
            _option(
                "--canary",
                env="CANARY",
                metavar="K",
                type=click.IntRange(0, 100_000),
                default=0,
                show_default=True,
                help="Send the first K changes of a rollout first; the rest wait until those "
                "are observed Synced (read back after the settle window).",
                **common,
            ),
        ]
    if override:
        decorators.append(
            _option(
                "--override-window",
                env="OVERRIDE_WINDOW",
                is_flag=True,
                help="Send calls that a sync window holds, and log window.overridden.",
                **common,
            )
        )

    def decorate(f: F) -> F:
        return _stacked(f, decorators)

    return decorate


def change_control() -> ChangeControl:
    """The change-control options of the current command."""
    from reconciler.core.rollout import ChangeControl, ChangeLimit
    from reconciler.core.windows import NO_WINDOWS

    given = click.get_current_context().meta.get(_CONTROL, {})
    return ChangeControl(
        windows=given.get("sync_windows") or NO_WINDOWS,
        max_change=given.get("max_change") or ChangeLimit(),
        allow_mass_change=bool(given.get("allow_mass_change")),
        override_window=bool(given.get("override_window")),
        max_changes_per_minute=given.get("max_changes_per_minute"),
        canary=int(given.get("canary") or 0),
    )


_LIMITS = f"{__name__}.file_limits"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmg])(i?)b?|b)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``8MiB``, ``500k``, ``1048576``: a number of bytes (k, M, G are 1000s; KiB, MiB,
    GiB are 1024s; any case)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: write bytes, or a number with k, M, G (1000s) or "
            "KiB, MiB, GiB (1024s), e.g. 16MiB"
        )
    number, prefix, binary = match.groups()
    scale = 1 if prefix is None else (1024 if binary else 1000) ** ("kmg".index(prefix.lower()) + 1)
    value = int(float(number) * scale)
    if value < 1:
        raise ValueError(f"{text!r} is less than 1 byte")
    return value


def _remember_limit(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if param.name == "max_file_bytes" and isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param=param) from exc
    ctx.meta.setdefault(_LIMITS, {})[param.name] = value


def limit_options(f: F) -> F:
    """What one desired file may cost (:class:`~reconciler.tree.desired.FileLimits`):
    read back by :func:`file_limits`."""
    default = DEFAULT_LIMITS
    common: dict[str, Any] = {"expose_value": False, "callback": _remember_limit}
    decorators = [
        _option(
            "--max-file-bytes",
            env="MAX_FILE_BYTES",
            metavar="SIZE",
            default="8MiB",
            show_default=True,
            help="Refuse a larger file, unread (its tasks are held).",
            **common,
        ),
        _option(
            "--max-file-tasks",
            env="MAX_FILE_TASKS",
            type=click.IntRange(min=1),
            metavar="N",
            default=default.max_tasks,
            show_default=True,
            help="Refuse a file of more tasks.",
            **common,
        ),
        _option(
            "--max-file-problems",
            env="MAX_FILE_PROBLEMS",
            type=click.IntRange(min=1),
            metavar="N",
            default=default.max_problems,
            show_default=True,
            help="Problems shown per file; the rest are counted.",
            **common,
        ),
    ]
    return _stacked(f, decorators)


def file_limits() -> FileLimits:
    """The file limits of the current command."""
    given = click.get_current_context().meta.get(_LIMITS, {})
    return FileLimits(
        max_bytes=given.get("max_file_bytes") or DEFAULT_LIMITS.max_bytes,
        max_tasks=given.get("max_file_tasks") or DEFAULT_LIMITS.max_tasks,
        max_problems=given.get("max_file_problems") or DEFAULT_LIMITS.max_problems,
    )


def wall_clock() -> datetime:
    """Now, for change control's decisions (one place, so a test can set the clock)."""
    return datetime.now(UTC)


def change_control_gate(
    plan: Plan,
    *,
    applied: Mapping[TaskKey, AppliedRecord],
    control: ChangeControl,
    tree: Path,
    observations: Mapping[TaskKey, Observation] | None = None,
) -> Gate:
    """``apply``'s change control, for a plan of a tree or a saved plan alike.

    Ends the command (exit 1, nothing sent or recorded) on a mass change not
    allowed; logs ``window.overridden`` for each call ``--override-window``
    sends through a window; returns the :class:`~reconciler.core.rollout.Gate`
    whose ``send`` calls may go (paced and canaried by :func:`_apply`).
    """
    from reconciler.core.rollout import gate_plan

    gate = gate_plan(
        plan, applied=applied, control=control, now=wall_clock(), observations=observations
    )
    log = events.get_logger()
    if gate.mass_change is not None:
        log_mass_change(gate, root=tree)
        fail(
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


def _check_max_forget(_: click.Context, param: click.Parameter, value: str) -> ForgetLimit:
    try:
        return ForgetLimit(parse_max_forget(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def check_tree_root(
    recorded: str | None, directory: Path, *, store: StoreLocation, allow: bool
) -> None:
    """End the command when the store was applied from another tree, unless allowed."""
    mismatch = check_root(recorded, tree_root(directory), store=str(store))
    if mismatch is None:
        return
    if not allow:
        fail(str(mismatch))
    click.echo(
        click.style("warning: ", fg="yellow", bold=True)
        + f"the tree root changes from {mismatch.recorded} to {mismatch.root} "
        "(--allow-root-change)",
        err=True,
    )


def record_tree_root(store: Store, directory: Path) -> None:
    """``apply`` and ``run`` record the tree they reconcile, the first time or when moved."""
    root, previous = tree_root(directory), store.tree_root()
    if root != previous:
        try:
            store.record_tree_root(root)
        except StoreError as exc:
            fail(str(exc))
        events.get_logger().info(
            "state.tree_root_recorded", path=str(store.path), root=root, previous_root=previous
        )


def mass_forget_refused(refusal: MassForget, *, directory: Path, what: str) -> NoReturn:
    """Log and end the command: the plan forgets too much for the tree to be right."""
    events.get_logger().error(
        "plan.mass_forget_refused",
        root=str(directory),
        forget=refusal.forget,
        known=refusal.known,
        allowed=refusal.allowed,
        max_forget=str(refusal.limit),
    )
    fail(
        f"{refusal}; {what}. Check that {directory} is the whole tree; to forget them on "
        "purpose, pass --allow-mass-forget (or a larger --max-forget)"
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


LOG_LEVELS = click.Choice(list(events.LEVELS))
LOG_FORMATS = click.Choice(["auto", "json", "console"])


def _remember_log_option(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A logging option given after the command: it overrides the one before it."""
    if value is None or value is False or param.name is None:
        return
    settings = ctx.find_root().obj
    settings[param.name] = value
    if param.name == "log_level":
        settings["level_given"] = True
    configure_events()


def _log_params() -> list[click.Parameter]:
    """Per-command copies of the global logging options, so that
    ``reconciler plan desired --log-level debug`` works as well as
    ``reconciler --log-level debug plan desired``. No environment variables:
    the group's own options read those."""
    common: dict[str, Any] = {"expose_value": False, "callback": _remember_log_option}
    return [
        click.Option(
            ["--log-format"],
            type=LOG_FORMATS,
            default=None,
            help="As before the command.",
            **common,
        ),
        click.Option(
            ["--log-level"], type=LOG_LEVELS, default=None, help="As before the command.", **common
        ),
        click.Option(
            ["--quiet", "-q"], is_flag=True, default=False, help="As before the command.", **common
        ),
    ]


#: ``--help`` groups a command's options under these headings, in this order: the
#: ones most runs set first (under "Options"), logging last. By parameter name.
HELP_SECTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "Options": (
        "state", "endpoint", "embedded", "base", "output", "save", "detailed_exitcode",
        "statuses", "lives", "apps", "help",
    ),
    "API": ("region", "service", "api_version", "timeout", "emulator_port",
            "allow_open_credentials"),
    "Budget": ("qps", "read_qps", "max_in_flight", "resync", "retry_delay", "drain_timeout"),
    "Observation": ("observe", "observe_interval", "refresh", "drift"),
    "Change control": (
        "sync_windows", "max_change", "allow_mass_change", "max_changes_per_minute", "canary",
        "override_window", "max_forget", "allow_mass_forget", "allow_root_change",
    ),
    "Desired-file limits": ("max_file_bytes", "max_file_tasks", "max_file_problems"),
    "Health, dashboard and notices": (
        "health_host", "health_port", "health_allowed_host", "health_token_file",
        "health_basic_auth_file", "notify",
    ),
    "Leadership": ("replica", "force_while_leading"),
    "Logging": ("log_format", "log_level", "quiet"),
}  # fmt: skip
_SECTION_OF: Final = {name: title for title, names in HELP_SECTIONS.items() for name in names}


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options in :data:`HELP_SECTIONS`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # the arguments are in the usage line
            record = param.get_help_record(ctx)
            if record is not None:
                rows.setdefault(_SECTION_OF.get(param.name or "", "Options"), []).append(record)
        for title in HELP_SECTIONS:
            if title in rows:
                with formatter.section(title):
                    formatter.write_dl(rows[title])


class ReconcilerGroup(click.Group):
    """The command group; every command also takes the global logging options."""

    command_class = SectionedCommand

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_log_params())
        super().add_command(cmd, name)


def configure_events(*, stream: TextIO | None = None, report: bool = False) -> None:
    """Configure events from the global options, wherever on the line they were given.

    ``report``: the command prints a report of its own (``validate``, ``plan``);
    in a terminal its events would repeat the report line by line, so they are
    left out unless a level was asked for explicitly. JSON events are unchanged.
    """
    settings = click.get_current_context().find_root().obj
    fmt: events.LogFormat = settings["log_format"]
    level: str = settings["log_level"]
    if settings.get("quiet") and events.LEVELS.index(level) < events.LEVELS.index("warning"):
        level = "warning"
    if report and events.uses_console(fmt, stream) and not settings.get("level_given"):
        level = "error"
    settings["effective_level"] = level
    settings["stream"] = stream
    events.configure(fmt=fmt, level=level, stream=stream)


def console_shows(level: str) -> bool:
    """Whether events at ``level`` reach a person as console lines in this run."""
    settings = click.get_current_context().find_root().obj
    effective: str = settings.get("effective_level", settings["log_level"])
    return events.uses_console(
        settings["log_format"], settings.get("stream")
    ) and events.LEVELS.index(effective) <= events.LEVELS.index(level)


@click.group(
    cls=ReconcilerGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@_option(
    "--log-format",
    env="LOG_FORMAT",
    type=LOG_FORMATS,
    default="auto",
    show_default=True,
    help="Events as JSON lines or console lines; auto: JSON unless the stream they go to "
    "(stderr; stdout for run) is a terminal. "
    "Also accepted after the command.",
)
@_option(
    "--log-level",
    env="LOG_LEVEL",
    type=LOG_LEVELS,
    default="info",
    show_default=True,
    help="Also accepted after the command.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Only warnings and errors, no progress bar (same as --log-level warning for events).",
)
@click.version_option(
    package_name=DISTRIBUTION, message="%(prog)s %(version)s (distribution %(package)s)"
)
@click.pass_context
def main(ctx: click.Context, log_format: events.LogFormat, log_level: str, quiet: bool) -> None:
    """Keep Volcengine RTC audio-segment tasks in line with a desired tree.

    Colour follows the terminal; set NO_COLOR to turn it off.
    """
    given = ctx.get_parameter_source("log_level") is not click.core.ParameterSource.DEFAULT
    ctx.obj = {
        "log_format": log_format,
        "log_level": log_level,
        "level_given": given,
        "quiet": quiet,
    }
    if events.no_color():
        ctx.color = False  # click.echo strips styles for every command below
    configure_events()


@main.command()
@tree_or_file_argument
@output_option("validate")
@limit_options
def validate(directory: str, output: str) -> None:
    """Check the desired tree, or one desired file; exit 1 and list every problem if invalid.

    PATH is a tree (a directory) or a single .yaml, .yml or .json file, which is
    checked on its own by the same rules: a task or Identifier declared twice in
    it is an error, clashes with other files are not looked for.
    """
    configure_events(report=True)
    path = Path(directory)
    if path.is_dir():
        what, root = "desired tree", directory
        index = load_tree(path, limits=file_limits())
    elif not path.exists():
        fail(f"{directory} does not exist: give a desired tree (a directory) or a desired file")
    elif not directory.endswith(SUFFIXES):
        fail(
            f"{directory} is not a desired file: only files ending in "
            f"{', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} are checked (or give a directory)"
        )
    else:
        # Paths in messages stay as the user wrote this one, hence no root.
        what, root = "desired file", ""
        index = load_file(directory, limits=file_limits())
    log_loaded(index, root=directory)
    found = index.problems
    if output == "json":
        doc = render.validation_json(index, given=directory, root=root)
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    elif found:
        click.echo(render.problems(root, found), err=True)
    if found:
        files = f" in {len(index.invalid_files) or 1} file(s)" if root else ""
        fail(f"{what} {directory} is invalid: {len(found)} problem(s){files}")
    if output == "text":
        files = f"{len(index.paths)} files under " if root else ""
        click.echo(
            click.style("valid: ", fg="green", bold=True)
            + f"{len(index.tasks)} tasks in {files}{directory}"
        )


#: The shells click completes, and the variable its completion is keyed on.
COMPLETION_SHELLS: Final = ("bash", "zsh", "fish")
COMPLETE_VAR: Final = "_RECONCILER_COMPLETE"


@main.command()
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS), required=False)
def completion(shell: str | None) -> None:
    """Print the completion script for SHELL (default: the one $SHELL names).

    Load it from the shell's start-up file, e.g. in ~/.bashrc:
    eval "$(reconciler completion bash)"; or save it once for speed:
    reconciler completion fish > ~/.config/fish/completions/reconciler.fish
    """
    from click.shell_completion import get_completion_class

    if shell is None:
        shell = Path(os.environ.get("SHELL", "")).name
        if shell not in COMPLETION_SHELLS:
            fail(
                f"cannot tell the shell from SHELL={os.environ.get('SHELL', '')!r}: "
                f"name it ({', '.join(COMPLETION_SHELLS)})"
            )
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        fail(f"click has no completion for {shell}")
    click.echo(cls(main, {}, "reconciler", COMPLETE_VAR).source(), nl=False)


@main.command()
def schema() -> None:
    """Print the JSON Schema of a desired file, for editors (docs/desired-files.md)."""
    click.echo(desired_schema_text(), nl=False)


def _key_args(identity: Mapping[str, str]) -> dict[str, str]:
    return {
        "app_id": identity["AppId"],
        "room_id": identity["RoomId"],
        "task_id": identity["TaskId"],
    }


def _refusal_json(refusal: MassForget) -> dict[str, object]:
    return {
        "code": "MassForget",
        "message": str(refusal),
        "forget": refusal.forget,
        "known": refusal.known,
        "allowed": refusal.allowed,
        "max_forget": str(refusal.limit),
    }


def _check_statuses(
    _: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> frozenset[str]:
    try:
        return parse_statuses(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def _check_live_states(
    _: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> frozenset[LiveStatus]:
    try:
        return parse_live_states(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


@main.command()
@dir_argument
@state_option
@_option(
    "--status",
    "statuses",
    env="STATUS",
    multiple=True,
    metavar="STATUS",
    callback=_check_statuses,
    help=f"Only tasks in this sync status: {', '.join(report_statuses())} (any case; "
    "repeat it or give a comma list).",
)
@_option(
    "--live",
    "lives",
    env="LIVE",
    multiple=True,
    metavar="STATE",
    callback=_check_live_states,
    help="Only tasks whose latest read found them running, ended, not-found or unknown "
    "(never read included; repeat it or give a comma list).",
)
@_option(
    "--app",
    "apps",
    env="APP",
    multiple=True,
    metavar="APPID",
    help="Only tasks of this AppId (repeatable).",
)
@output_option("status")
@limit_options
def status(
    directory: Path,
    state: StoreLocation,
    statuses: frozenset[str],
    lives: frozenset[LiveStatus],
    apps: tuple[str, ...],
    output: str,
) -> None:
    """Per task: sync status and since when, the live task as last read and how long ago,
    the last call, next retry, and its place in the tree (read-only)."""
    if not store_exists(state):
        fail(
            f"state store {state} does not exist: nothing has been applied with it "
            "(give the store with --state, or run apply first)"
        )
    index: DesiredIndex | None = None
    if directory.is_dir():
        # An invalid file is part of the report, not an error.
        index = load_tree(directory, limits=file_limits())
    elif click.get_current_context().get_parameter_source("directory") not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    ):
        fail(f"desired tree {directory} does not exist or is not a directory")
    with open_store(state, create=False, read_only=True) as store:
        rows = store.all()
        observations = store.observations()
        recorded_root = store.tree_root()
    report = build_report(
        rows,
        index=index,
        now=datetime.now(UTC),
        observations=observations,
        tree_path=str(directory),
        tree_root=tree_root(directory),
        recorded_root=recorded_root,
        statuses=statuses,
        apps=frozenset(apps),
        lives=lives,
    )
    if isinstance(state, PostgresURL):
        report = dataclasses.replace(report, shared=True, leader=read_leader_or_fail(state))
    for note in report.notes():
        click.echo(click.style("note: ", fg="yellow") + printable(note), err=True)
    if output == "json":
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(render.status_table(report, root=str(directory)))


def read_leader_or_fail(url: PostgresURL) -> LeaderRow | None:
    """Who leads the replicas sharing the store at ``url`` (``None``: none ever ran)."""
    import psycopg

    from reconciler.store.leader import read_leader
    from reconciler.store.postgres import SCHEMA

    try:
        return read_leader(url.conninfo(), schema=SCHEMA)
    except psycopg.Error as exc:
        fail(f"state store {url}: cannot read who leads: {url.scrub(str(exc))}")


def _check_endpoint(_: click.Context, param: click.Parameter, value: str) -> str:
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise click.BadParameter(
            f"{value!r} is not an http(s) URL such as {DEFAULT_ENDPOINT}", param=param
        )
    return value


def _not_empty(_: click.Context, param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must not be empty", param=param)
    return value


async def listen(start: Awaitable[str], *, what: str, host: str, port: int) -> str:
    """Start a server; a port in use is a clear error, not a traceback."""
    try:
        return await start
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}")


def api_options(f: F) -> F:
    """Options for talking to the API, shared by ``apply`` and ``run``."""
    decorators = [
        _option(
            "--endpoint",
            env="ENDPOINT",
            default=DEFAULT_ENDPOINT,
            show_default=True,
            callback=_check_endpoint,
            help="OpenAPI endpoint URL.",
        ),
        _option(
            "--region", env="REGION", default="cn-north-1", show_default=True, callback=_not_empty
        ),
        _option("--service", env="SERVICE", default="rtc", show_default=True, callback=_not_empty),
        _option(
            "--api-version",
            env="API_VERSION",
            default="2022-06-01",
            show_default=True,
            callback=_not_empty,
        ),
        _option(
            "--qps",
            env="QPS",
            type=click.IntRange(1, 150),
            default=150,
            show_default=True,
            help="UpdateSegment calls per second (any one-second window); lower it when "
            "other clients share the account.",
        ),
        _option(
            "--max-in-flight",
            env="MAX_IN_FLIGHT",
            type=click.IntRange(1, 1024),
            default=512,
            show_default=True,
            help="Ceiling on concurrent requests; the limit itself follows the server's "
            "latency (QPS budget x latency, with headroom).",
        ),
        _option(
            "--timeout",
            env="TIMEOUT",
            type=click.FloatRange(0.1, 300),
            default=10.0,
            show_default=True,
            help="Seconds to wait for an answer.",
        ),
        _option(
            "--read-qps",
            env="READ_QPS",
            type=click.IntRange(1, READ_QPS_MAX),
            default=20,
            show_default=True,
            help="GetSegmentTask reads of live tasks per second (any one-second window), a "
            f"budget of their own beside --qps; the API allows {READ_QPS_MAX}.",
        ),
    ]
    return _stacked(f, decorators)


def client_config(
    *,
    endpoint: str,
    region: str,
    service: str,
    api_version: str,
    qps: int,
    max_in_flight: int,
    timeout: float,
    read_qps: int,
) -> ClientConfig:
    from reconciler.api.client import ClientConfig

    return ClientConfig(
        endpoint=endpoint,
        region=region,
        service=service,
        version=api_version,
        timeout=timeout,
        max_in_flight=max_in_flight,
        limits=RateLimits(update=qps, get=read_qps),
    )


def drift_option(f: F) -> F:
    return _option(
        "--drift",
        env="DRIFT",
        type=click.Choice(["heal", "report"]),
        default="heal",
        show_default=True,
        help="A live value changed by another client: set it back (heal), or only report "
        "it and mark the task OutOfSync (report). Restarted tasks are always healed.",
    )(f)


def refresh_option(f: F) -> F:
    return _option(
        "--refresh/--no-refresh",
        env="REFRESH",
        default=None,
        help="Before planning, read live tasks with GetSegmentTask (within --read-qps). "
        "By default only the tasks a call would go to and those never confirmed are read, "
        "so no call re-sends a value live already has; --refresh reads every task (to find "
        "drift and restarts); --no-refresh reads none and plans against last-applied.",
    )(f)


def refresh_mode(refresh: bool | None) -> RefreshMode:
    """``--refresh`` reads every task, ``--no-refresh`` none, neither the targeted set."""
    return "targeted" if refresh is None else "full" if refresh else "none"


def read_live(
    index: DesiredIndex,
    applied: Mapping[TaskKey, AppliedRecord],
    *,
    mode: RefreshMode,
    config: ClientConfig,
    creds: Credentials | None,
    last: dict[TaskKey, Observation] | None = None,
    offline_ok: bool = False,
    failures: dict[TaskKey, ApiError] | None = None,
    probe: Plan | None = None,
) -> tuple[dict[TaskKey, Observation] | None, Refresh]:
    """Read what the plan needs (``mode``), with a progress bar on a terminal.

    Returns the observations to plan with (``None``: nothing read, plan against
    last-applied) and what was done. An endpoint that cannot be read ends the
    command: a plan is never silently made from memory instead. ``offline_ok``
    (``plan`` by default): without credentials, plan against last-applied and
    say so, as a CI job reviewing a tree does. ``failures`` gets each failed
    read's error; ``probe``: the :func:`~reconciler.core.plan.probe_plan` if the caller
    made it already.
    """
    from reconciler.api.client import RtcClient
    from reconciler.cli.views.progress import ReadProgress
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
        check_credentials_file(creds)
    if creds is None:
        creds = credentials_or_fail()
    settle_for_doubt(applied, keys)
    quiet = bool(click.get_current_context().find_root().obj.get("quiet"))
    what = "every desired task" if mode == "full" else "the tasks a call would go to"
    click.echo(
        f"Reading {len(keys)} live task(s) ({what}) at up to {config.limits.get}/s "
        f"(about {len(keys) / config.limits.get:.0f} s) ...",
        err=True,
    )
    progress = ReadProgress(len(keys), enabled=sys.stderr.isatty() and not quiet)

    async def read_all() -> dict[TaskKey, Observation]:
        async with RtcClient(creds, config=config) as client:
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
        fail(
            f"cannot read live tasks: {group.exceptions[0]}; nothing was planned or sent "
            "(--no-refresh plans against last-applied without reading)"
        )
    unread = len(keys) - len(found)
    if unread:
        click.echo(
            click.style("warning: ", fg="yellow", bold=True)
            + f"{unread} task(s) could not be read: one never confirmed gets no call until it "
            "is read, the others are planned against last-applied",
            err=True,
        )
    return found, Refresh(mode, read=len(found), failed=unread)


def settle_for_doubt(applied: Mapping[TaskKey, AppliedRecord], keys: Sequence[TaskKey]) -> None:
    """Wait until a read can tell whether the calls in doubt among ``keys`` landed.

    A call left Pending (a run stopped a moment ago) may still be on its way: a
    read taken within the settle window after it does not count, and the task
    would be left unread.
    """
    from reconciler.core.plan import SETTLE_S

    doubts = [r.in_doubt_since for k in keys if (r := applied.get(k)) and r.in_doubt_since]
    wait = max(doubts, default=0.0) + SETTLE_S + 0.1 - time.time()
    if wait > 0:
        click.echo(
            f"Waiting {wait:.1f} s for {len(doubts)} call(s) in doubt to settle before "
            "reading them back ...",
            err=True,
        )
        time.sleep(min(wait, SETTLE_S + 0.1))


def credentials_or_fail(*, refuse_open: bool = False) -> Credentials:
    try:
        creds = load_credentials()
    except CredentialsError as exc:
        fail(str(exc))
    events.register_secret(creds.secret_key)
    events.register_secret(creds.session_token)
    check_credentials_file(creds, refuse=refuse_open)
    return creds


def check_credentials_file(creds: Credentials, *, refuse: bool = False) -> None:
    """Warn, as ssh does of a private key, when others may read the credentials file;
    ``refuse`` (``run``): end the command instead."""
    problem = None if creds.source is None else too_open(creds.source)
    if problem is None:
        return
    if refuse:
        fail(
            f"{problem}; run does not start with it (--allow-open-credentials or "
            "RECONCILER_ALLOW_OPEN_CREDENTIALS=1 starts it anyway)"
        )
    click.echo(click.style("warning: ", fg="yellow", bold=True) + problem, err=True)


def _outcome_line(result: Result) -> str:
    from reconciler.engine.reconcile import Outcome

    mark = {
        Outcome.SYNCED: click.style("✓ synced     ", fg="green"),
        Outcome.NOT_RUNNING: click.style("- not running", fg="magenta"),
        Outcome.FAILED: click.style("✗ failed     ", fg="red"),
        Outcome.RETRY: click.style("✗ failed     ", fg="red"),
    }[result.outcome]
    detail = f"RequestId {result.request_id}" if result.request_id else ""
    if result.error is not None:
        detail = str(result.error)
    return f"{mark}  {printable(result.key)}  {printable(detail)}".rstrip()


@main.command()
@dir_argument
@state_option
@_option(
    "--base",
    env="BASE",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Compare against another tree taken as fully applied, instead of the state store.",
)
@output_option("plan", formats=("text", "json", "markdown"), file_option="--save")
@_option(
    "--save",
    env="PLAN_SAVE",
    deprecated_env="PLAN_OUT",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also save the plan to FILE, for `reconciler apply FILE` to make exactly its calls.",
)
@click.option(
    "--out",
    "out_deprecated",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    hidden=True,
    callback=lambda ctx, _, value: _deprecated_alias(ctx, value, old="--out", new="--save"),
)
@_option(
    "--detailed-exitcode",
    env="DETAILED_EXITCODE",
    is_flag=True,
    help="Exit 0 when no call is needed, 2 when calls are pending, 1 on error.",
)
@guard_options
@change_control_options()
@refresh_option
@drift_option
@api_options
@limit_options
def plan(
    directory: Path,
    state: StoreLocation,
    base: Path | None,
    output: str,
    save: Path | None,
    out_deprecated: Path | None,
    detailed_exitcode: bool,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    refresh: bool | None,
    drift: DriftPolicy,
    **api: Any,
) -> None:
    """Dry run: show the calls `apply` would make, with exact bodies.

    First the tasks a call would go to, and those never confirmed, are read
    with GetSegmentTask, and the plan compares with what live holds: no call
    re-sends a value live already has. --refresh reads every task (restarts,
    drift); --no-refresh, or no credentials, plans against last-applied and
    says so. With --save FILE the plan is also saved, with what it was made from, for
    `reconciler apply FILE` (which refuses it once the tree or store changed).
    """
    configure_events(report=True)
    if out_deprecated is not None and save is not None and out_deprecated != save:
        fail(f"--save {save} and --out {out_deprecated} (its old name) name different files")
    out = save or out_deprecated
    if out is not None and base is not None:
        fail("--save saves a plan against the state store for apply; --base has none")
    digest = digest_before_load(directory) if out is not None else None
    index = load_valid_tree(directory)
    observations: dict[TaskKey, Observation] | None = None
    if base:
        if refresh:
            fail("--refresh reads live tasks; --base compares two trees: use one of them")
        applied = records_from_tree(load_base_tree(base))
        basis = Refresh("none", reason="--base compares two trees, the base taken as applied")
    else:
        applied, recorded_root, stamp = read_applied(state)
        check_tree_root(recorded_root, directory, store=state, allow=allow_root_change)
        observations, basis = read_live(
            index,
            applied,
            mode=refresh_mode(refresh),
            config=client_config(**api),
            creds=None,
            offline_ok=refresh is None,
        )
    result = make_plan(index, applied, observations=observations, drift=drift, refresh=basis)
    refusal = (
        None if allow_mass_forget else check_forgets(result, known=len(applied), limit=max_forget)
    )
    from reconciler.core.rollout import gate_plan

    gate = gate_plan(
        result,
        applied=applied,
        control=change_control(),
        now=datetime.now(UTC),
        observations=observations,
    )
    waiting = gate.waiting_by_key()
    if output == "json":
        doc = result.to_json()
        doc["refusals"] = [] if refusal is None else [_refusal_json(refusal)]
        if gate.mass_change is not None:
            doc["refusals"].append(gate.mass_change.to_json())
        for call in doc["calls"]:
            held = waiting.get(TaskKey(**_key_args(call["task"])))
            call["waiting"] = None if held is None else str(held.reason)
        doc["waiting"] = gate.waiting_json()
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    elif output == "markdown":
        refused = [str(r) for r in (refusal, gate.mass_change) if r is not None]
        click.echo(
            render.plan_markdown(result, root=str(directory), refusals=refused, waiting=waiting),
            nl=False,
        )
    else:
        click.echo(
            render.plan_text(
                result, root=str(directory), forgets_refused=bool(refusal), waiting=waiting
            )
        )
    if gate.mass_change is not None:
        log_mass_change(gate, root=directory)
        if refusal is None:
            fail(
                f"{gate.mass_change}; apply would refuse it and run would hold the changes. "
                "Check the change; to make it on purpose, pass --allow-mass-change "
                "(or a larger --max-change)"
            )
    if out is not None and digest is not None and refusal is None:
        saved = savedplan.make(
            result,
            root=str(directory),
            tree=digest_loaded_tree(directory, index, before=digest),
            store=stamp,
            drift=drift,
            observations=observations,
        )
        try:
            savedplan.save(out, saved)
        except OSError as exc:
            fail(f"cannot save the plan to {out}: {exc}")
        click.echo(
            f"Saved the plan to {out}: `reconciler apply {out}` makes exactly these "
            f"{len(result.calls)} call(s), or refuses if the tree or the store changes first.",
            err=True,
        )
    elif out is not None:
        click.echo(f"The plan was not saved to {out}: it is refused (below).", err=True)
    if refusal is not None:
        mass_forget_refused(refusal, directory=directory, what="apply and run would refuse it")
    if detailed_exitcode and result.calls:
        sys.exit(2)


def _deprecated_alias(ctx: click.Context, value: Any, *, old: str, new: str) -> Any:
    """An option's old name: still works, with a warning naming the new one."""
    if value is not None and not ctx.resilient_parsing:
        click.echo(
            click.style("warning: ", fg="yellow", bold=True)
            + f"{old} is deprecated: use {new} (the same option)",
            err=True,
        )
    return value


def drain_option(f: F) -> F:
    return _option(
        "--drain-timeout",
        env="DRAIN_TIMEOUT",
        type=click.FloatRange(0, 3600),
        default=20.0,
        show_default=True,
        help="On SIGTERM/SIGINT, seconds to let in-flight calls finish and be recorded.",
    )(f)


def plan_or_tree_argument(f: F) -> F:
    """``apply``'s argument: the desired tree, or a plan saved by ``plan --save``."""
    return dir_argument(f, file_okay=True)


@main.command()
@plan_or_tree_argument
@state_option
@api_options
@drain_option
@guard_options
@change_control_options(pacing=True, override=True)
@refresh_option
@drift_option
@_option(
    "--force-while-leading",
    env="FORCE_WHILE_LEADING",
    is_flag=True,
    help="With a postgresql:// store that a run replica leads, apply anyway, beside it "
    "(both may send). Without it apply is refused while a daemon leads.",
)
@limit_options
def apply(
    directory: str,
    state: StoreLocation,
    drain_timeout: float,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    refresh: bool | None,
    drift: DriftPolicy,
    force_while_leading: bool,
    **api: Any,
) -> None:
    """Plan, then make the calls within the QPS budget and record the results.

    Like plan, it first reads the tasks a call would go to and those never
    confirmed (--refresh: every task, --no-refresh: none), so a call carries
    only what live lacks; a task never confirmed that could not be read gets
    no call.

    Ctrl-C (or SIGTERM) starts no new call, lets the calls in flight finish
    and records them, prints the summary and exits 1; a second Ctrl-C aborts
    at once.

    Given a FILE saved by `plan --save`, makes exactly that plan's calls, and
    refuses ("plan is stale") when the tree or the state store changed since.

    One writer per store: apply is refused while another process writes it (a
    daemon, another apply). At the first write the store refuses it sends no
    more calls, lists the calls made whose results were not recorded, exits 1.
    """
    from reconciler.cli.views.progress import ApplyProgress
    from reconciler.engine.reconcile import Outcome
    from reconciler.store.recorder import Recorder

    saved = None
    if Path(directory).is_file():
        saved = load_saved_plan(Path(directory), refresh=refresh, drift=drift)
        tree = Path(saved.root)
        if not tree.is_dir():
            fail(
                f"the tree of plan {directory}, {saved.root}, is not here: a saved plan's tree "
                "is taken from the folder apply runs in; run it where plan ran"
                + (f" ({saved.made_in})" if saved.made_in else "")
            )
        digest = digest_before_load(tree)
    else:
        tree = Path(directory)
    index = load_valid_tree(tree)
    if saved is not None:
        # Before the store is opened: a refused plan must not create one either.
        stale = savedplan.tree_staleness(saved, digest_loaded_tree(tree, index, before=digest))
        if not stale and saved.store.lineage is not None and not store_exists(state):
            stale = [
                f"there is no state store at {state}; the plan was made from {saved.store.path}"
            ]
        if stale:
            stale_plan_refused(directory, stale)
    creds = credentials_or_fail()
    config = client_config(**api)
    quiet = bool(click.get_current_context().find_root().obj.get("quiet"))
    with (
        one_writer_or_fail(state, command="reconciler apply", force=force_while_leading),
        open_store(state, create=True, command="reconciler apply") as store,
        before_any_call(),
    ):
        check_tree_root(store.tree_root(), tree, store=state, allow=allow_root_change)
        recorder = Recorder(store)
        observations: dict[TaskKey, Observation] | None = None
        basis: Refresh | None = None
        read_failures: dict[TaskKey, ApiError] = {}
        refused: list[TaskKey] = []
        if saved is not None:
            stale = savedplan.store_staleness(
                saved,
                StoreStamp(str(state), store.lineage(), store.generation()),
                store_is_new=store.opened_schema < SCHEMA_VERSION,
            )
            if saved.observations is not None:
                observations = dict(saved.observations)
            basis = saved_refresh(saved)
            the_plan = make_plan(
                index,
                recorder.applied,
                observations=observations,
                drift=saved.drift,
                refresh=basis,
            )
            if not stale and (differ := savedplan.different_calls(saved, the_plan)):
                differences = savedplan.listing(differ, shown=3, sep="; ")
                stale = [f"it no longer computes the same calls: {differences}"]
            if stale:
                stale_plan_refused(directory, stale)
            for obs in (observations or {}).values():
                known = recorder.observations.get(obs.key)
                if known is None or known.observed_at < obs.observed_at:
                    recorder.observed(obs)  # never over a newer read
        else:
            # A mass forget is refused whatever live holds: before any read.
            probe = probe_plan(index.tasks, recorder.applied, held_files=index.invalid_files)
            refusal = check_forgets(probe, known=len(recorder.applied), limit=max_forget)
            if refusal is not None and not allow_mass_forget:
                mass_forget_refused(refusal, directory=tree, what="nothing was applied")
            observations, basis = read_live(
                index,
                recorder.applied,
                mode=refresh_mode(refresh),
                config=config,
                creds=creds,
                last=recorder.observations,
                failures=read_failures,
                probe=probe,
            )
            for obs in (observations or {}).values():
                recorder.observed(obs)
            refused = record_refused_reads(read_failures, recorder, index)
            the_plan = make_plan(
                index, recorder.applied, observations=observations, drift=drift, refresh=basis
            )
        if basis is not None and basis.mode == "none":
            click.echo(click.style("note: ", bold=True) + basis.describe(), err=True)
        refusal = check_forgets(the_plan, known=len(recorder.applied), limit=max_forget)
        if refusal is not None and not allow_mass_forget:
            mass_forget_refused(refusal, directory=tree, what="nothing was applied")
        control = change_control()
        gate = change_control_gate(
            the_plan,
            applied=recorder.applied,
            control=control,
            tree=tree,
            observations=recorder.observations,
        )
        record_tree_root(store, tree)
        record_live_outcomes(the_plan, recorder, index)
        if not gate.send:
            recorder.bookkeeping(the_plan)
            click.echo(render.plan_text(the_plan, root=str(tree), waiting=gate.waiting_by_key()))
            echo_waiting(gate)
            exit_if_unread(the_plan, refused, read_failures)
            return
        echo_waiting(gate, used_up=saved is not None)
        click.echo(f"Applying {len(gate.send)} call(s) at up to {api['qps']}/s{_phases(gate)} ...")
        progress = ApplyProgress(len(gate.send), enabled=sys.stderr.isatty() and not quiet)
        try:
            report = asyncio.run(
                _apply(
                    the_plan,
                    creds,
                    config,
                    recorder,
                    progress,
                    drain_timeout=drain_timeout,
                    gate=gate,
                    control=control,
                    desired=index.tasks,
                    credentials_proven=basis is not None and basis.read > 0,
                )
            )
        except asyncio.CancelledError:
            pending = store.counts()[SyncStatus.PENDING]
            fail(
                f"aborted by a second interrupt; {pending} task(s) with a call in flight stay "
                "Pending and are planned again next time (their answers were not recorded)"
            )
    if not console_shows("info"):  # else each outcome was already a console line
        for r in report.results:
            if r.outcome is not Outcome.SYNCED or len(report.results) <= 50:
                click.echo(_outcome_line(r))
    click.echo(
        click.style("Apply: ", bold=True)
        + f"{report.count(Outcome.SYNCED)} synced, {report.count(Outcome.NOT_RUNNING)} not "
        f"running, {report.count(Outcome.FAILED)} failed (bad input), "
        f"{report.count(Outcome.RETRY)} failed (will retry)."
    )
    stopped = f"{len(report.not_started)} call(s) not made"
    if report.abandoned:
        stopped += (
            f", {report.abandoned} abandoned in flight after the {drain_timeout:g} s drain "
            "(outcome unknown; they stay Pending)"
        )
    echo_held(report.waiting)
    if report.store_error is not None:
        store_refused_write(report, stopped)
    if report.fatal is not None:
        fail(f"{report.fatal}; stopped the run: {stopped}")
    if report.stopped_rollout is not None and not report.interrupted:
        fail(
            f"{report.stopped_rollout}, so the rollout stopped: {stopped}. Fix it, then apply again"
        )
    if report.canary_failed is not None:
        fail(
            f"canary failed: {report.canary_failed}; the rollout stopped: {len(report.held)} "
            "change(s) held, not sent. Fix or revert the change, then apply again"
        )
    if report.interrupted:
        click.echo(
            click.style("Interrupted: ", fg="yellow", bold=True)
            + f"{stopped}; every answer received was recorded. Run apply again to finish.",
            err=True,
        )
    exit_if_unread(the_plan, refused, read_failures)
    if not report.ok:
        sys.exit(1)


def store_refused_write(report: ApplyReport, stopped: str) -> NoReturn:
    """End ``apply`` whose store refused a write: what was not sent, and which calls were
    made but not recorded (their tasks stay Pending)."""
    for key in report.unrecorded:
        click.echo(f"  not recorded: {key}", err=True)
    made = len(report.unrecorded)
    fail(
        f"{report.store_error}; stopped sending at the first write it refused: {stopped}; "
        + (
            f"{made} call(s) were made but their results may not be recorded (listed above; "
            "their tasks stay Pending)"
            if made
            else "every answer received was recorded"
        )
    )


def record_refused_reads(
    failures: Mapping[TaskKey, ApiError], recorder: Recorder, index: DesiredIndex
) -> list[TaskKey]:
    """First-contact reads refused as bad input (an AppId the account does not own, an
    id the server rejects): UpdateSegment would be refused alike, so each such task is
    Failed as a refused call leaves it, and waits for its spec to change."""
    refused = []
    log = events.get_logger()
    for key, exc in sorted(failures.items()):
        record = recorder.applied.get(key)
        task = index.tasks.get(key)
        if not isinstance(exc, BadInputError) or task is None:
            continue
        if record is not None and record.fields is not None:
            continue  # confirmed before: planned against last-applied
        recorder.failure(task, exc, terminal=True)
        log.error(
            "task.failed",
            app_id=key.app_id,
            room_id=key.room_id,
            task_id=key.task_id,
            action="GetSegmentTask",
            attempt=exc.attempts,
            code=exc.code,
            request_id=exc.request_id,
            message=exc.message,
            terminal=True,
        )
        refused.append(key)
    return refused


def exit_if_unread(
    plan: Plan, refused: Sequence[TaskKey], failures: Mapping[TaskKey, ApiError]
) -> None:
    """First-contact tasks whose read failed got no call: say which and why, and exit 1."""
    if not plan.unread and not refused:
        return
    for key in [*refused, *plan.unread][:50]:
        exc = failures.get(key)
        why = f": {exc.code}: {exc.message}" if exc is not None else ""
        label = "refused: " if key in refused else "unread: "
        click.echo(click.style(label, fg="yellow") + printable(f"{key}{why}"), err=True)
    listed = len(refused) + len(plan.unread)
    more = f" ({listed - 50} not listed)" if listed > 50 else ""
    parts = []
    if refused:
        parts.append(
            f"{len(refused)} task(s) never confirmed were refused as bad input when read: "
            "Failed, and tried again once their spec changes"
        )
    if plan.unread:
        parts.append(
            f"{len(plan.unread)} task(s) never confirmed could not be read, so no call was "
            "made to them (it could re-send what live already has); apply again once "
            "GetSegmentTask answers for them"
        )
    fail("; ".join(parts) + more)


def stale_plan_refused(path: str, reasons: Sequence[str]) -> NoReturn:
    fail(
        f"plan {path} is stale: {'; '.join(reasons)}. Nothing was applied; "
        "make a new plan and review it."
    )


def saved_refresh(saved: SavedPlan) -> Refresh | None:
    """What live state a saved plan stood on (``None``: saved before plans said so)."""
    doc = saved.plan.get("refresh")
    return Refresh.from_json(doc) if isinstance(doc, Mapping) else None


def load_saved_plan(path: Path, *, refresh: bool | None, drift: DriftPolicy) -> SavedPlan:
    """A plan saved by ``plan --save``; options that would change it are refused."""
    ctx = click.get_current_context()
    for name, flag in (("refresh", "--refresh"), ("drift", "--drift")):
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            fail(f"{flag} shapes a plan: give it to `plan --save`; a saved plan is applied as made")
    try:
        return savedplan.load(path)
    except savedplan.SavedPlanError as exc:
        fail(str(exc))


def _phases(gate: Gate) -> str:
    """``: 1 first (canary ...), 9 once it is observed Synced`` for a canaried apply."""
    if not gate.canaries or not gate.after_canaries:
        return ""
    names = ", ".join(printable(k) for k in gate.canaries)
    first = len(gate.send) - len(gate.after_canaries)
    return (
        f": {first} first (canary {names}), {len(gate.after_canaries)} once the "
        "canaries are observed Synced"
    )


def echo_held(waiting: Sequence[Waiting]) -> None:
    """Calls change control held when their turn came (a window opened mid-apply)."""
    for w in waiting[:50]:
        click.echo(
            click.style("waiting: ", fg="blue") + printable(f"{w.key}: {w.message}"), err=True
        )
    if waiting:
        more = len(waiting) - 50
        click.echo(
            click.style("Waiting: ", fg="blue", bold=True)
            + f"{len(waiting)} call(s) not made now: held when their turn came"
            + (f" ({more} not listed)" if more > 0 else "")
            + "; apply again when they may go (the daemon sends them by itself).",
            err=True,
        )


def echo_waiting(gate: Gate, *, used_up: bool = False) -> None:
    """The calls change control holds, one line each (the first 50), on stderr.

    ``used_up``: a saved plan whose other calls are being sent; recording them
    makes the file stale, so it cannot be applied again for the held ones.
    """
    for w in gate.waiting[:50]:
        click.echo(
            click.style("waiting: ", fg="blue") + printable(f"{w.key}: {w.message}"), err=True
        )
    if gate.waiting:
        more = len(gate.waiting) - 50
        click.echo(
            click.style("Waiting: ", fg="blue", bold=True)
            + f"{len(gate.waiting)} call(s) not made now"
            + (f" ({more} not listed)" if more > 0 else "")
            + (
                "; this saved plan is used up by the calls sent now: make and review a new "
                "plan for them when they may go."
                if used_up
                else "; apply again when they may go (the daemon sends them by itself)."
            ),
            err=True,
        )


def record_live_outcomes(plan: Plan, recorder: Recorder, index: DesiredIndex) -> None:
    """What a refreshed plan found without a call: ended tasks, drift left alone."""
    for ended in plan.ended:
        recorder.live_not_running(ended.task, ended.observation)
    for d in plan.drifts:
        if not d.healed:
            recorder.out_of_sync(index.tasks[d.key], d)


async def _apply(
    plan: Plan,
    creds: Credentials,
    config: ClientConfig,
    recorder: Recorder,
    progress: ApplyProgress,
    *,
    drain_timeout: float,
    gate: Gate | None = None,
    control: ChangeControl | None = None,
    desired: Mapping[TaskKey, DesiredTask] | None = None,
    credentials_proven: bool = False,
) -> ApplyReport:
    """Run the plan; the first SIGINT/SIGTERM drains, a second one cancels everything.

    With ``gate`` (:func:`change_control_gate`), only its calls are made:
    changes paced by ``control``'s rate cap, canaries first and read back.
    ``credentials_proven``: the reads before the calls were answered, so the
    calls go at once, without a lone probe call first.
    """
    from reconciler.api.client import RtcClient
    from reconciler.core.plan import Call
    from reconciler.core.rollout import ChangeKind, TokenBucket, window_hold
    from reconciler.engine.apply import PacedReconciler, Reconciles, apply_plan, apply_rollout
    from reconciler.engine.observe import observe_all
    from reconciler.engine.reconcile import TaskReconciler

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            progress.note(
                f"{sig.name}: no new calls; waiting up to {drain_timeout:g} s for the calls in "
                "flight to be answered and recorded. Press Ctrl-C again to abort at once."
            )
        elif main_task is not None:
            main_task.cancel()

    # SIGHUP too (the terminal apply ran in went away): drain, never die mid-call.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    async with RtcClient(creds, config=config) as client:
        reconciler: Reconciles = TaskReconciler(
            client=client, recorder=recorder, stop=stop, credentials_proven=credentials_proven
        )
        if gate is None:
            with progress:
                return await apply_plan(
                    plan,
                    reconciler=reconciler,
                    recorder=recorder,
                    workers=config.max_in_flight,
                    on_result=progress.advance,
                    stop=stop,
                    drain_timeout=drain_timeout,
                )
        if control is not None and (
            control.max_changes_per_minute or (control.windows and not control.override_window)
        ):
            changes = {k for k, kind in gate.kinds.items() if kind is not ChangeKind.HEAL}
            windows, kinds = control.windows, gate.kinds

            def hold(call: Call) -> Waiting | None:
                # Asked as each call's turn comes: a window may have opened meanwhile.
                if control.override_window:
                    return None
                kind = kinds.get(call.key, ChangeKind.CHANGE)
                return window_hold(
                    call.key, call.source.path, kind, windows=windows, now=wall_clock()
                )

            cap = control.max_changes_per_minute
            reconciler = PacedReconciler(
                reconciler,
                bucket=TokenBucket(cap) if cap else None,
                paced=changes,
                stop=stop,
                hold=hold,
            )

        async def read_back(keys: Sequence[TaskKey]) -> Mapping[TaskKey, Observation]:
            return await observe_all(client, keys, last=recorder.observations)

        with progress:
            return await apply_rollout(
                plan,
                gate,
                reconciler=reconciler,
                recorder=recorder,
                desired=desired if desired is not None else {c.key: c.task for c in plan.calls},
                read_back=read_back,
                workers=config.max_in_flight,
                on_result=progress.advance,
                stop=stop,
                drain_timeout=drain_timeout,
            )


#: ``run --emulator`` starts every this-many-th task of the tree (in key order)
#: with the tree's own values, the rest with StartSegment's defaults.
DEMO_MATCHING_EVERY: Final = 3


def _start_tree_tasks(
    emulator: Emulator, index: DesiredIndex, *, matching_every: int = 0
) -> tuple[int, int]:
    """Put every task of a tree in the emulator's running state, as StartSegment would.

    With ``matching_every`` N, every Nth task (in key order) runs with the tree's
    own values already, as an application backend that started it with them, and
    the others with StartSegment's defaults (a random Identifier, Duration 20,
    Handle true): a first sync then has some tasks to fix and some that already
    match live. Returns how many tasks were started, and how many match.
    """
    matching = 0
    for i, key in enumerate(sorted(index.tasks)):
        task = index.tasks[key]
        values: dict[str, Any] = {}
        if matching_every and i % matching_every == 0:
            fields = task.fields
            values = {
                "identifier": fields.get("Identifier"),
                "handle": fields.get("Handle", True),
                **({"duration": fields["Duration"]} if "Duration" in fields else {}),
            }
            matching += 1
        emulator.start_task(
            app_id=key.app_id,
            room_id=key.room_id,
            task_id=key.task_id,
            business_id=task.business_id,
            **values,
        )
    return len(index.tasks), matching


_ACCESS = f"{__name__}.health_access"


def _remember_access(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Read ``--health-token-file``/``--health-basic-auth-file`` now (a bad file ends the
    command before anything starts) and keep every access option for :func:`health_access`."""
    from reconciler.serve.health import read_token_file, read_users_file

    if value is not None and not ctx.resilient_parsing and isinstance(value, Path):
        read = read_token_file if param.name == "health_token_file" else read_users_file
        try:
            value = read(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    ctx.meta.setdefault(_ACCESS, {})[param.name] = value


def health_access_options(f: F) -> F:
    """Who may read ``run``'s dashboard and /metrics (the probes answer anyone)."""
    file = click.Path(exists=True, dir_okay=False, path_type=Path)
    common: dict[str, Any] = {"expose_value": False, "callback": _remember_access}
    decorators = [
        _option(
            "--health-allowed-host",
            env="HEALTH_ALLOWED_HOST",
            metavar="NAME",
            multiple=True,
            help="Another host name the dashboard and /metrics answer to, besides "
            "--health-host, localhost and IP addresses (repeatable; * any); others get 403.",
            **common,
        ),
        _option(
            "--health-token-file",
            env="HEALTH_TOKEN_FILE",
            type=file,
            help="Ask for this file's token (Authorization: Bearer) for the dashboard and "
            "/metrics; /healthz and /readyz stay open to probes.",
            **common,
        ),
        _option(
            "--health-basic-auth-file",
            env="HEALTH_BASIC_AUTH_FILE",
            type=file,
            help="Ask for a user and password of this file (user:password lines; HTTP basic "
            "auth, as a browser asks) for the dashboard and /metrics.",
            **common,
        ),
    ]
    return _stacked(f, decorators)


def health_access() -> HealthAccess:
    """The access options of the current command, secrets registered for redaction."""
    from reconciler.serve.health import HealthAccess

    given = click.get_current_context().meta.get(_ACCESS, {})
    token: str | None = given.get("health_token_file")
    users: dict[str, str] = given.get("health_basic_auth_file") or {}
    for secret in (token, *users.values()):
        events.register_secret(secret)
    hosts = given.get("health_allowed_host") or ()
    return HealthAccess(
        allowed_hosts=frozenset(h.lower().rstrip(".") for h in hosts),
        tokens=(token,) if token else (),
        users=users,
    )


def _check_notify(
    _: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    from reconciler.serve.notify import check_url, redact_url

    for url in value:
        if (problem := check_url(url)) is not None:
            raise click.BadParameter(f"{redact_url(url)}: {problem}", param=param)
    return value


@main.command()
@dir_argument
@state_option
@api_options
@_option(
    "--emulator",
    "embedded",
    env="EMULATOR",
    is_flag=True,
    help="Start the emulator in-process with every task of the tree running, and talk to "
    "it instead of the real API (no cloud account needed).",
)
@_option(
    "--emulator-port",
    env="EMULATOR_PORT",
    type=click.IntRange(0, 65535),
    default=8780,
    show_default=True,
    help="Port of the embedded emulator (0: any free port).",
)
@_option(
    "--health-host",
    env="HEALTH_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address for /healthz, /readyz and /metrics (0.0.0.0 in a container).",
)
@_option(
    "--health-port",
    env="HEALTH_PORT",
    type=click.IntRange(0, 65535),
    default=9108,
    show_default=True,
    help="Port for /healthz, /readyz and /metrics (0: any free port).",
)
@health_access_options
@_option(
    "--resync",
    env="RESYNC",
    type=click.FloatRange(1, 86400),
    default=300.0,
    show_default=True,
    help="Seconds between full re-plans of the whole tree.",
)
@_option(
    "--retry-delay",
    env="RETRY_DELAY",
    type=click.FloatRange(0.01, 3600),
    default=5.0,
    show_default=True,
    help="First delay before a NotRunning or failed task is tried again; it doubles, up "
    "to 10 minutes.",
)
@drain_option
@guard_options
@change_control_options(pacing=True)
@drift_option
@_option(
    "--observe-interval",
    env="OBSERVE_INTERVAL",
    type=click.FloatRange(1, 86400),
    default=10.0,
    show_default=True,
    help="Read each live task at most this often (seconds); with N tasks a full sweep "
    "takes max(interval, N / --read-qps).",
)
@_option(
    "--observe/--no-observe",
    env="OBSERVE",
    default=True,
    show_default=True,
    help="Read live tasks (GetSegmentTask) and plan against them; --no-observe compares "
    "with last-applied only.",
)
@_option(
    "--notify",
    env="NOTIFY",
    metavar="URL",
    multiple=True,
    callback=_check_notify,
    help="Slack-compatible webhook told of failures, heals, pauses and held forgets "
    "(repeatable; the variable takes URLs separated by spaces).",
)
@_option(
    "--allow-open-credentials",
    env="ALLOW_OPEN_CREDENTIALS",
    is_flag=True,
    help="Start even though others may read ~/.volc/credentials (chmod 600 it instead).",
)
@_option(
    "--replica",
    env="REPLICA",
    default=None,
    metavar="NAME",
    help="This replica's name in the leader election of a postgresql:// store (default: "
    "the host name, a pod's name in Kubernetes); status and metrics show it.",
)
@limit_options
def run(
    directory: Path,
    state: StoreLocation,
    embedded: bool,
    emulator_port: int,
    health_host: str,
    health_port: int,
    resync: float,
    retry_delay: float,
    drain_timeout: float,
    allow_root_change: bool,
    max_forget: ForgetLimit,
    allow_mass_forget: bool,
    drift: DriftPolicy,
    observe_interval: float,
    observe: bool,
    notify: tuple[str, ...],
    allow_open_credentials: bool,
    replica: str | None,
    **api: Any,
) -> None:
    """The daemon: watch the tree, reconcile, resync; SIGTERM/SIGINT drain and exit 0."""
    from reconciler.engine.daemon import DaemonConfig

    if not directory.is_dir():
        fail(f"desired tree {directory} does not exist or is not a directory")
    configure_events(stream=sys.stdout)
    creds = (
        Credentials("AKLTreconcilerEmbedded", secrets.token_urlsafe(32))
        if embedded
        else (credentials_or_fail(refuse_open=not allow_open_credentials))
    )
    events.register_secret(creds.secret_key)
    config = client_config(**api)
    control = change_control()
    if control.canary and not observe:
        fail("--canary confirms canaries by reading them back: it needs --observe")
    daemon_config = DaemonConfig(
        root=directory,
        workers=config.max_in_flight,
        resync_interval=resync,
        retry_base=retry_delay,
        drain_timeout=drain_timeout,
        max_forget=max_forget,
        allow_mass_forget=allow_mass_forget,
        observe=observe,
        observe_interval=observe_interval,
        read_qps=config.limits.get,
        drift=drift,
        control=control,
        limits=file_limits(),
    )
    leadership = None
    if isinstance(state, PostgresURL):
        # A shared store: replicas elect a leader; the fence guards every write.
        from reconciler.store.leader import Leadership
        from reconciler.store.postgres import SCHEMA

        leadership = Leadership(state.conninfo(), replica=replica, schema=SCHEMA)
    with open_store(state, create=True, fencing=leadership, command="reconciler run") as store:
        check_tree_root(store.tree_root(), directory, store=state, allow=allow_root_change)
        if leadership is None:
            record_tree_root(store, directory)
        asyncio.run(
            _run_daemon(
                daemon_config,
                creds,
                config,
                store,
                embedded=embedded,
                emulator_port=emulator_port,
                health=(health_host, health_port),
                access=health_access(),
                notify=notify,
                leadership=leadership,
                on_elected=lambda: record_tree_root(store, directory),
            )
        )


async def _run_daemon(
    daemon_config: DaemonConfig,
    creds: Credentials,
    config: ClientConfig,
    store: Store,
    *,
    embedded: bool,
    emulator_port: int,
    health: tuple[str, int],
    access: HealthAccess | None = None,
    notify: Sequence[str] = (),
    leadership: Leadership | None = None,
    on_elected: Callable[[], None] = lambda: None,
) -> None:
    from reconciler.api.client import RtcClient
    from reconciler.emulator import Emulator, EmulatorConfig
    from reconciler.engine.daemon import Daemon
    from reconciler.engine.metrics import Metrics
    from reconciler.engine.reconcile import TaskReconciler
    from reconciler.serve.dashboard import Dashboard
    from reconciler.serve.health import HealthAccess, HealthServer
    from reconciler.store.recorder import Recorder

    log = events.get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal(stop, sig, log))
    # SIGHUP re-reads the tree and re-plans every task (a daemon's reload); before
    # the daemon exists it is only noted: the start reads the tree anyway.
    daemon: Daemon | None = None

    def on_hup() -> None:
        if daemon is None:
            log.info("daemon.signal", signal="SIGHUP", action="ignored: starting")
        else:
            daemon.reload()

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    emulator: Emulator | None = None
    if embedded:
        emulator = Emulator(EmulatorConfig(credentials={creds.access_key: creds.secret_key}))
        url = await listen(
            emulator.start(host="127.0.0.1", port=emulator_port),
            what="the embedded emulator (--emulator-port)",
            host="127.0.0.1",
            port=emulator_port,
        )
        started, matching = _start_tree_tasks(
            emulator, load_tree(daemon_config.root), matching_every=DEMO_MATCHING_EVERY
        )
        config = dataclasses.replace(config, endpoint=url)
        log.info("emulator.embedded", url=url, running_tasks=started, matching_tree=matching)

    metrics = Metrics()
    recorder = Recorder(store)
    metrics.watch_status(store.counts)
    notifier = None
    if notify:
        from reconciler.serve.notify import Notifier

        # Before the daemon, so the first pass's failures are told too.
        notifier = Notifier(notify, counter=metrics.notifications)
        await notifier.start()
    try:
        async with RtcClient(creds, config=config, on_call=metrics.on_call) as client:
            metrics.watch_client(
                limit=lambda: client.in_flight_limit, latency_ms=lambda: client.latency_estimates_ms
            )
            daemon = Daemon(
                config=daemon_config,
                reconciler=TaskReconciler(client=client, recorder=recorder, stop=stop),
                recorder=recorder,
                metrics=metrics,
                leadership=leadership,
                on_elected=on_elected,
            )
            if leadership is not None:
                lead = leadership
                metrics.watch_leader(
                    replica=lead.replica,
                    leading=lambda: daemon.leading,
                    epoch=lambda: lead.epoch or (lead.leader.epoch if lead.leader else None),
                )
            server = HealthServer(
                metrics=metrics,
                readiness=daemon.readiness,
                liveness=daemon.liveness,
                degraded=daemon.degraded,
                standby=daemon.standby,
                dashboard=Dashboard(daemon=daemon, store_path=store.path),
                access=access or HealthAccess(),
            )
            health_url = await listen(
                server.start(host=health[0], port=health[1]),
                what="health and metrics (--health-port)",
                host=health[0],
                port=health[1],
            )
            log.info(
                "daemon.started",
                root=str(daemon_config.root),
                endpoint=config.endpoint,
                health=health_url,
                state=str(store.path),
                qps=config.limits.update,
                workers=daemon_config.workers,
                replica=None if leadership is None else leadership.holder,
            )
            try:
                await daemon.run(stop)
            finally:
                await server.stop()
    finally:
        if notifier is not None:
            await notifier.close()  # bounded: a hanging webhook cannot hold the exit
        if emulator is not None:
            await emulator.stop()


def _on_signal(
    stop: asyncio.Event, sig: signal.Signals, log: Any, *, event: str = "daemon.signal"
) -> Callable[[], None]:
    def handler() -> None:
        if stop.is_set():
            return
        stop.set()  # first: whatever happens to the log line, the signal stops the process
        log.info(event, signal=sig.name)

    return handler


def _emulator_option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """An option of ``reconciler emulator``, from ``RECONCILER_EMULATOR_<OPTION>``.

    The bare ``RECONCILER_<OPTION>`` it was read from before (``RECONCILER_PORT``)
    says nothing of the emulator and would mean something else to another
    command; it still works, deprecated.
    """
    bare = name.removeprefix("--").replace("-", "_").upper()
    return _option(name, env=f"EMULATOR_{bare}", deprecated_env=bare, **kwargs)


@main.group("state", cls=ReconcilerGroup)
def state_group() -> None:
    """Manage state stores (SQLite files and PostgreSQL databases)."""


@state_group.command("migrate")
@_option(
    "--from",
    "source",
    env="STATE_MIGRATE_FROM",
    type=StoreLocationType(),
    required=True,
    help="The store to copy (usually the SQLite file); only read, so a daemon may run on it.",
)
@_option(
    "--to",
    "target",
    env="STATE_MIGRATE_TO",
    type=StoreLocationType(),
    required=True,
    help="The empty store to fill (usually a postgresql:// URL); a store with any record "
    "is refused.",
)
def state_migrate(source: StoreLocation, target: StoreLocation) -> None:
    """Copy a state store into an empty one: every task row, observation and the meta
    (lineage, generation, tree root) in one transaction, checked by counts and a
    digest of the rows before it commits. Stop the daemon first: results it records
    after the copy's snapshot stay behind (a warning says so)."""
    configure_events()
    if str(source) == str(target):
        fail(f"--from and --to name the same store ({source})")
    if not store_exists(source):
        fail(f"state store {source} does not exist: nothing to migrate")
    with open_store(source, create=False, read_only=True) as store:
        snapshot = store.snapshot()
    with open_store(target, create=True, command="reconciler state migrate") as store:
        try:
            store.restore(snapshot)
        except StoreError as exc:
            fail(str(exc))
    with open_store(source, create=False, read_only=True) as store:
        generation = store.generation()
    meta = snapshot.meta
    click.echo(
        f"migrated {len(snapshot.tasks)} task(s), {len(snapshot.observations)} "
        f"observation(s) and the meta (lineage {meta.get('lineage')}, generation "
        f"{meta.get('generation', '0')}, tree root {meta.get('tree_root') or 'none'}) "
        f"from {source} to {target}; rows digest sha256:{snapshot.digest()}"
    )
    if str(generation) != meta.get("generation", "0"):
        click.echo(
            click.style("warning: ", fg="yellow", bold=True)
            + f"{source} recorded results while it was copied (generation "
            f"{meta.get('generation', '0')} then, {generation} now): stop the daemon and "
            "migrate again into an empty store",
            err=True,
        )


@main.command("emulator")
@_emulator_option("--host", default="127.0.0.1", show_default=True)
@_emulator_option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8780,
    show_default=True,
    # One name with `run --emulator-port`: both are the port the emulator listens on.
    help="Port to listen on (0: any free port); the same variable as run's --emulator-port.",
)
# Shared with apply and run: the region requests are signed for, which the emulator checks.
@_option("--region", env="REGION", default="cn-north-1", show_default=True)
@_emulator_option(
    "--tasks",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Start every task of this desired tree, as if StartSegment ran.",
)
@_emulator_option(
    "--latency-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
)
@_emulator_option(
    "--jitter-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
)
@_emulator_option(
    "--error-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of calls answered HTTP 500 InternalError.",
)
@_emulator_option(
    "--drop-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of calls whose connection is closed unanswered.",
)
@_emulator_option(
    "--drop-phase",
    type=click.Choice(["before", "after"]),
    default="after",
    show_default=True,
    help="Drop before or after applying the call.",
)
@_emulator_option(
    "--update-qps",
    type=click.IntRange(0),
    default=150,
    show_default=True,
    help="UpdateSegment limit over any one-second window (0: none).",
)
@_emulator_option(
    "--seed",
    type=int,
    default=None,
    help="Seed for fault draws and generated Identifiers, for repeatable runs.",
)
def emulator_command(
    host: str,
    port: int,
    region: str,
    tasks: Path | None,
    update_qps: int,
    **faults: Any,
) -> None:
    """A local stand-in for the RTC OpenAPI; accepts the VOLC_ACCESSKEY/VOLC_SECRETKEY pair."""
    from reconciler.emulator import DEFAULT_QPS, Emulator, EmulatorConfig

    creds = credentials_or_fail()
    qps = dict(DEFAULT_QPS)
    qps["UpdateSegment"] = update_qps
    config = EmulatorConfig(
        credentials={creds.access_key: creds.secret_key},
        session_tokens={creds.access_key: creds.session_token} if creds.session_token else {},
        region=region,
        qps=qps,
        **faults,
    )
    index = load_valid_tree(tasks, what="task tree") if tasks is not None else None

    async def serve_until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        log = events.get_logger()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal(stop, sig, log, event="emulator.signal"))
        emulator = Emulator(config)
        url = await listen(
            emulator.start(host=host, port=port), what="the emulator", host=host, port=port
        )
        started = _start_tree_tasks(emulator, index)[0] if index is not None else 0
        log.info("emulator.tasks_started", url=url, running_tasks=started)
        click.echo(f"emulator listening on {url}", err=True)
        try:
            await stop.wait()
        finally:
            await emulator.stop()

    asyncio.run(serve_until_signal())


def entry_point() -> None:
    """The console script: click's own errors exit 1, never 2.

    Click ends a usage error (unknown option, bad choice) with status 2, which
    ``plan --detailed-exitcode`` uses for "calls pending"; a CI job would read
    a typo as pending calls. So every error is 1.
    """
    try:
        status = main.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            # Ctrl-C: click has ended the "^C" line already; reconciler.interrupt says it.
            raise KeyboardInterrupt from None
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except StoreError as exc:  # a store that fails while read or written: one line, no traceback
        fail(str(exc))
    sys.exit(status if isinstance(status, int) else 0)
