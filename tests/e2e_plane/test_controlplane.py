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
    ---
    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: elector, namespace: default}
    rules:
    - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, update], resourceNames: [mine]}
    - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}
    ---
    apiVersion: rbac.authorization.k8s.io/v1
    kind: RoleBinding
    metadata: {name: elector, namespace: default}
    roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: elector}
    subjects:
    - {kind: User, name: e2e-elector, apiGroup: rbac.authorization.k8s.io}
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
    for name in (
        "namespaces",
        "secrets",
        "events",
        "configmaps",
        "nodes",
        "leases.coordination.k8s.io",
        "customresourcedefinitions.apiextensions.k8s.io",
    ):
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


def node(name, labels, runtime, address, taints=()):
    """A Node as a test would create it (there is no kubelet): labels, taints and status."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": list(taints)},
        "status": {
            "capacity": {"cpu": "4", "memory": "8Gi"},
            "addresses": [{"type": "InternalIP", "address": address}],
            "nodeInfo": {"containerRuntimeVersion": runtime, "kubeletVersion": "v1.30.0"},
        },
    }


def names(res):
    return sorted(res.stdout.split())


def test_nodes_status_selectors_relabel_delete(plane):
    taint = {"key": "dedicated", "value": "edge", "effect": "NoSchedule"}
    nodes = [
        node("edge-1.example.com", {"role": "edge"}, "containerd://1.7.3", "10.0.0.11", [taint]),
        node("core-1", {"role": "core"}, "docker://24.0.7", "10.0.0.12"),
    ]
    kubectl(plane, "create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}))

    got = json.loads(kubectl(plane, "get", "node", "edge-1.example.com", "-o", "json").stdout)
    assert got["status"]["nodeInfo"]["containerRuntimeVersion"] == "containerd://1.7.3"
    assert got["status"]["addresses"] == [{"type": "InternalIP", "address": "10.0.0.11"}]
    assert got["status"]["capacity"] == {"cpu": "4", "memory": "8Gi"}
    assert got["spec"]["taints"] == [taint]

    table = kubectl(plane, "get", "nodes", "core-1").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "VERSION", "RUNTIME", "AGE"]
    assert table[1].split()[:3] == ["core-1", "v1.30.0", "docker://24.0.7"]
    assert "10.0.0.12" in kubectl(plane, "get", "no", "core-1", "-o", "wide").stdout

    assert names(kubectl(plane, "get", "nodes", "-l", "role=edge", "-o", "name")) == ["node/edge-1.example.com"]
    by_name = kubectl(plane, "get", "nodes", "--field-selector", "metadata.name=core-1", "-o", "name")
    assert names(by_name) == ["node/core-1"]

    kubectl(plane, "label", "node", "core-1", "role=edge", "--overwrite")
    assert names(kubectl(plane, "get", "nodes", "-l", "role=edge", "-o", "name")) == [
        "node/core-1",
        "node/edge-1.example.com",
    ]
    relabelled = json.loads(kubectl(plane, "get", "node", "core-1", "-o", "json").stdout)
    assert relabelled["status"]["nodeInfo"]["containerRuntimeVersion"] == "docker://24.0.7"  # a patch keeps status

    kubectl(plane, "delete", "node", "core-1", "edge-1.example.com")
    gone = kubectl(plane, "get", "node", "core-1", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr

    bad = kubectl(plane, "create", "-f", "-", check=False, stdin=json.dumps(node("Bad_Name", {}, "x://1", "10.0.0.1")))
    assert bad.returncode != 0 and "RFC 1123 subdomain" in bad.stderr


def test_node_server_side_apply(plane):
    kubectl(
        plane,
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=json.dumps(node("ssa-1", {"role": "edge"}, "containerd://1.7.3", "10.0.0.21")),
    )
    # A second manager owns another label; a conflicting runtime version is refused.
    other = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "ssa-1", "labels": {"zone": "a"}}}
    kubectl(plane, "apply", "--server-side", "--field-manager=other", "-f", "-", stdin=json.dumps(other))
    clash = dict(other, status={"nodeInfo": {"containerRuntimeVersion": "docker://24.0.7"}})
    conflict = kubectl(
        plane, "apply", "--server-side", "--field-manager=other", "-f", "-", check=False, stdin=json.dumps(clash)
    )
    assert conflict.returncode != 0 and "conflict" in conflict.stderr.lower()

    got = json.loads(kubectl(plane, "get", "node", "ssa-1", "-o", "json", "--show-managed-fields").stdout)
    assert got["metadata"]["labels"] == {"role": "edge", "zone": "a"}
    assert got["status"]["nodeInfo"]["containerRuntimeVersion"] == "containerd://1.7.3"
    managers = {m["manager"]: m["fieldsV1"] for m in got["metadata"]["managedFields"]}
    assert "f:containerRuntimeVersion" in managers["kubectl"]["f:status"]["f:nodeInfo"]
    assert managers["other"] == {"f:metadata": {"f:labels": {"f:zone": {}}}}
    kubectl(plane, "delete", "node", "ssa-1")


def test_nodes_python_client_read_list_watch(plane):
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig)))
    body = node("py-1", {"role": "py"}, "docker://24.0.7", "10.0.0.31")
    # The client (v37, pydantic) refuses a body whose nodeInfo lacks any of its ten
    # required fields; the server accepts a partial one and returns them all ("" if unset).
    unset = ["architecture", "bootID", "kernelVersion", "kubeProxyVersion", "machineID", "operatingSystem"]
    body["status"]["nodeInfo"].update(dict.fromkeys([*unset, "osImage", "systemUUID"], ""))
    api.create_node(body)
    try:
        got = api.read_node("py-1")
        assert got.status.node_info.container_runtime_version == "docker://24.0.7"
        assert [(a.type, a.address) for a in got.status.addresses] == [("InternalIP", "10.0.0.31")]
        listed = api.list_node(label_selector="role=py")
        assert [n.status.node_info.container_runtime_version for n in listed.items] == ["docker://24.0.7"]

        api.patch_node("py-1", {"metadata": {"labels": {"extra": "1"}}})
        api.delete_node("py-1")
        events = []
        stream = kubernetes.watch.Watch().stream(
            api.list_node,
            label_selector="role=py",
            resource_version=listed.metadata.resource_version,
            timeout_seconds=10,
        )
        for event in stream:
            events.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                break
        assert events == [("MODIFIED", "py-1"), ("DELETED", "py-1")]
    finally:
        api.api_client.close()


def lease(name, holder, resource_version=None):
    meta = {"name": name, "namespace": "default", "resourceVersion": resource_version}
    spec = {"holderIdentity": holder, "leaseDurationSeconds": 10, "leaseTransitions": 0}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def test_leases_python_client_optimistic_concurrency_and_kubectl(plane):
    """What a Lease-based leader elector needs: create, read, replace guarded by
    resourceVersion (a stale one is a 409 Conflict, so two candidates never both win)."""
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.CoordinationV1Api(
        kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig))
    )
    try:
        created = api.create_namespaced_lease("default", lease("elect", "a"))
        with pytest.raises(kubernetes.client.ApiException) as exists:
            api.create_namespaced_lease("default", lease("elect", "b"))
        assert exists.value.status == 409
        stale = created.metadata.resource_version
        won = api.replace_namespaced_lease("elect", "default", lease("elect", "b", stale))
        assert won.spec.holder_identity == "b" and won.metadata.resource_version != stale
        with pytest.raises(kubernetes.client.ApiException) as conflict:
            api.replace_namespaced_lease("elect", "default", lease("elect", "c", stale))
        assert conflict.value.status == 409
        assert api.read_namespaced_lease("elect", "default").spec.holder_identity == "b"

        table = kubectl(plane, "get", "leases", "-n", "default").stdout.splitlines()
        assert table[0].split() == ["NAME", "HOLDER", "AGE"]
        assert table[1].split()[:2] == ["elect", "b"]
    finally:
        api.delete_namespaced_lease("elect", "default")
        api.api_client.close()


def test_lease_rbac_resource_names(plane):
    """RBAC as kube-apiserver applies it: resourceNames narrow get and update to one Lease,
    but never create (the name is in the body, not the URL)."""
    kubernetes = pytest.importorskip("kubernetes")
    elector = plane.add_user("e2e-elector")
    api = kubernetes.client.CoordinationV1Api(kubernetes.config.new_client_from_config(config_file=str(elector)))

    def status(call, *args):
        try:
            call(*args)
        except kubernetes.client.ApiException as exc:
            return exc.status
        return 200

    try:
        assert status(api.create_namespaced_lease, "default", lease("mine", "me")) == 200
        mine = api.read_namespaced_lease("mine", "default")
        assert status(api.replace_namespaced_lease, "mine", "default", mine) == 200
        assert status(api.read_namespaced_lease, "theirs", "default") == 403
        assert status(api.list_namespaced_lease, "default") == 403
        assert status(api.create_namespaced_lease, "kube-system", lease("mine", "me")) == 403
        assert status(api.create_namespaced_lease, "default", lease("theirs", "me")) == 200  # by name: not narrowed
        assert status(api.replace_namespaced_lease, "theirs", "default", lease("theirs", "me")) == 403
    finally:
        api.api_client.close()
        for name in ("mine", "theirs"):
            kubectl(plane, "delete", "lease", name, "-n", "default", "--ignore-not-found")
