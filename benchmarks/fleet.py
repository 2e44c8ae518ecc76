"""A small fleet on this machine for the fleet benchmarks (``bench_many.py``, ``bench_idle.py``).

The same parts ``make demo`` starts, as processes, all on 127.0.0.1: the local control plane
(tools/controlplane) with an audit log and ``manifests/rbac.yaml`` enforced, one private dockerd,
a loopback resource API (in this process: its call counters are read directly), M Node objects
(``edge-1``, ``edge-2``, …; there is no kubelet), the controller and one agent per node.
The agents share the dockerd, the archive root and the import-lock directory (one runtime
socket: one import at a time, as on one node). Each role has its own client certificate, so
the audit log tells them apart: the controller as its ServiceAccount, each agent as
``imageunlock-bench-agent:<node>`` in a group bound to the agent's ClusterRoles exactly as
the ServiceAccount is. Every role runs with the product's defaults (verify interval 300 s,
log level info) except the addresses it listens on.

``Fleet`` is a context manager: whatever it started is stopped at its end, also on failure.
A part that cannot come up raises ``Unavailable`` (the benches exit with ``UNAVAILABLE``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml

import controlplane
from benchmarks.measure import proc_cpu
from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine.runtimes.importlock import LOCK_DIR_ENV
from imageunlock.kube.client import GROUP, PLURAL, VERSION
from tests.support import audit
from tests.support.cluster import (
    CLUSTER_WIDE_SECRETS_FILE,
    CONTROLLER_USER,
    CRD_FILE,
    CRD_NAME,
    RBAC_FILE,
    node_object,
    spec_for,
    unlock_object,
)
from tests.support.dockerd import Dockerd, DockerdError
from tests.support.images import import_images, openssl_encrypt, save
from tests.support.net import free_port
from tests.support.operator_process import OperatorProcess
from tests.support.resource_api import KEY, LOGIN, FakeResourceApi

UNAVAILABLE = 3  # exit status of a bench whose parts could not come up (the smoke tests skip or fail on it)
VERSION_TAG = "1.0.0"
NAMESPACE = "bench"
SECRET = "loader-creds"
EMAIL = "bench@example.test"
AGENT_GROUP = "imageunlock-bench:agents"
RUNTIME = "docker://24.0.9"
WRITES = {("patch", "imageunlocks/status"), ("create", "events"), ("patch", "events")}


class Unavailable(RuntimeError):
    """A part of the fleet (control plane, dockerd, an operator process) did not come up."""


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def agent_user(node: str) -> str:
    return f"imageunlock-bench-agent:{node}"


def _policy() -> str:
    """manifests/rbac.yaml, the cluster-wide Secrets opt-in, and the same two ClusterRoles bound
    to the per-node agent identities' group (so each agent is its own user in the audit log)."""
    extra = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"bench-{role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "Group", "name": AGENT_GROUP, "apiGroup": "rbac.authorization.k8s.io"}],
        }
        for role in ("imageunlock-agent", "imageunlock-agent-secrets")
    ]
    texts = [RBAC_FILE.read_text(), CLUSTER_WIDE_SECRETS_FILE.read_text(), yaml.safe_dump_all(extra)]
    return "\n---\n".join(texts)


def is_ready(obj: dict[str, Any], nodes: int) -> bool:
    """What the benches wait for: ``NODES m/m`` and the Ready condition True."""
    status = obj.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return status.get("readyNodes") == f"{nodes}/{nodes}" and ready.get("status") == "True"


@dataclass
class Role:
    name: str  # "controller", "agent edge-1", …
    user: str  # as the audit log names it
    process: OperatorProcess

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid) or 0.0

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kib / 1024


