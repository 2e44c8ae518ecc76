#!/usr/bin/env python3
"""``make demo``: the operator's main job, end to end, on this machine, on two nodes.

``up`` brings up a local Kubernetes control plane, a private dockerd, a private containerd
and a demo resource API (all on 127.0.0.1), registers two Node objects (there is no kubelet:
``edge-docker`` reports docker, ``edge-containerd`` containerd), makes a demo archive (7 small
images, encrypted with ``openssl``), applies the CRD and the samples from ``manifests/``
(namespace, Secret, ImageUnlock), starts the controller and one agent per node in the
background, waits for Ready and prints ``kubectl get imageunlocks`` (NODES 2/2), each
node's entry and each node's readiness label (``node <name>: <key>=<version>``). Everything
stays running; state lives in ``.demo/`` (kubeconfig at ``.demo/kubeconfig``, logs at
``.demo/*.log``). ``down`` stops everything it started, by
PID, and removes ``.demo/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # tests.support

import yaml  # noqa: E402

import controlplane  # noqa: E402
from imageunlock.defaults import DEFAULT_IMAGES  # noqa: E402
from tests.support.cluster import node_object  # noqa: E402
from tests.support.containerd import Containerd, ContainerdError, bookworm_build, sid_build  # noqa: E402
from tests.support.dockerd import Dockerd  # noqa: E402
from tests.support.images import import_images, openssl_encrypt, save  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.processes import with_own_disk  # noqa: E402

DEMO = ROOT / ".demo"
VENV_BIN = Path(sys.executable).parent
VERSION = "1.0.0"
NAMESPACE = "imageunlock-demo"
NODES = {"edge-docker": "docker://24.0.9", "edge-containerd": "containerd://2.1.4"}
PROCESSES = ("controller", *(f"agent-{node}" for node in NODES), "resource-api", "containerd", "dockerd")


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _pid_file(name: str) -> Path:
    return DEMO / f"{name}.pid"


def _spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> int:
    with open(DEMO / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    _pid_file(name).write_text(str(proc.pid))
    return proc.pid


def _wait_file(path: Path, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not start within {timeout}s; see {DEMO}")


def _kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [controlplane.kubectl_path(), "--kubeconfig", str(DEMO / "kubeconfig"), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=300,
    )
    if check and result.returncode:
        raise SystemExit(f"demo: kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


def _samples(archive: Path, api_url: str) -> str:
    """manifests/samples with the demo's namespace, archive path and API URL filled in."""
    docs = []
    for path in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("Secret", "ImageUnlock"):
                continue
            doc.setdefault("metadata", {})["namespace"] = NAMESPACE
            if doc["kind"] == "Secret":
                doc["stringData"] = {"email": os.environ["DEMO_API_EMAIL"], "password": os.environ["DEMO_API_PASSWORD"]}
                doc.pop("data", None)
            elif doc["kind"] == "ImageUnlock":
                doc["spec"]["archivePath"] = str(archive)
                doc["spec"]["version"] = VERSION
                doc["spec"].setdefault("resourceApi", {})["url"] = api_url
            docs.append(doc)
    return yaml.safe_dump_all(docs)


