"""Prometheus metrics, all under ``imageunlock_`` (served by each role on
``IMAGEUNLOCK_METRICS_ADDRESS``, default ``0.0.0.0:8081``, path ``/metrics``): an agent its
node's view (``node`` on its per-node series), the controller the cluster summary
(``imageunlock_nodes_ready``/``_desired``, the summary condition) from a registry of its own.

Infrastructure, not a layer: adapters and the operator record here; the pure core and the
unlock service do not (the operator derives byte counts from the service's progress reports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

CONDITIONS = ("Ready", "Reconciling", "Stalled")
STATUSES = ("True", "False", "Unknown")
API_CALLS = ("login", "key_fragment")
API_OUTCOMES = ("ok", "rejected", "unavailable")

# The agent's series, on the default registry (with the process metrics): its own node's view.
CONDITION = Gauge(
    "imageunlock_status_condition",
    "This node's entry of an ImageUnlock, as a kstatus condition: 1 for the status it has, 0 for the others.",
    ["namespace", "name", "node", "condition", "status"],
)
UNLOCK_DURATION = Histogram(
    "imageunlock_unlock_duration_seconds",
    "Time of one unlock that loaded an archive (key request, decryption, load, verification).",
    ["runtime"],
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
DECRYPTED_BYTES = Counter(
    "imageunlock_decrypted_bytes_total", "Archive bytes decrypted and streamed into a runtime.", ["runtime"]
)
LOADED_BYTES = Counter(
    "imageunlock_loaded_bytes_total", "Archive bytes of unlocks whose images were loaded and verified.", ["runtime"]
)
FAILURES = Counter("imageunlock_failures_total", "Failed reconciles, by condition reason.", ["reason"])
API_REQUESTS = Counter(
    "imageunlock_resource_api_requests_total",
    "Resource API calls (login, key_fragment), by outcome (ok, rejected, unavailable).",
    ["call", "outcome"],
)
RUNTIME_REACHABLE = Gauge(
    "imageunlock_runtime_reachable",
    "1 when this node's container runtime answered its last check, else 0.",
    ["node", "runtime"],
)
for _call in API_CALLS:  # every label set is known: a rate() from the first scrape on
    for _outcome in API_OUTCOMES:
        API_REQUESTS.labels(_call, _outcome)

# The controller's series, on a registry of its own (the process metrics added): the cluster
# summary of every ImageUnlock. The same condition gauge, without ``node``.
CONTROLLER_REGISTRY = CollectorRegistry()
ProcessCollector(registry=CONTROLLER_REGISTRY)
PlatformCollector(registry=CONTROLLER_REGISTRY)
GCCollector(registry=CONTROLLER_REGISTRY)
SUMMARY_CONDITION = Gauge(
    "imageunlock_status_condition",
    "An ImageUnlock's summary kstatus condition: 1 for the status it has, 0 for the others.",
    ["namespace", "name", "condition", "status"],
    registry=CONTROLLER_REGISTRY,
)
NODES_READY = Gauge(
    "imageunlock_nodes_ready",
    "Selected nodes where every image of an ImageUnlock is verified (status.nodesReady).",
    ["namespace", "name"],
    registry=CONTROLLER_REGISTRY,
)
NODES_DESIRED = Gauge(
    "imageunlock_nodes_desired",
    "Nodes an ImageUnlock selects that run an agent (status.nodesDesired).",
    ["namespace", "name"],
    registry=CONTROLLER_REGISTRY,
)
CONTROLLER_LEADER = Gauge(
    "imageunlock_controller_leader",
    "1 while this controller replica holds the leader Lease and writes summaries, else 0 (a standby).",
    registry=CONTROLLER_REGISTRY,
)


def prepare_agent(node: str, runtime: str, reasons: Iterable[str]) -> None:
    """Create the agent's series whose label sets are known at start, at 0."""
    UNLOCK_DURATION.labels(runtime)
    DECRYPTED_BYTES.labels(runtime)
    LOADED_BYTES.labels(runtime)
    for reason in reasons:
        FAILURES.labels(reason)


def observe_node(namespace: str, name: str, node: str, states: Mapping[str, str] | None) -> None:
    """The agent's series of one ImageUnlock from its node's entry (``{condition type:
    status}``, kube.conditions.condition_states): none while the node has no entry (not
    selected, or not reported yet: ``None``)."""
    if states is None:
        forget_node(namespace, name, node)
        return
    _set_conditions(CONDITION, (namespace, name, node), states)


def forget_node(namespace: str, name: str, node: str) -> None:
    _remove_conditions(CONDITION, (namespace, name, node))


def observe_summary(namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
    """The controller's series of one ImageUnlock from its status as stored (the summary)."""
    status = status or {}
    conditions = status.get("conditions") or []
    _set_conditions(
        SUMMARY_CONDITION,
        (namespace, name),
        {str(c.get("type")): str(c.get("status")) for c in conditions if isinstance(c, Mapping)},
    )
    NODES_READY.labels(namespace, name).set(_count(status.get("nodesReady")))
    NODES_DESIRED.labels(namespace, name).set(_count(status.get("nodesDesired")))


def forget_summary(namespace: str, name: str) -> None:
    """Drop a deleted ImageUnlock's series."""
    _remove_conditions(SUMMARY_CONDITION, (namespace, name))
    for gauge in (NODES_READY, NODES_DESIRED):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)


def _set_conditions(gauge: Gauge, labels: tuple[str, ...], states: Mapping[str, str]) -> None:
    """1 for the status each condition has (``Unknown`` if not given), 0 for the others."""
    for condition in CONDITIONS:
        state = states.get(condition, "Unknown")
        for value in STATUSES:
            gauge.labels(*labels, condition, value).set(1 if value == state else 0)


def _remove_conditions(gauge: Gauge, labels: tuple[str, ...]) -> None:
    for condition in CONDITIONS:
        for value in STATUSES:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels, condition, value)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def serve(address: str, registry: CollectorRegistry = REGISTRY) -> Any:
    """Start the /metrics HTTP server on ``host:port``; returns the server (to shut down)."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server
