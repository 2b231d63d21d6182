"""The dashboard and the alert rules in ops/: promtool checks and unit-tests the rules, the
dashboard is well formed, and every metric they query is one `bentoml serve` exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from features import USER_FEATURES, metrics
from features.spec import EVENT_TS_FIELD
from tests.conftest import ROOT, Service

OPS = ROOT / "ops"
DASHBOARD = OPS / "grafana-dashboard.json"
RULES = OPS / "alerts.yml"
RULE_TESTS = OPS / "alerts.test.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Metric names in a PromQL expression: the identifiers left once string literals, label
# matchers, [ranges] and the label lists of by/without/on/ignoring/group_* are cut out,
# less function names (followed by "(") and keywords. Enough for the expressions in ops/,
# not a PromQL parser. A `_bucket`, `_sum`, `_count` or `_total` name is compared with the
# scrape's series of that name, so each is checked against its family as exported.
_CUT = re.compile(
    r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]'
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_NAME = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "group_left", "group_right"})
# A Grafana query variable: label_values(metric, label).
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*\w+\s*\)")
# Bucket bounds the expressions select, e.g. features_retrieval_seconds_bucket{le="0.015"}.
_LE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*_bucket)\{[^}]*\ble="([^"]+)"')

# A labelled counter has no series before its first increment. The test service cannot be
# driven to this one: its feature deadline is 1 s (tests/conftest.py) and every Redis
# timeout is shorter. It is checked against the family the service's code declares.
# Nor this one: the test service runs without a served-feature log; the service test that
# turns it on reads its series (tests/test_served_log_service.py).
DECLARED_ONLY = {
    "features_deadline_exceeded_total": metrics.DEADLINE_EXCEEDED,
    "features_served_log_records_total": metrics.SERVED_LOG_RECORDS,
}


def promtool(*args: str) -> str:
    """Run promtool (PROMTOOL, else the copy `make test` extracts, else PATH); its output."""
    candidates = (
        os.environ.get("PROMTOOL"),
        ROOT / ".tools" / "promtool",
        shutil.which("promtool"),
    )
    found = [str(c) for c in candidates if c and os.access(c, os.X_OK)]
    if not found:
        raise FileNotFoundError(
            "no promtool: `make test` extracts it from Debian's prometheus package, "
            "or set PROMTOOL=/path/to/promtool"
        )
    result = subprocess.run(
        [found[0], *args], check=False, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def expressions() -> Iterator[str]:
    """Every query in the dashboard (targets and variables) and in the rules."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]
    for rule in rules():
        yield rule["expr"]


def metric_names(expr: str) -> set[str]:
    variable = _LABEL_VALUES.fullmatch(expr.strip())
    if variable is not None:
        return {variable[1]}
    return set(_NAME.findall(_CUT.sub(" ", expr))) - _KEYWORDS


def test_the_name_pattern_finds_metrics_only() -> None:
    expr = (
        'sum by (job, reason) (rate(a_total{reason="x", job=~"$job"}[5m])) / ignoring (reason)'
        " group_left histogram_quantile(0.99, sum(rate(b_bucket[$__rate_interval])) by (le))"
        " > 14.4 * 0.01 and job:c:ratio_rate5m offset 5m"
    )
    assert metric_names(expr) == {"a_total", "b_bucket", "job:c:ratio_rate5m"}
    assert metric_names("label_values(d_count, job)") == {"d_count"}


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES))


def test_the_alerts_fire_on_synthetic_series_and_stay_quiet_otherwise() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))


def test_each_alert_says_how_long_how_bad_and_what_to_check() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 9
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        assert re.search(r"(docs|serving)/\S+", alert["annotations"]["description"]), alert["alert"]


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 41  # Grafana 12 and later
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"], panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["datasource"] == DATASOURCE, panel["title"]
    # No data source named by uid anywhere: every reference is the variable.
    assert set(re.findall(r'"uid": "([^"]*)"', json.dumps(dashboard["panels"]))) == {
        "${datasource}"
    }


def predict(client: httpx.Client, user: str) -> httpx.Response:
    return client.post("/predict", json={"user_id": user, "merchant_id": "ops", "amount": 1})


@pytest.fixture
def exported(service: Service, sync_redis: redis.Redis) -> dict[str, list[dict[str, str]]]:
    """The series of the service's /metrics, by name, once it has served a cache miss, a hit,
    defaults, a stale value, a failed Redis read and a client error."""
    stale = "ops-stale"
    old_ts = time.time() - 2 * USER_FEATURES.freshness_s
    row = {f.name: f.default for f in USER_FEATURES.features} | {EVENT_TS_FIELD: old_ts}
    sync_redis.hset(USER_FEATURES.key(stale), mapping=row)  # type: ignore[arg-type]
    sync_redis.expire(USER_FEATURES.key(stale), USER_FEATURES.ttl_s)
    with httpx.Client(base_url=service.url, timeout=10) as client:
        for user in ("ops-unknown", "ops-unknown", stale):  # missing defaults, a hit, stale
            assert predict(client, user).status_code == 200
        # Replies held for longer than the service's 50 ms socket timeout: a failed read.
        sync_redis.client_pause(300)
        assert predict(client, "ops-paused").status_code == 200
        assert predict(client, "not:an:id").status_code == 400
        text = client.get("/metrics").text
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample.labels)
    return series


@pytest.mark.e2e
def test_every_metric_queried_is_exported(exported: dict[str, list[dict[str, str]]]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = {name for expr in expressions() for name in metric_names(expr)}
    assert {name for name in used if ":" in name} <= recorded
    declared = {
        name
        for name, collector in DECLARED_ONLY.items()
        if any(f"{family.name}_total" == name for family in collector.describe())
    }
    missing = {name for name in used if ":" not in name} - exported.keys() - declared
    assert not missing, f"not exported by the service: {sorted(missing)}"
    assert "features_breaker_state" in used and "pid" in exported["features_breaker_state"][0]
    for name, bound in {m for expr in expressions() for m in _LE.findall(expr)}:
        assert bound in {labels["le"] for labels in exported[name]}, (name, bound)
    endpoints = {s["endpoint"] for s in exported["bentoml_service_request_duration_seconds_bucket"]}
    assert "/predict" in endpoints
