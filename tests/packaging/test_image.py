"""The operator image, built from the top-level Dockerfile and run in the private dockerd.

No registry is reachable, so the base is made locally (scripts/base-image.sh: a debootstrapped
Debian bookworm with python3 + venv, cached as a tarball) and passed as BASE_IMAGE; the wheels
come from PyPI (build with --network host: the test dockerd has no bridge).

Speed: the test dockerd is new every session and uses the vfs storage driver, where every
build step copies the whole root filesystem, so a cold build takes minutes. After a build the
base, the build stage and the image are saved (docker save) under
${XDG_CACHE_HOME:-~/.cache}/imageunlock/image-test/; the next session loads them and builds
with --cache-from: the Dockerfile still runs, and every unchanged step is a cache hit.
IMAGEUNLOCK_TEST_IMAGE_CACHE=0 builds from scratch.

Then the image is run: --help of the program and of both roles, its default command (the
agent); a read-only root filesystem as an arbitrary non-root user with no capabilities; and
both roles themselves against the local control plane (one container each for the module),
each as its own ServiceAccount authorized by manifests/rbac.yaml alone (plus the agents'
Secrets RoleBinding copied into the test's namespace, as the manifests tell a user to): the
agent run the way the DaemonSet runs it, for a Node the test registers (NODE_NAME, its
runtime from the Node: docker), with the Docker socket reached through its group
(--group-add, i.e. supplementalGroups); the controller the way its Deployment runs it (no
socket, no host path, read-only, no capabilities, told the DaemonSet's placement). Both
liveness probes answer, the agent unlocks the sample ImageUnlock for real, the controller
summarises it (Ready, NODES 1/1), and the audit log shows no denied request of either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support.dockerd import Dockerd
from ..support.images import TEST_VERSION
from ..support.net import free_port
from ..support.packaged_image import (
    ANY_USER_LOCKED_DOWN,
    CACHE_ROOT,
    DEFAULT_UID,
    TPM_ROUND_TRIP,
    WRITE_PROBE,
    Operator,
    base_tarball,
    build_args,
    cached_build,
    docker_build,
    hardened,
    image_files,
    image_id,
    operator_container,
    run,
    running_container,
    setid_files,
    shared_dir,
    shells,
)
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from .conftest import AGENT_USER, CONTROLLER_USER, env_of, find, manifest_objects, pod_of, sample_objects

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "imageunlock-test:latest"
BUILD_STAGE = "imageunlock-test:build"
BASE = "imageunlock-test-base:bookworm"
CACHE_DIR = CACHE_ROOT / "image-test"


@pytest.fixture(scope="module")
def image(dockerd: Dockerd) -> str:
    base = base_tarball()

    def build() -> None:
        if image_id(dockerd, BASE) is None:
            dockerd.docker("import", str(base), BASE)
        for extra in (("--target", "build", "-t", BUILD_STAGE), ("-t", IMAGE)):
            docker_build(dockerd, build_args(BASE), (BUILD_STAGE, IMAGE), *extra)

    stamp = {"base": base.name, "base_size": base.stat().st_size}
    cached_build(dockerd, CACHE_DIR, stamp, (BASE, BUILD_STAGE, IMAGE), build)
    return IMAGE


def test_image_metadata(dockerd, image):
    """Non-root by default, `imageunlock agent`, /tmp a volume, liveness port declared."""
    config = json.loads(dockerd.docker("image", "inspect", image, text=True).stdout)[0]["Config"]
    assert config["User"] == f"{DEFAULT_UID}:{DEFAULT_UID}"
    assert config["Entrypoint"] == ["imageunlock"]
    assert config["Cmd"] == ["agent"]
    assert "/tmp" in config["Volumes"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["IMAGEUNLOCK_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env["IMAGEUNLOCK_ARCHIVE_ROOT"] == "/var/lib/imageunlock"
    assert env["TMPDIR"] == "/tmp"


def test_help(dockerd, image):
    res = run(dockerd, "--network", "none", image, "--help")
    assert res.returncode == 0, res.stderr
    for command in ("unlock", "encrypt", "agent", "controller"):
        assert command in res.stdout
    assert "operator" not in res.stdout.split("{", 1)[-1].split("}", 1)[0].split(",")  # the old role is gone


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_role_help(dockerd, image, role):
    """`imageunlock agent --help` and `imageunlock controller --help` work in the image."""
    res = run(dockerd, "--network", "none", image, role, "--help")
    assert res.returncode == 0, res.stderr
    assert f"imageunlock {role}" in res.stdout


def test_default_command_is_the_agent(dockerd, image):
    """With no arguments the image runs `imageunlock agent`, which needs its node's name."""
    res = run(dockerd, "--network", "none", "-e", "RESOURCE_API_URL=https://api.example.com", image)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "NODE_NAME is not set" in res.stderr


