"""Prometheus metrics, all under ``imageunlock_`` (served by the operator on
``IMAGEUNLOCK_METRICS_ADDRESS``, default ``0.0.0.0:8081``, path ``/metrics``).

Infrastructure, not a layer: adapters and the operator record here; the pure core and the
unlock service do not (the operator derives byte counts from the service's progress reports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

CONDITIONS = ("Ready", "Reconciling", "Stalled")
STATUSES = ("True", "False", "Unknown")

CONDITION = Gauge(
    "imageunlock_status_condition",
    "An ImageUnlock's kstatus condition: 1 for the status it has, 0 for the others.",
    ["namespace", "name", "condition", "status"],
)
UNLOCK_DURATION = Histogram(
    "imageunlock_unlock_duration_seconds",
    "Time of one unlock that loaded an archive (key request, decryption, load, verification).",
    ["runtime"],
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
BYTES_DECRYPTED = Counter(
    "imageunlock_bytes_decrypted_total", "Archive bytes decrypted and streamed into a runtime.", ["runtime"]
)
BYTES_LOADED = Counter(
    "imageunlock_bytes_loaded_total", "Archive bytes of unlocks whose images were loaded and verified.", ["runtime"]
)
FAILURES = Counter("imageunlock_failures_total", "Failed reconciles, by condition reason.", ["reason"])
API_REQUESTS = Counter(
    "imageunlock_resource_api_requests_total",
    "Resource API calls (login, key_fragment), by outcome (ok, rejected, unavailable).",
    ["call", "outcome"],
)
RUNTIME_REACHABLE = Gauge(
    "imageunlock_runtime_reachable", "1 when the container runtime answered its last check, else 0.", ["runtime"]
)


def observe_status(namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
    """Set the condition gauges from an ImageUnlock's status (as seen on the watch stream)."""
    current = {c.get("type"): c.get("status") for c in (status or {}).get("conditions") or [] if isinstance(c, Mapping)}
    for condition in CONDITIONS:
        state = current.get(condition, "Unknown")
        for value in STATUSES:
            CONDITION.labels(namespace, name, condition, value).set(1 if value == state else 0)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted ImageUnlock's series."""
    for condition in CONDITIONS:
        for value in STATUSES:
            with contextlib.suppress(KeyError):
                CONDITION.remove(namespace, name, condition, value)


def serve(address: str, registry: CollectorRegistry = REGISTRY) -> Any:
    """Start the /metrics HTTP server on ``host:port``; returns the server (to shut down)."""
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    return server


# -- The controller's leader election (issue 21, item 4); a block of its own. ---------------
CONTROLLER_LEADER = Gauge(
    "imageunlock_controller_leader",
    "1 while this controller replica holds the leader Lease and writes summaries, else 0 (a standby).",
)
