"""manifests/ and the rendered chart against Kubernetes' schemas (kubernetes-validate, strict:
unknown fields are errors; the chart's ServiceMonitor, a Prometheus Operator CRD kind that
kubernetes-validate has no schema for, against the subset of monitoring.coreos.com/v1 it
uses), the samples against the CRD, the security and RBAC promises of the two roles (the
agent DaemonSet: non-root, its node's name from the downward API, hostPath only where it
must; the controller Deployment: Pod Security "restricted", told where the agents run;
least-privilege rules per role, Secrets readable by the agents per namespace by default,
cluster-wide only by the opt-in in manifests/cluster-wide-secrets/), and, for the kinds the
local control plane serves (Namespace, Secret, CRD, ImageUnlock), a server-side dry run; the
plane also enforces manifests/rbac.yaml on both ServiceAccounts.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imageunlock.engine.runtimes import DEFAULT_STATE_DIR

from ..support.ci import unavailable
from .conftest import (
    AGENT_SA,
    CHART,
    CLUSTER_WIDE_SECRETS,
    CONTROLLER_SA,
    CONTROLLER_USER,
    CRD_FILE,
    DEFAULT_SCRAPERS,
    MANIFESTS,
    METRICS_ALL,
    METRICS_OFF,
    NON_DEFAULT_VALUES,
    OPERATOR_NAMESPACE,
    PER_ROLE,
    REPO,
    SECRETS_ROLE,
    admitted,
    cluster_wide_objects,
    env_of,
    find,
    isolating_policies,
    load_docs,
    manifest_objects,
    pod_of,
    rendered_objects,
    require,
    restricted_violations,
    sample_objects,
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
K8S_VERSIONS = ["1.25", "latest"]
CUSTOM_KINDS = {"ImageUnlock", "PrometheusRule"}  # the rules: promtool checks them (test_prometheus.py)
# monitoring.coreos.com/v1 Duration (prometheus-operator's kubebuilder pattern), non-empty.
PROMETHEUS_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
# The part of the ServiceMonitor CRD (prometheus-operator) the chart renders, checked as
# strictly as kubernetes-validate checks built-in kinds: required fields, types, and no
# field outside that subset (a typo or a misplaced key fails here rather than at install).
# Not the whole CRD: the Prometheus Operator is not a dependency of this repository.
SERVICE_MONITOR_SHAPE: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string", "minLength": 1},
                "labels": _STRINGS,
                "annotations": _STRINGS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {"matchLabels": {**_STRINGS, "minProperties": 1}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},  # a Service port *name*
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": PROMETHEUS_DURATION, "minLength": 1},
                        },
                    },
                },
            },
        },
    },
}
AGENT_SUBJECT = {"kind": "ServiceAccount", "name": AGENT_SA, "namespace": OPERATOR_NAMESPACE}
CONTROLLER_SUBJECT = {"kind": "ServiceAccount", "name": CONTROLLER_SA, "namespace": OPERATOR_NAMESPACE}


def _label(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _validate(objects: list[dict[str, Any]], version: str) -> None:
    kv = require("kubernetes_validate")
    if version == "latest":
        version = kv.utils.latest_version()
    errors = []
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        if obj["kind"] == "ServiceMonitor":
            jsonschema = require("jsonschema")
            try:
                jsonschema.validate(obj, SERVICE_MONITOR_SHAPE)
            except jsonschema.ValidationError as exc:
                errors.append(f"{_label(obj)}: {'.'.join(map(str, exc.path))}: {exc.message}")
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{_label(obj)}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{_label(obj)}: {exc.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate(version):
    crd = load_docs(CRD_FILE.read_text())
    _validate(manifest_objects() + cluster_wide_objects() + sample_objects() + crd, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}, METRICS_ALL, METRICS_OFF, PER_ROLE],
    ids=["default", "non-default", "cluster-wide-secrets", "metrics-all", "metrics-off", "per-role"],
)
def test_rendered_chart_validates(values, version):
    objects = rendered_objects(values)
    expected = (
        {"Service", "ServiceMonitor", "NetworkPolicy", "PrometheusRule", "ConfigMap"}
        if values is METRICS_ALL
        else set()
    )
    assert expected <= {o["kind"] for o in objects}
    _validate(objects, version)


@pytest.mark.parametrize(
    "bad",
    [
        {"interval": "30 seconds"},
        {"port": 8081},  # a number: ServiceMonitor endpoints name the Service port
        {"targetPort": "metrics"},  # outside the checked subset
    ],
    ids=["interval", "port-number", "unknown-field"],
)
def test_service_monitor_shape_rejects(bad):
    """The ServiceMonitor check is not a formality: a broken endpoint fails it."""
    (monitor,) = find(rendered_objects(METRICS_ALL), "ServiceMonitor", "imageunlock-agent")
    monitor["spec"]["endpoints"][0].update(bad)
    with pytest.raises(AssertionError, match=r"ServiceMonitor/imageunlock-agent: spec\.endpoints\.0"):
        _validate([monitor], "latest")


@pytest.mark.parametrize("directory", [MANIFESTS, CLUSTER_WIDE_SECRETS], ids=["manifests", "cluster-wide-secrets"])
def test_kustomization_lists_every_installation_file(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    on_disk = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == on_disk


def _secrets_bindings(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        kind: [b for b in find(objects, kind) if b["roleRef"]["name"] == SECRETS_ROLE]
        for kind in ("ClusterRoleBinding", "RoleBinding")
    }


def test_manifests_bind_secrets_per_namespace():
    """The installation reads Secrets only where a RoleBinding allows it: the README's sample
    namespace; no ClusterRoleBinding of the Secrets role (that is the opt-in)."""
    objects = manifest_objects()
    secrets = _secrets_bindings(objects)
    assert secrets["ClusterRoleBinding"] == [], "Secret reading must not be bound cluster-wide by default"
    (binding,) = secrets["RoleBinding"]
    (readme_namespace,) = set(
        re.findall(r"kubectl apply -n (\S+) -f manifests/samples/", (REPO / "README.md").read_text())
    )
    assert binding["metadata"]["namespace"] == readme_namespace == "edge"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SECRETS_ROLE}
    assert binding["subjects"] == [AGENT_SUBJECT]
    assert [b["metadata"]["name"] for b in find(objects, "RoleBinding") if b not in secrets["RoleBinding"]] == [
        "imageunlock-controller-leader-election"  # the controller's Lease (rbac.yaml)
    ]
    # Each role's own ClusterRole (ImageUnlocks, status, Nodes, CRDs; Events for the agents)
    # stays cluster-wide: kopf watches ImageUnlocks in every namespace.
    assert sorted(
        (b["metadata"]["name"], b["roleRef"]["name"], b["subjects"][0]["name"])
        for b in find(objects, "ClusterRoleBinding")
    ) == [
        ("imageunlock-agent", "imageunlock-agent", AGENT_SA),
        ("imageunlock-controller", "imageunlock-controller", CONTROLLER_SA),
    ]
    # The RoleBinding says how to extend it (per namespace) and where the opt-in is.
    text = (MANIFESTS / "rbac.yaml").read_text()
    comment = text[: text.index("kind: RoleBinding")].rsplit("---", 1)[1]
    assert "Copy this RoleBinding" in comment and "cluster-wide-secrets/" in comment


def test_cluster_wide_secrets_is_a_documented_opt_in():
    """manifests/cluster-wide-secrets/ holds the cluster-wide binding, and only that; it is not
    part of the default installation."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert not any("cluster-wide" in r for r in kustomization["resources"] + kustomization.get("components", []))
    objects = cluster_wide_objects()
    (binding,) = objects
    assert binding["kind"] == "ClusterRoleBinding"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SECRETS_ROLE}
    assert binding["subjects"] == [AGENT_SUBJECT]  # the agents read Secrets, never the controller
    (role,) = find(manifest_objects(), "ClusterRole", SECRETS_ROLE)  # binds the installed role
    # list and watch: the metadata-only, name-selected Secret watch (issue 21; SECURITY.md)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    for path in sorted(CLUSTER_WIDE_SECRETS.glob("*.yaml")):
        header = path.read_text().split("apiVersion:", 1)[0]
        assert "OPT-IN" in header and "kubectl apply -k manifests/cluster-wide-secrets/" in header, path


