"""The Helm chart: strict lint, rendering with default and non-default values, its values
schema, that it cannot drift from crds/ and manifests/ (CRD bytes, RBAC rules, the agent
DaemonSet and the controller Deployment, metrics Service), that the controller is told
exactly where the DaemonSet places agents, that the controller pod meets Pod Security
"restricted", and the metrics objects (Service, ServiceMonitor, NetworkPolicy) wired to the
agent pods by labels and port names. Offline: helm-python-sdk (Helm's Go SDK through
libhelm_c), no cluster, no helm binary.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    CHART,
    CRD_FILE,
    DEFAULT_SCRAPERS,
    EDGE_TOLERATIONS,
    MANIFESTS,
    METRICS_ALL,
    METRICS_OFF,
    NON_DEFAULT_VALUES,
    PER_ROLE,
    SECRETS_ROLE,
    admitted,
    cluster_wide_objects,
    env_of,
    find,
    isolating_policies,
    load_docs,
    manifest_objects,
    pod_of,
    render_chart,
    rendered_objects,
    require,
    restricted_violations,
)

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error
# The example values for a cluster shared by several tenants (referenced by the chart README).
MULTI_TENANT = CHART / "examples" / "multi-tenant-values.yaml"
NOTES = "imageunlock-operator/templates/NOTES.txt"
STALL_MESSAGE = "not allowed to read Secret"  # what ImageUnlocks stall with (imageunlock/kube/client.py)
# A k3s cluster whose edge nodes are tainted: containerd's socket in k3s' directory.
K3S_EDGE: dict[str, Any] = {
    "agent": {
        "runtime": "containerd",
        "containerd": {"socketPath": "/run/k3s/containerd/containerd.sock"},
        "nodeSelector": {"azaion.com/edge": "true"},
        "tolerations": EDGE_TOLERATIONS,
    }
}


@pytest.fixture(scope="module")
def helm():
    return require("helm_python")


def _workloads(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (daemonset,) = find(objects, "DaemonSet")
    (deployment,) = find(objects, "Deployment")
    return daemonset, deployment


@pytest.mark.parametrize(
    "values",
    [
        None,
        NON_DEFAULT_VALUES,
        {"rbac": {"clusterWideSecrets": True}},
        METRICS_ALL,
        METRICS_OFF,
        K3S_EDGE,
        {"agent": {"tpm": {"enabled": True}}},
    ],
    ids=["default", "non-default", "cluster-wide-secrets", "metrics-all", "metrics-off", "k3s-edge", "tpm"],
)
def test_lint_strict(helm, values):
    report = helm.lint(str(CHART), values, strict=True, namespace="imageunlock-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    assert not problems, problems


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_renders(values):
    manifests = render_chart(values)
    kinds = sorted(o["kind"] for o in rendered_objects(values))
    # Two roles, each with its ServiceAccount, ClusterRole and ClusterRoleBinding, plus the
    # agents' Secret-reading ClusterRole: no binding of it by default; non-default: one
    # RoleBinding per rbac.secretNamespaces. metrics.enabled is on by default: one Service per
    # role; so is metrics.networkPolicy: one NetworkPolicy per role; and crds.enabled: the CRD.
    expected = ["ClusterRole"] * 3 + ["ClusterRoleBinding"] * 2 + ["ServiceAccount"] * 2
    expected += ["CustomResourceDefinition"]
    expected += ["DaemonSet", "Deployment", "Service", "Service", "NetworkPolicy", "NetworkPolicy"]
    # The controller's replicas: a PodDisruptionBudget, and a Role for their Lease.
    expected += ["PodDisruptionBudget", "Role", "RoleBinding"]
    if values:  # and namespace.create
        expected += ["Namespace", "RoleBinding", "RoleBinding"]
    assert kinds == sorted(expected)
    assert NOTES in manifests


def test_notes_show_both_roles_and_how_to_follow_nodes():
    notes = render_chart()[NOTES]
    assert "rollout status daemonset/imageunlock-agent" in notes
    assert "rollout status deployment/imageunlock-controller" in notes
    assert "kubectl -n <ns> get iu" in notes and "NODES shows ready/desired" in notes
    assert "--for=condition=Ready" in notes


def _comparable(workload: dict[str, Any]) -> dict[str, Any]:
    """A workload without what the chart adds on purpose (Helm's labels, the release's
    instance label in the selector and the controller's anti-affinity)."""
    workload = copy.deepcopy(workload)
    spec = workload["spec"]
    spec.pop("selector")
    spec["template"].pop("metadata")
    anti = spec["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
    for term in anti.get("preferredDuringSchedulingIgnoredDuringExecution", []):
        term["podAffinityTerm"]["labelSelector"]["matchLabels"].pop("app.kubernetes.io/instance", None)
    return {"name": workload["metadata"]["name"], "namespace": workload["metadata"]["namespace"], "spec": spec}


def test_default_values_match_the_manifests():
    """The chart's defaults render the same agent DaemonSet as manifests/daemonset.yaml and
    the same controller Deployment as manifests/controller.yaml (names, image, service
    accounts and all)."""
    chart, plain = _workloads(rendered_objects()), _workloads(manifest_objects())
    for rendered, written in zip(chart, plain, strict=True):
        assert _comparable(rendered) == _comparable(written)
        labels = rendered["spec"]["selector"]["matchLabels"]
        assert written["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _uncomment_docker(text: str) -> str:
    """manifests/daemonset.yaml with its commented Docker Engine lines switched on, as its
    header tells a user to (the gid goes to supplementalGroups by hand)."""
    lines, out, block = text.splitlines(), [], None
    for line in lines:
        start = re.match(r"^(\s*)# (- name: (?:IMAGEUNLOCK_DOCKER_HOST|docker-socket))$", line)
        if start:
            block = start.group(1)
            out.append(block + start.group(2))
            continue
        if block is not None and line.startswith(block + "#   "):
            out.append(block + line[len(block) + 2 :])
            continue
        block = None
        out.append(line)
    return "\n".join(out) + "\n"


def test_docker_enabled_matches_the_manifests_commented_docker_lines():
    """agent.docker.enabled=true renders what uncommenting daemonset.yaml's Docker lines
    gives: the socket (hostPath type Socket) at /var/run/docker.sock and
    IMAGEUNLOCK_DOCKER_HOST; the chart also adds the socket's group."""
    (written,) = [d for d in yaml.safe_load_all(_uncomment_docker((MANIFESTS / "daemonset.yaml").read_text())) if d]
    daemonset, _ = _workloads(rendered_objects({"agent": {"docker": {"enabled": True}}}))
    assert pod_of(daemonset)["securityContext"].pop("supplementalGroups") == [0, 999]
    pod_of(written)["securityContext"].pop("supplementalGroups")  # [0]: the gid is the user's to add
    assert _comparable(daemonset) == _comparable(written)
    pod = pod_of(daemonset)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["docker-socket"]["hostPath"] == {"path": "/var/run/docker.sock", "type": "Socket"}
    assert mounts["docker-socket"]["mountPath"] == "/var/run/docker.sock"
    config = _agent_config(daemonset)
    assert config.runtime_settings["docker_host"] == "unix:///var/run/docker.sock" and config.runtime == "auto"


def test_non_default_values_reach_the_workloads():
    objects = rendered_objects(NON_DEFAULT_VALUES)
    daemonset, deployment = _workloads(objects)
    assert daemonset["metadata"]["name"] == "iu-agent" and deployment["metadata"]["name"] == "iu-controller"
    pod = pod_of(daemonset)
    container = pod["containers"][0]
    env = env_of(container)
    assert container["image"] == "registry.example.com/azaion/imageunlock:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert env["IMAGEUNLOCK_ARCHIVE_ROOT"] == "/srv/azaion/archives"
    assert env["RESOURCE_API_URL"] == "https://resources.example.com"
    assert env["IMAGEUNLOCK_LOG_LEVEL"] == "debug"
    assert env["IMAGEUNLOCK_VERIFY_INTERVAL"] == "60"
    assert env["IMAGEUNLOCK_LIVENESS"] == "http://0.0.0.0:9090/healthz"
    assert env["IMAGEUNLOCK_WORKERS"] == "2"
    assert env["IMAGEUNLOCK_RUNTIME"] == "docker"
    assert env["IMAGEUNLOCK_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    # runtime docker: containerd is neither mounted nor named
    assert "IMAGEUNLOCK_CONTAINERD_ADDRESS" not in env and "IMAGEUNLOCK_CONTAINERD_NAMESPACE" not in env
    assert container["ports"] == [
        {"name": "health", "containerPort": 9090, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert container["resources"] == NON_DEFAULT_VALUES["agent"]["resources"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["archives"]["hostPath"] == {"path": "/srv/azaion/archives", "type": "DirectoryOrCreate"}
    assert "containerd" not in volumes
    assert volumes["docker-socket"]["hostPath"] == {"path": "/run/docker.sock", "type": "Socket"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "128Mi"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["archives"] == {"name": "archives", "mountPath": "/srv/azaion/archives", "readOnly": True}
    assert "containerd" not in mounts
    assert mounts["docker-socket"]["mountPath"] == "/var/run/docker.sock"
    assert pod["securityContext"]["supplementalGroups"] == [1001, 988]  # not containerd's 1002
    assert pod["securityContext"]["runAsUser"] == 20001
    assert pod["nodeSelector"] == NON_DEFAULT_VALUES["agent"]["nodeSelector"]
    assert pod["tolerations"] == EDGE_TOLERATIONS
    assert "affinity" not in pod  # none by default
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "iu-agent-sa"
    assert daemonset["spec"]["template"]["metadata"]["labels"]["example.com/team"] == "edge"
    assert daemonset["spec"]["template"]["metadata"]["annotations"] == {"example.com/scrape": "false"}
    # The controller: its own placement and resources, the shared settings.
    cpod = pod_of(deployment)
    (ccontainer,) = cpod["containers"]
    cenv = env_of(ccontainer)
    controller = NON_DEFAULT_VALUES["controller"]
    assert ccontainer["image"] == container["image"] and ccontainer["args"] == ["controller"]
    assert ccontainer["resources"] == controller["resources"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert cpod[key] == controller[key], key
    assert cpod["serviceAccountName"] == "iu-controller-sa"
    assert cpod["securityContext"]["runAsUser"] == 20001
    assert cpod["imagePullSecrets"] == [{"name": "regcred"}]
    assert (cenv["IMAGEUNLOCK_LOG_LEVEL"], cenv["IMAGEUNLOCK_LIVENESS"]) == ("debug", "http://0.0.0.0:9090/healthz")
    assert ccontainer["ports"] == [
        {"name": "health", "containerPort": 9090, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == "imageunlock-system"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "restricted"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/audit"] == "restricted"
    accounts = {sa["metadata"]["name"]: sa for sa in find(objects, "ServiceAccount")}
    assert sorted(accounts) == ["iu-agent-sa", "iu-controller-sa"]
    assert all(sa["metadata"]["annotations"] == {"example.com/owner": "edge"} for sa in accounts.values())
    bindings = [b for b in find(objects, "RoleBinding") if b["roleRef"]["name"] == "iu-agent-secrets"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["edge-a", "edge-b"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "iu-agent-secrets"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "iu-agent-sa", "namespace": "imageunlock-system"}
        ]
    assert not find(objects, "ClusterRoleBinding", "iu-agent-secrets")


def test_per_role_pod_values(helm):
    """affinity, updateStrategy, podLabels/podAnnotations (over the top-level ones),
    extraVolumes/extraVolumeMounts, priorityClassName and resources reach each role's pods
    and only its own; the chart's selector labels stay, so the workloads, the Service and the
    NetworkPolicies still select the right pods; the controller stays "restricted"."""
    report = helm.lint(str(CHART), PER_ROLE, strict=True, namespace="imageunlock-system", kube_version="v1.30.0")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= WARNING], report
    objects = rendered_objects(PER_ROLE)
    daemonset, deployment = _workloads(objects)
    assert daemonset["spec"]["updateStrategy"] == PER_ROLE["agent"]["updateStrategy"]
    assert deployment["spec"]["strategy"] == PER_ROLE["controller"]["updateStrategy"]
    for workload, role in ((daemonset, "agent"), (deployment, "controller")):
        values, pod = PER_ROLE[role], pod_of(workload)
        (container,) = pod["containers"]
        metadata = workload["spec"]["template"]["metadata"]
        assert metadata["labels"]["example.com/tier"] == values["podLabels"]["example.com/tier"]
        assert metadata["labels"]["example.com/team"] == "edge"
        assert metadata["labels"]["app.kubernetes.io/component"] == role
        assert workload["spec"]["selector"]["matchLabels"].items() <= metadata["labels"].items()
        assert metadata["annotations"] == {**PER_ROLE["podAnnotations"], **values["podAnnotations"]}
        assert pod["affinity"] == values["affinity"]
        assert pod["priorityClassName"] == values["priorityClassName"]
        assert container["resources"] == values["resources"]
        assert pod["volumes"][-1] == values["extraVolumes"][0]
        assert container["volumeMounts"][-1] == values["extraVolumeMounts"][0]
        assert pod["volumes"][:-1] == pod_of(_workloads(rendered_objects())[role == "controller"])["volumes"]
    assert restricted_violations(pod_of(deployment)) == []
    _metrics_wiring(objects)  # the Service still reaches the agents
    assert sorted(isolating_policies(objects)) == ["agent", "controller"]
    # Defaults: the updateStrategy of before, no affinity, the top-level labels alone.
    daemonset, deployment = _workloads(rendered_objects({"podLabels": {"example.com/team": "edge"}}))
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    # The controller: a new replica before an old one stops (the Lease keeps one writer).
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "affinity" not in pod_of(daemonset)
    # The controller's replicas: spread across nodes when they can be (preferred, not required).
    spread = pod_of(deployment)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [t["podAffinityTerm"]["topologyKey"] for t in spread] == ["kubernetes.io/hostname"]
    assert spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    for workload in (daemonset, deployment):
        assert workload["spec"]["template"]["metadata"]["labels"]["example.com/team"] == "edge"
    daemonset, _ = _workloads(rendered_objects({"agent": {"updateStrategy": {"type": "OnDelete"}}}))
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_agent_required_node_affinity_warns_that_the_controller_does_not_follow_it():
    """The controller counts the nodes an ImageUnlock waits for by agent.nodeSelector and
    agent.tolerations: a required nodeAffinity of the agents is passed to the DaemonSet, and
    the notes say what it does to NODES; a preferred one changes where no agent runs, no warning."""
    required = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "type", "operator": "NotIn", "values": ["virtual"]}]}
                ]
            }
        }
    }
    values = {"agent": {"affinity": required}}
    daemonset, deployment = _workloads(rendered_objects(values))
    assert pod_of(daemonset)["affinity"] == required
    assert "nodeAffinity" not in pod_of(deployment)["affinity"]
    assert "WARNING: agent.affinity has a required nodeAffinity" in render_chart(values)[NOTES]
    assert "agent.affinity" not in render_chart(PER_ROLE)[NOTES]


def test_optional_parts_can_be_switched_off():
    values = {
        "serviceAccount": {"create": False, "agentName": "existing-agent", "controllerName": "existing-controller"},
        "rbac": {"create": False},
        "agent": {"containerd": {"socketGroupId": None}},
        "resourceApiUrl": "",
        "resourceApiAllowlist": ["https://a.example.com", "https://b.example.com/v2"],
        "metrics": {"enabled": False, "networkPolicy": {"enabled": False}},
        "crds": {"enabled": False},
    }
    values["controller"] = {"podDisruptionBudget": {"enabled": False}}
    objects = rendered_objects(values)
    assert sorted(o["kind"] for o in objects) == ["DaemonSet", "Deployment"]
    daemonset, deployment = _workloads(objects)
    pod = pod_of(daemonset)
    assert pod["serviceAccountName"] == "existing-agent"
    assert pod_of(deployment)["serviceAccountName"] == "existing-controller"
    assert "supplementalGroups" not in pod["securityContext"]
    env = env_of(pod["containers"][0])
    assert "RESOURCE_API_URL" not in env
    assert env["IMAGEUNLOCK_API_URL_ALLOWLIST"] == "https://a.example.com,https://b.example.com/v2"
    # Without the controller: no Deployment, and no identity or rules for it either.
    objects = rendered_objects({"controller": {"enabled": False}})
    assert not find(objects, "Deployment")
    names = {o["metadata"]["name"] for o in objects}
    assert not any("controller" in name for name in names), names
    assert find(objects, "DaemonSet") and find(objects, "ClusterRoleBinding", "imageunlock-agent")
    assert "controller.enabled=false" in render_chart({"controller": {"enabled": False}})[NOTES]


def test_service_accounts_are_required_when_not_created(helm):
    with pytest.raises(helm.HelmError, match=r"serviceAccount\.agentName is required"):
        render_chart({"serviceAccount": {"create": False}})


def test_k3s_containerd_socket_is_mounted_where_the_agent_looks():
    """agent.containerd for k3s: its socket mounted at the same path, the address the agent
    dials, settings the agent starts with."""
    daemonset, _ = _workloads(rendered_objects(K3S_EDGE))
    pod = pod_of(daemonset)
    (container,) = pod["containers"]
    env = env_of(container)
    assert env["IMAGEUNLOCK_RUNTIME"] == "containerd" and "IMAGEUNLOCK_DOCKER_HOST" not in env
    socket = "/run/k3s/containerd/containerd.sock"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["containerd"]["hostPath"] == {"path": socket, "type": "Socket"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["containerd"] == {"name": "containerd", "mountPath": socket, "readOnly": True}
    assert "docker-socket" not in volumes
    assert pod["securityContext"]["supplementalGroups"] == [0]
    config = _agent_config(daemonset)
    assert config.runtime == "containerd"
    assert config.runtime_settings["containerd_address"] == socket
    assert config.runtime_settings["containerd_namespace"] == "k8s.io"


def test_agent_mounts_containerd_socket_itself_and_adds_only_its_group(helm):
    """Issue 18: the agent pod mounts containerd's socket FILE (hostPath type Socket) at the
    path IMAGEUNLOCK_CONTAINERD_ADDRESS names, not the /run/containerd directory (its other
    sockets and the tasks' files stay out of the pod); agent.supplementalGroups is empty by
    default, and the only group the pod gets is the socket's (agent.containerd.socketGroupId,
    0: the non-root agent needs it for containerd's root:root 0660 socket), which null
    removes; with runtime docker nothing of containerd's is mounted and its group is not
    added."""
    with helm.Chart.load(str(CHART)) as chart:
        assert chart.values["agent"]["supplementalGroups"] == []
        assert chart.values["agent"]["containerd"]["socketGroupId"] == 0
    daemonset, _ = _workloads(rendered_objects())
    pod = pod_of(daemonset)
    (container,) = pod["containers"]
    socket = "/run/containerd/containerd.sock"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "containerd"]
    assert volume["hostPath"] == {"path": socket, "type": "Socket"}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "containerd"]
    assert mount == {"name": "containerd", "mountPath": socket, "readOnly": True}
    assert not any(v.get("hostPath", {}).get("path") == "/run/containerd" for v in pod["volumes"])
    assert _agent_config(daemonset).runtime_settings["containerd_address"] == socket
    assert pod["securityContext"]["supplementalGroups"] == [0]
    assert pod["securityContext"]["runAsNonRoot"] is True  # why the group: the agent is not root
    # A socket whose group the agent does not need (or gets otherwise): no group at all.
    daemonset, _ = _workloads(rendered_objects({"agent": {"containerd": {"socketGroupId": None}}}))
    assert "supplementalGroups" not in pod_of(daemonset)["securityContext"]
    daemonset, _ = _workloads(rendered_objects({"agent": {"containerd": {"socketGroupId": 1500}}}))
    assert pod_of(daemonset)["securityContext"]["supplementalGroups"] == [1500]
    # Docker only: containerd's socket is neither required on the nodes nor reachable.
    daemonset, _ = _workloads(rendered_objects({"agent": {"runtime": "docker", "docker": {"enabled": True}}}))
    pod = pod_of(daemonset)
    assert [v["name"] for v in pod["volumes"] if "hostPath" in v] == ["archives", "docker-socket", "locks", "state"]
    assert pod["securityContext"]["supplementalGroups"] == [999]
    assert "IMAGEUNLOCK_CONTAINERD_ADDRESS" not in env_of(pod["containers"][0])


def test_agents_learn_their_node_from_the_downward_api():
    for values in (None, NON_DEFAULT_VALUES, K3S_EDGE):
        daemonset, _ = _workloads(rendered_objects(values))
        (container,) = pod_of(daemonset)["containers"]
        (node_name,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
        assert node_name == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
        assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        assert _agent_config(daemonset, node="edge-7").node_name == "edge-7"


@pytest.mark.parametrize(
    "values",
    [
        None,
        NON_DEFAULT_VALUES,
        K3S_EDGE,
        {"agent": {"nodeSelector": {"kubernetes.io/os": "linux"}, "tolerations": []}},
        {"agent": {"tolerations": [{"operator": "Exists"}]}},  # every taint: every node
    ],
    ids=["default", "non-default", "k3s-edge", "selector-only", "tolerate-all"],
)
def test_controller_is_told_where_the_agents_run(values):
    """IMAGEUNLOCK_AGENT_NODE_SELECTOR and IMAGEUNLOCK_AGENT_TOLERATIONS are the DaemonSet's
    own nodeSelector and tolerations, read back by the controller's settings parser."""
    daemonset, deployment = _workloads(rendered_objects(values))
    agent_pod = pod_of(daemonset)
    env = env_of(pod_of(deployment)["containers"][0], pod="imageunlock-controller-abc12")
    selector, tolerations = agent_pod.get("nodeSelector", {}), agent_pod.get("tolerations", [])
    assert json.loads(env["IMAGEUNLOCK_AGENT_NODE_SELECTOR"]) == selector
    assert json.loads(env["IMAGEUNLOCK_AGENT_TOLERATIONS"]) == tolerations
    config = pytest.importorskip("imageunlock.app.config")
    controller = config.ControllerConfig.from_env(env)
    assert controller.agent_node_selector == selector
    assert [dict(t) for t in controller.agent_tolerations] == tolerations
    if values:
        agent = values["agent"]
        assert selector == agent.get("nodeSelector", {})
        assert tolerations == agent.get(
            "tolerations", yaml.safe_load((CHART / "values.yaml").read_text())["agent"]["tolerations"]
        )


@pytest.mark.parametrize(
    "values", [None, NON_DEFAULT_VALUES, METRICS_OFF], ids=["default", "non-default", "metrics-off"]
)
def test_controller_pod_meets_pod_security_restricted(values):
    """The controller would be admitted where "restricted" is enforced: no hostPath (only
    its /tmp emptyDir), non-root, drop ALL, RuntimeDefault seccomp, no privilege escalation,
    no socket group; the agent falls short only by its hostPath volumes."""
    daemonset, deployment = _workloads(rendered_objects(values))
    pod = pod_of(deployment)
    assert restricted_violations(pod) == []
    assert [set(v) - {"name"} for v in pod["volumes"]] == [{"emptyDir"}]
    assert "supplementalGroups" not in pod["securityContext"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert all(v.endswith("hostPath") for v in restricted_violations(pod_of(daemonset)))


@pytest.mark.parametrize(
    "bad",
    [
        {"agent": {"runtime": "podman"}},
        {"agent": {"runtime": "docker"}},  # without agent.docker.enabled: no socket to reach
        {"agent": {"containerd": {"socketPath": "run/containerd/containerd.sock"}}},
        {"agent": {"containerd": {"socketPath": "/run/containerd"}}},  # not a socket path
        {"agent": {"containerd": {"socketGroupId": -1}}},
        {"agent": {"containerd": {"socketDir": "/run/containerd"}}},  # gone: the socket is mounted
        {"agent": {"containerd": {"address": "/run/containerd/containerd.sock"}}},  # gone: socketPath
        {"agent": {"docker": {"enabled": "true"}}},
        {"agent": {"docker": {"socketPath": "docker.sock"}}},
        {"agent": {"supplementalGroups": [-1]}},
        {"agent": {"tpm": {"enabled": "true"}}},
        {"agent": {"tpm": {"devicePath": "tpmrm0"}}},
        {"agent": {"tpm": {"deviceGroupId": -1}}},
        {"agent": {"tpm": {"stateDir": "/var/lib/imageunlock-state"}}},  # gone: agent.stateDir
        {"agent": {"tpm": {"tcti": "device:/dev/tpmrm0"}}},  # not a value: device:<devicePath>
        {"agent": {"archivePerNamespace": "true"}},  # a boolean, rendered as "true"/"false"
        {"agent": {"nodeSelector": {"azaion.com/edge": True}}},
        {"agent": {"tolerations": [{"key": "edge", "operator": "Maybe"}]}},
        {"agent": {"tolerations": [{"key": "edge", "effect": "NoRun"}]}},
        {"agent": {"affinity": []}},
        {"agent": {"updateStrategy": {"type": "Recreate"}}},  # a Deployment's, not a DaemonSet's
        {"controller": {"updateStrategy": {"type": "OnDelete"}}},  # a DaemonSet's, not a Deployment's
        {"agent": {"podLabels": {"app.kubernetes.io/component": "x"}}},  # the selectors' label
        {"controller": {"podLabels": {"app.kubernetes.io/instance": "x"}}},
        {"podLabels": {"app.kubernetes.io/name": "x"}},
        {"agent": {"podAnnotations": {"example.com/n": 1}}},
        {"agent": {"extraVolumes": [{"name": "archives", "emptyDir": {}}]}},  # the chart's own
        {"agent": {"extraVolumes": [{"emptyDir": {}}]}},  # no name
        {"controller": {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}},
        # a hostPath would cost the controller Pod Security "restricted"
        {"controller": {"extraVolumes": [{"name": "host", "hostPath": {"path": "/etc"}}]}},
        {"agent": {"extraVolumeMounts": [{"name": "ca"}]}},  # no mountPath
        {"controller": {"extraVolumeMounts": [{"name": "ca", "mountPath": "etc/ca"}]}},
        {"crds": {"enabled": "true"}},
        {"crds": {"keep": "false"}},
        {"crds": {"install": True}},
        {"controller": {"enabled": "yes"}},
        {"controller": {"replicas": 0}},  # no controller at all: controller.enabled=false
        {"controller": {"podDisruptionBudget": {"enabled": "true"}}},
        {"controller": {"podDisruptionBudget": {"minAvailable": "half"}}},
        {"controller": {"podDisruptionBudget": {"maxUnavailable": 1}}},  # minAvailable only
        {"nodeSelector": {"kubernetes.io/hostname": "edge-1"}},  # gone: agent.nodeSelector
        {"runtime": {"name": "docker", "socketPath": "/var/run/docker.sock"}},  # gone: agent.*
        {"serviceAccount": {"name": "operator"}},  # gone: agentName, controllerName
        {"logLevel": "verbose"},
        {"verifyInterval": 0},
        {"runAsUser": 0},
        {"archiveDir": "relative/path"},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"resourceApiUrl": "ftp://example.com"},
        {"resourceApiUrl": ""},  # and no resourceApiAllowlist: the agents would refuse to start
        {"rbac": {"secretNamespaces": ["Not_A_Namespace"]}},
        {"rbac": {"clusterWideSecrets": "true"}},
        # contradictory: cluster-wide AND a namespace list
        {"rbac": {"clusterWideSecrets": True, "secretNamespaces": ["edge"]}},
        {"replicas": 2},
        {"logFormat": "logfmt"},
        {"apiDeadline": 0},
        {"metrics": {"enabled": "true"}},
        {"metrics": {"port": 0}},
        {"metrics": {"port": 65536}},
        {"metrics": {"port": "8081"}},
        {"metrics": {"path": "/metrics"}},  # not a value: the agents serve /metrics only
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        {"metrics": {"serviceMonitor": {"interval": "1.5m"}}},
        {"metrics": {"serviceMonitor": {"labels": {"release": 1}}}},
        # a ServiceMonitor for a Service that is not there
        {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
        {"metrics": {"networkPolicy": {"namespaceSelector": {"matchNames": ["monitoring"]}}}},
        {"metrics": {"service": {"type": "NodePort"}}},  # ClusterIP only
        {"metrics": {"prometheusRule": {"stalledFor": "10 minutes"}}},
        {"metrics": {"prometheusRule": {"stalledFor": ""}}},
        {"metrics": {"prometheusRule": {"severity": "page me"}}},
        {"metrics": {"prometheusRule": {"for": "5m"}}},  # one per alert
        {"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
    ],
    ids=lambda v: _value_path(v),
)
def test_schema_rejects_bad_values(helm, bad):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    report = helm.lint(str(CHART), bad, strict=True)
    assert report["errors"] or any(m["severity"] >= WARNING for m in report["messages"])


def _value_path(value: Any) -> str:
    """agent.runtime for {"agent": {"runtime": ...}}: a readable test id."""
    path = []
    while isinstance(value, dict) and len(value) >= 1:
        key = next(iter(value))
        path.append(key)
        value = value[key]
    return ".".join(path)


CRD_NAME = "imageunlocks.loader.azaion.com"
KEEP = "helm.sh/resource-policy"


def _crd_docs() -> dict[str, dict[str, Any]]:
    """The CRDs of the repository's crds/: {file name: object}."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(CRD_FILE.parent.glob("*.yaml"))}


def _rendered_crds(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(objects, "CustomResourceDefinition")


def test_chart_renders_the_crds_dir_itself(helm):
    """One source of truth: the chart has no crds/ directory (Helm would install it once and
    never upgrade it) and renders the repository's crds/ through templates/crds.yaml, read
    through files/crds, a symbolic link to it. The rendered CRD is crds/' document with only
    the chart's labels and the keep annotation added to its metadata."""
    assert not (CHART / "crds").exists()
    assert (CHART / "files" / "crds").resolve() == CRD_FILE.parent.resolve()
    with helm.Chart.load(str(CHART)) as chart:
        assert chart.crds == [], "a chart crds/ directory is installed once and never upgraded"
        assert chart.values["crds"] == {"enabled": True, "keep": True}
    (source,) = _crd_docs().values()
    (crd,) = _rendered_crds(rendered_objects())
    assert crd["spec"] == source["spec"]
    assert crd["apiVersion"] == source["apiVersion"] and crd["kind"] == source["kind"]
    metadata = crd["metadata"]
    assert metadata["name"] == CRD_NAME == source["metadata"]["name"]
    assert metadata["annotations"] == {**source["metadata"].get("annotations", {}), KEEP: "keep"}
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert metadata["labels"]["app.kubernetes.io/part-of"] == "imageunlock"


def test_crds_keep_and_enabled(helm):
    """crds.keep=false drops only the keep annotation (helm uninstall then deletes the CRD and
    every ImageUnlock); crds.enabled=false renders no CRD at all (crds/ applied by hand or by
    GitOps), and the notes say so."""
    (source,) = _crd_docs().values()
    (crd,) = _rendered_crds(rendered_objects({"crds": {"keep": False}}))
    assert KEEP not in crd["metadata"].get("annotations", {})
    assert crd["metadata"].get("annotations", {}) == source["metadata"].get("annotations", {})
    assert crd["spec"] == source["spec"]
    assert _rendered_crds(rendered_objects({"crds": {"enabled": False}})) == []
    assert "crds.enabled=false" in render_chart({"crds": {"enabled": False}})[NOTES]
    assert "crds.enabled=false" not in render_chart()[NOTES]


def test_packaged_chart_carries_the_crd(helm, tmp_path):
    """helm package stores the files the link points to: the packaged chart (what the release
    workflow pushes) renders the same CRD, without the repository beside it."""
    with helm.Chart.load(str(CHART)) as chart:
        archive = chart.save(tmp_path)
    with helm.Chart.load_archive(Path(archive).read_bytes()) as packaged:
        assert packaged.crds == []
        rendered = packaged.render({}, name="imageunlock-operator", namespace="imageunlock-system", is_install=True)
    (crd,) = _rendered_crds(load_docs(rendered["imageunlock-operator/templates/crds.yaml"]))
    (source,) = _crd_docs().values()
    assert crd["spec"] == source["spec"] and crd["metadata"]["annotations"][KEEP] == "keep"


ROLE_SUFFIXES = ("-agent-secrets", "-agent", "-controller")


def _rules(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """ClusterRole rules keyed by the role's suffix after the name prefix ("imageunlock",
    or e.g. "iu" with fullnameOverride)."""
    rules = {}
    for role in find(objects, "ClusterRole"):
        name = role["metadata"]["name"]
        (suffix,) = [s for s in ROLE_SUFFIXES if name.endswith(s)][:1]
        rules[suffix] = role["rules"]
    return rules


def test_chart_rbac_equals_manifest_rbac():
    """The same rules, rule for rule and in the same order, for every role."""
    plain = _rules(manifest_objects())
    assert set(plain) == set(ROLE_SUFFIXES)
    for values in (None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}, K3S_EDGE):
        assert _rules(rendered_objects(values)) == plain


def _bindings(objects: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every (Cluster)RoleBinding as (kind, namespace, name, roleRef, subjects), sorted."""
    return sorted(
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"], o["roleRef"], o["subjects"])
        for o in objects
        if o["kind"] in ("ClusterRoleBinding", "RoleBinding")
    )


def test_chart_bindings_equal_the_manifests():
    """rbac.secretNamespaces=[edge] binds exactly as manifests/rbac.yaml (RoleBinding in edge),
    rbac.clusterWideSecrets as manifests/ plus its opt-in manifests/cluster-wide-secrets/."""
    namespaced = _bindings(manifest_objects())
    assert _bindings(rendered_objects({"rbac": {"secretNamespaces": ["edge"]}})) == namespaced
    lease = [b for b in find(manifest_objects(), "RoleBinding") if b["roleRef"]["kind"] == "Role"]
    cluster_wide = _bindings(find(manifest_objects(), "ClusterRoleBinding") + lease + cluster_wide_objects())
    assert _bindings(rendered_objects({"rbac": {"clusterWideSecrets": True}})) == cluster_wide


@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}],
    ids=["default", "non-default", "cluster-wide"],
)
def test_chart_bindings_point_at_the_roles(values):
    """Each role's bindings name its own ServiceAccount, the one its workload runs as: the
    controller's rules go to the controller, the agents' and the Secrets to the agents."""
    objects = rendered_objects(values)
    daemonset, deployment = _workloads(objects)
    accounts = {sa["metadata"]["name"]: sa for sa in find(objects, "ServiceAccount")}
    runs_as = {
        "agent": pod_of(daemonset)["serviceAccountName"],
        "controller": pod_of(deployment)["serviceAccountName"],
    }
    assert set(runs_as.values()) == set(accounts)
    roles = {(r["kind"], r["metadata"]["name"]): r for r in find(objects, "ClusterRole") + find(objects, "Role")}
    bindings = find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding")
    assert len(bindings) >= 3
    for binding in bindings:
        role = roles[binding["roleRef"]["kind"], binding["roleRef"]["name"]]
        if role["kind"] == "Role":  # the controller's Lease: in its own namespace
            assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
        component = role["metadata"]["labels"]["app.kubernetes.io/component"]
        sa = accounts[runs_as[component]]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
        ]
        own = ("-controller", "-controller-leader-election")
        assert binding["roleRef"]["name"].endswith(own) == (component == "controller")


def _secrets_bindings(objects: list[dict[str, Any]], role: str = SECRETS_ROLE) -> dict[str, list[dict[str, Any]]]:
    return {
        kind: [b for b in find(objects, kind) if b["roleRef"]["name"] == role]
        for kind in ("ClusterRoleBinding", "RoleBinding")
    }


def test_default_reads_secrets_in_no_namespace_and_warns():
    """Secure by default: no cluster-wide (nor any) Secret binding; the notes say why
    ImageUnlocks would stall and how to fix it."""
    objects = rendered_objects()
    assert find(objects, "ClusterRole", SECRETS_ROLE), "the role itself is still installed"
    assert _secrets_bindings(objects) == {"ClusterRoleBinding": [], "RoleBinding": []}
    # the roles' own rules only, not the Secrets role
    assert sorted(b["roleRef"]["name"] for b in find(objects, "ClusterRoleBinding")) == [
        "imageunlock-agent",
        "imageunlock-controller",
    ]
    notes = render_chart()[NOTES]
    assert "WARNING" in notes and STALL_MESSAGE in notes
    assert "rbac.secretNamespaces" in notes and "rbac.clusterWideSecrets" in notes


@pytest.mark.parametrize("namespaces", [["edge"], ["edge-a", "edge-b", "edge-c"]], ids=["one", "three"])
def test_secret_namespaces_get_one_role_binding_each(namespaces):
    values = {"rbac": {"secretNamespaces": namespaces}}
    objects = rendered_objects(values)
    secrets = _secrets_bindings(objects)
    assert secrets["ClusterRoleBinding"] == []
    assert sorted(b["metadata"]["namespace"] for b in secrets["RoleBinding"]) == sorted(namespaces)
    assert len(find(objects, "RoleBinding")) == len(namespaces) + 1  # and the controller's Lease
    for binding in secrets["RoleBinding"]:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": SECRETS_ROLE,
        }
    notes = render_chart(values)[NOTES]
    assert "WARNING" not in notes
    assert f"Secrets only in: {', '.join(namespaces)}." in notes


def test_cluster_wide_secrets_is_an_opt_in(helm):
    with helm.Chart.load(str(CHART)) as chart:
        assert chart.values["rbac"]["clusterWideSecrets"] is False
        assert chart.values["rbac"]["secretNamespaces"] == []
    values = {"rbac": {"clusterWideSecrets": True}}
    objects = rendered_objects(values)
    secrets = _secrets_bindings(objects)
    assert secrets["RoleBinding"] == []
    (binding,) = secrets["ClusterRoleBinding"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "imageunlock-agent", "namespace": "imageunlock-system"}
    ]
    notes = render_chart(values)[NOTES]
    assert "WARNING" not in notes and "EVERY" in notes
    # with another release name, the binding follows the role's name
    renamed = rendered_objects({**values, "fullnameOverride": "iu"})
    assert [b["metadata"]["name"] for b in _secrets_bindings(renamed, "iu-agent-secrets")["ClusterRoleBinding"]] == [
        "iu-agent-secrets"
    ]


def test_values_file_is_fully_described_by_the_schema(helm):
    """Every default value validates, and the schema forbids keys it does not know."""
    with helm.Chart.load(str(CHART)) as chart:
        schema = chart.schema
        defaults = copy.deepcopy(chart.values)
        chart.validate_schema(defaults)
    assert schema is not None and schema.get("additionalProperties") is False
    assert set(defaults) <= set(schema["properties"])


# ------------------------------------------------------------------ metrics


def test_tpm_enabled_mounts_the_device_and_the_sealed_key_directory():
    """agent.tpm.enabled: the TPM (hostPath CharDevice) at its own path, the agent told to
    reach it there (IMAGEUNLOCK_TPM_TCTI), a persistent host directory for the sealed blobs
    (IMAGEUNLOCK_STATE_DIR) and the device's group; off by default, none of it."""
    default = pod_of(_workloads(rendered_objects(None))[0])
    assert "tpm" not in {v["name"] for v in default["volumes"]}
    assert "IMAGEUNLOCK_TPM_TCTI" not in env_of(default["containers"][0])

    daemonset, _ = _workloads(rendered_objects({"agent": {"tpm": {"enabled": True, "deviceGroupId": 59}}}))
    pod = pod_of(daemonset)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["tpm"]["hostPath"] == {"path": "/dev/tpmrm0", "type": "CharDevice"}
    assert mounts["tpm"]["mountPath"] == "/dev/tpmrm0"
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/imageunlock-state", "type": "DirectoryOrCreate"}
    assert mounts["state"]["mountPath"] == "/var/lib/imageunlock-state" and not mounts["state"].get("readOnly")
    assert 59 in pod["securityContext"]["supplementalGroups"]
    env = env_of(pod["containers"][0])
    assert env["IMAGEUNLOCK_TPM_TCTI"] == "device:/dev/tpmrm0"
    assert env["IMAGEUNLOCK_STATE_DIR"] == "/var/lib/imageunlock-state"
    assert _agent_config(daemonset).tpm_tcti == "device:/dev/tpmrm0"

    other = {"tpm": {"enabled": True, "devicePath": "/dev/tpm0"}, "stateDir": "/data/iu"}
    pod = pod_of(_workloads(rendered_objects({"agent": other}))[0])
    assert env_of(pod["containers"][0])["IMAGEUNLOCK_TPM_TCTI"] == "device:/dev/tpm0"
    assert env_of(pod["containers"][0])["IMAGEUNLOCK_STATE_DIR"] == "/data/iu"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tpm"]["hostPath"]["path"] == "/dev/tpm0" and volumes["state"]["hostPath"]["path"] == "/data/iu"
    assert [v["name"] for v in pod["volumes"]].count("state") == 1  # one state directory for everything
    # The sealed keys need a state directory: without one the chart says so.
    with pytest.raises(Exception, match=r"agent\.tpm\.enabled keeps the sealed keys in agent\.stateDir"):
        rendered_objects({"agent": {"tpm": {"enabled": True}, "stateDir": ""}})


def _agent_config(daemonset: dict[str, Any], node: str = "edge-1") -> Any:
    """The agent's own settings parser run on the DaemonSet's environment (NODE_NAME as the
    kubelet would set it): what the pod would start with (or its ConfigurationError)."""
    config = pytest.importorskip("imageunlock.app.config")
    (container,) = pod_of(daemonset)["containers"]
    return config.AgentConfig.from_env(env_of(container, node=node))


def _metrics_wiring(objects: list[dict[str, Any]], role: str = "agent") -> tuple[dict[str, Any], dict[str, Any]]:
    """A role's workload (the agent DaemonSet, the controller Deployment) and its metrics
    Service, after checking the Service reaches that role's "metrics" port: its selector
    picks the role's pod template (and the workload's selector) but not the other role's
    pods, and its targetPort names the container port the role listens on."""
    daemonset, deployment = (find(objects, kind)[0] for kind in ("DaemonSet", "Deployment"))
    if role == "controller":
        daemonset, deployment = deployment, daemonset
    (service,) = [s for s in find(objects, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == role]
    pod = daemonset["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector == daemonset["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p for p in container["ports"]}
    assert port["name"] == port["targetPort"] == "metrics"
    assert container_ports["metrics"]["containerPort"] == port["port"]
    assert port["protocol"] == container_ports["metrics"]["protocol"] == "TCP"
    env = env_of(container)
    assert env["IMAGEUNLOCK_METRICS_ADDRESS"] == f"0.0.0.0:{port['port']}"
    return daemonset, service


def test_metrics_are_on_by_default_behind_a_cluster_ip_service():
    objects = rendered_objects()
    daemonset, service = _metrics_wiring(objects)
    assert service["metadata"]["name"] == "imageunlock-agent-metrics"
    assert service["spec"]["ports"][0]["port"] == 8081
    deployment, controller = _metrics_wiring(objects, "controller")  # the cluster summary (issue 21)
    assert controller["metadata"]["name"] == "imageunlock-controller-metrics"
    assert env_of(pod_of(deployment)["containers"][0])["IMAGEUNLOCK_METRICS_ADDRESS"] == "0.0.0.0:8081"
    # Opt-in extras stay off: no ServiceMonitor (needs the Prometheus Operator CRDs) and no
    # prometheus.io/* annotations (a sample-config convention that would have any
    # annotation-driven Prometheus scrape the endpoint unasked). The NetworkPolicies are on.
    assert not find(objects, "ServiceMonitor")
    for obj in (service, daemonset, daemonset["spec"]["template"]):
        assert not any(k.startswith("prometheus.io/") for k in obj["metadata"].get("annotations", {}))
    config = _agent_config(daemonset)
    assert (config.metrics_address, config.log_format, config.api_deadline) == ("0.0.0.0:8081", "text", 60)
    notes = render_chart()[NOTES]
    assert "http://imageunlock-agent-metrics.imageunlock-system.svc:8081/metrics" in notes
    assert "http://imageunlock-controller-metrics.imageunlock-system.svc:8081/metrics" in notes
    assert "Only pods that metrics.networkPolicy selects may scrape it" in notes
    assert '{"kubernetes.io/metadata.name":"monitoring"}' in notes


def test_metrics_values_reach_the_agents_and_service():
    objects = rendered_objects(METRICS_ALL)
    daemonset, service = _metrics_wiring(objects)
    assert service["spec"]["ports"][0]["port"] == 9102
    assert service["metadata"]["annotations"] == METRICS_ALL["metrics"]["service"]["annotations"]
    config = _agent_config(daemonset)
    assert (config.metrics_address, config.log_format, config.api_deadline) == ("0.0.0.0:9102", "json", 90)


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_service_monitor_selects_the_metrics_service(role):
    objects = rendered_objects(METRICS_ALL)
    _workload, service = _metrics_wiring(objects, role)
    assert len(find(objects, "ServiceMonitor")) == 2  # one per role
    (monitor,) = find(objects, "ServiceMonitor", f"imageunlock-{role}")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    # Exactly one Service carries the selected labels: the ServiceMonitor cannot pick another.
    assert [
        s["metadata"]["name"]
        for s in find(objects, "Service")
        if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ] == [service["metadata"]["name"]]
    (endpoint,) = spec["endpoints"]
    assert endpoint == {
        "port": service["spec"]["ports"][0]["name"],
        "path": "/metrics",
        "scheme": "http",
        "interval": "1m30s",
    }
    # An empty interval leaves it to Prometheus.
    values = {"metrics": {"serviceMonitor": {"enabled": True, "interval": ""}}}
    (monitor,) = find(rendered_objects(values), "ServiceMonitor", f"imageunlock-{role}")
    assert "interval" not in monitor["spec"]["endpoints"][0]
    assert "ServiceMonitor imageunlock-agent and imageunlock-controller" in render_chart(values)[NOTES]


def test_network_policy_admits_only_the_selected_scrapers_to_the_metrics_port():
    objects = rendered_objects(METRICS_ALL)
    _metrics_wiring(objects)
    policies = isolating_policies(objects)
    assert admitted(policies["agent"]) == [
        (
            "metrics",
            [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
        )
    ]
    assert policies["agent"]["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert admitted(policies["controller"]) == admitted(policies["agent"])


def test_network_policies_isolate_both_roles_by_default(helm):
    """Issue 18: on by default, one NetworkPolicy per role. The agent pods admit only their
    "metrics" port, only from every pod of the namespace named "monitoring"; their "health"
    port is admitted to no pod (the kubelet's probes come from the node, which Kubernetes
    always allows). The controller pod the same (its /metrics: issue 21). With metrics off
    neither admits anything; off (metrics.networkPolicy.enabled=false) no policy, and the notes warn."""
    with helm.Chart.load(str(CHART)) as chart:
        assert chart.values["metrics"]["networkPolicy"]["enabled"] is True
    objects = rendered_objects()
    policies = isolating_policies(objects)
    assert sorted(policies) == ["agent", "controller"]
    assert policies["agent"]["metadata"]["name"] == "imageunlock-agent"
    assert policies["controller"]["metadata"]["name"] == "imageunlock-controller"
    assert admitted(policies["agent"]) == [("metrics", DEFAULT_SCRAPERS)]
    assert admitted(policies["controller"]) == [("metrics", DEFAULT_SCRAPERS)]
    daemonset, _ = _workloads(objects)
    ports = {p["name"]: p for p in pod_of(daemonset)["containers"][0]["ports"]}
    assert not {"health", ports["health"]["containerPort"]} & {port for port, _ in admitted(policies["agent"])}
    notes = render_chart()[NOTES]
    assert "NetworkPolicies imageunlock-agent and imageunlock-controller isolate" in notes
    # The health endpoints stay closed when metrics are off: the agents admit nothing.
    policies = isolating_policies(rendered_objects(METRICS_OFF))
    assert sorted(policies) == ["agent", "controller"]
    assert admitted(policies["agent"]) == admitted(policies["controller"]) == []
    # Without the controller, only the agents' policy.
    assert sorted(isolating_policies(rendered_objects({"controller": {"enabled": False}}))) == ["agent"]
    # Opting out leaves no policy and says what that exposes.
    values = {"metrics": {"networkPolicy": {"enabled": False}}}
    assert not find(rendered_objects(values), "NetworkPolicy")
    notes = render_chart(values)[NOTES]
    assert "WARNING: metrics.networkPolicy.enabled=false" in notes and "unauthenticated /metrics" in notes


def test_chart_network_policies_equal_the_manifests():
    """manifests/networkpolicy.yaml is what the chart renders by default (same names,
    namespace, rules); only the chart's selectors add app.kubernetes.io/instance."""

    def comparable(objects: list[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for role, policy in isolating_policies(objects).items():
            spec = copy.deepcopy(policy["spec"])
            spec["podSelector"]["matchLabels"].pop("app.kubernetes.io/instance", None)
            out[role] = (policy["metadata"]["name"], policy["metadata"]["namespace"], spec)
        return out

    plain = comparable(manifest_objects())
    assert sorted(plain) == ["agent", "controller"]
    assert comparable(rendered_objects()) == plain


def test_metrics_off_leaves_no_endpoint():
    objects = rendered_objects(METRICS_OFF)
    for workload in _workloads(objects):
        (container,) = pod_of(workload)["containers"]
        env = env_of(container)
        assert env["IMAGEUNLOCK_METRICS_ADDRESS"] == ""  # set and empty: the role serves no /metrics
        assert [p["name"] for p in container["ports"]] == ["health"]
    (daemonset,) = find(objects, "DaemonSet")
    assert not find(objects, "Service") and not find(objects, "ServiceMonitor")
    assert _agent_config(daemonset).metrics_address == ""
    # The NetworkPolicies stay (the health ports are closed too), with no ingress rule.
    assert all(admitted(p) == [] for p in isolating_policies(objects).values())
    notes = render_chart(METRICS_OFF)[NOTES]
    assert "Metrics are off" in notes and "/metrics\n" not in notes


def test_the_state_dir_must_not_be_the_archive_dir(helm):
    """Whoever writes the state dir (ownership records, reclaim policies) decides which images
    the agents take for their own: it is never the archive directory, nor under it."""
    for state in ("/var/lib/imageunlock", "/var/lib/imageunlock/", "/var/lib/imageunlock/state"):
        with pytest.raises(helm.HelmError, match=r"agent\.stateDir must not be archiveDir"):
            render_chart({"agent": {"stateDir": state}})
    render_chart({"agent": {"stateDir": "/var/lib/imageunlock-state"}})


def test_metrics_port_must_differ_from_the_health_port(helm):
    with pytest.raises(helm.HelmError, match=r"metrics\.port and healthPort must differ"):
        render_chart({"healthPort": 8081})
    render_chart({"healthPort": 8081, "metrics": {"enabled": False}})  # no clash when off


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_chart_metrics_service_equals_the_manifests(role):
    """manifests/service.yaml is the chart's default metrics Services (same name, namespace,
    ports), each selecting its own role's pods."""
    chart = _metrics_wiring(rendered_objects(), role)[1]
    plain = _metrics_wiring(manifest_objects(), role)[1]
    for service in (chart, plain):
        service["spec"].pop("selector")  # the chart's also has app.kubernetes.io/instance
    assert (chart["metadata"]["name"], chart["metadata"]["namespace"], chart["spec"]) == (
        plain["metadata"]["name"],
        plain["metadata"]["namespace"],
        plain["spec"],
    )


# ------------------------------------------------------------------ tenants


def test_archive_per_namespace_reaches_the_agents(helm):
    """agent.archivePerNamespace (default false) is the agents' IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE,
    always set, "true" or "false"; the controller opens no archive and is not told."""
    with helm.Chart.load(str(CHART)) as chart:
        assert chart.values["agent"]["archivePerNamespace"] is False
    for values, expected in ((None, "false"), ({"agent": {"archivePerNamespace": True}}, "true")):
        daemonset, deployment = _workloads(rendered_objects(values))
        assert env_of(pod_of(daemonset)["containers"][0])["IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE"] == expected
        assert "IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE" not in env_of(pod_of(deployment)["containers"][0])


def test_multi_tenant_example_values(helm):
    """examples/multi-tenant-values.yaml (linted strictly, rendered with helm-python-sdk):
    per-namespace archives on the agents, Secrets readable only in the tenants' namespaces
    (no cluster-wide binding), credentials only to the one resource API, and the
    NetworkPolicies on: only Prometheus in "monitoring" reaches either role's metrics port.
    The chart README points to it."""
    values = yaml.safe_load(MULTI_TENANT.read_text())
    report = helm.lint(str(CHART), values, strict=True, namespace="imageunlock-system", kube_version="v1.30.0")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= WARNING], report
    objects = rendered_objects(values)
    daemonset, _ = _workloads(objects)
    env = env_of(pod_of(daemonset)["containers"][0])
    assert env["IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE"] == "true"
    assert json.loads(env["IMAGEUNLOCK_IMAGE_OWNERS"]) == {
        "tenant-a": ["azaion/"],
        "tenant-b": ["registry.example.com/tenant-b/"],
    }
    assert env["IMAGEUNLOCK_ARCHIVE_ROOT"] == "/var/lib/imageunlock"
    assert env["IMAGEUNLOCK_API_URL_ALLOWLIST"] == "https://api.azaion.com"
    _agent_config(daemonset)  # the agent starts with these settings
    policies = isolating_policies(objects)
    assert sorted(policies) == ["agent", "controller"]
    assert admitted(policies["agent"]) == [
        (
            "metrics",
            [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
        )
    ]
    assert admitted(policies["controller"]) == admitted(policies["agent"])
    secrets = _secrets_bindings(objects)
    assert secrets["ClusterRoleBinding"] == []
    assert sorted(b["metadata"]["namespace"] for b in secrets["RoleBinding"]) == ["tenant-a", "tenant-b"]
    assert "examples/multi-tenant-values.yaml" in (CHART / "README.md").read_text()


def test_the_import_lock_directory_is_the_hosts_and_can_be_turned_off():
    """The node-wide import lock (one import per runtime socket, agents and host CLI runs
    alike; issue 18) lives in a host directory the agent mounts at the same path."""
    daemonset, _ = _workloads(rendered_objects())
    pod = pod_of(daemonset)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["locks"]["hostPath"] == {"path": "/run/imageunlock", "type": "DirectoryOrCreate"}
    assert mounts["locks"]["mountPath"] == "/run/imageunlock"
    assert env_of(pod["containers"][0])["IMAGEUNLOCK_LOCK_DIR"] == "/run/imageunlock"
    daemonset, _ = _workloads(rendered_objects({"agent": {"lockDir": ""}}))
    pod = pod_of(daemonset)
    assert "locks" not in {v["name"] for v in pod["volumes"]}
    assert "IMAGEUNLOCK_LOCK_DIR" not in env_of(pod["containers"][0])


def test_image_owners_reach_the_agents_only_when_set():
    daemonset, _ = _workloads(rendered_objects())
    assert "IMAGEUNLOCK_IMAGE_OWNERS" not in env_of(pod_of(daemonset)["containers"][0])


@pytest.mark.parametrize("values", [None, {"fullnameOverride": "iu"}], ids=["default", "renamed"])
def test_controller_runs_two_replicas_guarded_by_its_lease(values):
    """Issue 21, item 4: two controller pods by default, RollingUpdate (the Lease keeps two
    from writing), spread across nodes, kept through drains by a PodDisruptionBudget; the
    Lease they share is the one the Role lets them update, with the same rules as
    manifests/rbac.yaml."""
    objects = rendered_objects(values)
    _, deployment = _workloads(objects)
    spec, pod = deployment["spec"], pod_of(deployment)
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    pod_labels = spec["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()

    (budget,) = find(objects, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    daemonset_labels = _workloads(objects)[0]["spec"]["template"]["metadata"]["labels"]
    assert not budget["spec"]["selector"]["matchLabels"].items() <= daemonset_labels.items()

    env = env_of(pod["containers"][0], pod="ctl-0")
    lease = env["IMAGEUNLOCK_LEASE_NAME"]
    assert lease == deployment["metadata"]["name"] and env["POD_NAMESPACE"] == deployment["metadata"]["namespace"]
    (role,) = find(objects, "Role")
    (binding,) = [b for b in find(objects, "RoleBinding") if b["roleRef"]["kind"] == "Role"]
    assert role["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert role["rules"][0]["resourceNames"] == [lease] and "create" in role["rules"][1]["verbs"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    (written,) = find(manifest_objects(), "Role")
    renamed = [{**r, "resourceNames": ["imageunlock-controller"]} if "resourceNames" in r else r for r in role["rules"]]
    assert renamed == written["rules"]


def test_controller_high_availability_values():
    objects = rendered_objects(
        {"controller": {"replicas": 3, "podDisruptionBudget": {"minAvailable": "50%"}, "affinity": {"x": {}}}}
    )
    _, deployment = _workloads(objects)
    assert deployment["spec"]["replicas"] == 3 and pod_of(deployment)["affinity"] == {"x": {}}
    assert find(objects, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == "50%"
    assert (
        find(rendered_objects({"controller": {"podDisruptionBudget": {"enabled": False}}}), "PodDisruptionBudget") == []
    )
    off = rendered_objects({"controller": {"enabled": False}})
    assert find(off, "PodDisruptionBudget") == [] and find(off, "Role") == []


def test_secret_watch_can_be_turned_off_to_grant_get_only():
    """list/watch on Secrets return their data to a client that does not ask for metadata
    only: where bound, a compromised agent could stream every Secret there. rbac.secretWatch
    false keeps the role to get (a fixed Secret is then re-checked at the verify interval)."""

    def verbs(values: dict[str, Any] | None) -> list[str]:
        [role] = [r for r in find(rendered_objects(values), "ClusterRole") if r["metadata"]["name"] == SECRETS_ROLE]
        [rule] = [r for r in role["rules"] if "secrets" in r["resources"]]
        return list(rule["verbs"])

    assert verbs(None) == ["get", "list", "watch"]
    assert verbs({"rbac": {"secretWatch": False}}) == ["get"]
