"""The Helm chart: strict lint, rendering with default and non-default values, its values
schema, that it cannot drift from crds/ and manifests/ (CRD bytes, RBAC rules, pod spec,
metrics Service), and the metrics objects (Service, ServiceMonitor, NetworkPolicy) wired to
each other by labels and port names. Offline: helm-python-sdk (Helm's Go SDK through
libhelm_c), no cluster, no helm binary.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .conftest import (
    CHART,
    CRD_FILE,
    METRICS_ALL,
    METRICS_OFF,
    NON_DEFAULT_VALUES,
    cluster_wide_objects,
    find,
    manifest_objects,
    render_chart,
    rendered_objects,
    require,
)

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error
NOTES = "imageunlock-operator/templates/NOTES.txt"
SECRETS_ROLE = "imageunlock-operator-secrets"  # the default release's Secret-reading ClusterRole
STALL_MESSAGE = "not allowed to read Secret"  # what ImageUnlocks stall with (imageunlock/kube.py)
# Every optional metrics branch on, with non-default settings (NON_DEFAULT_VALUES leaves
# metrics at its defaults).


@pytest.fixture(scope="module")
def helm():
    return require("helm_python")


@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}, METRICS_ALL, METRICS_OFF],
    ids=["default", "non-default", "cluster-wide-secrets", "metrics-all", "metrics-off"],
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
    # Secrets: no binding by default; non-default: one RoleBinding per rbac.secretNamespaces.
    # metrics.enabled is on by default: its Service.
    expected = ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    if values:  # and namespace.create
        expected += ["Namespace", "RoleBinding", "RoleBinding"]
    assert kinds == sorted(expected)
    assert NOTES in manifests


def test_default_values_match_the_manifests():
    """The chart's defaults render the same operator as manifests/deployment.yaml."""
    chart = find(rendered_objects(), "Deployment")[0]["spec"]
    plain = find(manifest_objects(), "Deployment")[0]["spec"]
    for spec in (chart, plain):
        spec.pop("selector")
        spec["template"].pop("metadata")
        pod = spec["template"]["spec"]
        pod.pop("serviceAccountName")
        pod["containers"][0].pop("image")
    assert chart == plain


