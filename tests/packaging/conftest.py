"""Fixtures for the packaging tests: the rendered chart, the manifests, the local control plane.

The control plane is started with the operator's RBAC (manifests/rbac.yaml, exactly as
installed: two identities, the agents' and the controller's; Secrets readable by the agents
only in the namespaces it binds) as its authorization policy and with an audit log, so a test
can act as either ServiceAccount and prove the granted rules are enough. A test grants
Secret access in its own namespace the way a user would (``Plane.bind_secrets``: a copy of
the manifests' RoleBinding). If the plane cannot be
brought up, its tests skip on a developer machine and FAIL under CI=true (see ``unavailable``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from ..support.ci import unavailable

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart" / "imageunlock-operator"
MANIFESTS = REPO / "manifests"
# The opt-in kustomization binding the Secret-reading ClusterRole cluster-wide.
CLUSTER_WIDE_SECRETS = MANIFESTS / "cluster-wide-secrets"
CRD_FILE = REPO / "crds" / "loader.azaion.com_imageunlocks.yaml"
GITOPS = REPO / "gitops"
OPERATOR_NAMESPACE = "imageunlock-system"
AGENT_SA = "imageunlock-agent"
CONTROLLER_SA = "imageunlock-controller"
AGENT_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{AGENT_SA}"
CONTROLLER_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{CONTROLLER_SA}"
# The Secret-reading ClusterRole (manifests/rbac.yaml; the default release's name too).
SECRETS_ROLE = "imageunlock-agent-secrets"
# The placement the chart's agent values below give the DaemonSet (and the controller).
EDGE_TOLERATIONS = [
    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "azaion.com/edge", "operator": "Equal", "value": "true", "effect": "NoExecute"},
]

# Values that switch on every optional branch of the chart.
NON_DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/azaion/imageunlock", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "iu",
    "namespace": {"create": True},
    "serviceAccount": {
        "create": True,
        "agentName": "iu-agent-sa",
        "controllerName": "iu-controller-sa",
        "annotations": {"example.com/owner": "edge"},
    },
    "rbac": {"create": True, "secretNamespaces": ["edge-a", "edge-b"]},
    "agent": {
        "runtime": "docker",
        # runtime docker: nothing of containerd's is mounted, its group is not added
        "containerd": {
            "socketPath": "/run/k3s/containerd/containerd.sock",
            "socketGroupId": 1002,
            "namespace": "edge.io",
        },
        "docker": {"enabled": True, "socketPath": "/run/docker.sock", "socketGroupId": 988},
        "supplementalGroups": [1001],
        "nodeSelector": {"azaion.com/edge": "true", "kubernetes.io/os": "linux"},
        "tolerations": EDGE_TOLERATIONS,
        "priorityClassName": "system-node-critical",
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "2", "memory": "256Mi"}},
    },
    "controller": {
        "enabled": True,
        "nodeSelector": {"kubernetes.io/hostname": "core-1"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "azaion.com/edge", "operator": "NotIn", "values": ["true"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
    },
    "archiveDir": "/srv/azaion/archives",
    "resourceApiUrl": "https://resources.example.com",
    "logLevel": "debug",
    "verifyInterval": 60,
    "healthPort": 9090,
    "extraEnv": [{"name": "IMAGEUNLOCK_WORKERS", "value": "2"}],
    "podAnnotations": {"example.com/scrape": "false"},
    "podLabels": {"example.com/team": "edge"},
    "runAsUser": 20001,
    "runAsGroup": 20001,
    "tmpSizeLimit": "128Mi",
}

# Per-role pod values (issue 21, item 6): what each role's pods get, apart from the other's.
CA_VOLUME = {"name": "ca", "configMap": {"name": "corporate-ca"}}
CA_MOUNT = {"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True}
PER_ROLE: dict[str, Any] = {
    "podLabels": {"example.com/team": "edge", "example.com/tier": "shared"},
    "podAnnotations": {"example.com/owner": "ops"},
    "agent": {
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {"matchExpressions": [{"key": "azaion.com/ssd", "operator": "Exists"}]},
                    }
                ]
            }
        },
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "20%"}},
        "podLabels": {"example.com/tier": "node"},
        "podAnnotations": {"example.com/role": "agent"},
        "extraVolumes": [CA_VOLUME],
        "extraVolumeMounts": [CA_MOUNT],
        "priorityClassName": "system-node-critical",
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
    },
    "controller": {
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "agent"}},
                        },
                    }
                ]
            }
        },
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "podLabels": {"example.com/tier": "cluster"},
        "podAnnotations": {"example.com/role": "controller", "example.com/owner": "platform"},
        "extraVolumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
        "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "5m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
    },
}


def require(module: str) -> ModuleType:
    """Import a test dependency; missing is 'unavailable' (skip locally, fail under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(module, f"not installed ({exc}); it is a pinned test dependency")
        raise  # unreachable: unavailable() skips or fails


def load_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomization_objects(directory: Path) -> list[dict[str, Any]]:
    """Every object of a kustomization's resource files, in order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        objects += load_docs((directory / name).read_text())
    return objects


def manifest_objects() -> list[dict[str, Any]]:
    """Every object of the installation manifests (kustomization resources), in order."""
    return kustomization_objects(MANIFESTS)


def cluster_wide_objects() -> list[dict[str, Any]]:
    """The objects of the cluster-wide Secrets opt-in (manifests/cluster-wide-secrets/)."""
    return kustomization_objects(CLUSTER_WIDE_SECRETS)


def sample_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted((MANIFESTS / "samples").glob("*.yaml")) for doc in load_docs(path.read_text())]


def render_chart(
    values: dict[str, Any] | None = None, *, name: str = "imageunlock-operator", namespace: str = OPERATOR_NAMESPACE
) -> dict[str, str]:
    """Render the chart offline with helm-python-sdk: {template path: manifest text}."""
    helm = require("helm_python")
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values or {})
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def rendered_objects(values: dict[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_chart(values, **kw).items()):
        if path.endswith(".yaml"):
            objects += load_docs(text)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


class Plane:
    """The local control plane plus a kubectl bound to it."""

    def __init__(self, cp: Any, kubectl: str, policy: Path, audit_log: Path) -> None:
        self.cp, self.kubectl_bin, self.policy, self.audit_log = cp, kubectl, policy, audit_log
        self._sa_kubeconfig: str | None = None
        self._kubeconfigs: dict[str, str] = {}

    @property
    def kubeconfig(self) -> str:
        return str(self.cp.kubeconfig)

    @property
    def sa_kubeconfig(self) -> str:
        """A kubeconfig for the agents' ServiceAccount identity (authorized by the policy)."""
        if self._sa_kubeconfig is None:
            self._sa_kubeconfig = self.kubeconfig_for(AGENT_USER)
        return self._sa_kubeconfig

    def kubeconfig_for(self, user: str) -> str:
        """A kubeconfig for ``user`` (e.g. CONTROLLER_USER), authorized by the policy."""
        if user not in self._kubeconfigs:
            self._kubeconfigs[user] = str(self.cp.add_user(user))
        return self._kubeconfigs[user]

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        kubeconfig: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        kubeconfig = kubeconfig or self.kubeconfig
        res = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", kubeconfig, "--cache-dir", f"{kubeconfig}.kubectl-cache", *args],
            input=stdin,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def write_policy(self, text: str) -> None:
        """Replace the authorization policy. The plane re-reads it when its modification
        time changes: written atomically, with an mtime that surely differs from before."""
        before = self.policy.stat().st_mtime_ns
        partial = self.policy.with_name(f".{self.policy.name}.partial")
        partial.write_text(text)
        os.replace(partial, self.policy)
        stamp = max(time.time_ns(), before + 1_000_000_000)
        os.utime(self.policy, ns=(stamp, stamp))

    @contextlib.contextmanager
    def policy_added(self, text: str) -> Iterator[None]:
        """The policy with ``text`` (more YAML documents) appended, for the with-block only."""
        original = self.policy.read_text()
        self.write_policy(f"{original}\n---\n{text}")
        try:
            yield
        finally:
            self.write_policy(original)

    def bind_secrets(self, namespace: str) -> None:
        """Let the agents read Secrets in ``namespace`` as a user would: a copy of
        manifests/rbac.yaml's Secrets RoleBinding with only metadata.namespace changed."""
        (binding,) = find(manifest_objects(), "RoleBinding", SECRETS_ROLE)
        binding = copy.deepcopy(binding)
        binding["metadata"]["namespace"] = namespace
        self.write_policy(f"{self.policy.read_text()}\n---\n{yaml.safe_dump(binding)}")

    def ensure_crd(self) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        self.kubectl("wait", "--for=condition=Established", "crd/imageunlocks.loader.azaion.com", "--timeout=60s")


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """A local control plane authorizing the agents' and the controller's ServiceAccounts by
    manifests/rbac.yaml (a copy: tests may add bindings to it)."""
    try:
        controlplane = importlib.import_module("controlplane")
    except ImportError as exc:
        unavailable("local control plane", f"tools/controlplane is not installed; run scripts/setup.sh ({exc})")
    root = tmp_path_factory.mktemp("packaging-plane")
    policy = root / "rbac.yaml"
    shutil.copyfile(MANIFESTS / "rbac.yaml", policy)
    audit_log = root / "audit.log"
    cp = controlplane.ControlPlane(root / "run", audit_log=audit_log, authorization_policy=policy)
    try:
        cp.start(timeout=90)
        kubectl = controlplane.kubectl_path()
    except Exception as exc:
        cp.stop()
        unavailable("local control plane", str(exc))
    try:
        yield Plane(cp, kubectl, policy, audit_log)
    finally:
        cp.stop()


# Chart values that switch every metrics option on, or metrics off (test_chart, test_manifests).
METRICS_ALL: dict[str, Any] = {
    "logFormat": "json",
    "apiDeadline": 90,
    "metrics": {
        "enabled": True,
        "port": 9102,
        "service": {"annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9102"}},
        "serviceMonitor": {"enabled": True, "interval": "1m30s", "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "stalledFor": "5m"},
        "dashboard": {"enabled": True, "labels": {"grafana_dashboard": "imageunlock"}, "namespace": "monitoring"},
        "networkPolicy": {
            "enabled": True,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
    },
}
METRICS_OFF: dict[str, Any] = {"metrics": {"enabled": False}}
# Who may scrape the agents by default (chart and manifests): every pod of "monitoring".
DEFAULT_SCRAPERS = [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}, "podSelector": {}}
]


