"""Building and running the operator image in the private dockerd, for the packaging tests
(test_image.py: the native image; test_image_arm64.py: the arm64 one under QEMU)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import pytest

from .ci import unavailable
from .dockerd import Dockerd
from .net import free_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_UID = 10001
BUILD_TIMEOUT = 1500
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imageunlock"


def base_tarball(arch: str | None = None) -> Path:
    """The debootstrapped root filesystem (scripts/base-image.sh, cached), for ``arch`` or
    this machine's."""
    env = {**os.environ, **({"BASE_ARCH": arch} if arch else {})}
    what = f"{arch} base image" if arch else "base image"
    try:
        res = subprocess.run(
            ["bash", str(REPO / "scripts" / "base-image.sh")], capture_output=True, text=True, timeout=1800, env=env
        )
    except subprocess.TimeoutExpired:
        unavailable(what, "scripts/base-image.sh timed out")
    if res.returncode != 0:
        unavailable(what, f"scripts/base-image.sh failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def build_args(base: str, build_base: str | None = None) -> list[str]:
    args = ["--network", "host", "--build-arg", f"BASE_IMAGE={base}"]
    if build_base:
        args += ["--build-arg", f"BUILD_IMAGE={build_base}"]
    # A TLS-intercepting proxy between this machine and PyPI: trust what the machine trusts
    # beyond the standard CAs (Debian keeps local CAs in /usr/local/share/ca-certificates).
    local_cas = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if local_cas:
        pem = "\n".join(p.read_text().strip() for p in local_cas)
        args += ["--build-arg", f"EXTRA_CA_CERTS={pem}"]
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    return args


def image_id(engine: Dockerd, ref: str) -> str | None:
    res = engine.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def docker_build(engine: Dockerd, args: Sequence[str], cache_from: Sequence[str], *extra: str) -> None:
    """``docker build`` with the classic builder (the one that honours a base image's recorded
    architecture), reusing ``cache_from``; a failure fails the test with the build's output."""
    cmd = ["docker", "-H", engine.url, "build", *args]
    for ref in cache_from:
        cmd += ["--cache-from", ref]
    cmd += [*extra, str(REPO)]
    try:
        res = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"docker build took more than {BUILD_TIMEOUT}s")
    if res.returncode != 0:
        pytest.fail(f"docker build {' '.join(extra)} failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}")


def cached_build(
    engine: Dockerd, cache_dir: Path, stamp: object, keep: Sequence[str], build: Callable[[], None]
) -> None:
    """Run ``build`` with the images ``keep`` (bases and stages) loaded from ``cache_dir`` when
    its stamp matches, and save them there again when the build changed them.
    ``IMAGEUNLOCK_TEST_IMAGE_CACHE=0`` builds without the cache."""
    cache, meta = cache_dir / "images.tar", cache_dir / "images.json"
    use_cache = os.environ.get("IMAGEUNLOCK_TEST_IMAGE_CACHE", "1") != "0"
    cached = use_cache and cache.exists() and meta.exists() and json.loads(meta.read_text()) == stamp
    if cached and engine.docker("load", "-q", "-i", str(cache), check=False).returncode != 0:
        cache.unlink(missing_ok=True)
    before = [image_id(engine, ref) for ref in keep]
    build()
    if use_cache and [image_id(engine, ref) for ref in keep] != before:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_dir / f".images.{os.getpid()}.tar"
        if engine.docker("save", "-o", str(partial), *keep, check=False).returncode == 0:
            os.replace(partial, cache)
            meta.write_text(json.dumps(stamp))
        else:
            partial.unlink(missing_ok=True)


def run(engine: Dockerd, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", engine.url, "run", "--rm", *args], capture_output=True, text=True, timeout=timeout
    )


def logs(engine: Dockerd, container: str) -> str:
    res = subprocess.run(
        ["docker", "-H", engine.url, "logs", "--tail", "80", container], capture_output=True, text=True, timeout=30
    )
    return res.stdout + res.stderr


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory the container's non-root user can read (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="iu-pack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# How the Deployment runs the operator: read-only root filesystem (/tmp from the image's
# VOLUME), no capabilities, no privilege escalation, the Docker socket through its group
# (--group-add = supplementalGroups). Host network: the control plane listens on 127.0.0.1.
def hardened(engine: Dockerd | None = None) -> list[str]:
    """A role's container as the pod runs it: host network (the control plane listens on
    127.0.0.1), read-only, no capabilities; with ``engine``, its socket as the node's."""
    options = ["--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if engine is not None:
        options += ["--group-add", str(os.stat(engine.socket).st_gid), "-v", f"{engine.socket}:/var/run/docker.sock"]
    return options


# The image as any non-root user with no network, no capabilities and a read-only root, and
# what a Python script run so checks of it: /tmp writable, nothing else, no build leftovers.
ANY_USER_LOCKED_DOWN = (
    "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "4242:4242",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
)  # fmt: skip
# A seal and an unseal on the TPM named by argv[1] (a TCTI string), in the image (issue 23).
TPM_ROUND_TRIP = """
import sys
from imageunlock.engine.keys import tpm
key, tcti = bytes(range(32)), sys.argv[1]
blob = tpm.seal(key, tcti=tcti, pcrs=[7], identity="image-test")
assert tpm.unseal(blob, tcti=tcti, identity="image-test") == key
print("ok")
"""


WRITE_PROBE = """
with tempfile.NamedTemporaryFile() as f:  # TMPDIR=/tmp is writable
    f.write(b"x"); f.flush()
for path in ("/opt/imageunlock/x", "/x", "/etc/x"):
    try:
        open(path, "w")
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES), exc
    else:
        raise AssertionError(path + " is writable")
# Nothing of the build stage came along: no wheels, sources, build venv, pip.
leftovers = [p for p in ("/wheels", "/src", "/opt/build", "/opt/imageunlock/bin/pip") if os.path.exists(p)]
"""


class Operator:
    """A running operator container."""

    def __init__(
        self, engine: Dockerd, container: str, port: int, archive_root: Path, metrics_port: int | None = None
    ) -> None:
        self.engine, self.container, self.port, self.archive_root = engine, container, port, archive_root
        self.metrics_port = metrics_port

    def metrics(self) -> str:
        """The exposition text of the container's metrics endpoint (a loopback port)."""
        assert self.metrics_port is not None, "started without a known metrics port"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as rsp:
            return str(rsp.read().decode())

    def logs(self) -> str:
        return logs(self.engine, self.container)

    def healthz(self, timeout: float = 90, interval: float = 0.5) -> dict[str, Any]:
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
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10) as rsp:
                    if rsp.status == 200:
                        return dict(json.loads(rsp.read() or b"{}"))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                last = str(exc)
            time.sleep(interval)
        pytest.fail(f"no 200 from /healthz within {timeout}s ({last}):\n{self.logs()}")


