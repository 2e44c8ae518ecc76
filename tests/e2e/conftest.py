"""End-to-end harness: a real Kubernetes API server, the real operator process, dockerd.

The API server is the project's local control plane (tools/controlplane), or any cluster
whose kubeconfig is in ``IMAGEUNLOCK_TEST_KUBECONFIG`` (kind, k3d, k3s). The operator runs
as its own process (``imageunlock operator``), cluster-wide as deployed, one per test, so a
test can SIGKILL it mid-load and start it again. These are the fixtures; the helpers a test
calls are in tests/support (cluster.py, operator_process.py, wait.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import controlplane

from ..support.ci import unavailable
from ..support.cluster import CLUSTER_WIDE_SECRETS_FILE, CRD_FILE, CRD_NAME, OPERATOR_USER, RBAC_FILE, Cluster
from ..support.dockerd import Dockerd
from ..support.images import build_archive_set
from ..support.net import free_port
from ..support.operator_process import OperatorProcess
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD


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
    except Exception as exc:
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
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return CRD_NAME


@pytest.fixture
def namespace(cluster: Cluster, crd: str) -> Iterator[str]:
    name = "iu-" + uuid.uuid4().hex[:8]
    cluster.core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        for item in cluster.list(name):
            cluster.delete(name, item["metadata"]["name"])
        cluster.core.delete_namespace(name)


@pytest.fixture
def secret(cluster: Cluster, namespace: str) -> str:
    cluster.core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": TEST_PASSWORD}},
    )
    return "loader-creds"


@pytest.fixture
def archive_root(tmp_path: Path) -> Path:
    root = tmp_path / "archives"
    root.mkdir()
    return root


@pytest.fixture
def start_operator(
    cluster: Cluster, clean_docker: Dockerd, resource_api, archive_root: Path, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(**overrides: str) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "KUBECONFIG"))}
        env.update(
            {
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
                # not the default 0.0.0.0:8081, which anything else on the host may hold
                "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            }
        )
        env.update(overrides)
        proc = OperatorProcess(tmp_path / f"operator-{len(started)}", env).start()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="session")
def archives_v2(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory, archives):
    """The same services at a newer version, for spec.version changes."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("archives-v2"),
        archives.names,
        "1.5.0",
        fragment=archives.fragment,
        payload_bytes=32 * 1024,
    )


@pytest.fixture(scope="session")
def big_archives(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory, archives):
    """Large enough (4 x 64 MiB) that a test can catch the operator in the middle of a load."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("archives-big"),
        ["azaion/flights", "azaion/autopilot", "azaion/detections", "azaion/annotations"],
        "9.9.9",
        fragment=archives.fragment,
        payload_bytes=64 << 20,
    )
