"""The arm64 operator image (the edge devices are Jetsons), built from the same Dockerfile and
run for real on this machine under QEMU user emulation.

What it takes, all installed by scripts/setup.sh: Debian's qemu-user-static, registered with
binfmt_misc with flag F (the kernel then runs every aarch64 binary through QEMU, inside
containers too); debootstrap for the bases. No registry is reachable, so both bases are made
locally (scripts/base-image.sh, cached tarballs): an arm64 Debian bookworm with python3 + venv
(its package scripts ran under emulation, once, several minutes) and the machine's own one.
Each is loaded with scripts/rootfs-image.py, whose image config records its architecture
(`docker import` would record the daemon's own), and the image is built the way
`make image-arm64` builds it: BASE_IMAGE the arm64 base, BUILD_IMAGE the native one, so the
build stage fetches arm64 wheels from PyPI and installs them natively; only the target stage's
one python3 call, the runtime stage's apt-get install of tpm2-tools and useradd, and its start
checks run emulated.

Speed: like test_image.py, the bases, the stages and the image are saved (docker save) under
${XDG_CACHE_HOME:-~/.cache}/imageunlock/image-test-arm64/ after a build and loaded by the next
session, which builds with --cache-from (every unchanged step a cache hit).
IMAGEUNLOCK_TEST_IMAGE_CACHE=0 builds from scratch.

Then the arm64 image runs: its config says arm64; inside, `uname -m` is aarch64 and it
reports its version; its native extensions (cryptography's AES, the C parsers) work, as an
arbitrary non-root user on a read-only root filesystem; `imageunlock unlock` loads and
verifies a real archive into the test's Docker Engine; `agent --help` and `controller --help`
work; and the node agent itself, run the way the DaemonSet runs it for a Node the test
registers, answers its liveness probe against the local control plane as the agents'
ServiceAccount, reaching the Docker Engine through the socket's group.

What this cannot prove: Jetson hardware (no GPU, no L4T kernel, no real Cortex-A78AE timing:
QEMU emulates the instruction set, not the board), and the kernel seen inside is this
machine's. On an arm64 machine the same test runs natively.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import imageunlock

from ..support.ci import unavailable
from ..support.dockerd import Dockerd
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
    setid_files,
    shared_dir,
    shells,
)
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from .conftest import MANIFESTS, REPO, manifest_objects, pod_of, rendered_objects

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2700)]

ARCH = "arm64"  # Debian / OCI name; the kernel's is aarch64
IMAGE = "imageunlock-test:arm64"
TARGET_STAGE = "imageunlock-test:arm64-target"
BUILD_STAGE = "imageunlock-test:arm64-build"
BASE = "imageunlock-test-base:bookworm-arm64"
CACHE_DIR = CACHE_ROOT / "image-test-arm64"
EMULATED = 300  # seconds for one `docker run` under QEMU
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
VERSION = imageunlock.__version__


def _native_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def _require_emulation() -> None:
    """arm64 binaries must run here: natively, or through QEMU registered with flag F."""
    if _native_arch() == ARCH:
        return
    try:
        handler = BINFMT.read_text()
    except OSError as exc:
        unavailable(
            "QEMU user emulation for arm64",
            f"no binfmt_misc handler {BINFMT} ({exc}); scripts/setup.sh installs qemu-user-static and registers it",
        )
    if not handler.startswith("enabled") or not re.search(r"^flags:.*F", handler, re.M):
        unavailable("QEMU user emulation for arm64", f"{BINFMT} is not enabled with flag F:\n{handler}")


def _load_base(engine: Dockerd, tarball: Path, arch: str, tag: str) -> None:
    """The root filesystem as an image whose config records ``arch`` (scripts/rootfs-image.py)."""
    with tempfile.TemporaryDirectory(prefix="iu-rootfs-") as tmp:
        archive = Path(tmp) / "base.tar"
        subprocess.run(
            [
                "python3",
                str(REPO / "scripts" / "rootfs-image.py"),
                str(tarball),
                "--arch",
                arch,
                "--tag",
                tag,
                "-o",
                str(archive),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        engine.docker("load", "-q", "-i", str(archive))


@pytest.fixture(scope="module")
def arm64_image(dockerd: Dockerd) -> str:
    _require_emulation()
    native = _native_arch()
    build_base = f"imageunlock-test-base:bookworm-{native}"
    tarballs = {ARCH: base_tarball(ARCH), native: base_tarball(native)}
    tags = (TARGET_STAGE, BUILD_STAGE, IMAGE)

    def build() -> None:
        for arch, tag in ((ARCH, BASE), (native, build_base)):
            if image_id(dockerd, tag) is None:
                _load_base(dockerd, tarballs[arch], arch, tag)
        for extra in (
            ("--target", "target", "-t", TARGET_STAGE),
            ("--target", "build", "-t", BUILD_STAGE),
            ("-t", IMAGE),
        ):
            docker_build(dockerd, build_args(BASE, build_base), tags, *extra)

    stamp = {arch: [path.name, path.stat().st_size] for arch, path in sorted(tarballs.items())}
    cached_build(dockerd, CACHE_DIR, stamp, (BASE, build_base, *tags), build)
    return IMAGE


# ------------------------------------------------------------------ the image


def test_arm64_image_config_records_arm64(dockerd, arm64_image):
    """A registry serves it to arm64 nodes only if its config says so; the runtime contract
    is the amd64 image's."""
    inspected = json.loads(dockerd.docker("image", "inspect", arm64_image, text=True).stdout)[0]
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "arm64")
    # v8 from the base; dockerd 20.10 drops the variant from images it restores from
    # --cache-from (a later build session), and arm64 without a variant means v8 (OCI).
    assert inspected.get("Variant") in ("v8", None), inspected.get("Variant")
    config = inspected["Config"]
    assert config["User"] == f"{DEFAULT_UID}:{DEFAULT_UID}"
    assert config["Entrypoint"] == ["imageunlock"]
    assert config["Cmd"] == ["agent"]
    assert "/tmp" in config["Volumes"]
    assert "8080/tcp" in config["ExposedPorts"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["IMAGEUNLOCK_DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env["TMPDIR"] == "/tmp"


# Run by the image's python (there is no shell in the image): the machine `uname` (a C
# program of the base) reports, the program's version, and Python's own view.
IDENTITY = """
import subprocess, sys
import imageunlock as i, platform as p, sysconfig as s
for argv in (["uname", "-m"], ["imageunlock", "--version"]):
    sys.stdout.flush()
    subprocess.run(argv, check=True)
print(i.__version__, p.machine(), s.get_platform())
"""


def test_arm64_image_runs_as_aarch64_and_reports_its_version(dockerd, arm64_image):
    res = run(dockerd, "--network", "none", "--entrypoint", "python", arm64_image, "-c", IDENTITY, timeout=EMULATED)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["aarch64", f"imageunlock {VERSION}", f"{VERSION} aarch64 linux-aarch64"], (
        res.stdout
    )


ARM64_CHECK = (
    """
import errno, os, subprocess, sys, tempfile
assert os.getuid() == 4242, os.getuid()
# The compiled dependencies are aarch64 wheels, and they work: cryptography (Rust), the
# C parsers of PyYAML and multidict, pydantic-core.
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key, iv = bytes(range(32)), bytes(16)
enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
ct = enc.update(b"imageunlock-arm64" + bytes(15)) + enc.finalize()
dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
assert dec.update(ct) + dec.finalize() == b"imageunlock-arm64" + bytes(15)
import yaml, multidict, pydantic_core
assert yaml.__with_libyaml__
for module in (yaml._yaml, multidict._multidict, pydantic_core._pydantic_core):
    assert "aarch64" in module.__file__, module.__file__
import imageunlock.cli, imageunlock.agent.handlers, imageunlock.controller.handlers  # what the roles import
import kopf, kubernetes, docker
"""
    + WRITE_PROBE
    + """
assert not leftovers, leftovers
print("ok")
"""
)


def test_arm64_native_code_works_read_only_as_any_non_root_user(dockerd, arm64_image):
    """--read-only --tmpfs /tmp as an arbitrary UID with no capabilities, as for amd64."""
    res = run(
        dockerd,
        *ANY_USER_LOCKED_DOWN,
        "--entrypoint",
        "python",
        arm64_image,
        "-c",
        ARM64_CHECK,
        timeout=EMULATED,
    )
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


def test_arm64_image_has_no_shell_and_no_setuid_or_setgid_file(dockerd, arm64_image):
    """Issue 18, as for amd64: the same Dockerfile's hardening holds for the arm64 image."""
    files = image_files(dockerd, arm64_image)
    assert "usr/local/bin/ctr" in files and "opt/imageunlock/bin/imageunlock" in files
    assert setid_files(files) == []
    assert shells(files) == []


def test_one_image_name_serves_both_architectures():
    """The chart and the manifests name the image without an architecture: the manifest list
    that `make push-images` pushes under that name serves amd64 and arm64 nodes alike, agents
    and controller."""
    workloads = [o for o in manifest_objects() + rendered_objects() if o["kind"] in ("DaemonSet", "Deployment")]
    assert sorted(o["kind"] for o in workloads) == ["DaemonSet", "DaemonSet", "Deployment", "Deployment"]
    make = subprocess.run(["make", "-s", "-C", str(REPO), "print-image"], capture_output=True, text=True, timeout=60)
    assert make.returncode == 0, make.stderr
    images = {c["image"] for o in workloads for c in pod_of(o)["containers"]}
    assert images == {make.stdout.strip()} == {f"azaion/imageunlock:{VERSION}"}
    # ... and nothing pins a pod to one architecture.
    assert "kubernetes.io/arch" not in json.dumps(workloads)
    for name in ("daemonset.yaml", "controller.yaml"):
        assert "kubernetes.io/arch" not in (MANIFESTS / name).read_text(), name


# ------------------------------------------------------------------ unlocking, running


@pytest.fixture(scope="module")
def arm64_api(archives) -> Iterator[FakeResourceApi]:
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        yield api


def test_arm64_cli_unlocks_an_archive_into_the_engine(dockerd, arm64_image, archives, arm64_api):
    """The whole data path on arm64, as the one-shot `docker run IMAGE unlock ...`: log in,
    fetch the key fragment, decrypt AES-256-CBC with cryptography's aarch64 code, stream the
    tar into the Engine through the socket's group, verify every image (exit 0)."""
    dockerd.docker("rmi", "-f", *archives.refs, check=False)  # a real load, not the fast path
    with shared_dir() as archive_root:
        archive = archive_root / "images.enc"
        shutil.copyfile(archives.own_archive, archive)
        archive.chmod(0o644)
        res = run(
            dockerd,
            *hardened(dockerd),
            "-v",
            f"{archive_root}:{archive_root}:ro",
            "-e",
            f"IMAGEUNLOCK_EMAIL={TEST_EMAIL}",
            "-e",
            f"IMAGEUNLOCK_PASSWORD={TEST_PASSWORD}",
            arm64_image,
            "unlock",
            "--archive",
            str(archive),
            "--version",
            archives.version,
            "--api-url",
            arm64_api.url,
            timeout=600,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    for ref in archives.refs:
        assert dockerd.docker("image", "inspect", ref, check=False).returncode == 0, ref
    assert TEST_PASSWORD not in res.stdout + res.stderr


@pytest.mark.parametrize("role", ["agent", "controller"])
def test_arm64_role_help(dockerd, arm64_image, role):
    res = run(dockerd, "--network", "none", arm64_image, role, "--help", timeout=EMULATED)
    assert res.returncode == 0, res.stderr
    assert f"imageunlock {role}" in res.stdout


def test_arm64_image_ships_an_arm64_ctr(dockerd, arm64_image):
    """The containerd runtime's `ctr` is the arm64 build (runs under emulation as aarch64)."""
    res = run(dockerd, "--network", "none", "--entrypoint", "ctr", arm64_image, "--version", timeout=EMULATED)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ctr ")


@pytest.mark.tpm
def test_arm64_image_seals_and_unseals_on_a_real_tpm(dockerd, arm64_image, swtpm):
    """Issue 23: the arm64 image's tpm2-tools (Debian's arm64 build, under emulation) seal and
    unseal through the TCTI modules, against a real TPM 2.0 on the host's loopback."""
    files = image_files(dockerd, arm64_image)
    assert "usr/bin/tpm2_unseal" in files and "usr/bin/tpm2_create" in files
    res = run(
        dockerd, "--network", "host", *ANY_USER_LOCKED_DOWN[2:], "--entrypoint", "python", arm64_image,
        "-c", TPM_ROUND_TRIP, swtpm.tcti, timeout=EMULATED,
    )  # fmt: skip
    assert (res.returncode, res.stdout.strip()) == (0, "ok"), res.stderr


ARM64_NODE = "iu-arm64-node"


@pytest.fixture(scope="module")
def arm64_agent(dockerd: Dockerd, arm64_image: str, plane) -> Iterator[Operator]:
    """The arm64 agent container, run as the DaemonSet runs it (support.packaged_image: the
    image's default command), for a Node the test registers with the Docker Engine as its
    runtime. The resource API is only named (nothing is unlocked)."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": ARM64_NODE, "labels": {"kubernetes.io/arch": ARCH}},
        "status": {"nodeInfo": {"containerRuntimeVersion": "docker://20.10.24", "architecture": ARCH}},
    }
    plane.kubectl("apply", "-f", "-", stdin=json.dumps(body))
    env = {"NODE_NAME": ARM64_NODE, "RESOURCE_API_URL": f"http://127.0.0.1:{free_port()}"}
    try:
        with operator_container(dockerd, arm64_image, plane, env) as op:
            yield op
    finally:
        plane.kubectl("delete", "node", ARM64_NODE, "--ignore-not-found", check=False)


def test_arm64_agent_answers_liveness_against_the_control_plane(dockerd, arm64_agent):
    body = arm64_agent.healthz(timeout=240, interval=1)  # kopf's start under emulation: tens of seconds
    # kopf's probe results: the runtime the Node reports answers, through the socket's group.
    assert body.get("runtime") == "reachable", body
    inside = [
        dockerd.docker("exec", arm64_agent.container, *argv, text=True).stdout.strip()
        for argv in (("id", "-u"), ("uname", "-m"))
    ]
    assert inside == [str(DEFAULT_UID), "aarch64"]
    logs = arm64_agent.logs()
    assert "Traceback" not in logs and f"agent on node {ARM64_NODE}" in logs, logs
