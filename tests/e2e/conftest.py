"""End-to-end harness: a real Kubernetes API server, the real operator process, dockerd.

The API server is the project's local control plane (tools/controlplane), or any cluster
whose kubeconfig is in ``IMAGEUNLOCK_TEST_KUBECONFIG`` (kind, k3d, k3s). The operator runs
as its own process (``imageunlock operator``), cluster-wide as deployed, one per test, so a
test can SIGKILL it mid-load and start it again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

import controlplane

from ..support.ci import unavailable
from ..support.dockerd import Dockerd
from ..support.net import free_port
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD

ROOT = Path(__file__).resolve().parents[2]

GROUP, VERSION, PLURAL = "loader.azaion.com", "v1alpha1", "imageunlocks"
CRD_FILE = ROOT / "crds" / "loader.azaion.com_imageunlocks.yaml"
RBAC_FILE = ROOT / "manifests" / "rbac.yaml"
# Test namespaces are random (iu-xxxxxxxx), so the plane enforces manifests/rbac.yaml plus
# the cluster-wide Secrets opt-in (by default Secrets are readable per namespace only).
CLUSTER_WIDE_SECRETS_FILE = ROOT / "manifests" / "cluster-wide-secrets" / "clusterrolebinding.yaml"
# The identity the Deployment gives the operator (manifests/rbac.yaml's ServiceAccount).
OPERATOR_USER = "system:serviceaccount:imageunlock-system:imageunlock-operator"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


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

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
                                capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get(namespace, name).get("status") or {}

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(namespace, name).get("conditions", []) if c["type"] == type_), {})

    def create_unlock(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageUnlock",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def events(self, namespace: str, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("IMAGEUNLOCK_TEST_KUBECONFIG")
    plane = None
    try:
        kubectl_bin = controlplane.kubectl_path()
        audit_log = None
        if given:
            kubeconfig = operator_kubeconfig = given
        else:
            workdir = tmp_path_factory.mktemp("plane")
            audit_log = workdir / "audit.log"
            policy = workdir / "rbac-policy.yaml"
            policy.write_text("\n---\n".join(p.read_text() for p in (RBAC_FILE, CLUSTER_WIDE_SECRETS_FILE)))
            plane = controlplane.ControlPlane(workdir, audit_log=audit_log, authorization_policy=policy)
            plane.start()
            kubeconfig = plane.kubeconfig
            operator_kubeconfig = plane.add_user(OPERATOR_USER)
    except Exception as exc:  # noqa: BLE001 - any failure to bring it up is reported the same way
        if plane is not None:
            plane.stop()
        unavailable("Kubernetes API server", f"{type(exc).__name__}: {exc}")
    try:
        yield Cluster(kubeconfig, kubectl_bin, operator_kubeconfig, audit_log)
    finally:
        if plane is not None:
            plane.stop()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/imageunlocks.loader.azaion.com", "--timeout=60s")
    return "imageunlocks.loader.azaion.com"


@pytest.fixture
def namespace(cluster: Cluster, crd: str) -> Iterator[str]:
    name = "iu-" + uuid.uuid4().hex[:8]
    cluster.core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        for item in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
            cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, name, PLURAL, item["metadata"]["name"])
        cluster.core.delete_namespace(name)


@pytest.fixture
def secret(cluster: Cluster, namespace: str) -> str:
    cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": TEST_PASSWORD}})
    return "loader-creds"



class OperatorProcess:
    """``imageunlock operator`` as a child process, watching one namespace."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / "operator.log"
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.port = free_port()
        env = {**self.env, "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{self.port}/healthz", "TMPDIR": str(self.tmpdir)}
        script = Path(sys.executable).with_name("imageunlock")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(script), "operator"], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        wait_for(self.healthy, timeout, "the operator's liveness endpoint")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def probe(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
            return response.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@pytest.fixture
def archive_root(tmp_path: Path) -> Path:
    root = tmp_path / "archives"
    root.mkdir()
    return root


@pytest.fixture
def start_operator(cluster: Cluster, clean_docker: Dockerd, resource_api, archive_root: Path, namespace: str,
                   tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(**overrides: str) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "KUBECONFIG"))}
        env.update({
            "KUBECONFIG": cluster.operator_kubeconfig,
            # cluster-wide, as deployed (a namespace-restricted kopf also lists and watches
            # Namespaces, which manifests/rbac.yaml rightly does not grant); each test's
            # objects live in its own namespace and are gone before the next test starts
            "IMAGEUNLOCK_NAMESPACES": "",
            "IMAGEUNLOCK_DOCKER_HOST": clean_docker.url,
            "IMAGEUNLOCK_ARCHIVE_ROOT": str(archive_root),
            "RESOURCE_API_URL": resource_api.url,
            "IMAGEUNLOCK_VERIFY_INTERVAL": "2",
            "IMAGEUNLOCK_PROGRESS_INTERVAL": "0.2",
            "IMAGEUNLOCK_RETRY_BASE": "0.5",
            "IMAGEUNLOCK_RETRY_MAX": "2",
            "IMAGEUNLOCK_API_RETRIES": "0",  # operator-level retries are what these tests watch
            "IMAGEUNLOCK_LOG_LEVEL": "debug",
        })
        env.update(overrides)
        proc = OperatorProcess(tmp_path / f"operator-{len(started)}", env).start()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def place(archive: Path, root: Path, name: str = "images.enc") -> str:
    target = root / name
    shutil.copyfile(archive, target)
    return str(target)


def manifest_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="session")
def archives_v2(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory, archives):
    """The same services at a newer version, for spec.version changes."""
    from ..support.images import build_archive_set

    return build_archive_set(dockerd, tmp_path_factory.mktemp("archives-v2"), archives.names, "1.5.0",
                             fragment=archives.fragment, payload_bytes=32 * 1024)


@pytest.fixture(scope="session")
def big_archives(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory, archives):
    """Large enough (4 × 64 MiB) that a test can catch the operator in the middle of a load."""
    from ..support.images import build_archive_set

    return build_archive_set(dockerd, tmp_path_factory.mktemp("archives-big"),
                             ["azaion/flights", "azaion/autopilot", "azaion/detections", "azaion/annotations"],
                             "9.9.9", fragment=archives.fragment, payload_bytes=64 << 20)
