"""Smoke test of the local control plane (tools/controlplane): etcd + a CRD-capable API
server with a minimal core/v1, driven with kubectl.

The first run builds the API server from Debian sid's Go sources (3-9 min on 2 cores);
later runs reuse the cache in ${XDG_CACHE_HOME:-~/.cache}/imageunlock/controlplane.
If the plane cannot be brought up the tests are skipped, except with CI=true, where
they fail.
"""

from __future__ import annotations

import base64
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

import controlplane

from ..support.ci import unavailable

# The first run may build the API server (minutes), inside the fixture of the first test.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

CRD = textwrap.dedent("""\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.e2e.example.com
    spec:
      group: e2e.example.com
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
      versions:
      - name: v1
        served: true
        storage: true
        subresources: {status: {}}
        additionalPrinterColumns:
        - {name: Size, type: integer, jsonPath: .spec.size}
        - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
        schema:
          openAPIV3Schema:
            type: object
            properties:
              spec:
                type: object
                properties:
                  size: {type: integer, minimum: 1}
              status:
                type: object
                properties:
                  conditions:
                    type: array
                    items:
                      type: object
                      required: [type, status]
                      properties:
                        type: {type: string}
                        status: {type: string}
                        reason: {type: string}
                        message: {type: string}
    """)

# For the second identity: may read configmaps in "default", nothing else.
POLICY = textwrap.dedent("""\
    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: cm-reader, namespace: default}
    rules:
    - {apiGroups: [""], resources: [configmaps], verbs: [get, list, watch]}
    ---
    apiVersion: rbac.authorization.k8s.io/v1
    kind: RoleBinding
    metadata: {name: cm-reader, namespace: default}
    roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
    subjects:
    - {kind: User, name: e2e-reader, apiGroup: rbac.authorization.k8s.io}
    """)


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    d = tmp_path_factory.mktemp("plane")
    (d / "rbac.yaml").write_text(POLICY)
    cp = controlplane.ControlPlane(d / "run", audit_log=d / "audit.log", authorization_policy=d / "rbac.yaml")
    try:
        cp.start(timeout=90)
        kubectl = controlplane.kubectl_path()
    except Exception as e:
        cp.stop()
        unavailable("local control plane", f"{type(e).__name__}: {e}")
    cp.kubectl_bin = kubectl
    try:
        yield cp
    finally:
        cp.stop()
        assert not cp.running()


def kubectl(cp, *args, stdin=None, kubeconfig=None, check=True):
    kubeconfig = kubeconfig or cp.kubeconfig
    cache = f"{kubeconfig}.kubectl-cache"  # per identity, so discovery is really requested
    res = subprocess.run(
        [cp.kubectl_bin, "--kubeconfig", kubeconfig, "--cache-dir", cache, *args],
        input=stdin,
        text=True,
        capture_output=True,
        timeout=60,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def test_api_resources(plane):
    out = kubectl(plane, "api-resources", "-o", "name").stdout.split()
    for name in ("namespaces", "secrets", "events", "configmaps", "customresourcedefinitions.apiextensions.k8s.io"):
        assert name in out
    namespaces = kubectl(plane, "get", "ns", "-o", "name").stdout.split()
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        assert f"namespace/{ns}" in namespaces


def test_crd_status_and_wait(plane):
    kubectl(plane, "apply", "-f", "-", stdin=CRD)
    kubectl(plane, "wait", "--for=condition=Established", "crd/widgets.e2e.example.com", "--timeout=30s")
    assert "widgets.e2e.example.com" in kubectl(plane, "api-resources", "-o", "name").stdout.split()

    kubectl(
        plane,
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "e2e.example.com/v1",
                "kind": "Widget",
                "metadata": {"name": "w1", "namespace": "default"},
                "spec": {"size": 3},
            }
        ),
    )
    bad = kubectl(
        plane,
        "create",
        "-f",
        "-",
        check=False,
        stdin=json.dumps(
            {
                "apiVersion": "e2e.example.com/v1",
                "kind": "Widget",
                "metadata": {"name": "w0", "namespace": "default"},
                "spec": {"size": 0},
            }
        ),
    )
    assert bad.returncode != 0 and "spec.size" in bad.stderr

    kubectl(
        plane,
        "patch",
        "widget",
        "w1",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Test"}]}}),
    )
    kubectl(plane, "wait", "--for=condition=Ready", "widget/w1", "-n", "default", "--timeout=20s")

    table = kubectl(plane, "get", "wd", "-n", "default").stdout
    assert table.split("\n")[0].split() == ["NAME", "SIZE", "READY"]
    assert table.split("\n")[1].split() == ["w1", "3", "True"]


def test_secret_string_data(plane):
    kubectl(
        plane,
        "apply",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "creds", "namespace": "default"},
                "stringData": {"username": "robot", "password": "s3cret"},
            }
        ),
    )
    secret = json.loads(kubectl(plane, "get", "secret", "creds", "-n", "default", "-o", "json").stdout)
    assert secret["type"] == "Opaque"
    assert "stringData" not in secret
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "username": "robot",
        "password": "s3cret",
    }


def test_second_identity_and_audit(plane):
    kubectl(plane, "create", "configmap", "settings", "-n", "default", "--from-literal=a=b")
    reader = plane.add_user("e2e-reader", groups=["e2e-group"])
    got = kubectl(plane, "get", "configmap", "settings", "-n", "default", "-o", "name", kubeconfig=reader)
    assert got.stdout.strip() == "configmap/settings"
    denied = kubectl(plane, "get", "secrets", "-n", "default", kubeconfig=reader, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    events = [json.loads(line) for line in (Path(plane.audit_log).read_text().splitlines())]
    mine = [e for e in events if e["user"]["username"] == "e2e-reader" and e["stage"] == "ResponseComplete"]
    seen = {(e.get("objectRef", {}).get("resource"), e["verb"], e.get("responseStatus", {}).get("code")) for e in mine}
    assert ("configmaps", "get", 200) in seen
    assert ("secrets", "list", 403) in seen
    # Discovery (/api, /apis, /version) is open to every authenticated user, as in kube.
    assert {code for resource, _, code in seen if resource != "secrets"} == {200}
