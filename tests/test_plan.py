"""The planner's rules, by example and by property."""

from __future__ import annotations

import json
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.plan import Plan, compute_plan, records_from_tree
from reconciler.core.task import (
    MANAGED_FIELDS,
    AppliedRecord,
    DesiredTask,
    FieldValue,
    Source,
    TaskKey,
)

K1 = TaskKey("app1", "room1", "t1")
K2 = TaskKey("app1", "room2", "t1")


def task(
    key: TaskKey = K1,
    *,
    path: str = "a.yaml",
    business_id: str | None = None,
    **fields: FieldValue,
) -> DesiredTask:
    ordered = {n: fields[n] for n in MANAGED_FIELDS if n in fields}
    return DesiredTask(key, business_id, ordered, Source(path, 1, 1))


def rec(
    key: TaskKey = K1,
    fields: Mapping[str, FieldValue] | None = None,
    *,
    path: str | None = "a.yaml",
    business_id: str | None = None,
    failed_spec: str | None = None,
) -> AppliedRecord:
    return AppliedRecord(key, business_id, fields, source=path, failed_spec=failed_spec)


def by_key(*items: DesiredTask) -> dict[TaskKey, DesiredTask]:
    return {t.key: t for t in items}


def recs(*items: AppliedRecord) -> dict[TaskKey, AppliedRecord]:
    return {r.key: r for r in items}


def test_first_call_sends_every_managed_field_and_identity() -> None:
    plan = compute_plan(by_key(task(Duration=30, Handle=True)), {})
    (call,) = plan.calls
    assert dict(call.body) == {
        "AppId": "app1",
        "RoomId": "room1",
        "TaskId": "t1",
        "Handle": True,
        "Duration": 30,
    }
    assert call.first
    assert [(c.field, c.old, c.new) for c in call.changes] == [
        ("Handle", None, True),
        ("Duration", None, 30),
    ]


def test_only_differing_fields_are_sent() -> None:
    desired = by_key(task(Identifier="x", Handle=True, Duration=30))
    plan = compute_plan(
        desired, recs(rec(fields={"Identifier": "x", "Handle": True, "Duration": 20}))
    )
    (call,) = plan.calls
    assert dict(call.body) == {"AppId": "app1", "RoomId": "room1", "TaskId": "t1", "Duration": 30}
    assert not call.first


def test_unchanged_duration_makes_no_call() -> None:
    plan = compute_plan(by_key(task(Duration=30)), recs(rec(fields={"Duration": 30})))
    assert plan.calls == ()
    assert plan.in_sync == (K1,)
    assert plan.empty


def test_bool_and_int_never_compare_equal() -> None:
    # Handle True must not be taken as "already 1".
    plan = compute_plan(by_key(task(Handle=True)), recs(rec(fields={"Handle": 1})))
    assert [dict(c.body)["Handle"] for c in plan.calls] == [True]


def test_business_id_travels_in_body_when_set() -> None:
    plan = compute_plan(by_key(task(business_id="edu", Duration=5)), {})
    assert plan.calls[0].body["BusinessId"] == "edu"
    assert list(plan.calls[0].body)[:4] == ["AppId", "RoomId", "TaskId", "BusinessId"]


def test_task_managing_nothing_makes_no_call_but_is_recorded() -> None:
    plan = compute_plan(by_key(task()), {})
    assert plan.calls == ()
    assert plan.in_sync == (K1,)
    assert [t.key for t in plan.bookkeeping] == [K1]


def test_removed_field_is_released_not_sent() -> None:
    plan = compute_plan(
        by_key(task(Handle=True)), recs(rec(fields={"Handle": True, "Duration": 30}))
    )
    assert plan.calls == ()
    (release,) = plan.releases
    assert release.fields == ("Duration",)
    assert dict(release.remaining) == {"Handle": True}
    assert dict(release.last) == {"Duration": 30}
    assert plan.summary()["fields_released"] == 1


def test_removed_task_is_forgotten_without_a_call() -> None:
    plan = compute_plan({}, recs(rec(fields={"Duration": 30})))
    assert plan.calls == ()
    (forget,) = plan.forgotten
    assert forget.key == K1 and forget.last == {"Duration": 30}


