"""Shared fixtures: real parts (dockerd, resource API, archives) brought up once per session.

A test that needs a real part that cannot be brought up is skipped on a developer machine
and FAILS under CI (CI=true): CI must never go green by skipping the real thing.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageunlock.models import DEFAULT_IMAGES

from .support.containerd import Containerd, ContainerdError, bookworm_build, sid_build
from .support.dockerd import Dockerd, DockerdError
from .support.images import ArchiveSet, build_archive_set
from .support.resource_api import FakeResourceApi

IN_CI = os.environ.get("CI", "").lower() == "true"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A SIGTERM (a CI time-out, a `kill`) becomes an interrupt, so pytest still runs the fixture
# teardowns that stop dockerd, the control plane and operators by PID.
signal.signal(signal.SIGTERM, _interrupt)
TEST_EMAIL = "edge@example.test"
TEST_PASSWORD = "pw-" + secrets.token_hex(8)
TEST_VERSION = "1.4.2"


def unavailable(part: str, why: str) -> None:
    message = f"{part} could not be brought up: {why}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    engine = Dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        engine.start()
    except DockerdError as exc:
        unavailable("dockerd", str(exc))
    try:
        yield engine
    finally:
        engine.stop()


def remove_images(engine: Dockerd) -> None:
    listed = engine.docker("images", "-q", "--no-trunc", text=True).stdout.split()
    if listed:
        engine.docker("rmi", "-f", *sorted(set(listed)), check=False)


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
    api = FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment).start()
    try:
        yield api
    finally:
        api.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``imageunlock`` console script as a user would. Unless ``env`` names
    an ``XDG_STATE_HOME``, each run has a fresh, empty one (no verified IDs from other runs)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEUNLOCK_")}
    full_env.update(env or {})
    script = Path(sys.executable).with_name("imageunlock")
    with tempfile.TemporaryDirectory(prefix="iu-state-") as state:
        if "XDG_STATE_HOME" not in (env or {}):
            full_env["XDG_STATE_HOME"] = state
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout
        )