def isolating_policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The NetworkPolicies of ``objects`` by the role whose pods each selects ("agent": the
    DaemonSet's pod template, "controller": the Deployment's), after checking that each
    selects exactly one role's pods, in that workload's namespace, by matchLabels only, and
    isolates them for ingress only (egress: the Kubernetes API, the resource API)."""
    workloads = {"agent": find(objects, "DaemonSet"), "controller": find(objects, "Deployment")}
    found: dict[str, dict[str, Any]] = {}
    for policy in find(objects, "NetworkPolicy"):
        spec = policy["spec"]
        assert list(spec["podSelector"]) == ["matchLabels"] and spec["podSelector"]["matchLabels"]
        selector = spec["podSelector"]["matchLabels"].items()
        picked = [
            (role, w)
            for role, ws in workloads.items()
            for w in ws
            if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(picked) == 1, (policy["metadata"]["name"], [role for role, _ in picked])
        ((role, workload),) = picked
        assert policy["metadata"]["namespace"] == workload["metadata"]["namespace"]
        assert spec["policyTypes"] == ["Ingress"]
        assert role not in found, f"two policies for the {role}"
        found[role] = policy
    return found


def admitted(policy: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(port, from) of every ingress rule of a policy; [] when it admits nothing."""
    rules = policy["spec"].get("ingress") or ()
    return [(p["port"], rule.get("from")) for rule in rules for p in rule.get("ports") or [{"port": "ANY"}]]


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or DaemonSet."""
    return workload["spec"]["template"]["spec"]


def env_of(container: dict[str, Any], node: str | None = None, pod: str | None = None) -> dict[str, Any]:
    """A container's environment: {name: value}; a downward-API variable as its valueFrom,
    or as ``node`` when given (what the kubelet would set for spec.nodeName), or with ``pod``
    as the pod's name in OPERATOR_NAMESPACE (metadata.name, metadata.namespace)."""
    fields = {"spec.nodeName": node} | ({"metadata.name": pod, "metadata.namespace": OPERATOR_NAMESPACE} if pod else {})
    env: dict[str, Any] = {}
    for e in container.get("env") or ():
        if "value" in e:
            env[e["name"]] = e["value"]
        elif fields.get(e["valueFrom"].get("fieldRef", {}).get("fieldPath")) is not None:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = e["valueFrom"]
    return env


# The volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What keeps a pod spec from the "restricted" Pod Security Standard (the checks of
    Kubernetes' pod-security-admission at the latest version, baseline's included), as
    short messages; [] when it meets it."""
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            found.append(host)
    for volume in pod.get("volumes") or ():
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {', '.join(sorted(kinds))}")
    for sysctl in psc.get("sysctls") or ():
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("hostProcess")
    containers = [*(pod.get("initContainers") or ()), *pod["containers"], *(pod.get("ephemeralContainers") or ())]
    for c in containers:
        sc, name = c.get("securityContext") or {}, c["name"]

        def setting(key: str, sc: dict[str, Any] = sc) -> Any:
            return sc[key] if key in sc else psc.get(key)

        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if setting("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if setting("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or ()):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or ()) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports") or ()):
            found.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        selinux = setting("seLinuxOptions") or {}
        if selinux.get("user") or selinux.get("role"):
            found.append(f"{name}: seLinuxOptions user/role")
        if selinux.get("type", "") not in (
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ):
            found.append(f"{name}: seLinuxOptions type")
        if (setting("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{name}: appArmorProfile Unconfined")
    return found