def test_non_default_values_reach_the_deployment():
    objects = rendered_objects(NON_DEFAULT_VALUES)
    (deployment,) = find(objects, "Deployment", "iu")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == "registry.example.com/azaion/imageunlock:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert env["IMAGEUNLOCK_ARCHIVE_ROOT"] == "/srv/azaion/archives"
    assert env["RESOURCE_API_URL"] == "https://resources.example.com"
    assert env["IMAGEUNLOCK_LOG_LEVEL"] == "debug"
    assert env["IMAGEUNLOCK_VERIFY_INTERVAL"] == "60"
    assert env["IMAGEUNLOCK_LIVENESS"] == "http://0.0.0.0:9090/healthz"
    assert env["IMAGEUNLOCK_WORKERS"] == "2"
    assert container["ports"] == [
        {"name": "health", "containerPort": 9090, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert container["resources"] == NON_DEFAULT_VALUES["resources"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["archives"]["hostPath"] == {"path": "/srv/azaion/archives", "type": "Directory"}
    assert volumes["runtime-socket"]["hostPath"] == {"path": "/run/docker.sock", "type": "Socket"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "128Mi"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["archives"] == {"name": "archives", "mountPath": "/srv/azaion/archives", "readOnly": True}
    assert mounts["runtime-socket"]["mountPath"] == "/var/run/docker.sock"
    assert pod["securityContext"]["supplementalGroups"] == [988]
    assert pod["securityContext"]["runAsUser"] == 20001
    assert pod["nodeSelector"] == NON_DEFAULT_VALUES["nodeSelector"]
    assert pod["tolerations"] == NON_DEFAULT_VALUES["tolerations"]
    assert pod["affinity"] == NON_DEFAULT_VALUES["affinity"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "iu-operator"
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["name"] == "imageunlock-system"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    bindings = find(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["edge-a", "edge-b"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == "iu-secrets"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "iu-operator", "namespace": "imageunlock-system"}
        ]
    assert not find(objects, "ClusterRoleBinding", "iu-secrets")


def test_optional_parts_can_be_switched_off():
    values = {
        "serviceAccount": {"create": False, "name": "existing"},
        "rbac": {"create": False},
        "runtime": {"socketPath": "/var/run/docker.sock", "socketGroupId": None},
        "resourceApiUrl": "",
        "resourceApiAllowlist": ["https://a.example.com", "https://b.example.com/v2"],
        "metrics": {"enabled": False},
    }
    objects = rendered_objects(values)
    assert sorted(o["kind"] for o in objects) == ["Deployment"]
    pod = objects[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert "supplementalGroups" not in pod["securityContext"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "RESOURCE_API_URL" not in env
    assert env["IMAGEUNLOCK_API_URL_ALLOWLIST"] == "https://a.example.com,https://b.example.com/v2"


def test_containerd_runtime_mounts_its_socket_where_the_operator_looks():
    """runtime.name containerd (a k3s node): the node's socket at the operator's default
    address, and settings the operator starts with."""
    objects = rendered_objects(
        {"runtime": {"name": "containerd", "socketGroupId": 0, "socketPath": "/run/k3s/containerd/containerd.sock"}}
    )
    (deployment,) = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMAGEUNLOCK_RUNTIME"] == "containerd" and "IMAGEUNLOCK_DOCKER_HOST" not in env
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["runtime-socket"]["hostPath"] == {"path": "/run/k3s/containerd/containerd.sock", "type": "Socket"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["runtime-socket"]["mountPath"] == "/run/containerd/containerd.sock"
    assert pod["securityContext"]["supplementalGroups"] == [0]
    config = _operator_config(deployment)
    assert config.runtime == "containerd" and config.containerd_address == "/run/containerd/containerd.sock"


@pytest.mark.parametrize(
    "bad",
    [
        {"runtime": {"name": "podman", "socketPath": "/run/podman/podman.sock"}},
        {"logLevel": "verbose"},
        {"verifyInterval": 0},
        {"runAsUser": 0},
        {"archiveDir": "relative/path"},
        {"runtime": {"socketPath": "docker.sock"}},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"resourceApiUrl": "ftp://example.com"},
        {"resourceApiUrl": ""},  # and no resourceApiAllowlist: the operator would refuse to start
        {"rbac": {"secretNamespaces": ["Not_A_Namespace"]}},
        {"rbac": {"clusterWideSecrets": "true"}},
        # contradictory: cluster-wide AND a namespace list
        {"rbac": {"clusterWideSecrets": True, "secretNamespaces": ["edge"]}},
        {"replicas": 2},  # not a value: one replica only
        {"logFormat": "logfmt"},
        {"apiDeadline": 0},
        {"metrics": {"enabled": "true"}},
        {"metrics": {"port": 0}},
        {"metrics": {"port": 65536}},
        {"metrics": {"port": "8081"}},
        {"metrics": {"path": "/metrics"}},  # not a value: the operator serves /metrics only
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        {"metrics": {"serviceMonitor": {"interval": "1.5m"}}},
        {"metrics": {"serviceMonitor": {"labels": {"release": 1}}}},
        # a ServiceMonitor for a Service that is not there
        {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
        {"metrics": {"networkPolicy": {"namespaceSelector": {"matchNames": ["monitoring"]}}}},
        {"metrics": {"service": {"type": "NodePort"}}},  # ClusterIP only
    ],
    ids=lambda v: next(iter(v)),
)
def test_schema_rejects_bad_values(helm, bad):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    report = helm.lint(str(CHART), bad, strict=True)
    assert report["errors"] or any(m["severity"] >= WARNING for m in report["messages"])


def test_chart_crds_are_identical_to_crds_dir(helm):
    """chart/.../crds/ is a byte-for-byte copy of crds/ (Helm installs CRDs from there)."""
    top = {p.name: p.read_bytes() for p in CRD_FILE.parent.iterdir() if p.suffix in (".yaml", ".yml")}
    chart_dir = CHART / "crds"
    copies = {p.name: p.read_bytes() for p in chart_dir.iterdir()}
    assert sorted(copies) == sorted(top), "chart crds/ and crds/ hold different files"
    for name, data in top.items():
        assert copies[name] == data, f"copy crds/{name} into {chart_dir}: they drifted"
    with helm.Chart.load(str(CHART)) as chart:
        loaded = {c["filename"].rsplit("/", 1)[-1]: c["data"].encode() for c in chart.crds}
    assert loaded == top


def _rules(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """ClusterRole rules keyed by the role's suffix after the base name (''/'-secrets')."""
    roles = find(objects, "ClusterRole")
    base = min((r["metadata"]["name"] for r in roles), key=len)
    return {r["metadata"]["name"][len(base) :]: r["rules"] for r in roles}


def test_chart_rbac_equals_manifest_rbac():
    plain = _rules(manifest_objects())
    assert set(plain) == {"", "-secrets"}
    for values in (None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}):
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
    cluster_wide = _bindings(find(manifest_objects(), "ClusterRoleBinding") + cluster_wide_objects())
    assert _bindings(rendered_objects({"rbac": {"clusterWideSecrets": True}})) == cluster_wide


@pytest.mark.parametrize(
    "values",
    [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}],
    ids=["default", "non-default", "cluster-wide"],
)
def test_chart_bindings_point_at_the_roles(values):
    objects = rendered_objects(values)
    (sa,) = find(objects, "ServiceAccount")
    roles = {r["metadata"]["name"] for r in find(objects, "ClusterRole")}
    bindings = find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "ClusterRole" and binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
        ]


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
    (operator_binding,) = find(objects, "ClusterRoleBinding")
    assert operator_binding["roleRef"]["name"] == "imageunlock-operator"  # not the Secrets role
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
    assert len(find(objects, "RoleBinding")) == len(namespaces)
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
        {"kind": "ServiceAccount", "name": "imageunlock-operator", "namespace": "imageunlock-system"}
    ]
    notes = render_chart(values)[NOTES]
    assert "WARNING" not in notes and "EVERY" in notes
    # with another release name, the binding follows the role's name
    renamed = rendered_objects({**values, "fullnameOverride": "iu"})
    assert [b["metadata"]["name"] for b in _secrets_bindings(renamed, "iu-secrets")["ClusterRoleBinding"]] == [
        "iu-secrets"
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


def _operator_config(deployment: dict[str, Any]) -> Any:
    """The operator's own settings parser run on the Deployment's environment: what the pod
    would start with (or its ConfigurationError)."""
    config = pytest.importorskip("imageunlock.config")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return config.OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"]})


def _metrics_wiring(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the metrics Service, after checking the Service reaches the pod's
    "metrics" port: its selector picks the pod template (and the Deployment's selector), and
    its targetPort names the container port the operator listens on."""
    (deployment,) = find(objects, "Deployment")
    (service,) = find(objects, "Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p for p in container["ports"]}
    assert port["name"] == port["targetPort"] == "metrics"
    assert container_ports["metrics"]["containerPort"] == port["port"]
    assert port["protocol"] == container_ports["metrics"]["protocol"] == "TCP"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["IMAGEUNLOCK_METRICS_ADDRESS"] == f"0.0.0.0:{port['port']}"
    return deployment, service


def test_metrics_are_on_by_default_behind_a_cluster_ip_service():
    objects = rendered_objects()
    deployment, service = _metrics_wiring(objects)
    assert service["metadata"]["name"] == "imageunlock-operator-metrics"
    assert service["spec"]["ports"][0]["port"] == 8081
    # Opt-in extras stay off: no ServiceMonitor (needs the Prometheus Operator CRDs), no
    # NetworkPolicy, and no prometheus.io/* annotations (a sample-config convention that
    # would have any annotation-driven Prometheus scrape the endpoint unasked).
    assert not find(objects, "ServiceMonitor") and not find(objects, "NetworkPolicy")
    for obj in (service, deployment, deployment["spec"]["template"]):
        assert not any(k.startswith("prometheus.io/") for k in obj["metadata"].get("annotations", {}))
    config = _operator_config(deployment)
    assert (config.metrics_address, config.log_format, config.api_deadline) == ("0.0.0.0:8081", "text", 60)
    notes = render_chart()[NOTES]
    assert "http://imageunlock-operator-metrics.imageunlock-system.svc:8081/metrics" in notes
    assert "unauthenticated" in notes and "metrics.networkPolicy.enabled=true" in notes


def test_metrics_values_reach_the_deployment_and_service():
    objects = rendered_objects(METRICS_ALL)
    deployment, service = _metrics_wiring(objects)
    assert service["spec"]["ports"][0]["port"] == 9102
    assert service["metadata"]["annotations"] == METRICS_ALL["metrics"]["service"]["annotations"]
    config = _operator_config(deployment)
    assert (config.metrics_address, config.log_format, config.api_deadline) == ("0.0.0.0:9102", "json", 90)


def test_service_monitor_selects_the_metrics_service():
    objects = rendered_objects(METRICS_ALL)
    _deployment, service = _metrics_wiring(objects)
    (monitor,) = find(objects, "ServiceMonitor")
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
    (monitor,) = find(rendered_objects(values), "ServiceMonitor")
    assert "interval" not in monitor["spec"]["endpoints"][0]
    assert "ServiceMonitor imageunlock-operator" in render_chart(values)[NOTES]


def test_network_policy_admits_only_the_selected_scrapers_to_the_metrics_port():
    objects = rendered_objects(METRICS_ALL)
    deployment, _service = _metrics_wiring(objects)
    (policy,) = find(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]  # egress (Kubernetes API, resource API) untouched
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    # Default selectors: every pod of the namespace named "monitoring".
    (policy,) = find(rendered_objects({"metrics": {"networkPolicy": {"enabled": True}}}), "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}}
    ]


def test_metrics_off_leaves_no_endpoint():
    objects = rendered_objects(METRICS_OFF)
    (deployment,) = find(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["IMAGEUNLOCK_METRICS_ADDRESS"] == ""  # set and empty: the operator serves no /metrics
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert not find(objects, "Service") and not find(objects, "ServiceMonitor")
    assert _operator_config(deployment).metrics_address == ""
    # networkPolicy.enabled alone renders nothing: it is about the metrics port
    assert not find(
        rendered_objects({"metrics": {"enabled": False, "networkPolicy": {"enabled": True}}}), "NetworkPolicy"
    )
    notes = render_chart(METRICS_OFF)[NOTES]
    assert "Metrics are off" in notes and "/metrics\n" not in notes


def test_metrics_port_must_differ_from_the_health_port(helm):
    with pytest.raises(helm.HelmError, match=r"metrics\.port and healthPort must differ"):
        render_chart({"healthPort": 8081})
    render_chart({"healthPort": 8081, "metrics": {"enabled": False}})  # no clash when off


def test_chart_metrics_service_equals_the_manifests():
    """manifests/service.yaml is the chart's default metrics Service (same name, namespace,
    ports), each selecting its own Deployment's pods."""
    chart = _metrics_wiring(rendered_objects())[1]
    plain = _metrics_wiring(manifest_objects())[1]
    for service in (chart, plain):
        service["spec"].pop("selector")  # the chart's also has app.kubernetes.io/instance
    assert (chart["metadata"]["name"], chart["metadata"]["namespace"], chart["spec"]) == (
        plain["metadata"]["name"],
        plain["metadata"]["namespace"],
        plain["spec"],
    )
