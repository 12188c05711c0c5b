"""The three-way planner: desired vs last-applied vs live ("live state wins over memory").

Pure: observations are values, time is in them; no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.live import LiveStatus, Observation, from_segment_task, not_found
from reconciler.core.plan import SETTLE_S, compute_plan
from reconciler.core.task import AppliedRecord, DesiredTask, FieldValue, Source, TaskKey

K = TaskKey("app1", "room1", "seg")
APPLIED_AT = 1_700_000_000.0
OLD_START = 1_699_990_000_000
NEW_START = 1_700_000_100_000


def desired(**fields: FieldValue) -> dict[TaskKey, DesiredTask]:
    order = ("Identifier", "Handle", "Duration")
    return {
        K: DesiredTask(
            K, None, {n: fields[n] for n in order if n in fields}, Source("a.yaml", 3, 5)
        )
    }


def applied(
    fields: Mapping[str, FieldValue] | None, *, incarnation: int | None = OLD_START
) -> dict[TaskKey, AppliedRecord]:
    return {
        K: AppliedRecord(
            K, None, fields, source="a.yaml", applied_at=APPLIED_AT, incarnation=incarnation
        )
    }


def live(
    *, after: float = 60.0, start: int = OLD_START, **fields: FieldValue
) -> dict[TaskKey, Observation]:
    task = {"StartTime": start, "EndTime": 0, "Status": 2, "StopReason": "", **fields}
    return {K: from_segment_task(K, task, observed_at=APPLIED_AT + after)}


WANTED: dict[str, FieldValue] = {"Identifier": "edu-hall-a", "Handle": True, "Duration": 20}


def test_a_restart_gets_only_the_fields_its_new_incarnation_lacks() -> None:
    # StartSegment's defaults: a random Identifier, Handle true, Duration 20.
    obs = live(start=NEW_START, Identifier="3f9c-uuid", Handle=True, Duration=20)
    plan = compute_plan(desired(**WANTED), applied(WANTED), observations=obs)
    (call,) = plan.calls
    assert dict(call.fields) == {"Identifier": "edu-hall-a"}, "Duration 20 = 20: no slice cut"
    assert call.basis == "live" and call.incarnation == NEW_START
    assert [(c.field, c.old, c.new) for c in call.changes] == [
        ("Identifier", "3f9c-uuid", "edu-hall-a")
    ]
    (restart,) = plan.restarts
    assert (restart.old_incarnation, restart.new_incarnation) == (OLD_START, NEW_START)
    assert plan.drifts == (), "a restart is not drift"


def test_a_restart_that_already_matches_costs_no_call_but_records_its_incarnation() -> None:
    wanted = {"Handle": True, "Duration": 20}
    obs = live(start=NEW_START, Identifier="3f9c-uuid", Handle=True, Duration=20)
    plan = compute_plan(desired(**wanted), applied(wanted), observations=obs)
    assert plan.calls == () and plan.in_sync == (K,)
    assert plan.incarnations == ((K, NEW_START),)


def test_drift_is_healed_by_default_and_only_reported_on_request() -> None:
    obs = live(Identifier="edu-hall-a", Handle=True, Duration=45)  # another client: 20 -> 45
    healed = compute_plan(desired(**WANTED), applied(WANTED), observations=obs)
    (call,) = healed.calls
    assert dict(call.fields) == {"Duration": 20}
    (drift,) = healed.drifts
    assert drift.fields == {"Duration": (20, 45)} and drift.healed

    reported = compute_plan(desired(**WANTED), applied(WANTED), observations=obs, drift="report")
    assert reported.calls == () and reported.in_sync == ()
    assert not reported.drifts[0].healed


def test_report_still_applies_what_the_file_changed() -> None:
    obs = live(Identifier="edu-hall-a", Handle=True, Duration=45)
    wanted = {**WANTED, "Handle": False}  # the file changed Handle; live drifted Duration
    plan = compute_plan(desired(**wanted), applied(WANTED), observations=obs, drift="report")
    (call,) = plan.calls
    assert dict(call.fields) == {"Handle": False}


def test_a_read_within_the_settle_window_never_counts() -> None:
    # Our own call just landed; a read sent right after may still show the old value.
    stale = live(after=SETTLE_S - 0.1, Identifier="edu-hall-a", Handle=True, Duration=60)
    plan = compute_plan(desired(**WANTED), applied(WANTED), observations=stale)
    assert plan.calls == () and plan.drifts == (), "a stale read never causes a second call"
    assert plan.observed == 0
    counted = live(after=SETTLE_S + 0.1, Identifier="edu-hall-a", Handle=True, Duration=60)
    assert compute_plan(desired(**WANTED), applied(WANTED), observations=counted).calls


def test_an_ended_task_costs_no_call_until_a_new_incarnation_runs() -> None:
    ended = {
        K: from_segment_task(
            K,
            {
                "StartTime": OLD_START,
                "EndTime": OLD_START + 5000,
                "Status": 3,
                "StopReason": "IdleTimeOut",
                "Duration": 20,
            },
            observed_at=APPLIED_AT + 60,
        )
    }
    wanted = {**WANTED, "Duration": 30}  # even with a change pending
    plan = compute_plan(desired(**wanted), applied(WANTED), observations=ended)
    assert plan.calls == ()
    (e,) = plan.ended
    assert e.observation.stop_reason == "IdleTimeOut" and e.observation.state is LiveStatus.ENDED


def test_a_task_out_of_sight_falls_back_to_last_applied() -> None:
    long_ago = int((APPLIED_AT - 80 * 3600) * 1000)
    seen = live(after=0, start=long_ago)[K]  # started 80 h before this read
    unknown = not_found(K, observed_at=APPLIED_AT + 60, last=seen)
    assert unknown.state is LiveStatus.UNKNOWN, "started > 72 h ago: not visible, not ended"
    plan = compute_plan(desired(**WANTED), applied(WANTED), observations={K: unknown})
    assert plan.calls == () and plan.ended == () and plan.observed == 0
    changed = compute_plan(
        desired(**{**WANTED, "Duration": 30}), applied(WANTED), observations={K: unknown}
    )
    (call,) = changed.calls
    assert call.basis == "last_applied" and dict(call.fields) == {"Duration": 30}


def test_a_task_seen_recently_and_now_gone_is_not_running() -> None:
    seen = live(after=0, start=int((APPLIED_AT - 3600) * 1000))[K]
    gone = not_found(K, observed_at=APPLIED_AT + 60, last=seen)
    assert gone.state is LiveStatus.NOT_FOUND


def test_a_first_sync_seen_live_sends_only_what_differs() -> None:
    obs = live(Identifier="edu-hall-a", Handle=True, Duration=20)
    plan = compute_plan(desired(**{**WANTED, "Duration": 30}), {}, observations=obs)
    (call,) = plan.calls
    assert dict(call.fields) == {"Duration": 30} and not call.first


def test_no_observations_is_the_old_two_way_plan() -> None:
    plan = compute_plan(desired(**WANTED), applied({**WANTED, "Duration": 60}))
    (call,) = plan.calls
    assert call.basis == "last_applied" and not plan.refreshed


@given(
    live_duration=st.integers(1, 600),
    wanted_duration=st.integers(1, 600),
    applied_duration=st.integers(1, 600),
    restarted=st.booleans(),
)
def test_duration_is_sent_exactly_when_live_differs(
    live_duration: int, wanted_duration: int, applied_duration: int, restarted: bool
) -> None:
    """With a counting observation of a running task, Duration (the slice cutter) is sent
    if and only if the live value differs from the desired one (heal)."""
    obs = live(start=NEW_START if restarted else OLD_START, Duration=live_duration)
    plan = compute_plan(
        desired(Duration=wanted_duration), applied({"Duration": applied_duration}), observations=obs
    )
    sent = [c for c in plan.calls if "Duration" in c.fields]
    assert bool(sent) == (live_duration != wanted_duration)


# --- first contact: nothing recorded, so live is read before anything is sent ---------


def test_first_contact_without_a_read_waits_for_one() -> None:
    """Reads given but none for a task never confirmed: no call until it is read."""
    plan = compute_plan(desired(**WANTED), {}, observations={})
    assert plan.calls == () and plan.unread == (K,) and plan.in_sync == ()
    assert plan.to_json()["unread"] == [K.identity()]
    pending_first = compute_plan(desired(**WANTED), applied(None), observations={})
    assert pending_first.unread == (K,), "a first call in doubt (Pending) is read first too"


def test_first_contact_matching_live_costs_no_call_and_is_recorded() -> None:
    plan = compute_plan(
        desired(**WANTED), {}, observations=live(Identifier="edu-hall-a", Handle=True, Duration=20)
    )
    assert plan.calls == () and plan.unread == () and plan.in_sync == (K,)
    assert [t.key for t in plan.bookkeeping] == [K], "recorded, so the next plan is empty"


def test_first_contact_out_of_sight_sends_every_field_and_says_why() -> None:
    unknown = not_found(K, observed_at=APPLIED_AT, last=None)
    plan = compute_plan(desired(**WANTED), {}, observations={K: unknown})
    (call,) = plan.calls
    assert dict(call.fields) == WANTED and call.first
    assert (call.basis, call.cause, call.unread) == ("none", "first", "unreadable")
    without_reads = compute_plan(desired(**WANTED), {}).calls[0]
    assert (without_reads.cause, without_reads.unread) == ("first", "not_read")


def test_a_call_says_whether_it_heals_or_changes() -> None:
    restarted = compute_plan(
        desired(**WANTED), applied(WANTED), observations=live(start=NEW_START, Duration=20)
    ).calls[0]
    assert restarted.cause == "restart" and restarted.heal
    drifted = compute_plan(
        desired(**WANTED),
        applied(WANTED),
        observations=live(Identifier="edu-hall-a", Handle=True, Duration=99),
    ).calls[0]
    assert drifted.cause == "drift" and drifted.heal
    changed = compute_plan(desired(**{**WANTED, "Duration": 30}), applied(WANTED)).calls[0]
    assert changed.cause == "change" and not changed.heal and changed.unread is None


@given(live_duration=st.integers(1, 600), wanted_duration=st.integers(1, 600))
def test_first_contact_sends_duration_exactly_when_live_differs(
    live_duration: int, wanted_duration: int
) -> None:
    plan = compute_plan(
        desired(Duration=wanted_duration), {}, observations=live(Duration=live_duration)
    )
    sent = [c for c in plan.calls if "Duration" in c.fields]
    assert bool(sent) == (live_duration != wanted_duration)