def up() -> int:
    if (DEMO / "kubeconfig").exists() and controlplane.ControlPlane(DEMO / "plane").running():
        say("already up; `make demo-down` first to start afresh")
        print(_kubectl("get", "imageunlocks", "-A").stdout)
        return 0
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    started = time.monotonic()

    say("starting the local Kubernetes control plane")
    plane = controlplane.ControlPlane(DEMO / "plane").start()
    shutil.copy(plane.kubeconfig, DEMO / "kubeconfig")

    say("starting a private dockerd")
    engine = Dockerd(DEMO / "dockerd")
    engine.sock_dir = DEMO / "run"
    engine.socket = engine.sock_dir / "docker.sock"
    if len(str(engine.socket)) > 100:
        engine.sock_dir = Path("/tmp") / f"imageunlock-demo-{os.getuid()}"
        engine.socket = engine.sock_dir / "docker.sock"
    engine.start()
    _pid_file("dockerd").write_text(str(engine.proc.pid))
    (DEMO / "docker-host").write_text(engine.url)

    say("starting a private containerd")
    try:
        build = sid_build()  # 2.x: its CRI honours the pinned label
    except ContainerdError:
        build = bookworm_build()
    containerd = Containerd(DEMO / "containerd", build)
    containerd.sock_dir = engine.sock_dir / "containerd"
    containerd.socket = containerd.sock_dir / "containerd.sock"
    containerd.start()
    _pid_file("containerd").write_text(str(containerd.proc.pid))

    say("making a demo archive: 7 images, encrypted with openssl")
    fragment = secrets.token_bytes(32)
    (DEMO / "fragment.bin").write_bytes(fragment)
    (DEMO / "fragment.bin").chmod(0o600)
    work = DEMO / "build"
    work.mkdir()
    refs = [f"{name}:{VERSION}" for name in DEFAULT_IMAGES]
    import_images(engine, work, refs, payload_bytes=256 * 1024)
    save(engine, refs, work / "images.tar")
    engine.docker("rmi", "-f", *refs)
    archives = DEMO / "archives"
    archives.mkdir()
    archive = openssl_encrypt(work / "images.tar", archives / "images.enc", fragment, secrets.token_bytes(16))
    shutil.rmtree(work)

    say("starting the demo resource API")
    os.environ.setdefault("DEMO_API_EMAIL", "demo@example.test")
    os.environ.setdefault("DEMO_API_PASSWORD", secrets.token_urlsafe(16))
    _spawn(
        "resource-api",
        [
            sys.executable,
            str(ROOT / "tests" / "support" / "resource_api.py"),
            "--fragment-file",
            str(DEMO / "fragment.bin"),
            "--port-file",
            str(DEMO / "api-url"),
        ],
    )
    api_url = _wait_file(DEMO / "api-url", 20, "the demo resource API")

    named = ", ".join(f"{node} ({runtime.split('://')[0]})" for node, runtime in NODES.items())
    say(f"registering the nodes {named}")
    for node, runtime in NODES.items():
        _kubectl("apply", "-f", "-", input=yaml.safe_dump(node_object(node, runtime, {"role": "edge"})))

    say("applying the CRD and the samples (namespace, Secret, ImageUnlock)")
    _kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    _kubectl("wait", "--for=condition=Established", "crd/imageunlocks.loader.azaion.com", "--timeout=60s")
    _kubectl("create", "namespace", NAMESPACE)
    _kubectl("apply", "-f", "-", input=_samples(archive, api_url))

    say("starting the controller and one agent per node (logs: .demo/controller.log, .demo/agent-*.log)")
    base = {k: v for k, v in os.environ.items() if k != "DEMO_API_PASSWORD"}
    base.update(KUBECONFIG=str(DEMO / "kubeconfig"), IMAGEUNLOCK_METRICS_ADDRESS="")
    controller_port = free_port()  # its /metrics: the cluster summary (nodes ready/desired)
    env = _role(base, IMAGEUNLOCK_METRICS_ADDRESS=f"127.0.0.1:{controller_port}")
    _spawn("controller", [str(VENV_BIN / "imageunlock"), "controller"], env)
    metrics_ports = {}
    for node in NODES:
        metrics_ports[node] = free_port()
        env = _role(
            base,
            NODE_NAME=node,  # the runtime comes from the Node (containerRuntimeVersion)
            IMAGEUNLOCK_DOCKER_HOST=engine.url,
            IMAGEUNLOCK_CONTAINERD_ADDRESS=str(containerd.socket),
            IMAGEUNLOCK_ARCHIVE_ROOT=str(archives),
            RESOURCE_API_URL=api_url,
            IMAGEUNLOCK_VERIFY_INTERVAL="60",
            IMAGEUNLOCK_METRICS_ADDRESS=f"127.0.0.1:{metrics_ports[node]}",
            PATH=containerd.env()["PATH"],  # its ctr first, as the agent image ships one
        )
        _spawn(f"agent-{node}", [*_own_disk(node, archive, archives), str(VENV_BIN / "imageunlock"), "agent"], env)

    say("waiting for the ImageUnlock to become Ready on every node")
    wait = _kubectl(
        "wait", "--for=condition=Ready", "imageunlocks", "--all", "-n", NAMESPACE, "--timeout=180s", check=False
    )
    print(_kubectl("get", "imageunlocks", "-A", "-o", "wide").stdout)
    if wait.returncode:
        say(f"not Ready: {wait.stderr.strip()}; see .demo/controller.log and .demo/agent-*.log")
        return 1
    print(_entries() + "\n")
    labels = _readiness_labels()
    if labels:
        print("\n".join(labels) + "\n")
    first = next(iter(NODES))
    print(f"metrics: http://127.0.0.1:{metrics_ports[first]}/metrics")
    print(f"controller metrics: http://127.0.0.1:{controller_port}/metrics")
    say(f"Ready in {time.monotonic() - started:.0f}s. Try:")
    for line in (
        "kubectl --kubeconfig .demo/kubeconfig get iu -A",
        f"kubectl --kubeconfig .demo/kubeconfig describe iu -n {NAMESPACE}",
        "kubectl --kubeconfig .demo/kubeconfig wait --for=condition=Ready iu --all -A",
        f"kubectl --kubeconfig .demo/kubeconfig get iu -n {NAMESPACE} -o yaml   # status.nodes: one entry per node",
        f"docker -H {engine.url} images",
        f"{build.ctr} -a {containerd.socket} -n k8s.io images ls",
        f"curl -s http://127.0.0.1:{metrics_ports[first]}/metrics | grep ^imageunlock_",
        f"curl -s http://127.0.0.1:{controller_port}/metrics | grep ^imageunlock_nodes_",
        "make demo-down",
    ):
        print(f"  {line}", file=sys.stderr)
    return 0


