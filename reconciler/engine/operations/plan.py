"""``plan``: the dry run. Read what the plan needs, plan, judge it as ``apply`` and
the daemon would, and (``--save``) keep it with what it was made from.

Two steps, so the command prints the plan between them: :func:`make_plan_report`
reads and plans, :func:`conclude` refuses what apply would refuse and saves
the plan if asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.core.guard import MassForget, check_forgets
from reconciler.core.live import Observation
from reconciler.core.plan import DriftPolicy, Plan, Refresh, RefreshMode, records_from_tree
from reconciler.core.task import TaskKey
from reconciler.engine import savedplan
from reconciler.engine.clock import REAL_CLOCK, Clock
from reconciler.engine.operations.common import (
    Guards,
    MassChangeRefused,
    Notices,
    OperationError,
    check_tree_root,
    digest_before_load,
    digest_loaded_tree,
    load_base_tree,
    load_valid_tree,
    log_mass_change,
    make_plan,
    mass_forget_refused,
    read_applied,
    read_live,
)
from reconciler.engine.savedplan import StoreStamp, TreeDigest
from reconciler.store.base import StoreLocation
from reconciler.tree.desired import DesiredIndex, FileLimits

if TYPE_CHECKING:
    from reconciler.api.client import ClientConfig
    from reconciler.core.rollout import ChangeControl, Gate


@dataclass(frozen=True, kw_only=True)
class PlanArgs:
    """What ``plan`` is asked: the tree, what it compares with, how it reads live."""

    directory: Path
    state: StoreLocation
    #: Compare with this tree taken as fully applied, instead of the store.
    base: Path | None = None
    #: Save the plan here for ``apply FILE``.
    save: Path | None = None
    #: ``None``: the targeted reads, and none without credentials (a CI review).
    refresh: bool | None = None
    drift: DriftPolicy = "heal"
    guards: Guards
    control: ChangeControl
    client: ClientConfig
    limits: FileLimits
    #: Change control judges the plan at this clock's time.
    clock: Clock = REAL_CLOCK

    @property
    def refresh_mode(self) -> RefreshMode:
        """``--refresh`` reads every task, ``--no-refresh`` none, neither the targeted set."""
        return refresh_mode(self.refresh)


def refresh_mode(refresh: bool | None) -> RefreshMode:
    return "targeted" if refresh is None else "full" if refresh else "none"


@dataclass(frozen=True, kw_only=True)
class PlanReport:
    """A plan with how apply and the daemon would judge it."""

    plan: Plan
    index: DesiredIndex
    gate: Gate
    #: The forgets ``--max-forget`` refuses (``None``: allowed, or none).
    forget_refusal: MassForget | None
    observations: dict[TaskKey, Observation] | None
    #: For ``--save``: the tree's digest before it was read, and the store's stamp.
    digest: TreeDigest | None
    stamp: StoreStamp | None

    @property
    def refusals(self) -> list[str]:
        return [str(r) for r in (self.forget_refusal, self.gate.mass_change) if r is not None]


@dataclass(frozen=True)
class Saved:
    """Where the plan was saved (``path`` ``None``: refused, so not saved)."""

    path: Path | None


def make_plan_report(args: PlanArgs, *, notices: Notices) -> PlanReport:
    """Read what the plan needs, plan, and judge the plan; refuses a bad tree or store."""
    if args.save is not None and args.base is not None:
        raise OperationError(
            "--save saves a plan against the state store for apply; --base has none"
        )
    directory = args.directory
    digest = digest_before_load(directory) if args.save is not None else None
    index = load_valid_tree(directory, limits=args.limits)
    observations: dict[TaskKey, Observation] | None = None
    stamp: StoreStamp | None = None
    if args.base:
        if args.refresh:
            raise OperationError(
                "--refresh reads live tasks; --base compares two trees: use one of them"
            )
        applied = records_from_tree(load_base_tree(args.base, limits=args.limits, notices=notices))
        basis = Refresh("none", reason="--base compares two trees, the base taken as applied")
    else:
        applied, recorded_root, stamp = read_applied(args.state, notices=notices)
        check_tree_root(
            recorded_root,
            directory,
            store=args.state,
            allow=args.guards.allow_root_change,
            notices=notices,
        )
        observations, basis = read_live(
            index,
            applied,
            mode=args.refresh_mode,
            config=args.client,
            creds=None,
            notices=notices,
            offline_ok=args.refresh is None,
        )
    result = make_plan(index, applied, observations=observations, drift=args.drift, refresh=basis)
    guards = args.guards
    refusal = (
        None
        if guards.allow_mass_forget
        else check_forgets(result, known=len(applied), limit=guards.max_forget)
    )
    from reconciler.core.rollout import gate_plan

    gate = gate_plan(
        result,
        applied=applied,
        control=args.control,
        now=args.clock.utcnow(),
        observations=observations,
    )
    return PlanReport(
        plan=result,
        index=index,
        gate=gate,
        forget_refusal=refusal,
        observations=observations,
        digest=digest,
        stamp=stamp,
    )


def conclude(report: PlanReport, args: PlanArgs, *, notices: Notices) -> Saved:
    """After the plan was shown: refuse a mass change (unless a mass forget is refused
    too, which then says so last), save the plan if asked and allowed, refuse a mass
    forget."""
    directory = args.directory
    gate = report.gate
    if gate.mass_change is not None:
        log_mass_change(gate, root=directory)
        if report.forget_refusal is None:
            raise MassChangeRefused(
                f"{gate.mass_change}; apply would refuse it and run would hold the changes. "
                "Check the change; to make it on purpose, pass --allow-mass-change "
                "(or a larger --max-change)"
            )
    out = args.save
    saved = Saved(None)
    if out is not None and report.digest is not None and report.forget_refusal is None:
        assert report.stamp is not None  # a plan against the store, not --base
        made = savedplan.make(
            report.plan,
            root=str(directory),
            tree=digest_loaded_tree(directory, report.index, before=report.digest),
            store=report.stamp,
            drift=args.drift,
            observations=report.observations,
        )
        try:
            savedplan.save(out, made)
        except OSError as exc:
            raise OperationError(f"cannot save the plan to {out}: {exc}") from exc
        notices.say(
            f"Saved the plan to {out}: `reconciler apply {out}` makes exactly these "
            f"{len(report.plan.calls)} call(s), or refuses if the tree or the store changes first."
        )
        saved = Saved(out)
    elif out is not None:
        notices.say(f"The plan was not saved to {out}: it is refused (below).")
    if report.forget_refusal is not None:
        mass_forget_refused(
            report.forget_refusal, directory=directory, what="apply and run would refuse it"
        )
    return saved
