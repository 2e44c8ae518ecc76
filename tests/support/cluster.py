"""The Kubernetes side of the e2e tests: the API server as a test drives it (kubectl and the
Python client), ImageUnlock objects, and their conditions as a user reads them.

The fixtures that bring the API server and the operator up are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import builtins
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes

from imageunlock.kube.client import GROUP, KIND, PLURAL, VERSION

from .wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
RBAC_FILE = ROOT / "manifests" / "rbac.yaml"
# Test namespaces are random (iu-xxxxxxxx), so the plane enforces manifests/rbac.yaml plus
# the cluster-wide Secrets opt-in (by default Secrets are readable per namespace only).
CLUSTER_WIDE_SECRETS_FILE = ROOT / "manifests" / "cluster-wide-secrets" / "clusterrolebinding.yaml"
# The identities the DaemonSet and the controller Deployment run as (manifests/rbac.yaml).
AGENT_USER = "system:serviceaccount:imageunlock-system:imageunlock-agent"
CONTROLLER_USER = "system:serviceaccount:imageunlock-system:imageunlock-controller"
# The namespace the operator is deployed in (manifests/): the controller's Lease is there.
OPERATOR_NAMESPACE = "imageunlock-system"
# The node the single-agent tests run their agent for (a Node object: there is no kubelet).
NODE = "node-1"


def unlock_object(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An ImageUnlock manifest."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def spec_for(path: str, version: str, secret: str, **extra: Any) -> dict[str, Any]:
    """An ImageUnlock spec: the archive at ``path``, its ``version``, credentials from ``secret``."""
    return {"archivePath": path, "version": version, "resourceApi": {"credentialsSecretRef": {"name": secret}}, **extra}


@dataclass
class Cluster:
    kubeconfig: str
    kubectl_bin: str
    # The agents' and the controller's own identities, held to manifests/rbac.yaml by the
    # local plane, and the audit log of everything they did. On a cluster given by
    # IMAGEUNLOCK_TEST_KUBECONFIG both run with that kubeconfig instead, and there is no audit log.
    agent_kubeconfig: str = ""
    controller_kubeconfig: str = ""
    audit_log: Path | None = None

    def __post_init__(self) -> None:
        # kubernetes.config is not annotated (unlike the generated client it configures).
        self.api: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=self.kubeconfig
        )
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.coordination = kubernetes.client.CoordinationV1Api(self.api)

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return _json(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def list(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = _json(
            self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        )["items"]
        return items

    def delete(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(namespace, name).get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(namespace, name).get("conditions", []) if c["type"] == type_), {})

    def create_unlock(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = unlock_object(namespace, name, spec)
        return _json(self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body))

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def request_check(self, namespace: str, name: str, value: str) -> None:
        """Set the requested-at annotation: every selected node verifies now and records it."""
        patch = {"metadata": {"annotations": {f"{GROUP}/requested-at": value}}}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)

    def entries(self, namespace: str, name: str) -> dict[str, dict[str, Any]]:
        """status.nodes by node name."""
        return {e["name"]: e for e in self.status(namespace, name).get("nodes") or []}

    def ensure_node(self, name: str, runtime: str = "docker://24.0.9", labels: dict[str, str] | None = None) -> None:
        """A Node object as kubelet would register it (labels, the runtime it reports)."""
        body = node_object(name, runtime, labels)
        try:
            # The client's validate_call makes the V1Node of the manifest its signature names.
            self.core.create_node(body)  # type: ignore[arg-type]
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(name, {"metadata": {"labels": body["metadata"]["labels"]}})

    def delete_node(self, name: str) -> None:
        try:
            self.core.delete_node(name)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise

    def label_node(self, name: str, labels: dict[str, str | None]) -> None:
        self.core.patch_node(name, {"metadata": {"labels": labels}})

    def node_metadata(self, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """A Node's labels and annotations."""
        meta = self.core.read_node(name).metadata
        return dict((meta and meta.labels) or {}), dict((meta and meta.annotations) or {})

    def set_node_condition(self, name: str, type_: str, status: str) -> None:
        """Set one of a Node's conditions as kubelet would report it (the plane has no kubelet;
        conditions are a whole list in a merge patch, so the others are kept as read)."""
        status_ = self.core.read_node(name).status
        kept = [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in (status_ and status_.conditions) or []
            if c.type != type_
        ]
        condition = {"type": type_, "status": status, "reason": f"Kubelet{type_}{status}", "message": "set by a test"}
        patch = {"status": {"conditions": [*kept, condition]}}
        self.core.patch_node(name, patch, _content_type="application/merge-patch+json")

    def events(self, namespace: str, name: str) -> builtins.list[kubernetes.client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]


def _json(answer: object) -> dict[str, Any]:
    """A custom-object call's answer: the parsed JSON object (the client types it ``object``)."""
    return cast(dict[str, Any], answer)


NODE_INFO_FIELDS = (
    "architecture",
    "bootID",
    "containerRuntimeVersion",
    "kernelVersion",
    "kubeProxyVersion",
    "kubeletVersion",
    "machineID",
    "operatingSystem",
    "osImage",
    "systemUUID",
)


def node_object(name: str, runtime: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node manifest (every nodeInfo field: the Python client insists on all of them)."""
    info = dict.fromkeys(NODE_INFO_FIELDS, "")
    info.update(containerRuntimeVersion=runtime, operatingSystem="linux", architecture="amd64")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "status": {"nodeInfo": info},
    }


def on_node(message: str, node: str = NODE) -> str:
    """A node's message as the summary shows it (the Stalled condition names the node)."""
    return f"node {node}: {message}"


def is_ready(cluster: Cluster, namespace: str, name: str) -> bool:
    return cluster.condition(namespace, name, "Ready").get("status") == "True"


def is_stalled(cluster: Cluster, namespace: str, name: str) -> bool:
    return cluster.condition(namespace, name, "Stalled").get("status") == "True"


def stalled_with(cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 60) -> str:
    """Wait until ``name`` is Stalled, assert it is for ``reason``; the condition's message."""
    wait_for(lambda: is_stalled(cluster, namespace, name), timeout, f"{name} Stalled")
    condition = cluster.condition(namespace, name, "Stalled")
    assert condition["reason"] == reason, condition
    message: str = condition["message"]
    return message
