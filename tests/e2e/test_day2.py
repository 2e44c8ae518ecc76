"""Day-2 operations on the real operator process and API server (issue 12): metrics, log
lines, one event per failure aggregating its repeats, and the on-demand re-check."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH

from ..support.cluster import NODE, is_ready, is_stalled, spec_for
from ..support.net import free_port
from ..support.operator_process import place
from ..support.resource_api import TEST_EMAIL
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def scrape(address: int | str) -> str:
    address = address if isinstance(address, str) else f"127.0.0.1:{address}"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_show_conditions_and_the_unlock(
    cluster, namespace, secret, start_operator, start_controller, archives, archive_root
):
    """The agent's series name its node; the controller's are the summary (issue 21, item 2)."""
    port = free_port()
    start_operator(IMAGEUNLOCK_METRICS_ADDRESS=f"127.0.0.1:{port}")
    controller = start_controller().env["IMAGEUNLOCK_METRICS_ADDRESS"]
    cluster.create_unlock(
        namespace, "metered", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "metered"), 60, "Ready")
    ready = (
        f'imageunlock_status_condition{{condition="Ready",name="metered",namespace="{namespace}",node="{NODE}",'
        'status="True"} 1.0'
    )
    text = wait_for(
        lambda: next((t for t in [scrape(port)] if ready in t), None), 30, "the Ready condition in /metrics"
    )
    assert re.search(r'^imageunlock_unlock_duration_seconds_count\{runtime="docker"\} 1\.0$', text, re.M)
    assert re.search(r'^imageunlock_loaded_bytes_total\{runtime="docker"\} [1-9]', text, re.M)
    assert 'imageunlock_resource_api_requests_total{call="key_fragment",outcome="ok"} 1.0' in text
    assert f'imageunlock_runtime_reachable{{node="{NODE}",runtime="docker"}} 1.0' in text
    assert "imageunlock_nodes_ready" not in text  # the controller's
    summary = f'{{name="metered",namespace="{namespace}"}}'
    text = wait_for(
        lambda: next((t for t in [scrape(controller)] if f"imageunlock_nodes_ready{summary} 1.0" in t), None),
        30,
        "NODES 1/1 in the controller's /metrics",
    )
    assert f"imageunlock_nodes_desired{summary} 1.0" in text
    assert (
        f'imageunlock_status_condition{{condition="Ready",name="metered",namespace="{namespace}",status="True"}} 1.0'
        in text
    )


def test_each_log_line_once_with_time_and_level(cluster, namespace, secret, start_operator, archives, archive_root):
    """Defect: the CLI's logging.basicConfig handler and kopf's both printed every line."""
    operator = start_operator(IMAGEUNLOCK_LOG_LEVEL="info")
    cluster.create_unlock(
        namespace, "logged", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "logged"), 60, "Ready")
    lines = [line for line in operator.log().splitlines() if "agent on node" in line]
    assert len(lines) == 1, lines
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # ISO-8601 UTC (issue 21)
    assert re.match(rf"^{stamp} INFO imageunlock\.agent\.handlers: agent on node node-1:", lines[0]), lines[0]
    log = operator.log()
    assert not re.search(r"Handler '\w+' succeeded", log)  # kopf's line per watch event
    assert re.search(
        rf"^{stamp} INFO \S+: {namespace}/logged: .* \[{namespace}/logged node=node-1 reason=Unlocked\]$", log, re.M
    )


def test_a_failure_is_logged_at_warning_with_its_object_and_reason(
    cluster, namespace, secret, start_operator, archive_root
):
    """Issue 21: a missing archive or a wrong password was in no log line."""
    operator = start_operator()
    cluster.create_unlock(namespace, "nowhere", spec_for(f"{archive_root}/missing.enc", "1.0.0", secret))
    wait_for(lambda: is_stalled(cluster, namespace, "nowhere"), 60, "Stalled")
    warnings = [line for line in operator.log().splitlines() if " WARNING " in line and "/nowhere" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].endswith(f"[{namespace}/nowhere node=node-1 reason=ArchiveNotFound]"), warnings[0]


def test_json_log_format(cluster, namespace, secret, start_operator):
    operator = start_operator(IMAGEUNLOCK_LOG_FORMAT="json")
    records = [json.loads(line) for line in operator.log().splitlines() if line.startswith("{")]
    assert any("agent on node" in r.get("message", "") for r in records)
    assert all({"timestamp", "severity", "message"} <= set(r) for r in records)


def test_a_failure_is_one_warning_event_and_its_repeats_aggregate(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api
):
    """Defects: kopf posted its own Error/Logging event beside ours, and each retry made a new
    event object. Now one Warning event object per failure, its count growing."""
    resource_api.fail(KEY_FRAGMENT_PATH, 503, times=3)
    start_operator()
    cluster.create_unlock(
        namespace, "flaky", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "flaky"), 90, "Ready after three 503s")
    events = cluster.events(namespace, "flaky")
    warnings = [e for e in events if e.type != "Normal"]
    assert [(e.type, e.reason) for e in warnings] == [("Warning", "ResourceApiUnavailable")], warnings
    assert warnings[0].count == 3
    assert not [e for e in events if e.reason == "Logging"]


def test_bad_credentials_make_exactly_one_event(cluster, namespace, start_operator, archives, archive_root):
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "wrong"}, "stringData": {"email": TEST_EMAIL, "password": "not-it"}}
    )
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(
        namespace, "creds", spec_for(place(archives.openssl_archive, archive_root), archives.version, "wrong")
    )
    wait_for(lambda: is_stalled(cluster, namespace, "creds"), 60, "Stalled")
    # the Warning itself, not any event: the Normal "Unlocking" one can be listed before it
    warnings = wait_for(
        lambda: [(e.type, e.reason) for e in cluster.events(namespace, "creds") if e.type != "Normal"], 10, "a Warning"
    )
    assert warnings == [("Warning", "AuthenticationFailed")]


def test_requested_at_annotation_verifies_now(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(
        namespace, "asked", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "asked"), 60, "Ready")
    clean_docker.docker("rmi", archives.refs[0])  # the hour-long verify interval would not notice
    cluster.kubectl("annotate", "iu", "asked", "-n", namespace, "loader.azaion.com/requested-at=first")
    wait_for(
        lambda: cluster.status(namespace, "asked").get("lastHandledRequestedAt") == "first", 60, "the request handled"
    )
    wait_for(lambda: is_ready(cluster, namespace, "asked"), 60, "Ready again")
    status = cluster.status(namespace, "asked")
    assert status.get("lastVerifiedTime") and resource_api.calls[KEY_FRAGMENT_PATH] == 2
