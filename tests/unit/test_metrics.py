"""Prometheus metrics: an agent's condition gauge is its node's entry (labelled ``node``, no
series without an entry), the controller's registry holds the cluster summary (nodes ready and
desired, the summary condition), deleted objects leave no series, known label sets exist from
the start, names follow Prometheus' conventions, and the endpoint serves the text format."""

from __future__ import annotations

import re
import urllib.request

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from imageunlock import metrics
from imageunlock.errors import reasons

from ..support.net import free_port

READY = {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Stalled", "status": "False"}]}
READY_STATES = {"Ready": "True", "Stalled": "False"}  # a node's entry, as kube.conditions.condition_states


def condition(namespace: str, name: str, type_: str, status: str, node: str = "edge-1") -> float | None:
    labels = {"namespace": namespace, "name": name, "node": node, "condition": type_, "status": status}
    return REGISTRY.get_sample_value("imageunlock_status_condition", labels)


def summary(metric: str, namespace: str, name: str, **labels: str) -> float | None:
    return metrics.CONTROLLER_REGISTRY.get_sample_value(metric, {"namespace": namespace, "name": name, **labels})


def test_the_agents_condition_gauge_is_its_nodes_entry():
    metrics.observe_node("ns", "iu", "edge-1", READY_STATES)
    assert condition("ns", "iu", "Ready", "True") == 1 and condition("ns", "iu", "Ready", "False") == 0
    assert condition("ns", "iu", "Stalled", "False") == 1
    assert condition("ns", "iu", "Reconciling", "Unknown") == 1  # no such condition in the entry
    metrics.observe_node("ns", "iu", "edge-1", {"Ready": "False"})
    assert condition("ns", "iu", "Ready", "True") == 0 and condition("ns", "iu", "Ready", "False") == 1


def test_a_node_without_an_entry_exports_nothing():
    """Defect: an unselected node exported Ready=Unknown 1 for every ImageUnlock."""
    metrics.observe_node("ns", "elsewhere", "edge-1", None)
    assert condition("ns", "elsewhere", "Ready", "Unknown") is None
    metrics.observe_node("ns", "left", "edge-1", READY_STATES)
    metrics.observe_node("ns", "left", "edge-1", None)  # the entry was removed
    assert condition("ns", "left", "Ready", "True") is None


def test_a_deleted_imageunlock_leaves_no_series():
    metrics.observe_node("ns", "gone", "edge-1", READY_STATES)
    metrics.forget_node("ns", "gone", "edge-1")
    assert condition("ns", "gone", "Ready", "True") is None
    metrics.forget_node("ns", "gone", "edge-1")  # twice is fine
    metrics.observe_summary("ns", "gone", {"nodesReady": 1, "nodesDesired": 2, **READY})
    metrics.forget_summary("ns", "gone")
    assert summary("imageunlock_nodes_ready", "ns", "gone") is None
    assert summary("imageunlock_status_condition", "ns", "gone", condition="Ready", status="True") is None
    metrics.forget_summary("ns", "gone")


def test_the_controller_exports_the_summary_on_its_own_registry():
    metrics.observe_summary("ns", "sum", {"nodesReady": 2, "nodesDesired": 3, **READY})
    assert summary("imageunlock_nodes_ready", "ns", "sum") == 2
    assert summary("imageunlock_nodes_desired", "ns", "sum") == 3
    assert summary("imageunlock_status_condition", "ns", "sum", condition="Ready", status="True") == 1
    assert summary("imageunlock_status_condition", "ns", "sum", condition="Stalled", status="True") == 0
    assert REGISTRY.get_sample_value("imageunlock_nodes_ready", {"namespace": "ns", "name": "sum"}) is None
    metrics.observe_summary("ns", "new", None)  # not summed up yet
    assert summary("imageunlock_nodes_desired", "ns", "new") == 0
    assert summary("imageunlock_status_condition", "ns", "new", condition="Ready", status="Unknown") == 1


def test_known_label_sets_exist_at_zero_from_the_start():
    metrics.prepare_agent("edge-1", "containerd", reasons())
    for name in ("imageunlock_decrypted_bytes_total", "imageunlock_loaded_bytes_total"):
        assert REGISTRY.get_sample_value(name, {"runtime": "containerd"}) == 0
    assert REGISTRY.get_sample_value("imageunlock_unlock_duration_seconds_count", {"runtime": "containerd"}) == 0
    for reason in ("AuthenticationFailed", "ArchiveNotFound", "RuntimeUnavailable"):
        assert REGISTRY.get_sample_value("imageunlock_failures_total", {"reason": reason}) == 0
    for call in ("login", "key_fragment"):
        for outcome in ("ok", "rejected", "unavailable"):
            labels = {"call": call, "outcome": outcome}
            assert REGISTRY.get_sample_value("imageunlock_resource_api_requests_total", labels) is not None


def test_names_follow_prometheus_conventions():
    """Base unit last, then _total for counters (imageunlock_decrypted_bytes_total, not
    imageunlock_bytes_decrypted_total)."""
    families = [f for r in (REGISTRY, metrics.CONTROLLER_REGISTRY) for f in r.collect()]
    ours = [f for f in families if f.name.startswith("imageunlock_")]
    assert len({f.name for f in ours}) >= 9
    for family in ours:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert re.fullmatch(r"imageunlock(_[a-z]+)+", name), name
        for unit in ("bytes", "seconds"):
            if unit in name.split("_"):
                assert re.search(rf"_{unit}(_total)?$", name), f"{name}: the unit goes last"
        assert (family.type == "counter") == name.endswith("_total"), name


def test_the_endpoint_serves_the_registry():
    registry = CollectorRegistry()
    Gauge("imageunlock_test_gauge", "a test gauge", registry=registry).set(3)
    port = free_port()
    server = metrics.serve(f"127.0.0.1:{port}", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "imageunlock_test_gauge 3.0" in response.read().decode()
    finally:
        server.shutdown()
