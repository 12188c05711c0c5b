"""The alert rules and the Grafana dashboard ask only for what the daemon exports.

Every expression is parsed by a real PromQL parser (``promql-parser``, the
GreptimeDB project's Rust port of Prometheus' own parser: an unknown function
or a syntax error fails) and each vector selector in it is checked against a
scrape of ``/metrics`` from a running daemon: the series name with its
``_total`` / ``_bucket`` suffix, every label a matcher or a ``by (...)`` names,
and every value an ``=`` matcher (or a plain ``a|b`` regex) wants. Where
``promtool`` is installed (Debian's ``prometheus`` package) the rules also pass
``promtool check rules`` and the unit tests in
``tests/prometheus/reconciler-alerts.test.yaml``, which feed series to each
alert and check it fires, after its ``for:``, with its labels and text.

Metrics exported but on no panel are reported as a warning, not a failure, so
a new metric is visible without breaking whoever adds it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler.core.task import TaskKey
from reconciler.emulator import EmulatorConfig, running_emulator
from tests.conftest import ACCESS_KEY, REPO, SECRET_KEY, tasks_yaml, wait_for, write
from tests.harness import DaemonProcess

RULES = REPO / "deploy" / "prometheus" / "reconciler-alerts.yaml"
RULE_TESTS = REPO / "tests" / "prometheus" / "reconciler-alerts.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "reconciler-dashboard.json"
#: Labels Prometheus adds to every scraped series (not in /metrics itself).
TARGET_LABELS = frozenset({"job", "instance"})
#: Grafana's built-in variables, as a query would be sent with them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h"}
SEVERITIES = {"critical", "warning", "info"}


# --- what the daemon exports --------------------------------------------------------


Exported = dict[str, list[dict[str, str]]]


def parse_scrape(text: str) -> Exported:
    """Sample name (``reconciler_calls_total``, ``..._bucket``) → the label sets it has."""
    out: Exported = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A scrape of a real daemon that has made calls and reads, some of them throttled.

    A family with labels shows no series until its first child, so the run
    must cause what the rules match on: an emulator allowing 2 reads a second
    throttles the daemon's first sweep of 6 tasks.
    """
    cwd = tmp_path_factory.mktemp("scrape")
    app = "661e4a7b9c0d1e2f"
    keys = [TaskKey(app, f"r{i}", "seg") for i in range(6)]
    rows = [{"RoomId": k.room_id, "TaskId": k.task_id, "Duration": 30} for k in keys]
    write(cwd / "desired", "a.yaml", tasks_yaml(app, rows))
    config = EmulatorConfig(credentials={ACCESS_KEY: SECRET_KEY}, qps={"GetSegmentTask": 2})
    with running_emulator(config) as h:
        for k in keys:
            h.start_task(app_id=k.app_id, room_id=k.room_id, task_id=k.task_id)
        args = ("--endpoint", h.url, "--health-port", "0", "--state", "s.db")
        with DaemonProcess(cwd, "desired", *args, "--observe-interval", "1") as d:
            d.wait_ready()
            wait_for(lambda: d.metric("reconciler_throttled_total", 'action="GetSegmentTask"'))
            text = d.health("/metrics").text
            d.stop()
    return parse_scrape(text)


# --- what an expression asks for ----------------------------------------------------------


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)


@dataclass
class Wanted:
    selectors: list[Selector] = field(default_factory=list)
    #: ``by (...)`` labels with the selectors they group.
    groupings: list[tuple[list[str], list[Selector]]] = field(default_factory=list)


