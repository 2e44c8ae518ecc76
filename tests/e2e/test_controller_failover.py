"""A controller that survives (issue 21, item 4): two controller processes as the Deployment's
two replicas, one Lease. SIGKILL the leader: the standby takes the Lease over and a new
ImageUnlock gets its summary within 15 s, written by the standby; while the leader lives,
the standby writes nothing (the audit log tells the replicas apart by their user agent,
"imageunlock-controller/<pod name>")."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from ..support import audit
from ..support.cluster import CONTROLLER_USER, OPERATOR_NAMESPACE, spec_for
from ..support.operator_process import OperatorProcess
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e

LEASE = "imageunlock-controller"
TAKEOVER = 15.0  # the promise: a new ImageUnlock's summary within 15 s of the leader's death


def summarised(cluster, namespace: str, name: str) -> bool:
    status = cluster.status(namespace, name)
    return status.get("observedGeneration") == 1 and bool(status.get("conditions"))


def holder(cluster) -> str:
    lease = cluster.coordination.read_namespaced_lease(LEASE, OPERATOR_NAMESPACE)
    return str(lease.spec.holder_identity or "")


def leads(proc: OperatorProcess) -> bool:
    """What its liveness answer says (kopf caches probe results for up to 10 s)."""
    return proc.probe().get("leader") is True


def summary_writers(cluster, namespace: str, since: int) -> dict[str, Counter[str]]:
    """{ImageUnlock name: Counter(user agent)} of the controller's status writes in ``namespace``."""
    writers: dict[str, Counter[str]] = {}
    for entry in audit.entries(cluster.audit_log, CONTROLLER_USER, since):
        ref = entry.get("objectRef") or {}
        if entry["verb"] == "patch" and ref.get("subresource") == "status" and ref.get("namespace") == namespace:
            writers.setdefault(ref["name"], Counter())[entry.get("userAgent", "")] += 1
    return writers


def test_sigkill_the_leader_and_the_standby_writes_a_new_summary_within_15s(cluster, namespace, start_controller):
    spec = spec_for("/var/lib/imageunlock/images.enc", "1.0.0", "loader-creds")
    replicas = {name: start_controller(replica=True, POD_NAME=name) for name in ("controller-a", "controller-b")}
    leader = wait_for(lambda: holder(cluster) in replicas and holder(cluster), 30, "one replica holding the Lease")
    (standby,) = set(replicas) - {leader}
    wait_for(lambda: leads(replicas[leader]), 15, f"{leader}'s liveness answer to say it leads")

    mark = audit.end(cluster.audit_log) if cluster.audit_log else 0
    cluster.create_unlock(namespace, "before", spec)
    wait_for(lambda: summarised(cluster, namespace, "before"), 30, "the leader's summary")
    assert not leads(replicas[standby]) and holder(cluster) == leader  # a standby, and healthy (200)

    replicas[leader].stop(signal.SIGKILL)
    killed = time.monotonic()
    killed_at = audit.end(cluster.audit_log) if cluster.audit_log else 0
    cluster.create_unlock(namespace, "after", spec)
    wait_for(lambda: summarised(cluster, namespace, "after"), TAKEOVER, "the standby's summary of a new ImageUnlock")
    print(f"\nfailover: the new ImageUnlock's summary {time.monotonic() - killed:.1f}s after SIGKILL of the leader")

    lease = cluster.coordination.read_namespaced_lease(LEASE, OPERATOR_NAMESPACE).spec
    assert lease.holder_identity == standby and lease.lease_transitions >= 1
    wait_for(lambda: leads(replicas[standby]), 15, f"{standby}'s liveness answer to say it leads")
    if cluster.audit_log is None:
        return  # a cluster given by IMAGEUNLOCK_TEST_KUBECONFIG: no audit log here
    before, after = summary_writers(cluster, namespace, mark), summary_writers(cluster, namespace, killed_at)
    assert set(before["before"]) == {f"imageunlock-controller/{leader}"}, before
    assert set(after["after"]) == {f"imageunlock-controller/{standby}"}, after