def test_task_of_invalid_file_is_held_not_forgotten() -> None:
    plan = compute_plan(
        {}, recs(rec(fields={"Duration": 30}, path="broken.yaml")), held_files={"broken.yaml"}
    )
    assert plan.forgotten == ()
    assert [(h.key, h.source_path) for h in plan.held] == [(K1, "broken.yaml")]
    assert plan.empty


def test_business_id_change_alone_warns_and_makes_no_call() -> None:
    plan = compute_plan(
        by_key(task(business_id="new", Duration=30)),
        recs(rec(fields={"Duration": 30}, business_id="old")),
    )
    assert plan.calls == ()
    (warning,) = plan.warnings
    assert warning.code == "BusinessIdImmutable"
    assert "'old'" in warning.message and "'new'" in warning.message


def test_refused_spec_is_blocked_until_it_changes() -> None:
    desired = task(Identifier="bad", Duration=30)
    blocked = compute_plan(by_key(desired), recs(rec(failed_spec=desired.spec_hash())))
    assert blocked.calls == () and [b.task.key for b in blocked.blocked] == [K1]

    changed = task(Identifier="good", Duration=30)
    retried = compute_plan(by_key(changed), recs(rec(failed_spec=desired.spec_hash())))
    assert [c.key for c in retried.calls] == [K1] and retried.blocked == ()


def test_moved_task_is_bookkept_so_its_new_file_is_recorded() -> None:
    plan = compute_plan(
        by_key(task(path="b.yaml", Duration=30)), recs(rec(fields={"Duration": 30}))
    )
    assert plan.calls == () and [t.source.path for t in plan.bookkeeping] == ["b.yaml"]


def test_only_restricts_the_plan() -> None:
    desired = by_key(task(K1, Duration=1), task(K2, Duration=2))
    plan = compute_plan(desired, recs(rec(TaskKey("x", "y", "z"), {"Duration": 3})), only=[K2])
    assert [c.key for c in plan.calls] == [K2]
    assert plan.forgotten == ()


def test_order_is_deterministic_by_key() -> None:
    keys = [TaskKey(a, r, t) for a in "ba" for r in "yx" for t in "21"]
    desired = {k: task(k, Duration=5) for k in keys}
    plan = compute_plan(desired, {})
    assert [c.key for c in plan.calls] == sorted(keys)


def test_base_tree_is_taken_as_fully_applied() -> None:
    base = by_key(task(Duration=30, Handle=True))
    head = by_key(task(Duration=45, Handle=True))
    plan = compute_plan(head, records_from_tree(base))
    assert [dict(c.body).get("Duration") for c in plan.calls] == [45]
    assert plan.calls[0].changes[0].old == 30


def test_json_shape_is_serialisable_and_stable() -> None:
    plan = compute_plan(
        by_key(task(Duration=45)),
        recs(rec(fields={"Duration": 30, "Handle": True}), rec(K2, {"Handle": False})),
    )
    doc = json.loads(json.dumps(plan.to_json()))
    assert doc["format_version"] == 4
    assert set(doc) == {
        "format_version",
        "refreshed",
        "refresh",
        "observed",
        "settling",
        "summary",
        "calls",
        "releases",
        "forgotten",
        "held",
        "blocked",
        "restarts",
        "drifts",
        "not_running",
        "unread",
        "warnings",
    }
    assert doc["refreshed"] is False and doc["observed"] == 0
    assert doc["calls"][0]["basis"] == "last_applied"
    assert doc["calls"][0]["cause"] == "change" and doc["calls"][0]["unread"] is None
    assert doc["calls"][0]["changes"] == [{"field": "Duration", "old": 30, "new": 45}]
    assert doc["calls"][0]["source"] == "a.yaml:1:1"
    assert doc["releases"][0]["fields"] == ["Handle"]
    assert doc["forgotten"][0]["task"] == {"AppId": "app1", "RoomId": "room2", "TaskId": "t1"}
    assert doc["summary"] == {
        "to_update": 1,
        "in_sync": 0,
        "fields_released": 1,
        "tasks_forgotten": 1,
        "held": 0,
        "blocked": 0,
        "warnings": 0,
        "restarted": 0,
        "drifted": 0,
        "not_running": 0,
        "unread": 0,
    }


