"""The Helm chart: strict lint, rendering with default and non-default values, its values
schema, and that it cannot drift from crds/ and manifests/ (CRD bytes, RBAC rules, pod spec).
Offline: helm-python-sdk (Helm's Go SDK through libhelm_c), no cluster, no helm binary.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .conftest import (
    CHART,
    CRD_FILE,
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


@pytest.fixture(scope="module")
def helm():
    return require("helm_python")


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}],
                         ids=["default", "non-default", "cluster-wide-secrets"])
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
    # Secrets: no binding by default; non-default: one RoleBinding per rbac.secretNamespaces
    expected = ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
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
    assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
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
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "iu-operator", "namespace": "imageunlock-system"}]
    assert not find(objects, "ClusterRoleBinding", "iu-secrets")


def test_optional_parts_can_be_switched_off():
    values = {"serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False},
              "runtime": {"socketPath": "/var/run/docker.sock", "socketGroupId": None}, "resourceApiUrl": "",
              "resourceApiAllowlist": ["https://a.example.com", "https://b.example.com/v2"]}
    objects = rendered_objects(values)
    assert sorted(o["kind"] for o in objects) == ["Deployment"]
    pod = objects[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert "supplementalGroups" not in pod["securityContext"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert "RESOURCE_API_URL" not in env
    assert env["IMAGEUNLOCK_API_URL_ALLOWLIST"] == "https://a.example.com,https://b.example.com/v2"


@pytest.mark.parametrize(
    "bad",
    [
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
    ],
    ids=lambda v: next(iter(v)),
)
def test_schema_rejects_bad_values(helm, bad):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
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
    return {r["metadata"]["name"][len(base):]: r["rules"] for r in roles}


def test_chart_rbac_equals_manifest_rbac():
    plain = _rules(manifest_objects())
    assert set(plain) == {"", "-secrets"}
    for values in (None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}):
        assert _rules(rendered_objects(values)) == plain


def _bindings(objects: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every (Cluster)RoleBinding as (kind, namespace, name, roleRef, subjects), sorted."""
    return sorted(
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"], o["roleRef"], o["subjects"])
        for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")
    )


def test_chart_bindings_equal_the_manifests():
    """rbac.secretNamespaces=[edge] binds exactly as manifests/rbac.yaml (RoleBinding in edge),
    rbac.clusterWideSecrets as manifests/ plus its opt-in manifests/cluster-wide-secrets/."""
    namespaced = _bindings(manifest_objects())
    assert _bindings(rendered_objects({"rbac": {"secretNamespaces": ["edge"]}})) == namespaced
    cluster_wide = _bindings(find(manifest_objects(), "ClusterRoleBinding") + cluster_wide_objects())
    assert _bindings(rendered_objects({"rbac": {"clusterWideSecrets": True}})) == cluster_wide


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES, {"rbac": {"clusterWideSecrets": True}}],
                         ids=["default", "non-default", "cluster-wide"])
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
    return {kind: [b for b in find(objects, kind) if b["roleRef"]["name"] == role]
            for kind in ("ClusterRoleBinding", "RoleBinding")}


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
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": SECRETS_ROLE}
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
        {"kind": "ServiceAccount", "name": "imageunlock-operator", "namespace": "imageunlock-system"}]
    notes = render_chart(values)[NOTES]
    assert "WARNING" not in notes and "EVERY" in notes
    # with another release name, the binding follows the role's name
    renamed = rendered_objects({**values, "fullnameOverride": "iu"})
    assert [b["metadata"]["name"] for b in _secrets_bindings(renamed, "iu-secrets")["ClusterRoleBinding"]] == [
        "iu-secrets"]


def test_values_file_is_fully_described_by_the_schema(helm):
    """Every default value validates, and the schema forbids keys it does not know."""
    with helm.Chart.load(str(CHART)) as chart:
        schema = chart.schema
        defaults = copy.deepcopy(chart.values)
        chart.validate_schema(defaults)
    assert schema is not None and schema.get("additionalProperties") is False
    assert set(defaults) <= set(schema["properties"])