def _kustomize(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    res = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return load_docs(res.stdout)


def _keys(objects: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects)


def test_kustomize_builds_the_installation_and_the_opt_in(tmp_path):
    """`kubectl apply -k` works on manifests/, on the opt-in alone and on an overlay of both."""
    try:
        kubectl = importlib.import_module("controlplane").kubectl_path()
    except Exception as exc:
        unavailable("kubectl", str(exc))
    assert _keys(_kustomize(kubectl, MANIFESTS)) == _keys(manifest_objects())
    assert _keys(_kustomize(kubectl, CLUSTER_WIDE_SECRETS)) == _keys(cluster_wide_objects())
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(d, tmp_path) for d in (MANIFESTS, CLUSTER_WIDE_SECRETS)],
            }
        )
    )
    both = _kustomize(kubectl, tmp_path)
    assert _keys(both) == _keys(manifest_objects() + cluster_wide_objects())
    assert len(_secrets_bindings(both)["ClusterRoleBinding"]) == 1


def test_sample_imageunlock_matches_the_crd_schema():
    jsonschema = require("jsonschema")
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    samples = sample_objects()
    (unlock,) = find(samples, "ImageUnlock")
    (secret,) = find(samples, "Secret")
    jsonschema.validate(unlock, schema)
    assert unlock["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert unlock["spec"]["resourceApi"]["credentialsSecretRef"]["name"] == secret["metadata"]["name"]
    assert sorted(secret["stringData"]) == ["email", "password"]
    # Applied with -n: no namespace pinned in the samples.
    assert all("namespace" not in o["metadata"] for o in samples)
    # The sample archive lies under the agents' default archive root.
    (daemonset,) = find(manifest_objects(), "DaemonSet")
    env = env_of(pod_of(daemonset)["containers"][0])
    assert unlock["spec"]["archivePath"].startswith(env["IMAGEUNLOCK_ARCHIVE_ROOT"] + "/")


def _workloads() -> tuple[dict[str, Any], dict[str, Any]]:
    objects = manifest_objects()
    (daemonset,) = find(objects, "DaemonSet")
    (deployment,) = find(objects, "Deployment")
    return daemonset, deployment


def _common_promises(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """What both roles promise: non-root, no capabilities, no escalation, read-only root,
    /tmp an emptyDir, kopf's /healthz as liveness and readiness probes."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc.get("privileged") is not True
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes["tmp"] and mounts["tmp"]["mountPath"] == "/tmp"
    assert pod["terminationGracePeriodSeconds"] == 60
    env = env_of(container)
    assert env["IMAGEUNLOCK_LIVENESS"] == "http://0.0.0.0:8080/healthz"


def test_daemonset_keeps_its_promises():
    daemonset, _ = _workloads()
    spec = daemonset["spec"]
    pod = pod_of(daemonset)
    (container,) = pod["containers"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert container["args"] == ["agent"]
    _common_promises(pod, container)
    assert pod["securityContext"]["supplementalGroups"] == [0], "containerd's socket group"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["archives"]["hostPath"] == {"path": "/var/lib/imageunlock", "type": "DirectoryOrCreate"}
    assert mounts["archives"] == {"name": "archives", "mountPath": "/var/lib/imageunlock", "readOnly": True}
    # containerd's socket itself (issue 18), not its directory, at the path the agent dials.
    socket = "/run/containerd/containerd.sock"
    assert volumes["containerd"]["hostPath"] == {"path": socket, "type": "Socket"}
    assert mounts["containerd"] == {"name": "containerd", "mountPath": socket, "readOnly": True}
    assert set(volumes) == set(mounts) == {"archives", "containerd", "tmp", "locks", "state"}  # no Docker socket
    assert volumes["locks"]["hostPath"] == {"path": "/run/imageunlock", "type": "DirectoryOrCreate"}
    assert mounts["locks"]["mountPath"] == env_of(container)["IMAGEUNLOCK_LOCK_DIR"] == "/run/imageunlock"
    # issue 20: ownership records and reclaim policies survive a restart of the agent
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/imageunlock-state", "type": "DirectoryOrCreate"}
    assert mounts["state"]["mountPath"] == env_of(container)["IMAGEUNLOCK_STATE_DIR"] == "/var/lib/imageunlock-state"
    # the agent's own default is the same, never the archive directory (whoever writes the state
    # dir decides which images the agent takes for its own)
    assert DEFAULT_STATE_DIR == "/var/lib/imageunlock-state" != volumes["archives"]["hostPath"]["path"]
    assert pod["serviceAccountName"] == AGENT_SA
    env = env_of(container)
    assert env["IMAGEUNLOCK_RUNTIME"] == "auto"
    assert env["IMAGEUNLOCK_CONTAINERD_ADDRESS"] == mounts["containerd"]["mountPath"] == socket
    assert env["IMAGEUNLOCK_CONTAINERD_NAMESPACE"] == "k8s.io"
    assert "IMAGEUNLOCK_DOCKER_HOST" not in env
    assert env["IMAGEUNLOCK_METRICS_ADDRESS"] == "0.0.0.0:8081"
    # Agents run on control-plane nodes too (a single-node cluster), on every node otherwise.
    assert pod["nodeSelector"] == {}
    assert pod["tolerations"] == [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # The Docker Engine lines are there to uncomment, with their instructions.
    text = (MANIFESTS / "daemonset.yaml").read_text()
    for line in ("# - name: docker-socket", "#     type: Socket", "#   value: unix:///var/run/docker.sock"):
        assert line in text, line
    assert "stat -c %g /var/run/docker.sock" in text and "/run/k3s/containerd/containerd.sock" in text
    assert "rollout restart" in text  # what a containerd restart asks of a socket mount
    assert {
        o["metadata"].get("namespace")
        for o in manifest_objects()
        if o["kind"] in ("DaemonSet", "Deployment", "ServiceAccount", "Service")
    } == {OPERATOR_NAMESPACE}


def test_daemonset_tells_each_agent_its_node():
    """NODE_NAME comes from the downward API: the node the pod was scheduled to."""
    daemonset, _ = _workloads()
    (container,) = pod_of(daemonset)["containers"]
    (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node_name == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    config = pytest.importorskip("imageunlock.app.config")
    agent = config.AgentConfig.from_env(env_of(container, node="edge-1"))
    assert (agent.node_name, agent.runtime, agent.archive_roots) == ("edge-1", "auto", ("/var/lib/imageunlock",))


def test_agent_falls_short_of_restricted_only_by_its_host_paths():
    daemonset, _ = _workloads()
    assert restricted_violations(pod_of(daemonset)) == [
        "volume archives: hostPath",
        "volume containerd: hostPath",
        "volume locks: hostPath",
        "volume state: hostPath",
    ]


def test_controller_keeps_its_promises():
    _, deployment = _workloads()
    spec = deployment["spec"]
    pod = pod_of(deployment)
    (container,) = pod["containers"]
    # Two replicas, one writing (the Lease); a rollout starts the new pod before it stops one.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert container["args"] == ["controller"]
    assert container["image"] == pod_of(_workloads()[0])["containers"][0]["image"]
    _common_promises(pod, container)
    assert pod["serviceAccountName"] == CONTROLLER_SA
    assert [p["name"] for p in container["ports"]] == ["health", "metrics"]
    env = env_of(container, pod="imageunlock-controller-abc12")
    config = pytest.importorskip("imageunlock.app.config")
    controller = config.ControllerConfig.from_env(env)
    assert controller.metrics_address == "0.0.0.0:8081"  # the cluster summary (issue 21)
    assert controller.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert (controller.leader_election, controller.lease_namespace) == (True, OPERATOR_NAMESPACE)
    assert env["POD_NAME"] == "imageunlock-controller-abc12"  # the Lease's holderIdentity


def test_controller_pod_meets_pod_security_restricted():
    """No hostPath (no volume but its /tmp emptyDir), non-root, drop ALL, RuntimeDefault
    seccomp, no privilege escalation: it would be admitted by an enforcing "restricted"."""
    _, deployment = _workloads()
    pod = pod_of(deployment)
    assert restricted_violations(pod) == []
    assert [set(v) - {"name"} for v in pod["volumes"]] == [{"emptyDir"}]
    assert "supplementalGroups" not in pod["securityContext"]  # no runtime socket, no socket group


def test_controller_knows_where_the_agents_run():
    """IMAGEUNLOCK_AGENT_NODE_SELECTOR/_TOLERATIONS are the DaemonSet's own placement."""
    daemonset, deployment = _workloads()
    agent_pod = pod_of(daemonset)
    env = env_of(pod_of(deployment)["containers"][0], pod="imageunlock-controller-abc12")
    assert json.loads(env["IMAGEUNLOCK_AGENT_NODE_SELECTOR"]) == agent_pod.get("nodeSelector", {})
    assert json.loads(env["IMAGEUNLOCK_AGENT_TOLERATIONS"]) == agent_pod.get("tolerations", [])
    config = pytest.importorskip("imageunlock.app.config")
    controller = config.ControllerConfig.from_env(env)
    assert controller.agent_node_selector == agent_pod["nodeSelector"]
    assert list(controller.agent_tolerations) == agent_pod["tolerations"]


def test_namespace_admits_the_agents_and_audits_restricted():
    (namespace,) = find(manifest_objects(), "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    header = (MANIFESTS / "namespace.yaml").read_text().split("\napiVersion:", 1)[0]
    assert "hostPath" in header and "restricted" in header


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_metrics_service_reaches_the_metrics_port_and_warns(role):
    """manifests/service.yaml has one Service per role, each selecting that role's pods (not
    the other's) on the container port named "metrics", ClusterIP only, and its header says
    the endpoints are open and how to close them."""
    objects = manifest_objects()
    daemonset, deployment = _workloads() if role == "agent" else reversed(_workloads())
    (service,) = find(objects, "Service", f"imageunlock-{role}-metrics")
    assert len(find(objects, "Service")) == 2
    pod = daemonset["spec"]["template"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == role
    (port,) = service["spec"]["ports"]
    (container,) = pod["spec"]["containers"]
    (metrics,) = [p for p in container["ports"] if p["name"] == port["targetPort"] == "metrics"]
    assert metrics["containerPort"] == port["port"]
    header = (MANIFESTS / "service.yaml").read_text().split("\napiVersion:", 1)[0]
    assert "unauthenticated" in header and "kind: NetworkPolicy" in header
    assert "one per role" in header


def test_network_policies_isolate_both_roles():
    """Issue 18: the installation isolates the operator's pods for ingress
    (networkpolicy.yaml, in the kustomization): the agent pods admit only their "metrics"
    port, from every pod of the "monitoring" namespace, and not their "health" port (the
    kubelet's probes come from the node, always allowed); the controller pod the same (its
    /metrics, issue 21)."""
    objects = manifest_objects()
    policies = isolating_policies(objects)
    assert sorted(policies) == ["agent", "controller"]
    assert admitted(policies["agent"]) == [("metrics", DEFAULT_SCRAPERS)]
    assert admitted(policies["controller"]) == [("metrics", DEFAULT_SCRAPERS)]
    daemonset, _ = _workloads()
    (container,) = pod_of(daemonset)["containers"]
    assert {p["name"] for p in container["ports"]} == {"health", "metrics"}  # the named port exists
    header = (MANIFESTS / "networkpolicy.yaml").read_text().split("\napiVersion:", 1)[0]
    assert "monitoring" in header and "kubelet" in header


RULE_START = re.compile(r"^(\s*)- apiGroups:")


def _rule_comments(text: str) -> list[tuple[str, list[str]]]:
    """(rule's text: its apiGroups, resources and verbs lines; its comment lines) for every
    rule under a `rules:` key."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if RULE_START.match(line):
            comments = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                comments.insert(0, lines[j].strip())
                j -= 1
            found.append((" ".join(x.strip() for x in lines[i : i + 3]), comments))
    return found


JUSTIFIED = 40  # characters of comment a rule needs at least
# A short comment may refer to the same grant's justification in the other role ("as for
# the agent"): allowed only when that rule is the same grant and is justified in full.
REFERS_BACK = re.compile(r"\bas for the (agents?|controller)\b")


@pytest.mark.parametrize(
    "path", [MANIFESTS / "rbac.yaml", CHART / "templates" / "rbac.yaml"], ids=["manifests", "chart"]
)
def test_every_rbac_rule_is_justified(path: Path):
    rules = _rule_comments(path.read_text())
    parsed = sum(len(o["rules"]) for o in manifest_objects() if o["kind"] in ("ClusterRole", "Role"))
    assert len(rules) == parsed, "every rule must start with '- apiGroups:'"
    length = {rule: max(sum(len(c) for c in comments) for r, comments in rules if r == rule) for rule, _ in rules}
    for rule, comments in rules:
        assert comments, f"rule without a justifying comment: {rule}"
        if sum(len(c) for c in comments) > JUSTIFIED:
            continue
        assert REFERS_BACK.search(" ".join(comments)), f"rule without a justifying comment: {rule}"
        assert length[rule] > JUSTIFIED, f"rule refers to a justification that is not there: {rule}"


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


CRDS_READ = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
IMAGEUNLOCKS_READ = {("loader.azaion.com", "imageunlocks", "list"), ("loader.azaion.com", "imageunlocks", "watch")}
STATUS_PATCH = {("loader.azaion.com", "imageunlocks/status", "patch")}


def test_rbac_is_least_privilege():
    """Exactly these grants, per role: nobody patches ImageUnlocks themselves (no kopf state,
    no finalizers), only the controller writes Nodes (patch, for the readiness label), only
    the agents post Events and read Secrets (get
    by name, bound per namespace), the agents get and watch their one Node (RBAC cannot narrow
    that to one Node), the controller lists and watches Nodes."""
    roles = {o["metadata"]["name"]: o["rules"] for o in manifest_objects() if o["kind"] == "ClusterRole"}
    assert {name: _granted(rules) for name, rules in roles.items()} == {
        "imageunlock-agent": IMAGEUNLOCKS_READ
        | STATUS_PATCH
        | CRDS_READ
        | {
            ("", "events", "create"),
            ("", "events", "patch"),  # aggregating a repeated Event (count, lastTimestamp)
            ("", "nodes", "get"),
            ("", "nodes", "list"),  # its own Node, field-selected, then watched (issue 22)
            ("", "nodes", "watch"),
        },
        "imageunlock-controller": IMAGEUNLOCKS_READ
        | STATUS_PATCH
        | CRDS_READ
        | {("", "nodes", "list"), ("", "nodes", "watch"), ("", "nodes", "patch")},  # patch: spec.readinessLabel
        # get by name; list and watch for the metadata-only, name-selected watch that re-checks
        # an ImageUnlock when its Secret changes (issue 21; SECURITY.md, "Secret watch")
        SECRETS_ROLE: {("", "secrets", "get"), ("", "secrets", "list"), ("", "secrets", "watch")},
    }
    rules = [r for rs in roles.values() for r in rs]
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in rules)
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"] for r in rules)


# ------------------------------------------------------------------ server-side dry run


def _served_kinds(plane) -> set[str]:
    out = plane.kubectl("api-resources", "--no-headers").stdout
    return {_kind_of(line) for line in out.splitlines() if line.strip()}


def _kind_of(line: str) -> str:
    # NAME [SHORTNAMES] APIVERSION NAMESPACED KIND
    fields = line.split()
    for i, field in enumerate(fields):
        if field in ("true", "false"):
            return fields[i + 1]
    return ""


def _dry_run(plane, objects: list[dict[str, Any]], namespace: str | None = None) -> None:
    args = ["apply", "--dry-run=server", "-o", "name", "-f", "-"]
    if namespace:
        args[1:1] = ["-n", namespace]
    plane.kubectl(*args, stdin=yaml.safe_dump_all(objects))


@pytest.mark.e2e
def test_server_side_dry_run(plane):
    plane.ensure_crd()
    served = _served_kinds(plane)
    assert {"Namespace", "Secret", "CustomResourceDefinition", "ImageUnlock", "Event"} <= served, served
    candidates = (
        manifest_objects() + load_docs(CRD_FILE.read_text()) + rendered_objects({"namespace": {"create": True}})
    )
    checked = [o for o in candidates if o["kind"] in served]
    assert sorted({o["kind"] for o in checked}) == ["CustomResourceDefinition", "Namespace"]
    _dry_run(plane, checked)
    # The samples, in the namespace they would be applied to (-n), like `make demo` does.
    plane.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    samples = sample_objects()
    assert sorted(o["kind"] for o in samples) == ["ImageUnlock", "Secret"]
    _dry_run(plane, samples, namespace=OPERATOR_NAMESPACE)


@pytest.mark.e2e
def test_server_rejects_an_invalid_sample(plane):
    """The dry run really validates: a sample with a relative archivePath is refused."""
    plane.ensure_crd()
    (unlock,) = find(sample_objects(), "ImageUnlock")
    unlock["spec"]["archivePath"] = "images.enc"
    plane.kubectl("apply", "-f", str(MANIFESTS / "namespace.yaml"))
    res = plane.kubectl(
        "apply", "--dry-run=server", "-n", OPERATOR_NAMESPACE, "-f", "-", stdin=json.dumps(unlock), check=False
    )
    assert res.returncode != 0 and "archivePath" in res.stderr


@pytest.mark.e2e
def test_plane_enforces_namespaced_secret_access(plane):
    """Enforced, as installed: the agents' ServiceAccount may get (and list, for its Secret
    watch) Secrets in the bound namespace only, elsewhere only once the cluster-wide opt-in is
    applied; the controller's may read no Secret at all."""
    for namespace in ("edge", "iu-elsewhere"):
        plane.kubectl("create", "namespace", namespace, check=False)

    def kubectl_as_operator(*args: str, kubeconfig: str | None = None) -> str:
        res = plane.kubectl(*args, kubeconfig=kubeconfig or plane.sa_kubeconfig, check=False)
        assert res.returncode != 0, res.stdout
        return res.stderr

    def get_secret(namespace: str) -> str:
        return kubectl_as_operator("get", "secret", "no-such-secret", "-n", namespace)

    assert "(NotFound)" in get_secret("edge"), "allowed there: only the Secret is missing"
    assert "(Forbidden)" in get_secret("iu-elsewhere")
    listed = plane.kubectl("get", "secrets", "-n", "edge", kubeconfig=plane.sa_kubeconfig, check=False)
    assert listed.returncode == 0, listed.stderr  # the Secret watch's list, where bound
    assert "(Forbidden)" in kubectl_as_operator("get", "secrets", "-n", "iu-elsewhere")  # not bound: no list
    controller = plane.kubeconfig_for(CONTROLLER_USER)
    assert "(Forbidden)" in kubectl_as_operator("get", "secret", "no-such-secret", "-n", "edge", kubeconfig=controller)
    with plane.policy_added((CLUSTER_WIDE_SECRETS / "clusterrolebinding.yaml").read_text()):
        assert "(NotFound)" in get_secret("iu-elsewhere")
        assert "(Forbidden)" in kubectl_as_operator(
            "get", "secret", "no-such-secret", "-n", "iu-elsewhere", kubeconfig=controller
        )
    assert "(Forbidden)" in get_secret("iu-elsewhere")


def _patch_node_as(kubeconfig: str, name: str, patch: dict[str, Any]) -> int:
    """The HTTP status of a merge patch of Node ``name`` as ``kubeconfig``'s user."""
    import kubernetes

    api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    try:
        kubernetes.client.CoreV1Api(api).patch_node(name, patch, _content_type="application/merge-patch+json")
    except kubernetes.client.ApiException as exc:
        return int(exc.status)
    finally:
        api.close()
    return 200


@pytest.mark.e2e
def test_plane_enforces_each_roles_node_access(plane):
    """Enforced, as installed: an agent gets, lists and watches Nodes (its own, by a field
    selector) but cannot change them; the controller lists them and patches them (the readiness
    label) but cannot read one by name, update or delete them."""
    agent, controller = plane.sa_kubeconfig, plane.kubeconfig_for(CONTROLLER_USER)
    name = "iu-rbac-node"
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"role": "edge"}}}
    plane.kubectl("apply", "-f", "-", stdin=json.dumps(node))
    try:

        def as_(kubeconfig: str, *args: str) -> subprocess.CompletedProcess[str]:
            return plane.kubectl(*args, kubeconfig=kubeconfig, check=False)

        assert as_(agent, "get", "node", name, "-o", "name").returncode == 0
        assert as_(agent, "get", "nodes", "--field-selector", f"metadata.name={name}", "-o", "name").returncode == 0
        assert as_(controller, "get", "nodes", "-o", "name").returncode == 0
        assert "(Forbidden)" in as_(controller, "get", "node", name).stderr  # list/watch, no get
        # the controller patches Nodes (spec.readinessLabel; a bare PATCH, as the operator
        # sends it: kubectl patch would GET first), the agent cannot
        label = {"metadata": {"labels": {"unlock.example.com/images": "1.0.0"}}}
        assert _patch_node_as(controller, name, label) == 200
        assert _patch_node_as(agent, name, label) == 403
        for kubeconfig in (agent, controller):
            assert "(Forbidden)" in as_(kubeconfig, "label", "node", name, "role=core", "--overwrite").stderr
            assert "(Forbidden)" in as_(kubeconfig, "delete", "node", name).stderr
    finally:
        plane.kubectl("delete", "node", name, "--ignore-not-found")