def _own_disk(node: str, archive: Path, archives: Path) -> list[str]:
    """Real nodes each have their own disk; here they share one, where two agents would take
    turns on the same file (ArchiveBusy). As root, every node but the first sees a copy of its
    own at the same path (a private mount namespace), as on a real fleet."""
    if node == next(iter(NODES)) or os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    disk = DEMO / "nodes" / node
    disk.mkdir(parents=True)
    shutil.copyfile(archive, disk / archive.name)
    return with_own_disk(disk, archives)


def _role(base: dict[str, str], **settings: str) -> dict[str, str]:
    return {**base, "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{free_port()}/healthz", **settings}


def _readiness_labels(timeout: float = 30.0) -> list[str]:
    """``node <name>: <key>=<version>`` per node and ImageUnlock with spec.readinessLabel, once
    the controller has labelled every node (it does so right after Ready); what is there after
    ``timeout`` otherwise, ``<key> not set`` where it is missing."""
    deadline = time.monotonic() + timeout
    while True:
        items = yaml.safe_load(_kubectl("get", "imageunlocks", "-n", NAMESPACE, "-o", "yaml").stdout)["items"]
        keys = [(i["spec"]["readinessLabel"], i["spec"]["version"]) for i in items if i["spec"].get("readinessLabel")]
        nodes = yaml.safe_load(_kubectl("get", "nodes", "-o", "yaml").stdout)["items"]
        labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in nodes}
        done = all(labels.get(node, {}).get(key) == version for node in NODES for key, version in keys)
        if done or time.monotonic() >= deadline:
            return [
                f"node {node}: {key}={labels[node][key]}"
                if labels.get(node, {}).get(key)
                else f"node {node}: {key} not set"
                for key, _version in keys
                for node in NODES
            ]
        time.sleep(0.5)


def _entries() -> str:
    """One line per node entry of every ImageUnlock: what ``kubectl get -o yaml`` shows at length."""
    items = yaml.safe_load(_kubectl("get", "imageunlocks", "-n", NAMESPACE, "-o", "yaml").stdout)["items"]
    lines = ["NODE ENTRIES (status.nodes)"]
    for item in items:
        for entry in (item.get("status") or {}).get("nodes") or []:
            images = len(entry.get("images") or [])
            lines.append(
                f"  {item['metadata']['name']}  {entry['name']:<16} {entry.get('runtime', ''):<11} "
                f"{entry.get('phase', ''):<7} {images} image(s)"
            )
    return "\n".join(lines)


def _stop_pid(name: str) -> None:
    try:
        pid = int(_pid_file(name).read_text())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def down() -> int:
    if not DEMO.exists():
        say("nothing to stop")
        return 0
    for name in PROCESSES:
        _stop_pid(name)
        say(f"stopped {name}")
    controlplane.ControlPlane(DEMO / "plane").stop()
    say("stopped the control plane")
    shutil.rmtree(Path("/tmp") / f"imageunlock-demo-{os.getuid()}", ignore_errors=True)
    shutil.rmtree(DEMO, ignore_errors=True)
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    sys.exit({"up": up, "down": down}.get(command, lambda: print(__doc__) or 2)())
