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

Then the image is run: --help; a read-only root filesystem as an arbitrary non-root user
with no capabilities; and the operator itself (one container for the module, run the way the
Deployment runs it) against the local control plane, as the operator's ServiceAccount
authorized by manifests/rbac.yaml alone (plus its Secrets RoleBinding copied into the test's
namespace, as the manifests tell a user to), with the Docker socket reached through its group
(--group-add, i.e. supplementalGroups): its liveness probe answers, then it unlocks the
sample ImageUnlock for real, and the audit log shows no denied request.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support.ci import unavailable
from ..support.dockerd import Dockerd
from ..support.images import TEST_VERSION
from ..support.net import free_port
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from .conftest import REPO, SA_USER, find, sample_objects

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "imageunlock-test:latest"
BUILD_STAGE = "imageunlock-test:build"
BASE = "imageunlock-test-base:bookworm"
DEFAULT_UID = 10001
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imageunlock" / "image-test"
BUILD_TIMEOUT = 1500


def _base_tarball() -> Path:
    try:
        res = subprocess.run(
            ["bash", str(REPO / "scripts" / "base-image.sh")], capture_output=True, text=True, timeout=1800
        )
    except subprocess.TimeoutExpired:
        unavailable("base image", "scripts/base-image.sh timed out")
    if res.returncode != 0:
        unavailable("base image", f"scripts/base-image.sh failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def _build_args() -> list[str]:
    args = ["--network", "host", "--build-arg", f"BASE_IMAGE={BASE}"]
    # A TLS-intercepting proxy between this machine and PyPI: trust what the machine trusts
    # beyond the standard CAs (Debian keeps local CAs in /usr/local/share/ca-certificates).
    local_cas = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if local_cas:
        pem = "\n".join(p.read_text().strip() for p in local_cas)
        args += ["--build-arg", f"EXTRA_CA_CERTS={pem}"]
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    return args


def _image_id(engine: Dockerd, ref: str) -> str | None:
    res = engine.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def _docker_build(engine: Dockerd, *extra: str) -> None:
    cmd = [
        "docker",
        "-H",
        engine.url,
        "build",
        *_build_args(),
        "--cache-from",
        BUILD_STAGE,
        "--cache-from",
        IMAGE,
        *extra,
        str(REPO),
    ]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"docker build took more than {BUILD_TIMEOUT}s")
    if res.returncode != 0:
        pytest.fail(f"docker build {' '.join(extra)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}")


@pytest.fixture(scope="module")
def image(dockerd: Dockerd) -> str:
    base = _base_tarball()
    stamp = {"base": base.name, "base_size": base.stat().st_size}
    cache, meta = CACHE_DIR / "images.tar", CACHE_DIR / "images.json"
    use_cache = os.environ.get("IMAGEUNLOCK_TEST_IMAGE_CACHE", "1") != "0"
    cached = use_cache and cache.exists() and meta.exists() and json.loads(meta.read_text()) == stamp
    if cached and dockerd.docker("load", "-q", "-i", str(cache), check=False).returncode != 0:
        cache.unlink(missing_ok=True)
    if _image_id(dockerd, BASE) is None:
        dockerd.docker("import", str(base), BASE)
    before = (_image_id(dockerd, BUILD_STAGE), _image_id(dockerd, IMAGE))
    _docker_build(dockerd, "--target", "build", "-t", BUILD_STAGE)
    _docker_build(dockerd, "-t", IMAGE)
    after = (_image_id(dockerd, BUILD_STAGE), _image_id(dockerd, IMAGE))
    if use_cache and after != before:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = CACHE_DIR / f".images.{os.getpid()}.tar"
        saved = dockerd.docker("save", "-o", str(partial), BASE, BUILD_STAGE, IMAGE, check=False)
        if saved.returncode == 0:
            os.replace(partial, cache)
            meta.write_text(json.dumps(stamp))
        else:
            partial.unlink(missing_ok=True)
    return IMAGE


def run(engine: Dockerd, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", engine.url, "run", "--rm", *args], capture_output=True, text=True, timeout=timeout
    )


