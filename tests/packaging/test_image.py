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

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support.dockerd import Dockerd
from ..support.images import TEST_VERSION
from ..support.packaged_image import (
    CACHE_ROOT,
    DEFAULT_UID,
    Operator,
    base_tarball,
    build_args,
    cached_build,
    docker_build,
    image_id,
    operator_container,
    run,
)
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from .conftest import SA_USER, find, sample_objects

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


@pytest.fixture(scope="module")
def image_api(archives) -> Iterator[FakeResourceApi]:
    """The resource API for the packaged operator: up before the container starts, since the
    operator only sends credentials to the API its RESOURCE_API_URL names."""
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        yield api


@pytest.fixture(scope="module")
def operator(dockerd: Dockerd, image: str, plane, image_api: FakeResourceApi) -> Iterator[Operator]:
    """The operator container, run the way the Deployment runs it (support.packaged_image)."""
    env = {"RESOURCE_API_URL": image_api.url, "IMAGEUNLOCK_LOG_LEVEL": "debug"}
    with operator_container(dockerd, image, plane, env) as running:
        yield running


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
