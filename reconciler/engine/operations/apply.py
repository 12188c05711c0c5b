"""``apply``: plan (or take a saved plan), judge it, make its calls within the
budgets and change control, and record every answer.

:func:`apply` returns an :class:`ApplyOutcome`, which the command prints and
turns into its exit status; what must be seen before the calls go out (the
calls held, the line that starts them, the progress bar) goes to the
:class:`ApplyView` on the way. The first SIGINT/SIGTERM/SIGHUP drains the
calls in flight; a second one cancels them (:class:`Aborted`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from reconciler.api.credentials import Credentials
from reconciler.core.errors import ApiError, BadInputError
from reconciler.core.guard import check_forgets
from reconciler.core.live import Observation
from reconciler.core.plan import DriftPolicy, Plan, Refresh, probe_plan
from reconciler.core.task import DesiredTask, SyncStatus, TaskKey
from reconciler.engine import savedplan
from reconciler.engine.clock import REAL_CLOCK, Clock
from reconciler.engine.operations.common import (
    Guards,
    Notices,
    OperationError,
    StalePlan,
    before_any_call,
    check_tree_root,
    digest_before_load,
    digest_loaded_tree,
    gate_or_refuse,
    load_checked_credentials,
    load_valid_tree,
    make_plan,
    mass_forget_refused,
    one_writer,
    open_store,
    read_live,
    record_tree_root,
    store_exists,
)
from reconciler.engine.operations.plan import refresh_mode
from reconciler.engine.savedplan import SavedPlan, StoreStamp
from reconciler.eventlog import setup as events
from reconciler.store.base import SCHEMA_VERSION, Store, StoreLocation
from reconciler.tree.desired import DesiredIndex, FileLimits

if TYPE_CHECKING:
    from reconciler.api.client import ClientConfig
    from reconciler.core.rollout import ChangeControl, Gate, Waiting
    from reconciler.engine.apply import ApplyReport
    from reconciler.engine.reconcile import Result
    from reconciler.store.recorder import Recorder


@dataclass(frozen=True, kw_only=True)
class ApplyArgs:
    """What ``apply`` is asked: a tree, or a plan saved by ``plan --save``."""

    #: The desired tree, or a saved plan's file (as the user wrote it).
    target: str
    state: StoreLocation
    drain_timeout: float = 20.0
    refresh: bool | None = None
    drift: DriftPolicy = "heal"
    #: With a PostgreSQL store a replica leads: apply beside it.
    force_while_leading: bool = False
    guards: Guards
    control: ChangeControl
    client: ClientConfig
    limits: FileLimits
    #: Change control's time: the plan is gated, and each paced call held, by it.
    clock: Clock = REAL_CLOCK


class ApplyDisplay(Protocol):
    """A display of the calls' results as they land, and of notes above it."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...
    def advance(self, result: Result) -> None: ...
    def note(self, text: str) -> None: ...


class ApplyView(Notices, Protocol):
    """What ``apply`` shows before its calls finish."""

    def basis(self, refresh: Refresh) -> None:
        """The plan was made without reading live (``--no-refresh``, a saved plan)."""

    def plan(self, plan: Plan, *, root: str, gate: Gate) -> None:
        """No call may go now: the plan, as ``plan`` shows it."""

    def waiting(self, gate: Gate, *, used_up: bool) -> None:
        """The calls change control holds (``used_up``: a saved plan partly sent)."""

    def applying(self, gate: Gate, *, qps: int) -> None:
        """The calls start."""

    def apply_progress(self, total: int) -> ApplyDisplay: ...


class Aborted(OperationError):
    """A second interrupt cancelled the calls in flight."""


@dataclass(frozen=True, kw_only=True)
class ApplyOutcome:
    """What ``apply`` did; ``report`` is ``None`` when no call could go."""

    plan: Plan
    gate: Gate
    report: ApplyReport | None
    #: First-contact reads refused as bad input: those tasks are Failed.
    refused: Sequence[TaskKey] = ()
    read_failures: Mapping[TaskKey, ApiError] = field(default_factory=dict)