@pytest.mark.containerd
def test_the_images_ctr_talks_to_the_nodes_containerd(dockerd, image, containerd):
    """Issue 10: the containerd runtime drives `ctr`, so the image ships it (the base release's
    Debian build, for the image's architecture); against a real containerd (sid's 2.x, as the
    node's), mounted the way the DaemonSet mounts it: the socket file alone, read-only, at
    /run/containerd/containerd.sock, reached as the image's non-root user through the socket's
    group (issue 18: no directory mount, the only group containerd.socketGroupId's)."""
    socket = "/run/containerd/containerd.sock"
    res = run(
        dockerd,
        "--network",
        "none",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--group-add",
        str(os.stat(containerd.socket).st_gid),  # root:root 0660 as on a node: 0 (socketGroupId)
        "-v",
        f"{containerd.socket}:{socket}:ro",
        "--entrypoint",
        "ctr",
        image,
        "-a",
        socket,
        "version",
    )
    assert res.returncode == 0, res.stderr
    client, _, server = res.stdout.partition("Server:")
    assert "Version:" in client and "Version:" in server
    assert ".".join(map(str, containerd.build.version)) in server


def test_image_has_no_shell_and_no_setuid_or_setgid_file(dockerd, image):
    """Issue 18: the built image's filesystem (docker export) holds no file with a setuid or
    setgid bit (nothing in it can gain privileges) and no shell (sh, dash, bash, busybox,
    ...: the product runs Python and ctr directly), while the program, its Python and ctr are
    there; `sh` cannot be run in it."""
    files = image_files(dockerd, image)
    for path in ("opt/imageunlock/bin/imageunlock", "opt/imageunlock/bin/python", "usr/local/bin/ctr", "etc/passwd"):
        assert path in files, path
    assert setid_files(files) == []
    assert shells(files) == []
    res = run(dockerd, "--network", "none", "--entrypoint", "sh", image, "-c", "true")
    assert res.returncode != 0 and "not found" in res.stderr, (res.returncode, res.stderr)


@pytest.mark.tpm
def test_the_images_tpm_tools_seal_and_unseal_on_a_real_tpm(dockerd, image, swtpm):
    """Issue 23: the image carries Debian's tpm2-tools and the TCTI modules the product uses;
    as the locked-down non-root user, a seal and an unseal round trip on a real TPM 2.0
    (swtpm on the host's loopback: --network host)."""
    files = image_files(dockerd, image)
    assert "usr/bin/tpm2_unseal" in files and "usr/bin/tpm2_create" in files
    res = run(
        dockerd, "--network", "host", *ANY_USER_LOCKED_DOWN[2:], "--entrypoint", "python", image,
        "-c", TPM_ROUND_TRIP, swtpm.tcti,
    )  # fmt: skip
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


READ_ONLY_CHECK = (
    """
import errno, os, subprocess, sys, tempfile
import imageunlock.agent.handlers, imageunlock.controller.handlers  # kopf, kubernetes, docker
import imageunlock.app.kopfrun, imageunlock.cli
assert os.getuid() == 4242, os.getuid()
"""
    + WRITE_PROBE
    + """
# ... and no test tools.
site = next(p for p in sys.path if p.endswith("site-packages"))
tools = ("pytest", "hypothesis", "setuptools", "wheel", "pip")
leftovers += [n for n in os.listdir(site) if n.lower().startswith(tools)]
assert not leftovers, leftovers
assert subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0
print("ok")
"""
)


def test_read_only_root_filesystem_as_any_non_root_user(dockerd, image):
    """--read-only --tmpfs /tmp as an arbitrary UID with no capabilities; lean final image."""
    res = run(dockerd, *ANY_USER_LOCKED_DOWN, "--entrypoint", "python", image, "-c", READ_ONLY_CHECK)
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


# ------------------------------------------------------------------ the two roles, running

NODE = "iu-pack-node"  # the Node the packaged agent serves (no kubelet: the test registers it)


@pytest.fixture(scope="module")
def image_api(archives) -> Iterator[FakeResourceApi]:
    """The resource API for the packaged agent: up before the container starts, since the
    agent only sends credentials to the API its RESOURCE_API_URL names."""
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        yield api


