"""Every option and argument the commands share, in one place.

Each option can also come from an environment variable (see :class:`EnvOption`):
``RECONCILER_<OPTION>``, or ``RECONCILER_<COMMAND>_<OPTION>`` where the bare
name would mean different things in different commands; the desired tree
argument from ``RECONCILER_DIR``. Option groups that make one value
(change control, file limits, health access) keep their parts in the click
context as they are parsed, and a reader (:func:`change_control`,
:func:`file_limits`, :func:`health_access`) builds the value the command
hands to its operation. ``--help`` lists them under :data:`HELP_SECTIONS`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from reconciler.api.ratelimit import READ_QPS_MAX, RateLimits
from reconciler.cli.shell import configure_events, fail
from reconciler.core.guard import (
    DEFAULT_MAX_FORGET,
    FORGET_FLOOR,
    ForgetLimit,
    format_fraction,
    parse_max_forget,
    parse_share,
)
from reconciler.eventlog import setup as events
from reconciler.store.base import PostgresURL, StoreLocation, parse_location
from reconciler.tree.desired import DEFAULT_LIMITS, FileLimits

if TYPE_CHECKING:
    from reconciler.api.client import ClientConfig
    from reconciler.core.rollout import ChangeControl
    from reconciler.serve.health import HealthAccess

F = TypeVar("F", bound=Callable[..., Any])


DEFAULT_STATE = Path(".reconciler") / "state.db"


DEFAULT_ENDPOINT = "https://rtc.volcengineapi.com"


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


def env_option(
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


def plan_or_tree_argument(f: F) -> F:
    """``apply``'s argument: the desired tree, or a plan saved by ``plan --save``."""
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
    return env_option(
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
    return env_option(
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


def deprecated_alias(ctx: click.Context, value: Any, *, old: str, new: str) -> Any:
    """An option's old name: still works, with a warning naming the new one."""
    if value is not None and not ctx.resilient_parsing:
        click.echo(
            click.style("warning: ", fg="yellow", bold=True)
            + f"{old} is deprecated: use {new} (the same option)",
            err=True,
        )
    return value


def _stacked(f: F, decorators: Sequence[Callable[[Any], Any]]) -> F:
    """Apply ``decorators`` as if written above ``f`` in this order."""
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _check_max_forget(_: click.Context, param: click.Parameter, value: str) -> ForgetLimit:
    try:
        return ForgetLimit(parse_max_forget(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def guard_options(f: F) -> F:
    """The guards against a wrong or emptied tree, shared by ``plan``, ``apply`` and ``run``."""
    decorators = [
        env_option(
            "--allow-root-change",
            env="ALLOW_ROOT_CHANGE",
            is_flag=True,
            help="Accept a tree other than the one the state store was applied from "
            "(apply and run then record the new one).",
        ),
        env_option(
            "--max-forget",
            env="MAX_FORGET",
            metavar="SHARE",
            default=format_fraction(DEFAULT_MAX_FORGET),
            show_default=True,
            callback=_check_max_forget,
            help="The most of the known tasks one plan may forget, as a percentage (10%) or "
            f"a fraction (0.1); up to {FORGET_FLOOR} tasks at once are always allowed.",
        ),
        env_option(
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
        env_option(
            "--sync-windows",
            env="SYNC_WINDOWS",
            metavar="FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            expose_value=False,
            callback=_load_sync_windows,
            help="YAML file of sync windows: when calls may go out (docs/change-control.md).",
        ),
        env_option(
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
        env_option(
            "--allow-mass-change",
            env="ALLOW_MASS_CHANGE",
            is_flag=True,
            help="Change more tasks at once than --max-change allows.",
            **common,
        ),
    ]
    if pacing:
        decorators += [
            env_option(
                "--max-changes-per-minute",
                env="MAX_CHANGES_PER_MINUTE",
                metavar="N",
                type=click.IntRange(1, 100_000),
                default=None,
                help="Pace changes (not heals) to at most N a minute, evenly spaced.",
                **common,
            ),
            env_option(
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
            env_option(
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
        env_option(
            "--max-file-bytes",
            env="MAX_FILE_BYTES",
            metavar="SIZE",
            default="8MiB",
            show_default=True,
            help="Refuse a larger file, unread (its tasks are held).",
            **common,
        ),
        env_option(
            "--max-file-tasks",
            env="MAX_FILE_TASKS",
            type=click.IntRange(min=1),
            metavar="N",
            default=default.max_tasks,
            show_default=True,
            help="Refuse a file of more tasks.",
            **common,
        ),
        env_option(
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


_API = f"{__name__}.api"


def _remember_api(
    check: Callable[[click.Context, click.Parameter, Any], Any] | None = None,
) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A callback that checks an API option (``check``) and keeps it for :func:`client_config`."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if check is not None:
            value = check(ctx, param, value)
        ctx.meta.setdefault(_API, {})[param.name] = value

    return remember


def api_options(f: F) -> F:
    """Options for talking to the API, shared by ``plan``, ``apply`` and ``run``: read
    back by :func:`client_config`."""
    decorators = [
        env_option(
            "--endpoint",
            env="ENDPOINT",
            default=DEFAULT_ENDPOINT,
            show_default=True,
            expose_value=False,
            callback=_remember_api(_check_endpoint),
            help="OpenAPI endpoint URL.",
        ),
        env_option(
            "--region",
            env="REGION",
            default="cn-north-1",
            show_default=True,
            expose_value=False,
            callback=_remember_api(_not_empty),
        ),
        env_option(
            "--service",
            env="SERVICE",
            default="rtc",
            show_default=True,
            expose_value=False,
            callback=_remember_api(_not_empty),
        ),
        env_option(
            "--api-version",
            env="API_VERSION",
            default="2022-06-01",
            show_default=True,
            expose_value=False,
            callback=_remember_api(_not_empty),
        ),
        env_option(
            "--qps",
            expose_value=False,
            callback=_remember_api(),
            env="QPS",
            type=click.IntRange(1, 150),
            default=150,
            show_default=True,
            help="UpdateSegment calls per second (any one-second window); lower it when "
            "other clients share the account.",
        ),
        env_option(
            "--max-in-flight",
            expose_value=False,
            callback=_remember_api(),
            env="MAX_IN_FLIGHT",
            type=click.IntRange(1, 1024),
            default=512,
            show_default=True,
            help="Ceiling on concurrent requests; the limit itself follows the server's "
            "latency (QPS budget x latency, with headroom).",
        ),
        env_option(
            "--timeout",
            expose_value=False,
            callback=_remember_api(),
            env="TIMEOUT",
            type=click.FloatRange(0.1, 300),
            default=10.0,
            show_default=True,
            help="Seconds to wait for an answer.",
        ),
        env_option(
            "--read-qps",
            expose_value=False,
            callback=_remember_api(),
            env="READ_QPS",
            type=click.IntRange(1, READ_QPS_MAX),
            default=20,
            show_default=True,
            help="GetSegmentTask reads of live tasks per second (any one-second window), a "
            f"budget of their own beside --qps; the API allows {READ_QPS_MAX}.",
        ),
    ]
    return _stacked(f, decorators)


def client_config() -> ClientConfig:
    """The API options of the current command."""
    from reconciler.api.client import ClientConfig

    given = click.get_current_context().meta[_API]
    return ClientConfig(
        endpoint=given["endpoint"],
        region=given["region"],
        service=given["service"],
        version=given["api_version"],
        timeout=given["timeout"],
        max_in_flight=given["max_in_flight"],
        limits=RateLimits(update=given["qps"], get=given["read_qps"]),
    )


def drift_option(f: F) -> F:
    return env_option(
        "--drift",
        env="DRIFT",
        type=click.Choice(["heal", "report"]),
        default="heal",
        show_default=True,
        help="A live value changed by another client: set it back (heal), or only report "
        "it and mark the task OutOfSync (report). Restarted tasks are always healed.",
    )(f)


def refresh_option(f: F) -> F:
    return env_option(
        "--refresh/--no-refresh",
        env="REFRESH",
        default=None,
        help="Before planning, read live tasks with GetSegmentTask (within --read-qps). "
        "By default only the tasks a call would go to and those never confirmed are read, "
        "so no call re-sends a value live already has; --refresh reads every task (to find "
        "drift and restarts); --no-refresh reads none and plans against last-applied.",
    )(f)


def drain_option(f: F) -> F:
    return env_option(
        "--drain-timeout",
        env="DRAIN_TIMEOUT",
        type=click.FloatRange(0, 3600),
        default=20.0,
        show_default=True,
        help="On SIGTERM/SIGINT, seconds to let in-flight calls finish and be recorded.",
    )(f)


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
        env_option(
            "--health-allowed-host",
            env="HEALTH_ALLOWED_HOST",
            metavar="NAME",
            multiple=True,
            help="Another host name the dashboard and /metrics answer to, besides "
            "--health-host, localhost and IP addresses (repeatable; * any); others get 403.",
            **common,
        ),
        env_option(
            "--health-token-file",
            env="HEALTH_TOKEN_FILE",
            type=file,
            help="Ask for this file's token (Authorization: Bearer) for the dashboard and "
            "/metrics; /healthz and /readyz stay open to probes.",
            **common,
        ),
        env_option(
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


def check_notify(
    _: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    from reconciler.serve.notify import check_url, redact_url

    for url in value:
        if (problem := check_url(url)) is not None:
            raise click.BadParameter(f"{redact_url(url)}: {problem}", param=param)
    return value


def emulator_option(name: str, **kwargs: Any) -> Callable[[F], F]:
    """An option of ``reconciler emulator``, from ``RECONCILER_EMULATOR_<OPTION>``.

    The bare ``RECONCILER_<OPTION>`` it was read from before (``RECONCILER_PORT``)
    says nothing of the emulator and would mean something else to another
    command; it still works, deprecated.
    """
    bare = name.removeprefix("--").replace("-", "_").upper()
    return env_option(name, env=f"EMULATOR_{bare}", deprecated_env=bare, **kwargs)


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