def apply(args: ApplyArgs, *, view: ApplyView) -> ApplyOutcome:
    """Plan (or check a saved plan), gate, call, record. Refusals raise
    :class:`~.common.OperationError` before any call is made."""
    from reconciler.store.recorder import Recorder

    state, guards = args.state, args.guards
    tree, index, saved = load_target(args)
    creds = load_checked_credentials(notices=view)
    with (
        one_writer(state, command="reconciler apply", force=args.force_while_leading),
        open_store(state, create=True, command="reconciler apply") as store,
        before_any_call(),
    ):
        check_tree_root(
            store.tree_root(), tree, store=state, allow=guards.allow_root_change, notices=view
        )
        recorder = Recorder(store)
        if saved is not None:
            planned = replan_saved(saved, args, index=index, store=store, recorder=recorder)
        else:
            planned = plan_tree(
                args, tree=tree, index=index, recorder=recorder, creds=creds, view=view
            )
        the_plan, basis = planned.plan, planned.basis
        if basis is not None and basis.mode == "none":
            view.basis(basis)
        refusal = check_forgets(the_plan, known=len(recorder.applied), limit=guards.max_forget)
        if refusal is not None and not guards.allow_mass_forget:
            mass_forget_refused(refusal, directory=tree, what="nothing was applied")
        gate = gate_or_refuse(
            the_plan,
            applied=recorder.applied,
            control=args.control,
            tree=tree,
            clock=args.clock,
            observations=recorder.observations,
        )
        record_tree_root(store, tree)
        record_live_outcomes(the_plan, recorder, index)
        if not gate.send:
            recorder.bookkeeping(the_plan)
            view.plan(the_plan, root=str(tree), gate=gate)
            view.waiting(gate, used_up=False)
            return ApplyOutcome(
                plan=the_plan,
                gate=gate,
                report=None,
                refused=planned.refused,
                read_failures=planned.read_failures,
            )
        view.waiting(gate, used_up=saved is not None)
        view.applying(gate, qps=args.client.limits.update)
        progress = view.apply_progress(len(gate.send))
        try:
            report = asyncio.run(
                make_calls(
                    the_plan,
                    creds,
                    args.client,
                    recorder,
                    progress,
                    drain_timeout=args.drain_timeout,
                    gate=gate,
                    control=args.control,
                    clock=args.clock,
                    desired=index.tasks,
                    credentials_proven=basis is not None and basis.read > 0,
                )
            )
        except asyncio.CancelledError:
            pending = store.counts()[SyncStatus.PENDING]
            raise Aborted(
                f"aborted by a second interrupt; {pending} task(s) with a call in flight stay "
                "Pending and are planned again next time (their answers were not recorded)"
            ) from None
    return ApplyOutcome(
        plan=the_plan,
        gate=gate,
        report=report,
        refused=planned.refused,
        read_failures=planned.read_failures,
    )


def load_target(args: ApplyArgs) -> tuple[Path, DesiredIndex, SavedPlan | None]:
    """The tree to apply, loaded, and the saved plan if one was given. A saved plan
    whose tree changed, or whose store is gone, is refused before the store is
    opened: a refused plan must not create one either."""
    target = Path(args.target)
    if not target.is_file():
        return target, load_valid_tree(target, limits=args.limits), None
    try:
        saved = savedplan.load(target)
    except savedplan.SavedPlanError as exc:
        raise OperationError(str(exc)) from exc
    tree = Path(saved.root)
    if not tree.is_dir():
        raise OperationError(
            f"the tree of plan {args.target}, {saved.root}, is not here: a saved plan's tree "
            "is taken from the folder apply runs in; run it where plan ran"
            + (f" ({saved.made_in})" if saved.made_in else "")
        )
    digest = digest_before_load(tree)
    index = load_valid_tree(tree, limits=args.limits)
    stale = savedplan.tree_staleness(saved, digest_loaded_tree(tree, index, before=digest))
    if not stale and saved.store.lineage is not None and not store_exists(args.state):
        stale = [
            f"there is no state store at {args.state}; the plan was made from {saved.store.path}"
        ]
    if stale:
        raise StalePlan(args.target, stale)
    return tree, index, saved


@dataclass(frozen=True, kw_only=True)
class Planned:
    """The plan to apply and what it stood on."""

    plan: Plan
    #: What live state it was planned against (``None``: a plan saved before plans said).
    basis: Refresh | None
    refused: Sequence[TaskKey] = ()
    read_failures: Mapping[TaskKey, ApiError] = field(default_factory=dict)