@dataclass
class Fleet:
    agents: int = 2
    workdir: Path | None = None
    roles: list[Role] = field(default_factory=list)

    # -- bring-up ----------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        self._stack = contextlib.ExitStack()
        try:
            self._up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _up(self) -> None:
        tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="iu-bench-fleet-")))
        self.work = self.workdir or tmp
        self.nodes = [f"edge-{i + 1}" for i in range(self.agents)]
        say("starting the local control plane (audit log, manifests/rbac.yaml enforced)")
        self.audit_log = self.work / "audit.log"
        policy = self.work / "rbac-policy.yaml"
        policy.write_text(_policy())
        plane = controlplane.ControlPlane(self.work / "plane", audit_log=self.audit_log, authorization_policy=policy)
        self._stack.callback(plane.stop)
        try:
            plane.start()
        except Exception as exc:
            raise Unavailable(f"the control plane: {type(exc).__name__}: {exc}") from exc
        self.plane = plane
        self.kubeconfig = plane.kubeconfig
        self.kubectl = controlplane.kubectl_path()

        say("starting a private dockerd and making a 7-image archive")
        engine = Dockerd(self.work / "dockerd")
        self._stack.callback(engine.stop)
        try:
            engine.start()
        except DockerdError as exc:
            raise Unavailable(f"dockerd: {exc}") from exc
        self.engine = engine
        fragment = secrets.token_bytes(32)
        build = self.work / "build"
        build.mkdir()
        refs = [f"{name}:{VERSION_TAG}" for name in DEFAULT_IMAGES]
        import_images(engine, build, refs, payload_bytes=64 * 1024)
        save(engine, refs, build / "images.tar")
        engine.docker("rmi", "-f", *refs)
        self.archives = self.work / "archives"
        self.archives.mkdir()
        self.archive = openssl_encrypt(build / "images.tar", self.archives / "images.enc", fragment, os.urandom(16))
        shutil.rmtree(build)

        password = secrets.token_urlsafe(16)
        self.api = self._stack.enter_context(FakeResourceApi(EMAIL, password, fragment))

        self.client = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
        self.client.configuration.connection_pool_maxsize = 16
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self._kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        self._kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
        say(f"registering the nodes {', '.join(self.nodes)}")
        for node in self.nodes:
            self.core.create_node(node_object(node, RUNTIME, {"role": "edge"}))
        self.namespace(NAMESPACE, password)
        self._password = password

        say(f"starting the controller and {self.agents} agents")
        locks = self.work / "locks"
        locks.mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "KUBECONFIG", "NODE_NAME"))}
        base.update(IMAGEUNLOCK_NAMESPACES="", IMAGEUNLOCK_LOG_LEVEL="info", **{LOCK_DIR_ENV: str(locks)})
        # The controller's Lease lives in the operator's namespace (manifests/rbac.yaml's Role).
        self.core.create_namespace({"metadata": {"name": "imageunlock-system"}})
        lease = {"POD_NAMESPACE": "imageunlock-system"}
        starts = [("controller", CONTROLLER_USER, plane.add_user(CONTROLLER_USER), lease)]
        for node in self.nodes:
            user = agent_user(node)
            settings = {
                "NODE_NAME": node,
                "IMAGEUNLOCK_DOCKER_HOST": engine.url,
                "IMAGEUNLOCK_ARCHIVE_ROOT": str(self.archives),
                "RESOURCE_API_URL": self.api.url,
            }
            starts.append((f"agent {node}", user, plane.add_user(user, groups=[AGENT_GROUP]), settings))
        for name, user, kubeconfig, settings in starts:
            env = {
                **base,
                "KUBECONFIG": kubeconfig,
                "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
                **settings,
            }
            role = "controller" if name == "controller" else "agent"
            process = OperatorProcess(self.work / name.replace(" ", "-"), env, role=role)
            self._stack.callback(process.stop)
            try:
                process.start()
            except AssertionError as exc:
                raise Unavailable(f"the {name}: {exc}") from exc
            self.roles.append(Role(name, user, process))

    def _kubectl(self, *args: str) -> str:
        result = subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args], capture_output=True, text=True, timeout=120
        )
        if result.returncode:
            raise Unavailable(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    # -- objects -----------------------------------------------------------------------
    def namespace(self, name: str, password: str | None = None) -> str:
        """A namespace with the credentials Secret in it."""
        self.core.create_namespace({"metadata": {"name": name}})
        self.core.create_namespaced_secret(
            name,
            {"metadata": {"name": SECRET}, "stringData": {"email": EMAIL, "password": password or self._password}},
        )
        return name

    def body(self, namespace: str, name: str) -> dict[str, Any]:
        """An ImageUnlock naming the fleet's archive, version and (default) images."""
        return unlock_object(namespace, name, spec_for(str(self.archive), VERSION_TAG, SECRET))

    def list(self, namespace: str) -> dict[str, Any]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)

    def seed(self, timeout: float = 180) -> float:
        """One ImageUnlock unlocks the archive on every node (a key request per node); its wall
        time. Raises RuntimeError when it is not Ready in time."""
        started = time.monotonic()
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, self.body(NAMESPACE, "seed"))
        deadline = started + timeout
        while time.monotonic() < deadline:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "seed")
            if is_ready(obj, self.agents):
                return time.monotonic() - started
            time.sleep(0.2)
        # the parts are up: not Ready is a failure of what is measured, never "unavailable"
        raise RuntimeError(f"the seed ImageUnlock was not Ready on {self.agents} nodes in {timeout:.0f}s: {obj}")

    def create_all(self, namespace: str, names: list[str], threads: int = 4) -> dict[str, float]:
        """Create one ImageUnlock per name, ``threads`` at a time; when each create returned."""
        done: dict[str, float] = {}

        def create(name: str) -> None:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, self.body(namespace, name))
            done[name] = time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(create, names))
        return done

    def delete_all(self, namespace: str, timeout: float = 300, keep: frozenset[str] = frozenset()) -> None:
        """Delete every ImageUnlock in ``namespace`` but those named in ``keep``, and wait
        until they are gone."""

        def left() -> list[str]:
            return [o["metadata"]["name"] for o in self.list(namespace)["items"] if o["metadata"]["name"] not in keep]

        if not keep:
            self.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        else:
            for name in left():
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        deadline = time.monotonic() + timeout
        while left() and time.monotonic() < deadline:
            time.sleep(0.5)

    # -- what the roles did ------------------------------------------------------------
    def audit_end(self) -> int:
        return audit.end(self.audit_log)

    def requests(self, since: int) -> dict[str, Counter[tuple[str, str]]]:
        """Per role, the resource requests it made after audit byte ``since``: (verb, resource)."""
        made: dict[str, Counter[tuple[str, str]]] = {}
        for role in self.roles:
            counts: Counter[tuple[str, str]] = Counter()
            for request, n in audit.requests(audit.entries(self.audit_log, role.user, since)).items():
                counts[(request.verb, request.resource)] += n
            made[role.name] = counts
        return made

    def quiet(self, since: int, still: float = 3.0, timeout: float = 30.0) -> float:
        """Wait until no role has made a request other than a watch for ``still`` seconds
        (at most ``timeout``); how long it waited."""
        started = time.monotonic()
        last_count, last_change = -1, started
        while time.monotonic() - started < timeout:
            count = sum(n for made in self.requests(since).values() for (verb, _), n in made.items() if verb != "watch")
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= still:
                break
            time.sleep(0.5)
        return time.monotonic() - started

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every role and of the plane's and the Engine's processes."""
        figures = {role.name: role.cpu() for role in self.roles}
        for name in ("apiserver", "etcd"):
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.plane.dir / f"{name}.pid").read_text())
                figures[name] = proc_cpu(pid) or 0.0
        if self.engine.proc is not None:
            figures["dockerd"] = proc_cpu(self.engine.proc.pid) or 0.0
        return figures

    def key_requests(self) -> dict[str, int]:
        return {"login": self.api.calls[LOGIN], "key": self.api.calls[KEY]}


class ReadyWatch:
    """Watches ImageUnlocks in one namespace (list, then watch from its resourceVersion, so
    nothing is missed) and records when each first became Ready on every node."""

    def __init__(self, fleet: Fleet, namespace: str) -> None:
        self.fleet, self.namespace = fleet, namespace
        self.ready: dict[str, float] = {}
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> ReadyWatch:
        self._resource_version = self._seen(self.fleet.list(self.namespace))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(70)

    def _seen(self, listing: dict[str, Any]) -> str:
        for obj in listing["items"]:
            self._note(obj)
        return str(listing["metadata"]["resourceVersion"])

    def _note(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name not in self.ready and is_ready(obj, self.fleet.agents):
            with self.changed:
                self.ready[name] = time.monotonic()
                self.changed.notify_all()

    def _run(self) -> None:
        custom = self.fleet.custom
        try:
            while not self._stop.is_set():
                watch = kubernetes.watch.Watch()
                try:
                    for event in watch.stream(
                        custom.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        resource_version=self._resource_version,
                        timeout_seconds=5,  # bounded: the stop flag is looked at every 5 s at least
                    ):
                        obj = event["object"]
                        self._resource_version = obj["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._note(obj)
                        if self._stop.is_set():
                            break
                except kubernetes.client.ApiException as exc:
                    if exc.status != 410:
                        raise
                    self._resource_version = self._seen(self.fleet.list(self.namespace))  # expired: list again
                finally:
                    watch.stop()
        except BaseException as exc:
            self.error = exc
            with self.changed:
                self.changed.notify_all()

    def wait(self, names: set[str], timeout: float) -> bool:
        """Until every one of ``names`` is Ready (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not names <= self.ready.keys():
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True


def rate_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells, right-aligned under the widest cell of each column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )
