"""The daemon: watch the desired tree and keep live tasks in line with it.

Level-based, in the spirit of controller-runtime. Events only say *which*
tasks to look at; a worker that takes a task key plans that one task afresh
from the current desired index and recorded state, so it always acts on the
latest spec and a key saved fifty times is reconciled once.

Pieces, each a thin shell around the functional core:

- **Index** (:class:`~reconciler.tree.desired.DesiredIndex`): files are re-read
  one at a time as the watcher reports them; a full scan (start, resync, a
  git-sync root swap, a directory event) re-reads only files whose
  ``(mtime, size, inode)`` changed. An invalid file keeps its tasks held.
- **Queue** (:class:`~reconciler.engine.workqueue.WorkQueue`): keyed, deduplicated,
  per-key capped exponential backoff for NotRunning and failed tasks; a task
  refused as bad input is planned as *blocked* and waits for its spec.
- **Workers**: a fixed pool shares the client, hence one QPS budget.
- **Resync**: on an interval, rescan and re-plan everything (catches any
  missed file event and any drift in recorded state).
- **Credentials errors** pause every worker (readiness goes false) and are
  retried after a growing pause rather than burned through every task.
- **A store that refuses writes** (a full disk, a lost database) holds every
  worker and read as well: no call goes out that could not be recorded (the
  reconciler's send gate says no, so calls waiting for a QPS slot are
  withdrawn). Readiness says ``cannot write the state store ...``;
  ``daemon.store_unwritable`` is logged once per streak. The store is probed
  with a write after a growing pause; once it takes one, the results that
  could not be recorded are recorded (their calls are not sent again), the
  planner's view is read back from the store, ``daemon.store_writable`` is
  logged, and everything is planned afresh.
- **Change control** (:class:`~reconciler.engine.admission.Admission`): each
  worker's call is admitted or kept waiting (a sync window, the mass-change
  gate, the rate cap, the canary); what it decides from lives there, and it
  wakes waiting tasks through the queue. A worker's story is
  :meth:`Daemon._process`: plan, admit, reconcile, act on the result.
- **Forget guard**: a change that would forget more tasks than
  ``--max-forget`` allows (an emptied tree, a wrong git-sync revision) is
  not carried out. The records are *withheld*: kept as they are, re-decided
  with every later change, and forgotten only once the whole set is within
  the limit again; readiness stays true but degraded, and calls go on.
- **Observer**: reads every desired task with GetSegmentTask on its own
  budget (``read_qps``), oldest observation first, each at most once per
  ``observe_interval`` (:class:`~reconciler.engine.observe.ObserveSchedule`), and
  again soon after our own successful call. Each observation is recorded and
  the task re-planned against it: a restarted task (a new StartTime) gets the
  fields its new incarnation lacks, drift is healed or, with ``drift
  "report"``, marked OutOfSync; an ended task is NotRunning and costs no
  UpdateSegment until a new incarnation appears. Events: ``task.restarted``,
  ``task.drifted``, ``task.not_running`` (``source: observation``).
- **Shutdown**: stop watching, stop taking keys, let in-flight calls finish
  within the drain deadline (each result is recorded as it lands), exit.
- **Leadership** (a PostgreSQL store shared by replicas,
  :class:`~reconciler.store.leader.Leadership`, gated by
  :class:`~reconciler.engine.lead.Lead`): the daemon starts as a standby. It
  loads and watches the tree (the index stays warm) but plans nothing,
  writes nothing and makes no request, reads included (the observer is held
  like the workers: its reads would spend the account's read budget for a
  view the leader already keeps). Elected, it re-reads the store (another
  replica recorded since), re-plans everything and goes; losing the lead
  holds the workers and the observer at once and withdraws the calls
  waiting for a QPS slot. So does a lease in doubt (``leader.lapsed``: the
  event loop stood still, a keepalive came late) until a keepalive renews
  it; and the lease is checked again right before each request of any kind
  is written (the client's gate), so a replica frozen mid-rollout sends
  nothing when it wakes. Calls already on the wire finish; their results are
  recorded unless another replica took over (the store's fence refuses
  them). On shutdown the leader drains, then releases the lead, so a standby
  takes over within a second. ``/readyz`` of a warm standby is 200
  ``standby: leader is ...``: it is ready to take over, and an unready
  standby would stall a RollingUpdate and block every node drain through the
  PodDisruptionBudget; nothing routes requests to a replica anyway.

Staying responsive. However large a change, the event loop (health
probes, signals, calls in flight) never stands still for long: files are
read and parsed in a thread (a daemon thread, so SIGTERM never waits for a
parse), the index takes a big file in steps, a big plan is computed in a
thread from the keys taken on the loop, and acting on it (bookkeeping,
change control, the queue) yields every :data:`~reconciler.tree.desired.STEP`
tasks. A worker or a read that plans a task meanwhile plans it itself, and
its newer view is kept. Tree updates and whole replans are serialised by one
lock, so two of them never interleave. After a large load or plan the heap is
frozen out of the cyclic collector's sight (:mod:`reconciler.core.heap`). What
one file may cost is bounded by :class:`~reconciler.tree.desired.FileLimits`.

Time comes from the :class:`~reconciler.engine.clock.Clock` the daemon is
given (the real clocks by default), never from a global, so tests move it.

Crash safety comes from ordering: desired state lives in files, and a
result is recorded only after the server confirmed it, so a restart re-plans
and re-sends at most the calls that were in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import os
import stat
import threading
from collections.abc import Callable, Coroutine, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from reconciler.core import heap
from reconciler.core.errors import ApiError, BadInputError, CallWithdrawn, FatalError
from reconciler.core.guard import ForgetLimit, MassForget, check_forgets
from reconciler.core.live import Observation
from reconciler.core.plan import SETTLE_S, Call, DriftPolicy, Plan, compute_plan
from reconciler.core.rollout import ChangeControl
from reconciler.core.task import SyncStatus, TaskKey, task_fields
from reconciler.engine.admission import Admission
from reconciler.engine.clock import REAL_CLOCK, Clock
from reconciler.engine.lead import Lead
from reconciler.engine.metrics import Metrics
from reconciler.engine.observe import GET_ACTION, ObserveSchedule, sweep_seconds
from reconciler.engine.reconcile import Outcome, Result, TaskReconciler
from reconciler.engine.workqueue import WorkQueue
from reconciler.eventlog import setup as events
from reconciler.store.base import FencedError, ResultNotRecorded, StoreError, StoreWriteError
from reconciler.store.recorder import Recorder
from reconciler.tree.desired import (
    DEFAULT_LIMITS,
    STEP,
    DesiredIndex,
    FileLimits,
    FileResult,
    Problem,
    discover,
    read_file,
)
from reconciler.tree.watch import TreeChange, watch_tree

if TYPE_CHECKING:
    from reconciler.store.leader import Leadership


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    root: Path
    workers: int = 64
    resync_interval: float = 300.0
    drain_timeout: float = 20.0
    #: Watcher batching: a batch is yielded after ``step_ms`` of quiet, or
    #: after ``debounce_ms`` at the most while changes keep coming.
    step_ms: int = 50
    debounce_ms: int = 1600
    retry_base: float = 5.0
    retry_cap: float = 600.0
    fatal_pause: float = 30.0
    fatal_pause_cap: float = 600.0
    #: First pause before a store that refused a write is tried again; it doubles.
    store_retry: float = 1.0
    store_retry_cap: float = 60.0
    max_forget: ForgetLimit = dataclasses.field(default_factory=ForgetLimit)
    allow_mass_forget: bool = False
    #: Read live tasks (GetSegmentTask) and plan against them.
    observe: bool = True
    observe_interval: float = 10.0
    read_qps: int = 20
    drift: DriftPolicy = "heal"
    settle_s: float = SETTLE_S
    #: Sync windows, the mass-change gate, the rate cap and the canary.
    control: ChangeControl = dataclasses.field(default_factory=ChangeControl)
    #: What one desired file may cost.
    limits: FileLimits = DEFAULT_LIMITS


class Daemon:
    def __init__(
        self,
        *,
        config: DaemonConfig,
        reconciler: TaskReconciler,
        recorder: Recorder,
        metrics: Metrics,
        leadership: Leadership | None = None,
        on_elected: Callable[[], None] = lambda: None,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        """``leadership``: elect a leader among replicas sharing the store (a
        PostgreSQL store); ``None``: the only replica, leading from the start.
        ``on_elected``: the first thing a new leader does (a standby writes nothing,
        so e.g. the tree root is recorded then). ``clock``: where every reading of
        the time comes from (the real clocks by default)."""
        self.config = config
        self.leadership = leadership
        self.clock = clock
        self._on_elected = on_elected
        self.reconciler = reconciler
        self.recorder = recorder
        self.metrics = metrics
        self.index = DesiredIndex()
        self.queue: WorkQueue[TaskKey] = WorkQueue(
            backoff_base=config.retry_base, backoff_cap=config.retry_cap, clock=clock.monotonic
        )
        self.log = events.get_logger()
        self._signatures: dict[str, tuple[int, int, int]] = {}
        self._scan_problems: list[Problem] = []
        self._reported_invalid: frozenset[str] = frozenset()
        self._pass: set[TaskKey] = set()
        self._pass_started = 0.0
        # First contact in the current pass: tasks read before any call, and how
        # many of them live already matched (no call made).
        self._first_contact = {"read_first": 0, "already_matching": 0}
        self._first_pass_done = False
        # Reads since the last observe.swept line, by outcome: one line a sweep.
        self._sweep: collections.Counter[str] = collections.Counter()
        self._sweep_started = 0.0
        self._running = asyncio.Event()
        self._running.set()
        self._stop = asyncio.Event()
        # What calls and reads wait for: leading on a lease that holds, not paused,
        # the store taking writes; or stopping, so that held workers see the stop.
        self.lead = Lead(
            leadership,
            stopping=lambda: self._stop.is_set(),
            held=lambda: not self._running.is_set() or self._store_problem is not None,
            new_term=self._new_term,
            log=self.log,
        )
        self._leader_task: asyncio.Task[None] | None = None
        reconciler.may_send = self._may_send
        # Why the store refuses writes (``None``: it takes them); the calls whose
        # answers it did not take, to record once it does; failed writes this streak.
        self._store_problem: str | None = None
        self._unrecorded: dict[TaskKey, ResultNotRecorded] = {}
        self._store_failures = 0
        self._store_probe: asyncio.Task[None] | None = None
        if leadership is not None:
            # The lease is checked again by the client right before each request of
            # any kind is written: every attempt, reads included.
            reconciler.client.gate = self._may_send
        self._paused_reason: str | None = None
        self._fatal_pauses = 0
        self._root_missing = False
        self._background: list[asyncio.Task[None]] = []
        # One-off work (a reload, a new term's planning), cancelled on shutdown.
        self._jobs: set[asyncio.Task[None]] = set()
        # Set once the tree was first loaded: the observer reads what it declares.
        self._loaded = asyncio.Event()
        # Orphaned records the forget guard keeps, and the refusal that keeps them.
        self._withheld: frozenset[TaskKey] = frozenset()
        self._refusal: MassForget | None = None
        # A NotRunning or failed result is recorded with the time this
        # daemon's backoff will try the task again, in the result's transaction.
        recorder.retry_at = self._retry_at
        metrics.watch_daemon(held_tasks=self.held_tasks, forget_refused=lambda: len(self._withheld))
        self.schedule = ObserveSchedule(interval=config.observe_interval, clock=clock.monotonic)
        # Read before write: tasks that get no call until a read newer than the
        # given wall time shows what live holds (a hold just lifted; first
        # contact needs no entry: the planner lists it as unread).
        self._read_first: dict[TaskKey, float] = {}
        self._started_wall = clock.wall()
        # Tasks marked OutOfSync (drift reported, not healed), to clear when it ends.
        self._out_of_sync: set[TaskKey] = set(
            recorder.store.keys_with_status(SyncStatus.OUT_OF_SYNC)
        )
        metrics.watch_observations(self.oldest_observation_age, sweep=self.sweep_seconds)
        metrics.watch_readiness(
            ready=lambda: self.readiness() is None, paused=lambda: self._paused_reason is not None
        )
        self._announced: dict[tuple[TaskKey, str], object] = {}
        # Tree updates and whole replans, one at a time.
        self._tree_lock = asyncio.Lock()
        self.admission = Admission(
            control=config.control,
            desired=lambda: self.index.tasks,
            records=recorder,
            log=self.log,
            wake=self._wake,
            wake_after=self.queue.add_after,
            settle_s=config.settle_s,
            root=str(config.root),
        )
        metrics.watch_change_control(
            waiting=self.admission.waiting_counts,
            mass_change_held=self.admission.mass_change_held,
            canary_failed=self.admission.canary_failed,
        )

    # --- what the dashboard reads ---------------------------------------------------

    @property
    def scan_problems(self) -> tuple[Problem, ...]:
        """Problems met finding the files (refused paths), beside :attr:`index`'s own."""
        return tuple(self._scan_problems)

    @property
    def started_wall(self) -> float:
        """When the daemon started (epoch seconds): the age of a task never read."""
        return self._started_wall

    # --- readiness ---------------------------------------------------------------

    def liveness(self) -> str | None:
        """``None`` while the watcher and resync loops run, else which one died."""
        for task in self._background:
            if task.done() and not self._stop.is_set():
                return f"{task.get_name()} stopped unexpectedly"
        return None

    def readiness(self) -> str | None:
        if (dead := self.liveness()) is not None:
            return dead
        if self._store_problem is not None:
            return self._store_problem
        if self.leadership is not None and not self.lead.leading:
            # A warm standby is ready (to take over) while it can reach the store.
            return self.leadership.problem
        if self._paused_reason is not None:
            return self._paused_reason
        if not self._first_pass_done:
            return f"first reconcile in progress ({len(self._pass)} tasks to go)"
        return None

    @property
    def leading(self) -> bool:
        """Whether this replica leads (always, without leadership)."""
        return self.lead.leading

    def standby(self) -> str | None:
        """``standby: leader is ...`` while another replica leads (``None``: we lead)."""
        if self.leadership is None or self.lead.leading:
            return None
        return self.leadership.standby_reason()

    def degraded(self) -> list[str]:
        """Why the daemon, though ready, is not reconciling everything (empty: it is)."""
        out = []
        invalid = len(self.index.invalid_files) + len(self._scan_problems)
        if invalid:
            held = self.held_tasks()
            out.append(f"{_count(invalid, 'invalid file')} holding {_count(held, 'task')}")
        if self._refusal is not None:
            out.append(f"{self._refusal}; their records are kept")
        out += self.admission.degraded()
        return out

    def held_tasks(self) -> int:
        """Recorded tasks kept as they are because the file declaring them is invalid."""
        return len(self.held_keys())

    def _held(self, key: TaskKey) -> bool:
        """Whether ``key`` is one of :meth:`held_keys` (without walking the store)."""
        record = self.recorder.applied.get(key)
        return (
            record is not None
            and record.source in self.index.invalid_files
            and key not in self.index.tasks
        )

    def held_keys(self) -> set[TaskKey]:
        """The recorded tasks :meth:`held_tasks` counts."""
        invalid = self.index.invalid_files
        if not invalid:
            return set()
        desired = self.index.tasks
        return {
            key
            for key, r in self.recorder.applied.items()
            if r.source in invalid and key not in desired
        }

    def _retry_at(self, key: TaskKey) -> datetime:
        return self.clock.utcnow() + timedelta(seconds=self.queue.next_delay(key))

    # --- the tree ----------------------------------------------------------------

    def _stat(self, rel: str) -> os.stat_result | None:
        """The file's status (``None``: it is gone). A file that is there but cannot
        be followed (a symlink loop) is the link's own status: read, it becomes an
        invalid file like any other, logged and counted, not a file that is absent."""
        path = self.config.root / rel
        try:
            return os.stat(path)
        except FileNotFoundError:
            return None
        except OSError:
            try:
                return os.lstat(path)
            except OSError:
                return None

    def _signature(self, rel: str) -> tuple[int, int, int] | None:
        st = self._stat(rel)
        return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self, rels: Sequence[str]) -> list[_Read]:
        """Each file's signature and contents (off the loop: see :func:`off_loop`).

        The cyclic collector is held off meanwhile, as a bulk load does: a big
        file makes millions of short-lived nodes, and each full collection
        would stop the event loop too.
        """
        root, limits = self.config.root, self.config.limits
        out: list[_Read] = []
        with heap.gc_paused():
            for rel in rels:
                st = self._stat(rel)
                if st is None:
                    out.append((rel, None, None))
                elif stat.S_ISDIR(st.st_mode):
                    out.append((rel, "dir", None))
                else:
                    sig = (st.st_mtime_ns, st.st_size, st.st_ino)
                    out.append((rel, sig, read_file(root, rel, limits=limits)))
        return out

    async def _reload(self, rels: Sequence[str]) -> set[TaskKey]:
        """Read ``rels`` again (a batch per thread hop) and put them in the index."""
        affected: set[TaskKey] = set()
        rescan = False
        for start in range(0, len(rels), _FILES_PER_HOP):
            batch = await off_loop(
                functools.partial(self._read, rels[start : start + _FILES_PER_HOP])
            )
            # What was just parsed lives as long as the index: out of the collector's sight.
            heap.settle(sum(len(r.tasks) for _, _, r in batch if r is not None))
            for rel, sig, result in batch:
                if sig == "dir":
                    # A folder whose name looks like a file: its contents are found by a rescan.
                    rescan = True
                elif sig is None:
                    self._signatures.pop(rel, None)
                    affected |= await _stepped(self.index.remove_steps(rel))
                else:
                    assert result is not None and not isinstance(sig, str)
                    self._signatures[rel] = sig
                    affected |= await _stepped(self.index.put_steps(result))
        if rescan:
            affected |= await self.scan()
        return affected

    async def scan(self, *, skip: frozenset[str] = frozenset()) -> set[TaskKey]:
        """Bring the index in line with the tree; re-read only changed files.

        ``skip``: files still being saved repeatedly; the watcher sends them later.
        A root that is missing for a moment (a git-sync swap gone wrong, a
        re-clone) changes nothing: every task is kept as it is until it returns.
        """
        try:
            paths, self._scan_problems = await off_loop(
                functools.partial(discover, self.config.root)
            )
        except OSError as exc:
            if not self._root_missing:
                self.log.error(
                    "desired.root_unavailable", root=str(self.config.root), error=str(exc)
                )
            self._root_missing = True
            return set()
        if self._root_missing:
            self.log.info("desired.root_available", root=str(self.config.root))
            self._root_missing = False
        present = set(paths)
        changed = await off_loop(
            lambda: [
                rel
                for rel in paths
                if rel not in skip and self._signature(rel) != self._signatures.get(rel)
            ]
        )
        affected = await self._reload(changed)
        for rel in self.index.paths - present:
            self._signatures.pop(rel, None)
            affected |= await _stepped(self.index.remove_steps(rel))
        return affected

    async def apply_change(self, change: TreeChange) -> set[TaskKey]:
        affected = await self._reload(sorted(change.paths))
        if change.rescan:
            affected |= await self.scan(skip=change.settling)
        return affected

    async def _report_files(self) -> None:
        invalid = self.index.invalid_files
        new = invalid - self._reported_invalid
        if new:
            # Grouped once: a pull request of many broken files costs each file once.
            problems: dict[str, list[str]] = {}
            for p in (*self.index.problems, *self._scan_problems):
                if p.source.path in new:
                    problems.setdefault(p.source.path, []).append(str(p))
            held: dict[str | None, int] = {}
            for r in self.recorder.applied.values():
                if r.source in new:
                    held[r.source] = held.get(r.source, 0) + 1
        for path in sorted(new):
            self.log.error(
                "desired.invalid_file",
                path=path,
                problems=problems.get(path, []),
                held_tasks=held.get(path, 0),
            )
        for path in sorted(self._reported_invalid - invalid):
            self.log.info("desired.file_fixed", path=path)
            if self.config.observe:
                # Held, its tasks may have been restarted or changed meanwhile:
                # nothing is sent to them before a read taken from now on.
                now = self.clock.wall()
                for task in self.index.tasks_of(path):
                    if task.key in self.recorder.applied:
                        self._read_first[task.key] = now
                        self.schedule.urgent(task.key)
        for p in self._scan_problems:
            self.log.error("desired.refused_path", path=p.source.path, message=p.message)
        self._reported_invalid = invalid
        if self.config.observe and self._background:
            await self._track_desired()
        self.metrics.invalid_files.set(len(invalid) + len(self._scan_problems))
        self.metrics.desired_tasks.set(len(self.index.tasks))

    # --- planning and queueing ----------------------------------------------------

    def _plan(self, only: Iterable[TaskKey] | None) -> Plan:
        # Off the loop (a large replan) it only looks keys up: the records and
        # reads a worker adds meanwhile are each seen whole, or not yet.
        return compute_plan(
            self.index.tasks,
            self.recorder.applied,
            held_files=self.index.invalid_files,
            only=only,
            observations=self.recorder.observations if self.config.observe else None,
            drift=self.config.drift,
            settle_s=self.config.settle_s,
        )

    def _guard(self, plan: Plan) -> Plan:
        """``plan`` without its forgets while they would be a mass forget.

        ``plan`` must cover every orphaned record (a full plan, or one that
        includes the withheld keys), so the count is the store's, not a batch's.
        """
        if self.config.allow_mass_forget:
            return plan
        refusal = check_forgets(
            plan, known=len(self.recorder.applied), limit=self.config.max_forget
        )
        if refusal is None:
            if self._refusal is not None:
                self.log.info("plan.mass_forget_cleared", forget=len(plan.forgotten))
            self._refusal, self._withheld = None, frozenset()
            return plan
        if self._refusal is None or self._refusal.forget != refusal.forget:
            self.log.error(
                "plan.mass_forget_refused",
                root=str(self.config.root),
                forget=refusal.forget,
                known=refusal.known,
                allowed=refusal.allowed,
                max_forget=str(refusal.limit),
            )
        self._refusal = refusal
        self._withheld = frozenset(f.key for f in plan.forgotten)
        return dataclasses.replace(plan, forgotten=())

    async def replan(self, only: Iterable[TaskKey] | None, *, reason: str) -> Plan:
        """Plan ``only`` (``None``: every task and record) and act on the plan.

        A large plan is computed off the loop, and acted on in steps; see the
        module docstring (staying responsive).
        """
        if only is not None and self._withheld:
            only = {*only, *self._withheld}  # decide the withheld forgets with the rest
        # Every key, taken on the loop in one C-level step, so the planner's thread
        # never walks a dict a worker may be adding to.
        keys = set(only) if only is not None else self.index.tasks.keys() | self.recorder.applied
        self.admission.replanning()
        if len(keys) > STEP:
            plan = await off_loop(functools.partial(self._plan, keys))
        else:
            plan = self._plan(keys)
        plan = self._guard(plan)
        await self._bookkeeping(plan)
        await self.admission.note_all(plan, only, clock=self.clock.now)
        for start in range(0, len(plan.unread), STEP):
            for key in plan.unread[start : start + STEP]:
                self.schedule.urgent(key)  # read first, ahead of every other read
            await asyncio.sleep(0)
        for w in plan.warnings:
            self.log.warning("plan.warning", code=w.code, message=w.message, **task_fields(w.key))
        for n, key in enumerate((c.key for c in plan.calls), 1):
            if n % STEP == 0:
                await asyncio.sleep(0)
            if reason == "resync" and self.queue.is_scheduled(key):
                continue  # keeps its backoff schedule: resync retries with growing delay
            self.queue.add(key)
            self.log.debug("task.queued", reason=reason, **task_fields(key))
        self.metrics.queue_depth.set(len(self.queue))
        heap.settle(len(keys))
        return plan

    async def _bookkeeping(self, plan: Plan) -> None:
        """``recorder.bookkeeping(plan)`` in parts of :data:`STEP` tasks, a transaction each."""
        for part in _bookkeeping_parts(plan):
            try:
                self.recorder.bookkeeping(part)
            except StoreWriteError as exc:  # planned afresh once the store takes writes
                self._store_failed(exc)
                return
            await asyncio.sleep(0)

    def _start_pass(self, plan: Plan, *, reason: str) -> None:
        # First-contact tasks count too: the pass ends once each was read, and
        # called if live differs.
        self._pass = {c.key for c in plan.calls} | set(plan.unread)
        self._pass_started = self.clock.monotonic()
        self._first_contact = {"read_first": len(plan.unread), "already_matching": 0}
        self.log.info("reconcile.started", reason=reason, calls=len(plan.calls), **plan.summary())
        self._maybe_finish_pass()

    def _must_read(self, key: TaskKey) -> bool:
        """Whether ``key`` waits for a read newer than its hold's end (:attr:`_read_first`)."""
        since = self._read_first.get(key)
        if since is None:
            return False
        obs = self.recorder.observations.get(key)
        if obs is not None and obs.observed_at >= since:
            del self._read_first[key]
            return False
        return True

    def _read_unread(self, plan: Plan, *keys: TaskKey) -> None:
        """Read the plan's first-contact tasks (and ``keys``) ahead of every other read."""
        for key in (*plan.unread, *keys):
            self.schedule.urgent(key)

    def _maybe_finish_pass(self) -> None:
        if self._pass:
            return
        if self._pass_started:
            self.metrics.last_reconcile.set(self.clock.wall())
            self.log.info(
                "reconcile.completed",
                seconds=round(self.clock.monotonic() - self._pass_started, 3),
                desired_tasks=len(self.index.tasks),
                invalid_files=len(self.index.invalid_files),
                **self._first_contact,
            )
            self._pass_started = 0.0
        self._first_pass_done = True

    # --- workers ------------------------------------------------------------------

    async def _worker(self) -> None:
        while (key := await self.queue.get()) is not None:
            handled = False
            try:
                await self.lead.wait()
                if self._stop.is_set():
                    return  # shutting down: take no new call, even one already dequeued
                self.metrics.in_flight.inc()
                try:
                    handled = await self._process(key)
                finally:
                    self.metrics.in_flight.dec()
            except FencedError as exc:  # another replica leads: its plan covers this key
                self._lost(str(exc))
            except StoreWriteError as exc:  # not recorded: hold everything until it can be
                self.queue.add(key)
                self._store_failed(exc)
            except Exception as exc:  # one task's surprise must not stop a worker
                delay = self.queue.add_rate_limited(key)
                self.log.exception(
                    "task.error", error=repr(exc), retry_in_s=delay, **task_fields(key)
                )
                handled = True
            finally:
                self.queue.done(key)
                self.metrics.queue_depth.set(len(self.queue))
                if handled:
                    self._pass.discard(key)
                    self._maybe_finish_pass()

    async def _process(self, key: TaskKey) -> bool:
        """Plan one key, admit its call, make it, and act on what came of it (as
        controller-runtime's reconcileHandler does); ``False`` if it was left
        unhandled (live not read yet, the call withdrawn, a credentials error)."""
        plan = self._plan_one(key)
        if plan.unread or self._must_read(key):
            # Not before live was read: the observation re-plans and queues it.
            self._read_unread(plan, key)
            self.queue.forget(key)
            return False
        if not plan.calls:
            self.queue.forget(key)
            return True
        if self.admission.admit(plan, self.clock.now()) is not None:
            return True  # waits: change control queues it again when its gate can open
        match await self._call(plan.calls[0]):
            case CallWithdrawn():
                # Stopping, or the lead was lost: it waited for a slot and was never sent.
                if not self._stop.is_set():
                    self.queue.add(key)  # planned afresh if this replica leads again
                return False
            case FatalError() as exc:
                self.queue.add(key)
                await self._pause(exc)
                return False
            case Result(requeue_after=None) as result:
                self._landed(result)
                self.queue.forget(key)
            case Result() as result:
                self._landed(result)
                delay = self.queue.add_rate_limited(key)
                self.log.info(
                    "task.requeued",
                    outcome=result.outcome.value,
                    after_s=delay,
                    **task_fields(key),
                )
        return True

    def _plan_one(self, key: TaskKey) -> Plan:
        """``key``'s plan, its bookkeeping recorded and its change noted."""
        plan = self._plan([key])
        if plan.forgotten and self._refusal is not None:
            # Orphaned while forgets are refused: kept with the others.
            self._withheld |= {key}
            plan = dataclasses.replace(plan, forgotten=())
        self.recorder.bookkeeping(plan)
        self.admission.note(plan, [key], self.clock.now())
        return plan

    async def _call(self, call: Call) -> Result | CallWithdrawn | FatalError:
        """Make ``call``; a withdrawal or a credentials error is returned, not raised."""
        try:
            return await self.reconciler.reconcile(call)
        except (CallWithdrawn, FatalError) as exc:
            return exc

    def _landed(self, result: Result) -> None:
        """A call was answered: the pause streak ends, change control hears of it, and
        the task is read again soon."""
        self._fatal_pauses = 0
        self.admission.after_call(result, self.clock.now())
        key = result.key
        if self.config.observe and key in self.index.tasks:
            # Read-after-write: confirm soon, but after the settle window, so the
            # read that counts shows our call (a stale one never causes another).
            after = self.config.settle_s + 0.5 if result.outcome is Outcome.SYNCED else 0.0
            self.schedule.soon(key, after)

    async def _pause(self, exc: FatalError) -> None:
        if not self._running.is_set():
            return
        self._running.clear()
        self.lead.sync()
        pause = min(self.config.fatal_pause_cap, self.config.fatal_pause * 2**self._fatal_pauses)
        self._fatal_pauses += 1
        self._paused_reason = f"calls paused: {exc}"
        self.log.error("daemon.paused", error=str(exc), code=exc.code, retry_in_s=pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)
        self._paused_reason = None
        self._running.set()
        self.lead.sync()
        if not self._stop.is_set():
            self.log.info("daemon.resumed")

    def _wake(self, keys: Sequence[TaskKey]) -> None:
        """Queue tasks change control held, now that their hold is lifted."""
        for key in keys:
            self.queue.add(key)
        self.metrics.queue_depth.set(len(self.queue))

    # --- the loop -----------------------------------------------------------------

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async for change in watch_tree(
                    self.config.root,
                    stop=stop,
                    step_ms=self.config.step_ms,
                    debounce_ms=self.config.debounce_ms,
                ):
                    await self._on_change(change)
            except Exception as exc:  # keep watching; resync covers the gap
                self.log.exception("watch.failed", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _on_change(self, change: TreeChange) -> None:
        async with self._tree_lock:
            affected = await self.apply_change(change)
            self.log.info(
                "desired.changed",
                files=len(change.paths),
                rescan=change.rescan,
                tasks=len(affected),
            )
            await self._report_files()
            if affected and self.lead.leading:  # a standby only keeps its index warm
                await self.replan(affected, reason="file_changed")

    def reload(self) -> None:
        """SIGHUP: read the whole tree again and re-plan every task, as a resync does.

        Options are not re-read (they come from the command line and the
        environment): a restart changes them. The work is done by a task, so
        the signal handler returns at once.
        """
        self.log.info("daemon.signal", signal="SIGHUP", action="reload")
        self._spawn(self._reload_all(), name="reload")

    async def _reload_all(self) -> None:
        try:
            changed = await self._rescan_and_replan("reload")
            if changed is not None:
                self.log.info("daemon.reloaded", files=len(self.index.paths), changed=len(changed))
        except Exception as exc:  # a reload must never stop the daemon
            self.log.exception("daemon.reload_failed", error=repr(exc))

    async def _rescan_and_replan(self, reason: str) -> set[TaskKey] | None:
        """Rescan, then (leading) re-plan every task; the files that changed, or
        ``None`` when this replica does not lead."""
        async with self._tree_lock:
            changed = await self.scan()
            await self._report_files()
            if not self.lead.leading:
                return None
            plan = await self.replan(None, reason=reason)
            if not self._pass:
                self._start_pass(plan, reason=reason)
            return changed

    def _spawn(self, work: Coroutine[None, None, None], *, name: str) -> None:
        """Run ``work`` beside the loop's tasks; cancelled with them on shutdown."""
        task = asyncio.create_task(work, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _resync(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.resync_interval)
                return
            try:
                await self._rescan_and_replan("resync")
            except Exception as exc:  # try again at the next resync
                self.log.exception("resync.failed", error=repr(exc))

    # --- observing live tasks ------------------------------------------------------

    def oldest_observation_age(self) -> float | None:
        """Seconds since the least recently read desired task was read (``None``: off,
        or a standby, which reads nothing: the leader's gauge is the one to watch)."""
        if not self.config.observe or not self.index.tasks or not self.lead.leading:
            return None
        observations = self.recorder.observations
        oldest = min(
            (o.observed_at if (o := observations.get(k)) else self._started_wall)
            for k in self.index.tasks
        )
        return max(0.0, self.clock.wall() - oldest)

    def sweep_seconds(self) -> float:
        """Seconds one full sweep of reads should take now (0: not observing)."""
        if not self.config.observe:
            return 0.0
        cfg = self.config
        return sweep_seconds(
            len(self.index.tasks), interval=cfg.observe_interval, read_qps=cfg.read_qps
        )

    async def _track_desired(self) -> None:
        """Keep the read schedule in line with the desired index and the held tasks
        (new keys in steps of :data:`STEP`: a big file adds hundreds of thousands)."""
        wanted = self.index.tasks.keys() | self.held_keys()
        tracked = self.schedule.keys()
        self.schedule.untrack(tracked - wanted)
        now_wall, now = self.clock.wall(), self.clock.monotonic()
        observations = self.recorder.observations
        new = list(wanted - tracked)
        for start in range(0, len(new), STEP):
            if start:
                await asyncio.sleep(0)
            for key in new[start : start + STEP]:
                obs = observations.get(key)
                # A task read before (an earlier run) waits for its turn, oldest first.
                due = now
                if obs is not None:
                    due += obs.observed_at - now_wall + self.schedule.interval
                self.schedule.track([key], first_due=due)

    async def _observe(self, stop: asyncio.Event) -> None:
        """Readers that take due keys from the schedule; paced by the client's read budget."""
        await self._loaded.wait()
        cfg = self.config
        sweep = sweep_seconds(
            len(self.index.tasks), interval=cfg.observe_interval, read_qps=cfg.read_qps
        )
        fields = {
            "tasks": len(self.index.tasks),
            "interval_s": cfg.observe_interval,
            "read_qps": cfg.read_qps,
            "sweep_s": round(sweep, 1),
            "drift": cfg.drift,
        }
        if sweep > cfg.observe_interval:
            self.log.warning(
                "observe.started",
                **fields,
                message=f"a full sweep of {len(self.index.tasks)} tasks takes {sweep:.0f} s at "
                f"--read-qps {cfg.read_qps}, longer than --observe-interval "
                f"{cfg.observe_interval:g} s; each task is read every {sweep:.0f} s",
            )
        else:
            self.log.info("observe.started", **fields)
        # One dispatcher hands due keys to reads at the read budget's pace, in
        # bursts of half a second's worth: reads released faster would only queue
        # in the client's limiter (which stays the hard guard over any one-second
        # window), and reads spread one by one cost twice the CPU each, every one
        # waking a cold process.
        slots = asyncio.Semaphore(min(256, cfg.read_qps * 3))
        reading: set[asyncio.Task[None]] = set()
        burst = max(1, cfg.read_qps // 2)
        period = burst / cfg.read_qps
        window, released = self.clock.monotonic(), 0
        try:
            while (key := await self.schedule.take(stop)) is not None:
                if released >= burst:
                    await asyncio.sleep(window + period - self.clock.monotonic())
                    window, released = max(window + period, self.clock.monotonic()), 0
                released += 1
                await slots.acquire()
                # Last, right before the read: a pause (credentials error), or the
                # lead lost, while this one waited for its turn holds it back too.
                await self.lead.wait()
                if stop.is_set():
                    break
                read = asyncio.create_task(self._read_in_slot(key, slots))
                reading.add(read)
                read.add_done_callback(reading.discard)
        finally:
            for read in list(reading):
                read.cancel()
            await asyncio.gather(*reading, return_exceptions=True)

    async def _read_in_slot(self, key: TaskKey, slots: asyncio.Semaphore) -> None:
        again: float | None = None
        try:
            await self._read_one(key)
        except FencedError as exc:  # another replica leads: it reads for itself
            self._lost(str(exc))
        except StoreWriteError as exc:  # the read is lost; it is taken again in its turn
            self._store_failed(exc)
        except CallWithdrawn:  # the lease was in doubt when it was to go: nothing was sent
            again = 0.0
        except Exception as exc:  # one odd answer must not stop the observer
            self.log.exception("observe.failed", error=repr(exc), **task_fields(key))
        finally:
            self.schedule.done(key, after=again)
            slots.release()

    async def _read_one(self, key: TaskKey) -> None:
        last = self.recorder.observations.get(key)
        try:
            obs = await self.reconciler.read(key, last=last)
        except FatalError as exc:
            await self._pause(exc)
            return
        except ApiError as exc:
            self.metrics.observations.labels("error").inc()
            self._tally_read("failed")
            self.log.warning(
                "observe.failed", code=exc.code, message=exc.message, **task_fields(key)
            )
            if isinstance(exc, BadInputError):
                self._read_refused(key, exc)
            return
        self.metrics.observations.labels(str(obs.state)).inc()
        self._tally_read(str(obs.state).replace("-", "_"))
        if key in self.index.tasks:  # not removed from the tree while it was read
            with self.recorder.store.bulk():  # the read and what it settles: one commit
                self._on_observation(obs, last)
        elif self._held(key):
            # Its file is invalid: nothing is planned, but status and the dashboard
            # show what live holds, and the plan once the hold lifts starts from it.
            self.recorder.observed(obs)

    def _tally_read(self, outcome: str) -> None:
        """Count a read; once there were as many as tasks read, log ``observe.swept``.

        A read that finds nothing new writes no line of its own (its
        ``call.succeeded`` is debug): at info a sweep is this one line, with
        counts and duration, and whatever a read found has a line of its own.
        """
        if not self._sweep:
            self._sweep_started = self.clock.monotonic()
        self._sweep[outcome] += 1
        tracked = len(self.schedule)
        reads = self._sweep.total()
        if reads < max(1, tracked):
            return
        self.log.info(
            "observe.swept",
            tasks=tracked,
            reads=reads,
            seconds=round(self.clock.monotonic() - self._sweep_started, 1),
            **dict(sorted(self._sweep.items())),
        )
        self._sweep.clear()

    def _read_refused(self, key: TaskKey, exc: BadInputError) -> None:
        """A first-contact read refused as bad input (an unknown AppId, an id the server
        rejects): UpdateSegment would be refused alike, so the task is Failed as a
        refused call leaves it, and waits for its spec to change instead of a read."""
        task = self.index.tasks.get(key)
        record = self.recorder.applied.get(key)
        if task is None or (
            record is not None
            and (record.fields is not None or record.failed_spec == task.spec_hash())
        ):
            return  # confirmed before (planned against last-applied), or refused already
        with self.recorder.store.bulk():
            self.recorder.failure(task, exc, terminal=True)
        self.log.error(
            "task.failed",
            **task_fields(key),
            action=GET_ACTION,
            attempt=exc.attempts,
            code=exc.code,
            request_id=exc.request_id,
            message=exc.message,
            terminal=True,
        )
        self._pass.discard(key)
        self._maybe_finish_pass()

    def _first_time(self, key: TaskKey, what: str, signature: object) -> bool:
        """Whether this restart, drift or end of ``key`` is news (each is logged once).

        Reads keep showing the same thing until it is dealt with; a read
        within the settle window may show it before it counts.
        """
        if self._announced.get((key, what)) == signature:
            return False
        self._announced[(key, what)] = signature
        return True

    def _on_observation(self, obs: Observation, prev: Observation | None) -> None:
        """Record a read and act on it: level-based, from the plan of this one task."""
        key = obs.key
        self.recorder.observed(obs)
        if (since := self._read_first.get(key)) is not None and obs.observed_at >= since:
            del self._read_first[key]
        task = self.index.tasks[key]
        plan = self._plan([key])
        for r in plan.restarts:
            if self._first_time(key, "restarted", r.new_incarnation):
                self.metrics.restarts_detected.inc()
                self.log.warning(
                    "task.restarted",
                    **task_fields(key),
                    old_start_time=r.old_incarnation,
                    new_start_time=r.new_incarnation,
                    live=dict(r.live),
                )
        for d in plan.drifts:
            if self._first_time(key, "drifted", (obs.start_time_ms, tuple(obs.fields.items()))):
                self.metrics.drift_detected.inc()
                self.log.warning(
                    "task.drifted",
                    **task_fields(key),
                    policy=self.config.drift,
                    fields={n: {"last_applied": a, "live": b} for n, (a, b) in d.fields.items()},
                    desired={n: task.fields[n] for n in d.fields},
                )
            if not d.healed:
                self.recorder.out_of_sync(task, d)
                self._out_of_sync.add(key)
        if not plan.drifts and key in self._out_of_sync:
            self._out_of_sync.discard(key)
            if not plan.calls:  # the live task is back in line by itself
                self.recorder.store.record_in_sync(
                    key, business_id=task.business_id, source=task.source, fields=task.fields
                )
        if plan.ended and self._first_time(key, "ended", (obs.state, obs.start_time_ms)):
            self.recorder.live_not_running(task, obs)
            self.queue.forget(key)
            self.log.warning(
                "task.not_running",
                **task_fields(key),
                source="observation",
                state=str(obs.state),
                stop_reason=obs.stop_reason,
                end_time=obs.end_time_ms,
            )
        self.recorder.bookkeeping(plan)
        now = self.clock.now()
        self.admission.note(plan, [key], now)
        self.admission.after_read(key, now)
        if plan.unread:
            # A call in doubt, read too soon after it to tell: read again once it counts.
            self.schedule.soon(key, self.config.settle_s + 0.5)
        if plan.calls:
            reason = "restarted" if plan.restarts else "drift" if plan.drifts else "observed"
            if prev is None and key not in self.recorder.applied:
                reason = "first_contact"
            if not self.queue.is_scheduled(key) or plan.restarts:
                self.queue.add(key)
                self.log.debug("task.queued", reason=reason, **task_fields(key))
                self.metrics.queue_depth.set(len(self.queue))
        elif key in self._pass and not plan.unread and key not in self._read_first:
            # Read at first contact, and live already matches: recorded, no call.
            self._first_contact["already_matching"] += prev is None
            self.log.debug("task.matches_live", **task_fields(key), fields=dict(task.fields))
            self._pass.discard(key)
            self._maybe_finish_pass()

    # --- a store that refuses writes ---------------------------------------------------

    def _store_failed(self, exc: StoreWriteError) -> None:
        """The store refused a write: hold calls and reads (said once per streak) and
        probe it until it takes writes again."""
        if isinstance(exc, ResultNotRecorded):
            self._unrecorded[exc.key] = exc
        self._store_failures += 1
        if self._store_problem is not None:
            return
        self._store_problem = f"cannot write the state store {exc.store}: {exc.reason}"
        self.lead.sync()
        self.log.error(
            "daemon.store_unwritable",
            store=exc.store,
            error=exc.reason,
            write=exc.what,
            retry_in_s=self.config.store_retry,
        )
        self._store_probe = asyncio.get_running_loop().create_task(
            self._recover_store(), name="store probe"
        )

    async def _recover_store(self) -> None:
        started = self.clock.monotonic()
        pause = self.config.store_retry
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
            if self._stop.is_set():
                return
            try:
                recorded = self._record_again()
            except StoreError as exc:
                pause = min(self.config.store_retry_cap, pause * 2)
                self.log.debug("daemon.store_probe_failed", error=str(exc), retry_in_s=pause)
                continue
            break
        self.log.info(
            "daemon.store_writable",
            seconds=round(self.clock.monotonic() - started, 1),
            failed_writes=self._store_failures,
            results_recorded=recorded,
        )
        self._store_problem, self._store_failures = None, 0
        self.lead.sync()
        if self.lead.leading:
            try:
                async with self._tree_lock:
                    plan = await self.replan(None, reason="store_writable")
                    if not self._pass:
                        self._start_pass(plan, reason="store_writable")
            except Exception as exc:  # the next resync plans it all again
                self.log.exception("resync.failed", error=repr(exc))

    def _record_again(self) -> int:
        """A probe write, then the planner's view read back from the store (a refused
        bulk write may have left it ahead), then each result not yet recorded."""
        self.recorder.store.check_writable()
        self.recorder.reload()
        self._out_of_sync = set(self.recorder.store.keys_with_status(SyncStatus.OUT_OF_SYNC))
        recorded = 0
        for key, exc in list(self._unrecorded.items()):
            exc.record()
            del self._unrecorded[key]
            recorded += 1
        return recorded

    def _elected(self, epoch: int) -> None:
        """This replica leads now: start from the store as it is, plan everything, go."""
        assert self.leadership is not None
        self._on_elected()
        # Another replica recorded results (and reads) since this one last looked.
        self.recorder.reload()
        self._out_of_sync = set(self.recorder.store.keys_with_status(SyncStatus.OUT_OF_SYNC))
        if self.config.observe:
            # Due again by the reads the store holds: the last leader's, oldest first.
            self.schedule.untrack(self.schedule.keys())  # tracked again as the term plans
        self._first_pass_done = False
        self.lead.elected()
        self._spawn(self._plan_term(epoch), name="elected")

    async def _start(self) -> None:
        """Load the tree, then (the only replica) plan every task."""
        started = self.clock.monotonic()
        async with self._tree_lock:
            await self.scan()
            await self._report_files()
            self.log.info(
                "desired.loaded",
                root=str(self.config.root),
                files=len(self.index.paths),
                tasks=len(self.index.tasks),
                invalid_files=len(self.index.invalid_files),
                seconds=round(self.clock.monotonic() - started, 3),
            )
            self._loaded.set()
            if self.leadership is None:  # else planned once elected (_elected)
                plan = await self.replan(None, reason="start")
                self._start_pass(plan, reason="start")

    async def _plan_term(self, epoch: int) -> None:
        """The tree read again and every task planned, for the term that began at
        ``epoch`` (workers start meanwhile on what is queued: each plans its own)."""
        try:
            async with self._tree_lock:
                await self.scan()
                await self._report_files()
                if not self.lead.leading:
                    return  # lost again meanwhile: the next term plans
                plan = await self.replan(None, reason="elected")
                self._start_pass(plan, reason="elected")
        except Exception as exc:  # the next resync plans it all again
            self.log.exception("resync.failed", error=repr(exc), epoch=epoch)

    def _lost(self, why: str) -> None:
        """Stop calling at once (:meth:`Lead.lost`); the pass starts over once elected."""
        if self.lead.lost(why):
            self._pass = set()
            self._first_pass_done = False

    def _new_term(self, term: asyncio.Event) -> None:
        # Calls of this term wait for a slot only while the term lasts.
        self.reconciler.stop = term

    def _may_send(self) -> bool:
        """Whether a request may go out now: the store takes writes, and the lead allows
        it (the gate of the reconciler and the client)."""
        return self._store_problem is None and self.lead.may_send()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain."""
        self._stop = stop
        gc.freeze()  # the records loaded from the store live as long (heap.settle)
        workers = [asyncio.create_task(self._worker()) for _ in range(self.config.workers)]
        # Loading and the first plan run as a task of their own: a SIGTERM while
        # a huge tree loads stops the daemon within the drain timeout.
        self._spawn(self._start(), name="start")
        self._background += [
            asyncio.create_task(self._watch(stop), name="watcher"),
            asyncio.create_task(self._resync(stop), name="resync"),
        ]
        if self.config.observe:
            self._background.append(asyncio.create_task(self._observe(stop), name="observer"))
        if self.leadership is not None:
            self._leader_task = asyncio.create_task(
                self.leadership.run(
                    on_elected=self._elected,
                    on_lost=self._lost,
                    on_lapsed=self.lead.lapsed,
                    on_renewed=self.lead.renewed,
                ),
                name="leadership",
            )
            self._background.append(self._leader_task)
        await stop.wait()
        self.lead.end_term()  # withdraw calls waiting for a slot (without leadership: stop itself)
        self.lead.sync()  # held workers and readers see the stop

        self.log.info("daemon.draining", in_flight=self.queue.processing, queued=len(self.queue))
        # The lead is kept (alive) while in-flight calls drain, and let go after.
        stopping = [t for t in (*self._background, *self._jobs) if t is not self._leader_task]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        self.queue.shutdown()
        _, late = await asyncio.wait(workers, timeout=self.config.drain_timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self.leadership is not None and self._leader_task is not None:
            self._leader_task.cancel()
            await asyncio.gather(self._leader_task, return_exceptions=True)
            await self.leadership.release()
        self.log.info("daemon.stopped", abandoned_in_flight=len(late))
        # The interpreter's exit collects every object the collector tracks: a big
        # tree, or the nodes of a file still being parsed, would hold the exit for
        # seconds after the drain.
        gc.freeze()


_T = TypeVar("_T")
#: A file read off the loop: its path, signature (``None``: gone; ``"dir"``: a
#: folder), and what it declares.
_Read = tuple[str, tuple[int, int, int] | str | None, FileResult | None]
#: Files read per thread hop: a hop costs about 0.1 ms, a small file about 1 ms.
_FILES_PER_HOP = 64


async def off_loop(work: Callable[[], _T]) -> _T:
    """``work()`` in a thread of its own, awaited.

    A daemon thread, not the default executor: the interpreter waits for the
    executor's threads at exit, so a SIGTERM during a long parse would wait
    for it; a daemon thread is abandoned instead. The GIL is shared in
    slices of a few milliseconds, so the loop keeps answering meanwhile.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name="reconciler-off-loop", daemon=True).start()
    return await future


async def _stepped(steps: Generator[None, None, set[TaskKey]]) -> set[TaskKey]:
    """Run an index update, letting the loop run between its steps. A large one
    (more than a few steps) keeps what it built out of the collector's full
    passes as it goes (:func:`~reconciler.core.heap.settle`)."""
    taken = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: set[TaskKey] = done.value
            return result
        taken += 1
        if taken > 8:
            gc.freeze()
        await asyncio.sleep(0)


def _bookkeeping_parts(plan: Plan) -> Iterable[Plan]:
    """``plan``'s bookkeeping (releases, forgets, in-sync records, incarnations) in
    parts of at most :data:`STEP` entries each; nothing else."""
    lists = (plan.releases, plan.forgotten, plan.bookkeeping, plan.incarnations)
    longest = max(len(x) for x in lists)
    for start in range(0, longest, STEP):
        end = start + STEP
        yield Plan(
            releases=plan.releases[start:end],
            forgotten=plan.forgotten[start:end],
            bookkeeping=plan.bookkeeping[start:end],
            incarnations=plan.incarnations[start:end],
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
