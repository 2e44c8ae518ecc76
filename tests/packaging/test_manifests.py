"""manifests/ and the rendered chart against Kubernetes' schemas (kubernetes-validate, strict:
unknown fields are errors), the samples against the CRD, the security and RBAC promises, and,
for the kinds the local control plane serves (Namespace, Secret, CRD, ImageUnlock), a
server-side dry run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    CHART,
    CRD_FILE,
    MANIFESTS,
    NON_DEFAULT_VALUES,
    OPERATOR_NAMESPACE,
    find,
    load_docs,
    manifest_objects,
    rendered_objects,
    require,
    sample_objects,
)

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
K8S_VERSIONS = ["1.25", "latest"]
CUSTOM_KINDS = {"ImageUnlock"}


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
    _validate(manifest_objects() + sample_objects() + crd, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", [None, NON_DEFAULT_VALUES], ids=["default", "non-default"])
def test_rendered_chart_validates(values, version):
    _validate(rendered_objects(values), version)


def test_kustomization_lists_every_installation_file():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    on_disk = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == on_disk


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
    # The sample archive lies under the operator's default archive root.
    (deployment,) = find(manifest_objects(), "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert unlock["spec"]["archivePath"].startswith(env["IMAGEUNLOCK_ARCHIVE_ROOT"] + "/")


def test_deployment_keeps_its_promises():
    (deployment,) = find(manifest_objects(), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["supplementalGroups"], "the Docker socket's group"
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
    assert volumes["archives"]["hostPath"] == {"path": "/var/lib/imageunlock", "type": "Directory"}
    assert mounts["archives"]["readOnly"] is True
    assert volumes["runtime-socket"]["hostPath"] == {"path": "/var/run/docker.sock", "type": "Socket"}
    assert mounts["runtime-socket"]["mountPath"] == "/var/run/docker.sock"
    assert "emptyDir" in volumes["tmp"] and mounts["tmp"]["mountPath"] == "/tmp"
    assert pod["serviceAccountName"] == "imageunlock-operator"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMAGEUNLOCK_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env["IMAGEUNLOCK_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    assert {o["metadata"].get("namespace") for o in manifest_objects() if o["kind"] in
            ("Deployment", "ServiceAccount")} == {OPERATOR_NAMESPACE}


RULE_START = re.compile(r"^(\s*)- apiGroups:")


def _rule_comments(text: str) -> list[tuple[str, list[str]]]:
    """(rule's first line, its comment lines) for every rule under a `rules:` key."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if RULE_START.match(line):
            comments = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                comments.insert(0, lines[j].strip())
                j -= 1
            found.append((line.strip(), comments))
    return found


@pytest.mark.parametrize("path", [MANIFESTS / "rbac.yaml", CHART / "templates" / "rbac.yaml"],
                         ids=["manifests", "chart"])
def test_every_rbac_rule_is_justified(path: Path):
    rules = _rule_comments(path.read_text())
    parsed = sum(len(o["rules"]) for o in manifest_objects() if o["kind"] == "ClusterRole")
    assert len(rules) == parsed, "every rule must start with '- apiGroups:'"
    for first, comments in rules:
        assert comments and sum(len(c) for c in comments) > 40, f"rule without a justifying comment: {first}"


def test_rbac_is_least_privilege():
    rules = [r for o in manifest_objects() if o["kind"] == "ClusterRole" for r in o["rules"]]
    granted = {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    assert granted == {
        ("loader.azaion.com", "imageunlocks", "list"),
        ("loader.azaion.com", "imageunlocks", "watch"),
        ("loader.azaion.com", "imageunlocks", "patch"),
        ("loader.azaion.com", "imageunlocks/status", "patch"),
        ("", "events", "create"),
        ("", "secrets", "get"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in rules)


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
        manifest_objects()
        + load_docs(CRD_FILE.read_text())
        + rendered_objects({"namespace": {"create": True}})
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
    res = plane.kubectl("apply", "--dry-run=server", "-n", OPERATOR_NAMESPACE, "-f", "-",
                        stdin=json.dumps(unlock), check=False)
    assert res.returncode != 0 and "archivePath" in res.stderr
