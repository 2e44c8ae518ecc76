"""Least privilege from facts: every request an agent or the controller made, per the API
server's audit log, is allowed by the RBAC rules in manifests/ for its own ServiceAccount
(evaluated here in Python); rules never used are reported.

All e2e tests run agents and the controller under their ServiceAccount identities with the
plane enforcing manifests/rbac.yaml, cluster-wide as deployed, so by the time this module
runs the audit log holds the whole suite's traffic; this module adds a lifecycle of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from ..support import audit
from ..support.audit import Request
from ..support.cluster import AGENT_USER, CONTROLLER_USER, RBAC_FILE, is_ready, is_stalled, spec_for
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def manifest_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def bound_rules(docs: list[dict], user: str) -> list[dict]:
    """Rules of every (Cluster)Role bound to ``user`` (a ServiceAccount)."""
    _, _, namespace, name = user.split(":")
    roles = {
        (d["kind"], d["metadata"]["name"]): d.get("rules", []) for d in docs if d["kind"] in ("ClusterRole", "Role")
    }
    rules = []
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if any(
            s["kind"] == "ServiceAccount" and s["name"] == name and s.get("namespace") == namespace
            for s in binding.get("subjects", [])
        ):
            rules += roles.get((binding["roleRef"]["kind"], binding["roleRef"]["name"]), [])
    return rules


def allows(rule: dict, request: Request) -> bool:
    def has(values: list[str], value: str) -> bool:
        return "*" in values or value in values

    return (
        has(rule.get("apiGroups", []), request.group)
        and has(rule.get("resources", []), request.resource)
        and has(rule.get("verbs", []), request.verb)
    )


def test_cluster_wide_run_then_every_request_is_allowed_by_the_manifests(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker
):
    if cluster.audit_log is None:
        pytest.skip("a cluster given by IMAGEUNLOCK_TEST_KUBECONFIG has no audit log here")
    start_operator()  # cluster-wide, as the Deployment runs it
    path = place(archives.own_archive, archive_root)
    key = f"unlock.loader.azaion.com/{namespace}"  # the controller's one Node write: the readiness label
    cluster.create_unlock(namespace, "audited", spec_for(path, archives.version, secret, readinessLabel=key))
    cluster.create_unlock(namespace, "nosecret", spec_for(path, archives.version, "missing", images=["azaion/none"]))
    wait_for(lambda: is_ready(cluster, namespace, "audited"), 60, "Ready")
    wait_for(lambda: is_stalled(cluster, namespace, "nosecret"), 60, "Stalled")
    cluster.patch_spec(namespace, "audited", {"images": archives.names[:3]})
    wait_for(lambda: cluster.status(namespace, "audited").get("observedGeneration") == 2, 60, "generation 2")

    needed = {
        AGENT_USER: [
            Request("patch", "loader.azaion.com", "imageunlocks/status", True),
            Request("get", "", "secrets", True),
            # each named Secret, field-selected and metadata-only, so a fixed one re-checks at once
            Request("list", "", "secrets", True),
            Request("watch", "", "secrets", True),
            Request("create", "", "events", True),
            Request("get", "", "nodes", False),
            Request("list", "", "nodes", False),  # its own Node, field-selected, then watched
            Request("watch", "", "nodes", False),
            Request("watch", "loader.azaion.com", "imageunlocks", False),
        ],
        CONTROLLER_USER: [
            Request("patch", "loader.azaion.com", "imageunlocks/status", True),
            Request("list", "", "nodes", False),
            Request("watch", "", "nodes", False),
            Request("patch", "", "nodes", False),  # spec.readinessLabel
            Request("watch", "loader.azaion.com", "imageunlocks", False),
            # leader election: the Lease, read and renewed (created by the session's first)
            Request("get", "coordination.k8s.io", "leases", True),
            Request("update", "coordination.k8s.io", "leases", True),
        ],
    }
    for user, load_bearing in needed.items():
        check_identity(cluster.audit_log, user, load_bearing)


def check_identity(audit_log: Path, user: str, load_bearing: list[Request]) -> None:
    events = audit.entries(audit_log, user)
    made, refused = audit.requests(events), audit.refused(events)
    rules = bound_rules(manifest_docs(RBAC_FILE), user)
    assert rules, f"manifests/rbac.yaml binds no rules to {user}"
    assert made, f"the audit log holds no request of {user}"
    denied = [r for r in made if not any(allows(rule, r) for rule in rules)]
    assert denied == [] and refused == [], f"{user}: not allowed by manifests/rbac.yaml: {denied or refused[:3]}"

    used = {
        (tuple(rule["apiGroups"]), tuple(rule["resources"]), verb)
        for rule in rules
        for verb in rule["verbs"]
        for r in made
        if allows({**rule, "verbs": [verb]}, r)
    }
    unused = [
        (rule["apiGroups"], rule["resources"], verb)
        for rule in rules
        for verb in rule["verbs"]
        if (tuple(rule["apiGroups"]), tuple(rule["resources"]), verb) not in used
    ]
    print(f"\nRBAC: requests {user} made (from the audit log):")
    for request, count in sorted(made.items(), key=lambda kv: (kv[0].group, kv[0].resource, kv[0].verb)):
        print(f"  {count:6d}  {request.verb:6s} {request.group or 'core'}/{request.resource}")
    print("RBAC: granted but never used:", unused or "none")
    # The load-bearing grants must all have been exercised by the suite.
    for request in load_bearing:
        assert request in made, f"the suite never exercised {request} as {user}"


def test_an_idle_agent_makes_no_request_but_its_open_watches(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker
):
    """Issue 22, item 1: the agent read its Node every 10 s (24 GETs in 2 minutes for two
    agents); it now follows it with a watch. Over an idle window longer than that period it
    makes no request at all: a watch still open is no new request."""
    if cluster.audit_log is None:
        pytest.skip("a cluster given by IMAGEUNLOCK_TEST_KUBECONFIG has no audit log here")
    start_operator()
    cluster.create_unlock(
        namespace, "idle", spec_for(place(archives.own_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "idle"), 60, "Ready")
    time.sleep(3)  # the Ready write's echoes settle
    mark = audit.end(cluster.audit_log)
    time.sleep(12)  # an idle window longer than the old 10 s Node re-read
    made = audit.requests(audit.entries(cluster.audit_log, AGENT_USER, since=mark))
    assert {r: n for r, n in made.items() if r.verb != "watch"} == {}, made