class OperatorPlane(Protocol):
    """What :func:`operator_container` needs of a control plane (the packaging tests' ``Plane``)."""

    @property
    def sa_kubeconfig(self) -> str: ...

    def ensure_crd(self) -> None: ...


@contextlib.contextmanager
def operator_container(engine: Dockerd, image: str, plane: OperatorPlane, env: dict[str, str]) -> Iterator[Operator]:
    """The agent container as the DaemonSet runs it (:func:`hardened`, default non-root
    user), with the archive directory read-only and a read-only kubeconfig for the operator's
    ServiceAccount (authorized by manifests/rbac.yaml only); liveness and metrics on free
    loopback ports. Yields an :class:`Operator`; the container is
    stopped and removed by id, with its anonymous /tmp volume."""
    plane.ensure_crd()
    port = free_port()
    with shared_dir() as archive_root, shared_dir() as config_dir:
        kubeconfig = config_dir / "kubeconfig"
        shutil.copyfile(plane.sa_kubeconfig, kubeconfig)
        os.chown(kubeconfig, DEFAULT_UID, DEFAULT_UID)
        kubeconfig.chmod(0o400)
        env = {
            "KUBECONFIG": "/etc/imageunlock/kubeconfig",
            "IMAGEUNLOCK_ARCHIVE_ROOT": str(archive_root),
            "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{port}/healthz",
            "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",  # host network: not 8081
            **env,
        }
        options = [
            *hardened(engine),
            "-v",
            f"{archive_root}:{archive_root}:ro",
            "-v",
            f"{config_dir}:/etc/imageunlock:ro",
        ]
        with running_container(engine, options, env, image) as container:
            yield Operator(engine, container, port, archive_root)


@contextlib.contextmanager
def running_container(engine: Dockerd, options: list[str], env: dict[str, str], *image_and_args: str) -> Iterator[str]:
    """``docker run -d`` with ``env``; yields the container id; stopped and removed by id,
    with its anonymous volumes, at the end."""
    for name, value in env.items():
        options = [*options, "-e", f"{name}={value}"]
    res = subprocess.run(
        ["docker", "-H", engine.url, "run", "-d", *options, *image_and_args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    container = res.stdout.strip()
    try:
        yield container
    finally:
        subprocess.run(["docker", "-H", engine.url, "stop", "-t", "15", container], capture_output=True, timeout=60)
        subprocess.run(["docker", "-H", engine.url, "rm", "-f", "-v", container], capture_output=True, timeout=60)


# Programs that are a shell (by file name): none may be in the image (issue 18).
SHELLS = frozenset({"sh", "ash", "dash", "bash", "rbash", "zsh", "ksh", "mksh", "csh", "tcsh", "busybox", "toybox"})


def image_files(engine: Dockerd, image: str) -> dict[str, tarfile.TarInfo]:
    """The image's root filesystem as ``docker export`` of a created (never started)
    container gives it: {path without a leading "/" or "./": its tar entry (mode, type, link
    target)}. The container is removed by id."""
    created = engine.docker("create", "--network", "none", image, text=True)
    container = created.stdout.strip()
    try:
        export = subprocess.Popen(["docker", "-H", engine.url, "export", container], stdout=subprocess.PIPE)
        assert export.stdout is not None
        files: dict[str, tarfile.TarInfo] = {}
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                files[member.name.removeprefix("./").rstrip("/")] = member
        assert export.wait(timeout=300) == 0, f"docker export {image} failed"
    finally:
        engine.docker("rm", "-f", container, check=False)
    return files


def setid_files(files: dict[str, tarfile.TarInfo]) -> list[str]:
    """Every entry with a setuid or setgid bit, as "path mode"."""
    return sorted(f"{name} {member.mode:o}" for name, member in files.items() if member.mode & 0o6000)


def shells(files: dict[str, tarfile.TarInfo]) -> list[str]:
    """Every program (an executable file, or a link) whose name is a shell's: data files such
    as /usr/share/menu/dash may stay."""
    return sorted(
        name
        for name, member in files.items()
        if PurePosixPath(name).name in SHELLS
        and (member.issym() or member.islnk() or member.mode & 0o111)
        and not member.isdir()
    )