def replan_saved(
    saved: SavedPlan, args: ApplyArgs, *, index: DesiredIndex, store: Store, recorder: Recorder
) -> Planned:
    """Plan again from what the saved plan stood on; refused as stale unless the store
    is the one it was made from and the same calls come out. Its reads are recorded
    (never over a newer one)."""
    stale = savedplan.store_staleness(
        saved,
        StoreStamp(str(args.state), store.lineage(), store.generation()),
        store_is_new=store.opened_schema < SCHEMA_VERSION,
    )
    observations = dict(saved.observations) if saved.observations is not None else None
    basis = saved_refresh(saved)
    plan = make_plan(
        index, recorder.applied, observations=observations, drift=saved.drift, refresh=basis
    )
    if not stale and (differ := savedplan.different_calls(saved, plan)):
        differences = savedplan.listing(differ, shown=3, sep="; ")
        stale = [f"it no longer computes the same calls: {differences}"]
    if stale:
        raise StalePlan(args.target, stale)
    for obs in (observations or {}).values():
        known = recorder.observations.get(obs.key)
        if known is None or known.observed_at < obs.observed_at:
            recorder.observed(obs)  # never over a newer read
    return Planned(plan=plan, basis=basis)


def plan_tree(
    args: ApplyArgs,
    *,
    tree: Path,
    index: DesiredIndex,
    recorder: Recorder,
    creds: Credentials,
    view: ApplyView,
) -> Planned:
    """Read what the plan needs and plan; a mass forget is refused whatever live holds,
    so before any read."""
    guards = args.guards
    probe = probe_plan(index.tasks, recorder.applied, held_files=index.invalid_files)
    refusal = check_forgets(probe, known=len(recorder.applied), limit=guards.max_forget)
    if refusal is not None and not guards.allow_mass_forget:
        mass_forget_refused(refusal, directory=tree, what="nothing was applied")
    read_failures: dict[TaskKey, ApiError] = {}
    observations, basis = read_live(
        index,
        recorder.applied,
        mode=refresh_mode(args.refresh),
        config=args.client,
        creds=creds,
        notices=view,
        last=recorder.observations,
        failures=read_failures,
        probe=probe,
    )
    for obs in (observations or {}).values():
        recorder.observed(obs)
    refused = record_refused_reads(read_failures, recorder, index)
    plan = make_plan(
        index, recorder.applied, observations=observations, drift=args.drift, refresh=basis
    )
    return Planned(plan=plan, basis=basis, refused=refused, read_failures=read_failures)


def saved_refresh(saved: SavedPlan) -> Refresh | None:
    """What live state a saved plan stood on (``None``: saved before plans said so)."""
    doc = saved.plan.get("refresh")
    return Refresh.from_json(doc) if isinstance(doc, Mapping) else None


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


def record_live_outcomes(plan: Plan, recorder: Recorder, index: DesiredIndex) -> None:
    """What a refreshed plan found without a call: ended tasks, drift left alone."""
    for ended in plan.ended:
        recorder.live_not_running(ended.task, ended.observation)
    for d in plan.drifts:
        if not d.healed:
            recorder.out_of_sync(index.tasks[d.key], d)


async def make_calls(
    plan: Plan,
    creds: Credentials,
    config: ClientConfig,
    recorder: Recorder,
    progress: ApplyDisplay,
    *,
    drain_timeout: float,
    gate: Gate,
    control: ChangeControl,
    clock: Clock = REAL_CLOCK,
    desired: Mapping[TaskKey, DesiredTask] | None = None,
    credentials_proven: bool = False,
) -> ApplyReport:
    """Make ``gate``'s calls; the first SIGINT/SIGTERM drains, a second one cancels
    everything.

    Only the calls of ``gate`` (:func:`~.common.gate_or_refuse`) are made:
    changes paced by ``control``'s rate cap, canaries first and read back.
    ``credentials_proven``: the reads before the calls were answered, so the
    calls go at once, without a lone probe call first.
    """
    from reconciler.api.client import RtcClient
    from reconciler.core.plan import Call
    from reconciler.core.rollout import ChangeKind, TokenBucket, window_hold
    from reconciler.engine.apply import PacedReconciler, Reconciles, apply_rollout
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
        if control.max_changes_per_minute or (control.windows and not control.override_window):
            changes = {k for k, kind in gate.kinds.items() if kind is not ChangeKind.HEAL}
            windows, kinds, override = control.windows, gate.kinds, control.override_window

            def hold(call: Call) -> Waiting | None:
                # Asked as each call's turn comes: a window may have opened meanwhile.
                if override:
                    return None
                kind = kinds.get(call.key, ChangeKind.CHANGE)
                return window_hold(
                    call.key, call.source.path, kind, windows=windows, now=clock.utcnow()
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
