"""A real Prometheus (Debian's, tests/support/prometheus.py) scrapes two agents and the
controller every second and evaluates the chart's alerting rules, their ``for`` shortened to
a second (issue 21, item 3): the stalled alert fires for a Stalled ImageUnlock and resolves
once it is fixed; the controller's series say 2 of 2 nodes; every dashboard query runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ..support.cluster import NODE, is_ready, is_stalled, spec_for
from ..support.operator_process import place
from ..support.prometheus import DASHBOARD, chart_rules, served
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e
SECOND = "node-alerts-2"
STALLED = "ImageUnlockStalled"


@pytest.fixture
def second_node(cluster, namespace):
    cluster.ensure_node(SECOND)
    yield SECOND
    cluster.delete_node(SECOND)


def test_a_real_prometheus_fires_and_resolves_the_stalled_alert(
    cluster, namespace, secret, start_operator, start_agent, start_controller, second_node, clean_docker, archives,
    archive_root, tmp_path: Path,
):  # fmt: skip
    agents = [start_operator()]
    own_disk = tmp_path / "second-node-disk"  # the second node's own copy of the archive
    own_disk.mkdir()
    agents.append(start_agent(second_node, archive_root, disk=own_disk, IMAGEUNLOCK_DOCKER_HOST=clean_docker.url))
    controller = start_controller()
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(chart_rules({"stalledFor": "1s", "nodesNotReadyFor": "1s"})))
    targets = {
        "agent": [a.env["IMAGEUNLOCK_METRICS_ADDRESS"] for a in agents],
        "controller": [controller.env["IMAGEUNLOCK_METRICS_ADDRESS"]],
    }
    with served(tmp_path / "prometheus", targets, [rules]) as prometheus:
        wait_for(lambda: list(prometheus.up().values()) == [1.0] * 3, 20, f"3 targets up: {prometheus.up()}")
        selector = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE, SECOND]}]}
        right = place(archives.openssl_archive, archive_root)
        place(archives.openssl_archive, own_disk)

        # A mistake: no archive at that path, on either node.
        missing = str(Path(right).with_name("missing.enc"))
        cluster.create_unlock(namespace, "watched", spec_for(missing, archives.version, secret, nodeSelector=selector))
        wait_for(lambda: is_stalled(cluster, namespace, "watched"), 60, "Stalled")
        firing = wait_for(lambda: prometheus.alerts(STALLED), 20, f"{STALLED} firing:\n{prometheus.tail()}")
        assert [(a["labels"]["namespace"], a["labels"]["name"]) for a in firing] == [(namespace, "watched")]
        # 0 of 2: the controller's series, scraped on their own schedule - waited for too
        wait_for(lambda: prometheus.alerts("ImageUnlockNodesNotReady"), 20, "ImageUnlockNodesNotReady (0 of 2)")

        # Fixed: the alert resolves, and the controller's series say 2 of 2.
        cluster.patch_spec(namespace, "watched", {"archivePath": right})
        wait_for(lambda: is_ready(cluster, namespace, "watched"), 90, "Ready after the fix")
        wait_for(lambda: not prometheus.alerts(STALLED, "firing") and not prometheus.alerts(STALLED, "pending"), 20,
                 f"{STALLED} resolved")  # fmt: skip
        summary = f'{{namespace="{namespace}", name="watched"}}'
        wait_for(lambda: _value(prometheus, f"imageunlock_nodes_ready{summary}") == 2, 20, "nodes ready 2")
        assert _value(prometheus, f"imageunlock_nodes_desired{summary}") == 2
        wait_for(lambda: not prometheus.alerts("ImageUnlockNodesNotReady"), 10, "ImageUnlockNodesNotReady resolved")
        # Each agent's own series follows its entry's watch event, then a scrape: waited for.
        ready_query = 'imageunlock_status_condition{condition="Ready", status="True", name="watched"} == 1'

        def ready_series() -> list[str]:
            return sorted(r["metric"].get("node", "summary") for r in prometheus.query(ready_query))

        wait_for(
            lambda: ready_series() == sorted([NODE, SECOND, "summary"]),
            20,
            "Ready series of both nodes and the summary",
        )

        # Every dashboard query is valid PromQL for this Prometheus, over series it has.
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel["targets"]:
                prometheus.query(target["expr"].replace("$__rate_interval", "1m"))  # raises on an error


def _value(prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None