def _selectors(expr: Any) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [
                (m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers
            ]
            name = node.name or next((v for n, _, v in matchers if n == "__name__"), "")
            found.append(Selector(name, [m for m in matchers if m[0] != "__name__"]))

    promql_parser.walk(expr, visit)
    return found


def wanted(expr_text: str) -> Wanted:
    """Parse ``expr_text`` (raises ``ValueError`` on a PromQL error) and list its needs."""
    expr = promql_parser.parse(expr_text)
    out = Wanted(_selectors(expr))

    def visit(node: Any) -> None:
        if (
            isinstance(node, promql_parser.AggregateExpr)
            and node.modifier is not None
            and str(node.modifier.type).endswith("By")
        ):
            out.groupings.append((list(node.modifier.labels), _selectors(node.expr)))

    promql_parser.walk(expr, visit)
    return out


def problems(expr_text: str, exported: Exported) -> list[str]:
    """What ``expr_text`` asks for that the scrape does not have."""
    try:
        need = wanted(expr_text)
    except ValueError as exc:
        return [f"not PromQL: {exc}"]
    out = []
    for sel in need.selectors:
        if sel.name not in exported:
            out.append(f"{sel.name}: no such series is exported")
            continue
        series = exported[sel.name]
        labels = {k for s in series for k in s}
        for label, op, value in sel.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels:
                out.append(f"{sel.name}: no label {label!r} (it has {sorted(labels)})")
                continue
            values = {s[label] for s in series if label in s}
            if op == "Equal" and value not in values:
                out.append(f"{sel.name}{{{label}={value!r}}}: not a value it has {sorted(values)}")
            if op == "Re":
                literals = value.split("|") if re.fullmatch(r"[\w|]+", value) else []
                missing = [v for v in literals if v not in values]
                if missing or not any(re.fullmatch(value, v) for v in values):
                    out.append(f"{sel.name}{{{label}=~{value!r}}}: matches none of {missing}")
    for by, sels in need.groupings:
        have = TARGET_LABELS | {k for s in sels for ls in exported.get(s.name, []) for k in ls}
        for label in by:
            if label not in have:
                out.append(f"by ({label}): no selector under it has that label")
    return out


def test_the_checker_catches_drift() -> None:
    scrape = parse_scrape(
        "# TYPE reconciler_calls_total counter\n"
        'reconciler_calls_total{action="UpdateSegment",outcome="ok"} 1\n'
        "# TYPE reconciler_queue_depth gauge\nreconciler_queue_depth 0\n"
    )
    ok = 'sum by (outcome) (rate(reconciler_calls_total{outcome="ok"}[5m]))'
    assert problems(ok, scrape) == []
    assert (
        problems("reconciler_queue_depth > 1 and on (instance) reconciler_queue_depth", scrape)
        == []
    )
    assert problems("rate(reconciler_calls[5m])", scrape) == [
        "reconciler_calls: no such series is exported"
    ]
    assert problems('reconciler_calls_total{result="ok"}', scrape)[0].startswith(
        "reconciler_calls_total: no label 'result'"
    )
    assert "not a value" in problems('reconciler_calls_total{outcome="okay"}', scrape)[0]
    assert "matches none" in problems('reconciler_calls_total{outcome=~"ok|fatal"}', scrape)[0]
    assert problems("sum by (code) (reconciler_calls_total)", scrape) == [
        "by (code): no selector under it has that label"
    ]
    assert problems("rate(reconciler_calls_total[5m]", scrape)[0].startswith("not PromQL")
    assert problems("rates(reconciler_calls_total[5m])", scrape)[0].startswith("not PromQL")


# --- the alert rules ------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_has_for_severity_summary_and_what_to_do() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    assert set(names) >= {
        "ReconcilerDown",
        "ReconcilerNotReady",
        "ReconcilerCallsPaused",
        "ReconcilerTasksFailed",
        "ReconcilerTasksOutOfSync",
        "ReconcilerObservationsStale",
        "ReconcilerThrottled",
        "ReconcilerInvalidDesiredFiles",
        "ReconcilerMassForgetHeld",
    }
    for r in rules:
        assert re.fullmatch(r"\d+[smh]", str(r["for"])), r["alert"]
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert len(r["annotations"]["description"]) > 80, f"{r['alert']}: say what to do"


def test_alert_expressions_use_only_exported_metrics(exported: Exported) -> None:
    found = {r["alert"]: problems(r["expr"], exported) for r in alert_rules()}
    assert {name: p for name, p in found.items() if p} == {}
    dashboard = {t["expr"] for t in dashboard_targets()}
    found = {e: problems(grafana_expr(e), exported) for e in dashboard}
    assert {e: p for e, p in found.items() if p} == {}

    referenced = {
        s.name
        for e in [*dashboard, *(r["expr"] for r in alert_rules())]
        for s in wanted(grafana_expr(e)).selectors
    }
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported}
    unused = sorted(
        f
        for f in families
        if f.startswith("reconciler_")
        and not any(re.fullmatch(rf"{f}(_total|_bucket|_count|_sum)?", r) for r in referenced)
    )
    if unused:
        warnings.warn(f"exported but on no panel or alert: {unused}", stacklevel=1)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_promtool_checks_the_rules_and_their_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [tool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
        for t in case["alert_rule_test"]
        if t.get("exp_alerts")
    }
    assert tested == {r["alert"] for r in alert_rules()}, "each alert is seen firing"


# --- the dashboard --------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in doc["panels"]:
        yield p
        yield from p.get("panels", [])  # inside a collapsed row


def dashboard_targets() -> list[dict[str, Any]]:
    return [t for p in panels(dashboard()) for t in p.get("targets", [])]


def grafana_expr(expr: str) -> str:
    """``expr`` as Grafana sends it: its built-in variables filled in."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def test_the_dashboard_is_well_formed() -> None:
    doc = dashboard()
    assert doc["title"] and doc["uid"] and isinstance(doc["schemaVersion"], int)
    (ds_var,) = [v for v in doc["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": f"${{{ds_var['name']}}}"}
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(doc):
        if p["type"] == "row":
            continue
        where = f"panel {p['id']} {p['title']!r}"
        assert p["title"] and p["type"] in {"timeseries", "stat", "gauge", "table"}, where
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        assert p["datasource"] == datasource, where
        assert p["targets"], where
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in p["targets"]:
            assert t["datasource"] == datasource and t["expr"].strip(), where
            assert "$" not in grafana_expr(t["expr"]), f"{where}: an unknown variable"
    exprs = " ".join(t["expr"] for t in dashboard_targets())
    for needed in (
        "reconciler_tasks",
        "reconciler_calls_total",
        "histogram_quantile(0.99, sum by (le, action) (rate(reconciler_call_latency_seconds_bucket",
        "reconciler_queue_depth",
        "reconciler_in_flight",
        "reconciler_oldest_observation_age_seconds",
        "reconciler_invalid_files",
        "reconciler_throttled_total",
    ):
        assert needed in exprs, f"no panel shows {needed}"
