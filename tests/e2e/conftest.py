"""End-to-end harness: a real Kubernetes API server, the real agent and controller
processes, dockerd (and containerd).

The API server is the project's local control plane (tools/controlplane), or any cluster
whose kubeconfig is in ``IMAGEUNLOCK_TEST_KUBECONFIG`` (kind, k3d, k3s). There is no kubelet:
a test's nodes are Node objects (``node-1`` for the single-node tests), each served by an
agent process (``imageunlock agent`` with NODE_NAME), beside one controller process
(``imageunlock controller``), all cluster-wide as deployed and one set per test, so a test
can SIGKILL an agent mid-load and start it again. These are the fixtures; the helpers a
test calls are in tests/support (cluster.py, operator_process.py, wait.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes
import pytest

import controlplane

from ..support.ci import unavailable
from ..support.cluster import (
    AGENT_USER,
    CLUSTER_WIDE_SECRETS_FILE,
    CONTROLLER_USER,
    CRD_FILE,
    CRD_NAME,
    NODE,
    OPERATOR_NAMESPACE,
    RBAC_FILE,
    Cluster,
)
from ..support.dockerd import Dockerd
from ..support.images import build_archive_set
from ..support.net import free_port
from ..support.operator_process import OperatorProcess
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("IMAGEUNLOCK_TEST_KUBECONFIG")
    plane = None
    try:
        kubectl_bin = controlplane.kubectl_path()
        audit_log = None
        if given:
            kubeconfig = agent_kubeconfig = controller_kubeconfig = given
        else:
            workdir = tmp_path_factory.mktemp("plane")
            audit_log = workdir / "audit.log"
            policy = workdir / "rbac-policy.yaml"
            policy.write_text("\n---\n".join(p.read_text() for p in (RBAC_FILE, CLUSTER_WIDE_SECRETS_FILE)))
            plane = controlplane.ControlPlane(workdir, audit_log=audit_log, authorization_policy=policy)
            plane.start()
            kubeconfig = plane.kubeconfig
            agent_kubeconfig = plane.add_user(AGENT_USER)
            controller_kubeconfig = plane.add_user(CONTROLLER_USER)
    except Exception as exc:
        if plane is not None:
            plane.stop()
        unavailable("Kubernetes API server", f"{type(exc).__name__}: {exc}")
    try:
        yield Cluster(kubeconfig, kubectl_bin, agent_kubeconfig, controller_kubeconfig, audit_log)
    finally:
        if plane is not None:
            plane.stop()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return CRD_NAME


@contextlib.contextmanager
def new_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace of its own, emptied of ImageUnlocks and deleted at the end."""
    name = "iu-" + uuid.uuid4().hex[:8]
    cluster.core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        for item in cluster.list(name):
            cluster.delete(name, item["metadata"]["name"])
        cluster.core.delete_namespace(name)


def create_secret(cluster: Cluster, namespace: str) -> str:
    """The resource API's credentials, as the Secret ``loader-creds``."""
    cluster.core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": TEST_PASSWORD}},
    )
    return "loader-creds"


@pytest.fixture
def namespace(cluster: Cluster, crd: str) -> Iterator[str]:
    with new_namespace(cluster) as name:
        yield name


@pytest.fixture
def secret(cluster: Cluster, namespace: str) -> str:
    return create_secret(cluster, namespace)


@pytest.fixture
def archive_root(tmp_path: Path) -> Path:
    root = tmp_path / "archives"
    root.mkdir()
    return root


def _role_env(kubeconfig: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "KUBECONFIG", "NODE_NAME", "POD_"))}
    env.update(
        {
            "KUBECONFIG": kubeconfig,
            # cluster-wide, as deployed (a namespace-restricted kopf also lists and watches
            # Namespaces, which manifests/rbac.yaml rightly does not grant); each test's
            # objects live in its own namespace and are gone before the next test starts
            "IMAGEUNLOCK_NAMESPACES": "",
            "IMAGEUNLOCK_LOG_LEVEL": "debug",
            # not the default 0.0.0.0:8081, which anything else on the host may hold
            "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            **settings,
        }
    )
    return env