def test_image_metadata(dockerd, image):
    """Non-root by default, `imageunlock operator`, /tmp a volume, liveness port declared."""
    config = json.loads(dockerd.docker("image", "inspect", image, text=True).stdout)[0]["Config"]
    assert config["User"] == f"{DEFAULT_UID}:{DEFAULT_UID}"
    assert config["Entrypoint"] == ["imageunlock"]
    assert config["Cmd"] == ["operator"]
    assert "/tmp" in config["Volumes"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["IMAGEUNLOCK_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env["IMAGEUNLOCK_ARCHIVE_ROOT"] == "/var/lib/imageunlock"
    assert env["TMPDIR"] == "/tmp"


def test_help(dockerd, image):
    res = run(dockerd, "--network", "none", image, "--help")
    assert res.returncode == 0, res.stderr
    for command in ("unlock", "encrypt", "operator"):
        assert command in res.stdout


READ_ONLY_CHECK = """
import errno, os, subprocess, sys, tempfile
import imageunlock.handlers, imageunlock.operator_main, imageunlock.cli  # kopf, kubernetes, docker
assert os.getuid() == 4242, os.getuid()
with tempfile.NamedTemporaryFile() as f:  # TMPDIR=/tmp is writable
    f.write(b"x"); f.flush()
for path in ("/opt/imageunlock/x", "/x", "/etc/x"):
    try:
        open(path, "w")
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES), exc
    else:
        raise AssertionError(path + " is writable")
# Nothing of the build stage came along: no wheels, sources, build venv, pip, test tools.
leftovers = [p for p in ("/wheels", "/src", "/opt/build", "/opt/imageunlock/bin/pip") if os.path.exists(p)]
site = next(p for p in sys.path if p.endswith("site-packages"))
tools = ("pytest", "hypothesis", "setuptools", "wheel", "pip")
leftovers += [n for n in os.listdir(site) if n.lower().startswith(tools)]
assert not leftovers, leftovers
assert subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0
print("ok")
"""


def test_read_only_root_filesystem_as_any_non_root_user(dockerd, image):
    """--read-only --tmpfs /tmp as an arbitrary UID with no capabilities; lean final image."""
    res = run(
        dockerd,
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--user",
        "4242:4242",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--entrypoint",
        "python",
        image,
        "-c",
        READ_ONLY_CHECK,
    )
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


# ------------------------------------------------------------------ the operator, running


@contextlib.contextmanager
def _shared_dir() -> Iterator[Path]:
    """A directory the container's non-root user can read (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="iu-pack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Operator:
    def __init__(self, engine: Dockerd, container: str, port: int, archive_root: Path) -> None:
        self.engine, self.container, self.port, self.archive_root = engine, container, port, archive_root

    def logs(self) -> str:
        res = subprocess.run(
            ["docker", "-H", self.engine.url, "logs", "--tail", "80", self.container],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return res.stdout + res.stderr

    def healthz(self, timeout: float = 90) -> dict[str, Any]:
        """Poll kopf's liveness endpoint until it answers 200 (bounded); its JSON body."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            state = json.loads(
                self.engine.docker("inspect", "--format", "{{json .State}}", self.container, text=True).stdout
            )
            if not state["Running"]:
                pytest.fail(f"operator exited with {state['ExitCode']}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as rsp:
                    if rsp.status == 200:
                        return json.loads(rsp.read() or b"{}")
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last = str(exc)
            time.sleep(0.5)
        pytest.fail(f"no 200 from /healthz within {timeout}s ({last}):\n{self.logs()}")


@pytest.fixture(scope="module")
def image_api(archives) -> Iterator[FakeResourceApi]:
    """The resource API for the packaged operator: up before the container starts, since the
    operator only sends credentials to the API its RESOURCE_API_URL names."""
    api = FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def operator(dockerd: Dockerd, image: str, plane, image_api: FakeResourceApi) -> Iterator[Operator]:
    """The operator container, run the way the Deployment runs it: default (non-root) user,
    read-only root filesystem (/tmp from the image's VOLUME), no capabilities, the Docker
    socket through its group (--group-add = supplementalGroups), the archive directory
    read-only, a read-only kubeconfig for the operator's ServiceAccount (authorized by
    manifests/rbac.yaml only). Host network: the control plane listens on 127.0.0.1."""
    plane.ensure_crd()
    port = free_port()
    with _shared_dir() as archive_root, _shared_dir() as config_dir:
        shutil.copyfile(plane.sa_kubeconfig, config_dir / "kubeconfig")
        os.chown(config_dir / "kubeconfig", DEFAULT_UID, DEFAULT_UID)
        (config_dir / "kubeconfig").chmod(0o400)
        res = subprocess.run(
            [
                "docker",
                "-H",
                dockerd.url,
                "run",
                "-d",
                "--network",
                "host",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--group-add",
                str(os.stat(dockerd.socket).st_gid),
                "-v",
                f"{dockerd.socket}:/var/run/docker.sock",
                "-v",
                f"{archive_root}:{archive_root}:ro",
                "-v",
                f"{config_dir}:/etc/imageunlock:ro",
                "-e",
                "KUBECONFIG=/etc/imageunlock/kubeconfig",
                "-e",
                f"IMAGEUNLOCK_ARCHIVE_ROOT={archive_root}",
                "-e",
                f"RESOURCE_API_URL={image_api.url}",
                "-e",
                f"IMAGEUNLOCK_LIVENESS=http://127.0.0.1:{port}/healthz",
                "-e",
                f"IMAGEUNLOCK_METRICS_ADDRESS=127.0.0.1:{free_port()}",  # host network: not 8081
                "-e",
                "IMAGEUNLOCK_LOG_LEVEL=debug",
                image,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        container = res.stdout.strip()
        try:
            yield Operator(dockerd, container, port, archive_root)
        finally:  # stopped and removed by id, with its anonymous /tmp volume
            subprocess.run(
                ["docker", "-H", dockerd.url, "stop", "-t", "15", container], capture_output=True, timeout=60
            )
            subprocess.run(["docker", "-H", dockerd.url, "rm", "-f", "-v", container], capture_output=True, timeout=60)


def test_operator_answers_liveness_against_the_control_plane(operator):
    body = operator.healthz()
    # kopf's probe results: the runtime answers, through the socket's group.
    assert body.get("runtime") == "reachable", body
    user = operator.engine.docker("exec", operator.container, "id", "-u", text=True).stdout.strip()
    assert user == str(DEFAULT_UID)
    assert "Traceback" not in operator.logs()


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


def test_operator_unlocks_the_sample_as_its_service_account(operator, plane, archives, image_api):
    """The packaged operator, with exactly the manifests' RBAC, unlocks manifests/samples/."""
    engine, namespace = operator.engine, "iu-pack"
    operator.healthz()
    plane.kubectl("create", "namespace", namespace, check=False)
    plane.bind_secrets(namespace)  # Secrets are readable per namespace: as a user would, copy the RoleBinding
    engine.docker("rmi", "-f", *archives.refs, check=False)  # a real unlock, not the fast path
    archive = operator.archive_root / "images.enc"
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
            pytest.fail(f"Stalled: {status.get('message')}\n{operator.logs()}")
        time.sleep(1)
    else:
        pytest.fail(f"not Ready within 240s: {status}\n{operator.logs()}")
    logs = operator.logs()
    assert status["phase"] == "Ready"
    assert sorted(i["name"] for i in status["images"]) == sorted(archives.refs)
    for ref in archives.refs:
        assert engine.docker("image", "inspect", ref, check=False).returncode == 0, ref
    events = json.loads(plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e.get("reason") == "Unlocked" and e["involvedObject"]["name"] == name for e in events), events
    # manifests/rbac.yaml was enough: no request of the ServiceAccount was denied ...
    denied, requests = _audit(plane.audit_log, SA_USER)
    assert not denied, f"denied requests: {denied}\n{logs}"
    # ... and it used what it is granted for (the audit log saw these requests).
    for needed in [
        ("imageunlocks", "watch", "loader.azaion.com"),
        ("imageunlocks", "patch", "loader.azaion.com"),
        ("imageunlocks/status", "patch", "loader.azaion.com"),
        ("secrets", "get", ""),
        ("events", "create", ""),
        ("customresourcedefinitions", "watch", "apiextensions.k8s.io"),
    ]:
        assert needed in requests, (needed, sorted(requests))
    assert TEST_PASSWORD not in logs
