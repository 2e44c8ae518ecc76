"""Prometheus metrics: the condition gauge follows status, deleted objects leave no series,
and the endpoint serves the text format."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from imageunlock import metrics

from ..support.net import free_port


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def condition(namespace: str, name: str, type_: str, status: str) -> float | None:
    return sample(
        "imageunlock_status_condition", {"namespace": namespace, "name": name, "condition": type_, "status": status}
    )


def test_condition_gauge_follows_the_conditions():
    metrics.observe_conditions("ns", "iu", {"Ready": "True", "Stalled": "False"})
    assert condition("ns", "iu", "Ready", "True") == 1 and condition("ns", "iu", "Ready", "False") == 0
    assert condition("ns", "iu", "Stalled", "False") == 1
    assert condition("ns", "iu", "Reconciling", "Unknown") == 1  # no such condition yet
    metrics.observe_conditions("ns", "iu", {"Ready": "False"})
    assert condition("ns", "iu", "Ready", "True") == 0 and condition("ns", "iu", "Ready", "False") == 1


def test_a_deleted_imageunlock_leaves_no_series():
    metrics.observe_conditions("ns", "gone", {})
    assert condition("ns", "gone", "Ready", "Unknown") == 1
    metrics.forget("ns", "gone")
    assert condition("ns", "gone", "Ready", "Unknown") is None
    metrics.forget("ns", "gone")  # twice is fine


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