@contextlib.contextmanager
def _stopped_at_exit() -> Iterator[list[OperatorProcess]]:
    """A list to put started processes in; every one is stopped at the end."""
    started: list[OperatorProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()


def ensure_operator_namespace(cluster: Cluster) -> str:
    """The namespace the controller's Lease lives in, as deployed (manifests/rbac.yaml's Role)."""
    with contextlib.suppress(kubernetes.client.ApiException):  # 409: it exists
        cluster.core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    return OPERATOR_NAMESPACE


@contextlib.contextmanager
def controller_starter(cluster: Cluster, workdir: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """``start(replica=False, **settings)``: the controller (cluster summaries), started on first
    use; ``replica=True`` starts one more (a second replica of the Deployment: the Lease elects
    the writer)."""
    operator_namespace = ensure_operator_namespace(cluster)
    with _stopped_at_exit() as started:

        def start(replica: bool = False, **overrides: str) -> OperatorProcess:
            if started and started[-1].proc is not None and not replica:
                return started[-1]
            env = _role_env(cluster.controller_kubeconfig, POD_NAMESPACE=operator_namespace, **overrides)
            proc = OperatorProcess(workdir / f"controller-{len(started)}", env, role="controller").start()
            started.append(proc)
            return proc

        yield start


@contextlib.contextmanager
def agent_starter(
    cluster: Cluster, resource_api: FakeResourceApi, start_controller: Callable[..., OperatorProcess], workdir: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """``start(node, archive_root, disk=None, **settings)``: an agent for ``node`` (its Node
    must exist), and the controller if it is not running yet. With ``disk``, the agent sees
    that directory at ``archive_root`` (the node's own disk)."""
    with _stopped_at_exit() as started:

        def start(node: str, archive_root: Path, disk: Path | None = None, **overrides: str) -> OperatorProcess:
            start_controller()
            env = _role_env(
                cluster.agent_kubeconfig,
                NODE_NAME=node,
                IMAGEUNLOCK_ARCHIVE_ROOT=str(archive_root),
                RESOURCE_API_URL=resource_api.url,
                IMAGEUNLOCK_VERIFY_INTERVAL="2",
                IMAGEUNLOCK_PROGRESS_INTERVAL="0.2",
                IMAGEUNLOCK_RETRY_BASE="0.5",
                IMAGEUNLOCK_RETRY_MAX="2",
                IMAGEUNLOCK_API_RETRIES="0",  # agent-level retries are what these tests watch
                # the node's own state (ownership records, reclaim policies): kept across a
                # restart of the node's agent, never shared with another test's
                IMAGEUNLOCK_STATE_DIR=str(workdir / f"state-{node}"),
            )
            env.update(overrides)
            own = (disk, archive_root) if disk is not None else None
            proc = OperatorProcess(workdir / f"agent-{node}-{len(started)}", env, disk=own).start()
            started.append(proc)
            return proc

        yield start


@pytest.fixture
def start_controller(cluster: Cluster, crd: str, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """The controller; one per test, started on first use."""
    with controller_starter(cluster, tmp_path) as start:
        yield start


@pytest.fixture
def start_agent(
    cluster: Cluster, resource_api, start_controller, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Agents for this test (agent_starter), beside its controller."""
    with agent_starter(cluster, resource_api, start_controller, tmp_path) as start:
        yield start


@pytest.fixture
def start_operator(
    cluster: Cluster, clean_docker: Dockerd, archive_root: Path, namespace: str, start_agent
) -> Callable[..., OperatorProcess]:
    """The single-node setup most tests use: Node ``node-1`` on the test's dockerd, its agent
    (returned: a test may stop and restart it) and the controller."""
    cluster.ensure_node(NODE)

    def start(**overrides: str) -> OperatorProcess:
        return start_agent(NODE, archive_root, **{"IMAGEUNLOCK_DOCKER_HOST": clean_docker.url, **overrides})

    return start


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
    """4 x 8 MiB: more than the socket buffers hold, so a load into a paused Engine stalls
    well before its end (the test gates that moment rather than racing a large load)."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("archives-big"),
        ["azaion/flights", "azaion/autopilot", "azaion/detections", "azaion/annotations"],
        "9.9.9",
        fragment=archives.fragment,
        payload_bytes=8 << 20,
    )
