"""The Kubernetes side of the e2e tests: the API server as a test drives it (kubectl and the
Python client), ImageUnlock objects, and their conditions as a user reads them.

The fixtures that bring the API server and the operator up are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes

from imageunlock.kube import GROUP, KIND, PLURAL, VERSION

from .wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = ROOT / "crds" / f"{GROUP}_{PLURAL}.yaml"
RBAC_FILE = ROOT / "manifests" / "rbac.yaml"
# Test namespaces are random (iu-xxxxxxxx), so the plane enforces manifests/rbac.yaml plus
# the cluster-wide Secrets opt-in (by default Secrets are readable per namespace only).
CLUSTER_WIDE_SECRETS_FILE = ROOT / "manifests" / "cluster-wide-secrets" / "clusterrolebinding.yaml"
# The identity the Deployment gives the operator (manifests/rbac.yaml's ServiceAccount).
OPERATOR_USER = "system:serviceaccount:imageunlock-system:imageunlock-operator"
# kopf's diff base: the object as the operator last handled it (handlers.py stores it here).
LAST_HANDLED = f"{GROUP}/last-handled-configuration"


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
    # The operator's own identity, held to manifests/rbac.yaml by the local plane, and the
    # audit log of everything it did. On a cluster given by IMAGEUNLOCK_TEST_KUBECONFIG the
    # operator runs with that kubeconfig instead, and there is no audit log.
    operator_kubeconfig: str = ""
    audit_log: Path | None = None

    def __post_init__(self) -> None:
        self.api = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

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
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def list(self, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    def delete(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(namespace, name).get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(namespace, name).get("conditions", []) if c["type"] == type_), {})

    def create_unlock(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = unlock_object(namespace, name, spec)
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def last_handled(self, namespace: str, name: str) -> dict[str, Any]:
        """The object (spec, labels, annotations) as kopf recorded it at the end of its last
        handling cycle: it changes once the operator is done with a change, handlers and all."""
        annotations = self.get(namespace, name)["metadata"].get("annotations") or {}
        return json.loads(annotations.get(LAST_HANDLED) or "{}")

    def events(self, namespace: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]


def is_ready(cluster: Cluster, namespace: str, name: str) -> bool:
    return cluster.condition(namespace, name, "Ready").get("status") == "True"


def is_stalled(cluster: Cluster, namespace: str, name: str) -> bool:
    return cluster.condition(namespace, name, "Stalled").get("status") == "True"


def stalled_with(cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 60) -> str:
    """Wait until ``name`` is Stalled, assert it is for ``reason``; the condition's message."""
    wait_for(lambda: is_stalled(cluster, namespace, name), timeout, f"{name} Stalled")
    condition = cluster.condition(namespace, name, "Stalled")
    assert condition["reason"] == reason, condition
    return condition["message"]