# --- properties -------------------------------------------------------------

ids = st.sampled_from(["a", "b", "c"])
values: dict[str, st.SearchStrategy[FieldValue]] = {
    "Identifier": st.sampled_from(["x", "y", "z"]),
    "Handle": st.booleans(),
    "Duration": st.integers(1, 600),
}


@st.composite
def field_sets(draw: st.DrawFn) -> dict[str, FieldValue]:
    names = draw(st.lists(st.sampled_from(MANAGED_FIELDS), unique=True))
    return {n: draw(values[n]) for n in MANAGED_FIELDS if n in names}


keys = st.builds(TaskKey, ids, ids, ids)
desired_trees = st.dictionaries(
    keys,
    st.tuples(field_sets(), st.sampled_from([None, "biz"]), st.sampled_from(["a.yaml", "b.yaml"])),
    max_size=12,
).map(
    lambda d: {
        k: DesiredTask(k, biz, fields, Source(path, 1, 1)) for k, (fields, biz, path) in d.items()
    }
)
record_sets = st.dictionaries(
    keys,
    st.tuples(st.one_of(st.none(), field_sets()), st.sampled_from([None, "biz"])),
    max_size=12,
).map(
    lambda d: {k: AppliedRecord(k, biz, fields, source="a.yaml") for k, (fields, biz) in d.items()}
)


def record_outcome(
    plan: Plan, applied: Mapping[TaskKey, AppliedRecord]
) -> dict[TaskKey, AppliedRecord]:
    """The store's writers, as a model: every call succeeded, everything recorded."""
    after = dict(applied)
    for f in plan.forgotten:
        del after[f.key]
    for r in plan.releases:
        old = after[r.key]
        after[r.key] = AppliedRecord(r.key, old.business_id, dict(r.remaining), source=old.source)
    for t in [c.task for c in plan.calls] + list(plan.bookkeeping):
        after[t.key] = AppliedRecord(t.key, t.business_id, dict(t.fields), source=t.source.path)
    return after


@settings(max_examples=300, deadline=None)
@given(desired_trees, record_sets)
def test_recording_a_plan_makes_the_next_plan_empty(
    desired: dict[TaskKey, DesiredTask], applied: dict[TaskKey, AppliedRecord]
) -> None:
    plan = compute_plan(desired, applied)
    again = compute_plan(desired, record_outcome(plan, applied))
    assert again.empty, again


@settings(max_examples=300, deadline=None)
@given(desired_trees, record_sets)
def test_bodies_carry_identity_and_only_changed_fields(
    desired: dict[TaskKey, DesiredTask], applied: dict[TaskKey, AppliedRecord]
) -> None:
    plan = compute_plan(desired, applied)
    for call in plan.calls:
        assert {
            "AppId": call.key.app_id,
            "RoomId": call.key.room_id,
            "TaskId": call.key.task_id,
        }.items() <= call.body.items()
        record = applied.get(call.key)
        last = None if record is None else record.fields
        sent = {n: v for n, v in call.body.items() if n in MANAGED_FIELDS}
        assert sent, "a call always changes something"
        for name, value in sent.items():
            assert value == call.task.fields[name]
            if last is not None:
                assert not (
                    name in last and type(last[name]) is type(value) and last[name] == value
                )
    assert plan == compute_plan(desired, applied), "planning is deterministic"


def test_applied_index_counts_confirmed_records_as_they_change() -> None:
    """The daemon's share base for --max-change, kept without walking the store."""
    from reconciler.core.rollout import applied_tasks
    from reconciler.core.task import AppliedIndex

    index = AppliedIndex({K1: rec(fields={"Duration": 30}), K2: rec(K2, None)})
    assert index.confirmed == 1 == applied_tasks(dict(index))
    index[K2] = rec(K2, {"Duration": 5})
    index[K1] = rec(fields=None)
    assert index.confirmed == 1
    index.pop(K2)
    index.pop(K2, None)
    assert index.confirmed == 0 == applied_tasks(dict(index)) == applied_tasks(index)
    index[K2] = rec(K2, {"Duration": 5})
    del index[K2]
    assert index.confirmed == 0
