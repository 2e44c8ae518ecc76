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
    find,
    manifest_objects,
    render_chart,
    rendered_objects,
    require,
)

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


@pytest.fixture(scope="module")
def helm():
    return require("helm_python")


@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
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
    expected = ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    if values:  # namespace.create, and RoleBindings instead of the secrets ClusterRoleBinding
        expected = sorted(expected[:3] + ["Deployment", "Namespace", "RoleBinding", "RoleBinding", "ServiceAccount"])
    assert kinds == sorted(expected)
    assert "imageunlock-operator/templates/NOTES.txt" in manifests


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
    for values in (None, NON_DEFAULT_VALUES):
        assert _rules(rendered_objects(values)) == plain


def test_chart_bindings_point_at_the_roles():
    objects = rendered_objects()
    (sa,) = find(objects, "ServiceAccount")
    roles = {r["metadata"]["name"] for r in find(objects, "ClusterRole")}
    bindings = find(objects, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == roles
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
        ]


def test_values_file_is_fully_described_by_the_schema(helm):
    """Every default value validates, and the schema forbids keys it does not know."""
    with helm.Chart.load(str(CHART)) as chart:
        schema = chart.schema
        defaults = copy.deepcopy(chart.values)
        chart.validate_schema(defaults)
    assert schema is not None and schema.get("additionalProperties") is False
    assert set(defaults) <= set(schema["properties"])