@pytest.fixture(scope="module")
def node(plane) -> Iterator[str]:
    """A Node as kubelet would register it, running the Docker Engine: the agent's
    IMAGEUNLOCK_RUNTIME=auto resolves to docker from it, and the controller counts it."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
        "status": {"nodeInfo": {"containerRuntimeVersion": "docker://20.10.24", "kubeletVersion": "v1.30.0"}},
    }
    plane.kubectl("apply", "-f", "-", stdin=json.dumps(body))
    try:
        yield NODE
    finally:
        plane.kubectl("delete", "node", NODE, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def agent(dockerd: Dockerd, image: str, plane, node: str, image_api: FakeResourceApi) -> Iterator[Operator]:
    """The agent container, run the way the DaemonSet runs it (support.packaged_image: the
    image's default command, the agents' ServiceAccount), for the registered Node."""
    env = {"NODE_NAME": node, "RESOURCE_API_URL": image_api.url, "IMAGEUNLOCK_LOG_LEVEL": "debug"}
    with operator_container(dockerd, image, plane, env) as running:
        yield running


@contextlib.contextmanager
def controller_container(engine: Dockerd, image: str, plane) -> Iterator[Operator]:
    """The controller as manifests/controller.yaml runs it: `imageunlock controller` as the
    controller's ServiceAccount, the image's non-root user, read-only root filesystem, no
    capabilities, no privilege escalation, and no socket, host path or group at all; the
    agents' placement from the manifest's environment. Liveness on a free loopback port
    (host network: the control plane listens on 127.0.0.1)."""
    plane.ensure_crd()
    (deployment,) = find(manifest_objects(), "Deployment")
    written = env_of(pod_of(deployment)["containers"][0], pod="imageunlock-controller-pack")
    port, metrics_port = free_port(), free_port()
    assert written["IMAGEUNLOCK_METRICS_ADDRESS"] == "0.0.0.0:8081"  # moved to loopback: host network
    plane.kubectl("create", "namespace", written["POD_NAMESPACE"], check=False)  # the Lease's
    env = {
        **{k: v for k, v in written.items() if k.startswith("IMAGEUNLOCK_AGENT_") or k.startswith("POD_")},
        "KUBECONFIG": "/etc/imageunlock/kubeconfig",
        "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{port}/healthz",
        "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
        "IMAGEUNLOCK_LOG_LEVEL": "debug",
    }
    with shared_dir() as config_dir:
        kubeconfig = config_dir / "kubeconfig"
        shutil.copyfile(plane.kubeconfig_for(CONTROLLER_USER), kubeconfig)
        os.chown(kubeconfig, DEFAULT_UID, DEFAULT_UID)
        kubeconfig.chmod(0o400)
        options = hardened()
        options += ["-v", f"{config_dir}:/etc/imageunlock:ro"]
        with running_container(engine, options, env, image, "controller") as container:
            yield Operator(engine, container, port, config_dir, metrics_port)


@pytest.fixture(scope="module")
def controller(dockerd: Dockerd, image: str, plane, node: str) -> Iterator[Operator]:
    with controller_container(dockerd, image, plane) as running:
        yield running


def test_agent_answers_liveness_against_the_control_plane(agent):
    body = agent.healthz()
    # kopf's probe results: the runtime the Node reports answers, through the socket's group.
    assert body.get("runtime") == "reachable", body
    user = agent.engine.docker("exec", agent.container, "id", "-u", text=True).stdout.strip()
    assert user == str(DEFAULT_UID)
    logs = agent.logs()
    assert "Traceback" not in logs
    assert f"agent on node {NODE}" in logs and "runtime docker" in logs, logs


def test_controller_answers_liveness_without_host_access(controller):
    controller.healthz()
    inspect = json.loads(
        controller.engine.docker("inspect", "--format", "{{json .}}", controller.container, text=True).stdout
    )
    assert inspect["Config"]["Cmd"] == ["controller"]
    assert inspect["Config"]["User"] == f"{DEFAULT_UID}:{DEFAULT_UID}"
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True and inspect["HostConfig"]["CapDrop"] == ["ALL"]
    assert not inspect["HostConfig"].get("GroupAdd")
    assert not any(m["Source"].endswith(".sock") for m in inspect["Mounts"])
    # The only replica takes the Lease in the operator's namespace (manifests/rbac.yaml's Role)
    # and says so on its metrics endpoint.
    deadline = time.monotonic() + 60
    while "imageunlock_controller_leader 1.0" not in (text := controller.metrics()):
        assert time.monotonic() < deadline, f"{text}\n{controller.logs()}"
        time.sleep(0.5)
    assert "Traceback" not in controller.logs()


def _audit(audit_log: Path, user: str) -> tuple[list[dict[str, Any]], set[tuple[str, str, str]]]:
    """(denied requests, {(resource[/subresource], verb, apiGroup)} requested) of one user."""
    denied, requests = [], set()
    for line in audit_log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("user", {}).get("username") != user:
            continue
        ref = event.get("objectRef") or {}  # watches stay open: seen as ResponseStarted
        if ref.get("resource") and event.get("stage") in ("ResponseStarted", "ResponseComplete"):
            requests.add(
                (
                    ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else ""),
                    event.get("verb", ""),
                    ref.get("apiGroup", ""),
                )
            )
        if event.get("responseStatus", {}).get("code") == 403:
            denied.append({k: event.get(k) for k in ("verb", "requestURI", "objectRef")})
    return denied, requests


def test_roles_unlock_the_sample_as_their_service_accounts(agent, controller, plane, archives, image_api):
    """The packaged agent and controller, with exactly the manifests' RBAC, unlock
    manifests/samples/ on the node and report it Ready, NODES 1/1."""
    engine, namespace = agent.engine, "iu-pack"
    agent.healthz()
    controller.healthz()
    plane.kubectl("create", "namespace", namespace, check=False)
    plane.bind_secrets(namespace)  # Secrets are readable per namespace: as a user would, copy the RoleBinding
    engine.docker("rmi", "-f", *archives.refs, check=False)  # a real unlock, not the fast path
    archive = agent.archive_root / "images.enc"
    shutil.copyfile(archives.own_archive, archive)
    archive.chmod(0o644)
    # The samples with the fields `make demo` patches: credentials, URL, archive path.
    samples = sample_objects()
    (secret,) = find(samples, "Secret")
    (unlock,) = find(samples, "ImageUnlock")
    secret["stringData"] = {"email": TEST_EMAIL, "password": TEST_PASSWORD}
    unlock["spec"]["resourceApi"]["url"] = image_api.url
    unlock["spec"]["archivePath"] = str(archive)
    assert unlock["spec"]["version"] == TEST_VERSION
    name = unlock["metadata"]["name"]
    plane.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, unlock]}),
    )
    deadline = time.monotonic() + 240
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = json.loads(plane.kubectl("get", "-n", namespace, "imageunlock", name, "-o", "json").stdout)
        status = obj.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        if (
            conditions.get("Ready", {}).get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
        ):
            break
        if conditions.get("Stalled", {}).get("status") == "True":
            pytest.fail(f"Stalled: {status.get('message')}\n{agent.logs()}\n{controller.logs()}")
        time.sleep(1)
    else:
        pytest.fail(f"not Ready within 240s: {status}\n{agent.logs()}\n{controller.logs()}")
    logs = agent.logs()
    assert status["phase"] == "Ready"
    assert status["readyNodes"] == "1/1"
    assert sorted(i["name"] for i in status["images"]) == sorted(archives.refs)
    (entry,) = status["nodes"]
    assert (entry["name"], entry["runtime"], entry["phase"]) == (NODE, "docker", "Ready")
    for ref in archives.refs:
        assert engine.docker("image", "inspect", ref, check=False).returncode == 0, ref
    events = json.loads(plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e.get("reason") == "Unlocked" and e["involvedObject"]["name"] == name for e in events), events
    # manifests/rbac.yaml was enough: no request of either ServiceAccount was denied ...
    for user, role_logs in ((AGENT_USER, logs), (CONTROLLER_USER, controller.logs())):
        denied, _ = _audit(plane.audit_log, user)
        assert not denied, f"denied requests of {user}: {denied}\n{role_logs}"
    # ... and each used what it is granted for (the audit log saw these requests).
    needed = {
        AGENT_USER: [
            ("imageunlocks", "watch", "loader.azaion.com"),
            ("imageunlocks/status", "patch", "loader.azaion.com"),
            ("nodes", "get", ""),
            ("secrets", "get", ""),
            ("events", "create", ""),
            ("customresourcedefinitions", "watch", "apiextensions.k8s.io"),
        ],
        CONTROLLER_USER: [
            ("imageunlocks", "watch", "loader.azaion.com"),
            ("imageunlocks/status", "patch", "loader.azaion.com"),
            ("nodes", "list", ""),
            ("nodes", "watch", ""),
            ("customresourcedefinitions", "watch", "apiextensions.k8s.io"),
        ],
    }
    for user, requests_needed in needed.items():
        _, requests = _audit(plane.audit_log, user)
        for request in requests_needed:
            assert request in requests, (user, request, sorted(requests))
    assert TEST_PASSWORD not in logs + controller.logs()
