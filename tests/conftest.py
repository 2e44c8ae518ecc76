"""Shared fixtures: real parts (dockerd, containerd, resource API, archives) brought up once per
session, a software TPM once per test. A part that cannot be brought up skips the test, or
fails it under CI (support/ci.py). Helpers that are not fixtures live in tests/support.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator

import pytest

from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine.runtimes.importlock import LOCK_DIR_ENV

from .support.ci import unavailable
from .support.containerd import Containerd, ContainerdError, bookworm_build, sid_build
from .support.dockerd import Dockerd, remove_images, running
from .support.images import TEST_VERSION, ArchiveSet, build_archive_set
from .support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from .support.tpm import Swtpm
from .support.tpm import running as swtpm_running


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A SIGTERM (a CI time-out, a `kill`) becomes an interrupt, so pytest still runs the fixture
# teardowns that stop dockerd, the control plane and operators by PID.
signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session", autouse=True)
def import_lock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The node-wide import locks (importlock.py) of this session, inherited by every CLI
    and operator process a test starts: never the machine's /run/imageunlock."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOCK_DIR_ENV, str(tmp_path_factory.mktemp("import-locks")))
        yield


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    yield from running(tmp_path_factory.mktemp("dockerd"))


@pytest.fixture
def clean_docker(dockerd: Dockerd) -> Dockerd:
    """The private Engine with no images in it."""
    remove_images(dockerd)
    return dockerd


def _containerd(tmp_path_factory: pytest.TempPathFactory, which: str) -> Iterator[Containerd]:
    try:
        build = sid_build() if which == "sid" else bookworm_build()
        daemon = Containerd(tmp_path_factory.mktemp(f"containerd-{which}"), build).start()
    except (ContainerdError, OSError) as exc:
        unavailable(f"containerd ({which})", str(exc))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd from Debian sid (2.x: its CRI honours pinning), own root and socket."""
    yield from _containerd(tmp_path_factory, "sid")


@pytest.fixture(scope="session")
def containerd_bookworm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """Debian bookworm's containerd 1.6, the same way (its CRI ignores the pinned label)."""
    yield from _containerd(tmp_path_factory, "bookworm")


@pytest.fixture
def clean_containerd(containerd: Containerd) -> Containerd:
    """The private containerd with no image, lease or blob in it."""
    containerd.reset()
    return containerd


@pytest.fixture
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A new software TPM 2.0 (Debian's swtpm) of its own for each test: its own seeds and PCRs."""
    yield from swtpm_running(tmp_path_factory.mktemp("swtpm"))


@pytest.fixture
def other_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A second, unrelated software TPM: another device."""
    yield from swtpm_running(tmp_path_factory.mktemp("swtpm-other"))


@pytest.fixture(scope="session")
def archives(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> ArchiveSet:
    """The seeds' 7 services as small real images, saved and encrypted (openssl and ours)."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("archives"),
        list(DEFAULT_IMAGES),
        TEST_VERSION,
        fragment=secrets.token_bytes(32),
        payload_bytes=48 * 1024,
    )


@pytest.fixture
def resource_api(archives: ArchiveSet) -> Iterator[FakeResourceApi]:
    """The resource API (loopback HTTP) that serves the session's archives' key fragment."""
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        yield api


@pytest.fixture(scope="session")
def big_archives(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> ArchiveSet:
    """The same 7 services with 8 MiB of payload each (a ~56 MiB archive): large enough that
    polling sees a runtime's temp files grow and that an unlock can be stopped mid-load."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("big-archives"),
        list(DEFAULT_IMAGES),
        TEST_VERSION,
        fragment=secrets.token_bytes(32),
        payload_bytes=8 << 20,
    )


@pytest.fixture
def big_api(big_archives: ArchiveSet) -> Iterator[FakeResourceApi]:
    """The resource API serving ``big_archives``' key fragment."""
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, big_archives.fragment) as api:
        yield api
