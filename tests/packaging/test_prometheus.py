"""The chart's alerting rules and Grafana dashboard (issue 21, item 3), against Debian's real
``promtool``: the rendered rules pass ``promtool check rules`` and the unit tests of
alerts_test.yml (``promtool test rules``: each alert fires after its ``for`` and resolves), and
every dashboard query names only metrics the operator exports."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from imageunlock import metrics

from ..support.ci import unavailable
from ..support.prometheus import DASHBOARD, PrometheusError, chart_rules, promtool
from .conftest import find, rendered_objects, require

ALERTS_TEST = Path(__file__).with_name("alerts_test.yml")
ALERTS = {
    "ImageUnlockStalled",
    "ImageUnlockNodesNotReady",
    "ImageUnlockResourceApiFailing",
    "ImageUnlockRuntimeUnreachable",
}
# Words of PromQL and label names in grouping clauses: what is left of a query is metric names.
PROMQL = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "vector",
}  # fmt: skip


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """rules.yml (the chart's PrometheusRule at its defaults, as a rules file) next to a copy
    of alerts_test.yml, as promtool resolves rule_files relative to the test file."""
    try:
        promtool("--version")
    except PrometheusError as exc:
        unavailable("promtool", str(exc))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(chart_rules()))
    shutil.copyfile(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    return tmp_path


def test_promtool_checks_the_rendered_rules(rules_dir):
    result = promtool("check", "rules", str(rules_dir / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_fire_and_resolve_every_alert(rules_dir):
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for t in case["alert_rule_test"]
    }
    assert tested == ALERTS == {r["alert"] for group in chart_rules()["groups"] for r in group["rules"]}


def test_rule_values_reach_the_rules():
    rules = {r["alert"]: r for r in chart_rules({"stalledFor": "1s", "severity": "page"})["groups"][0]["rules"]}
    assert rules["ImageUnlockStalled"]["for"] == "1s"
    assert rules["ImageUnlockNodesNotReady"]["for"] == "30m"
    assert {r["labels"]["severity"] for r in rules.values()} == {"page"}


def test_rules_and_dashboard_are_opt_in_and_need_the_metrics():
    helm = require("helm_python")
    assert not find(rendered_objects(), "PrometheusRule") and not find(rendered_objects(), "ConfigMap")
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}, "dashboard": {"enabled": True}}
    }
    objects = rendered_objects(values)
    (rule,) = find(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "kps"
    (dashboard,) = find(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["imageunlock.json"]) == json.loads(DASHBOARD.read_text())
    for part in ("prometheusRule", "dashboard"):  # nothing to alert on or show without metrics
        with pytest.raises(helm.HelmError):
            rendered_objects({"metrics": {"enabled": False, part: {"enabled": True}}})


def exported() -> set[str]:
    """Every series name the agent's and the controller's registries expose."""
    registries = (metrics.REGISTRY, metrics.CONTROLLER_REGISTRY)
    return {
        s.name
        for r in registries
        for family in r.collect()
        for s in family.samples
        if s.name.startswith("imageunlock_")
    }


def metric_names(expr: str) -> set[str]:
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)', " ", expr)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]


def test_every_dashboard_query_names_only_exported_metrics():
    metrics.prepare_agent("edge-1", "docker", ["ArchiveNotFound"])  # histogram and counters: their samples
    metrics.observe_node("ns", "iu", "edge-1", {"conditions": [{"type": "Ready", "status": "True"}]})
    metrics.observe_summary("ns", "iu", {"nodesReady": 1, "nodesDesired": 1})
    metrics.RUNTIME_REACHABLE.labels("edge-1", "docker").set(1)
    names = exported()
    dashboard = json.loads(DASHBOARD.read_text())
    assert len(queries(dashboard)) >= 10
    used = set()
    for expr in queries(dashboard):
        found = metric_names(expr)
        assert found, f"no metric in {expr!r}"
        assert found <= names, f"{expr!r} names {sorted(found - names)}, not exported"
        used |= found
    # Each role's headline series is on it.
    assert {"imageunlock_nodes_ready", "imageunlock_nodes_desired", "imageunlock_status_condition"} <= used
    assert metric_names('sum by (le) (rate(imageunlock_bytes_decrypted_total{x="y"}[5m]))') == {
        "imageunlock_bytes_decrypted_total"
    }  # the old name: not exported, so it would be caught
