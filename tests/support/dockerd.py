"""A private Docker Engine for tests: Debian's dockerd with its own roots and socket, and
what the tests ask it (the images it holds, the loads it did).

Started with ``--storage-driver=vfs --iptables=false --bridge=none`` so it needs no kernel
networking setup and touches nothing of the host's Docker. Stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, overload

from .processes import await_answer, log_tail, stop_group, unmount_below


class DockerdError(RuntimeError):
    pass


class Dockerd:
    """``env``: extra environment of dockerd, e.g. ``DOCKER_TMPDIR`` (the directory the Engine
    unpacks every ``docker load`` body into before importing; default ``<data-root>/tmp``)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        # unix socket paths are limited to 108 bytes: keep the socket in a short dir.
        self.root = Path(root)
        self.env = dict(env or {})
        self.sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"iu-dockerd-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.socket = self.sock_dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def temp_dir(self) -> Path:
        """Where the Engine unpacks a ``docker load`` body (``docker-import-*``) before importing it."""
        return Path(self.env["DOCKER_TMPDIR"]) if self.env.get("DOCKER_TMPDIR") else self.data_root / "tmp"

    def start(self, timeout: float = 60.0) -> Dockerd:
        binary = shutil.which("dockerd")
        if binary is None:
            raise DockerdError("dockerd not installed (make setup installs Debian's docker.io)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            f"--data-root={self.data_root}",
            f"--exec-root={self.sock_dir / 'exec'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--host={self.url}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env}
            )
        try:
            await_answer(
                self.proc,
                lambda: self.socket.exists() and self.docker("version", check=False).returncode == 0,
                timeout,
                "dockerd",
                self.log_path,
                DockerdError,
            )
        except DockerdError:
            self.stop()
            raise
        return self

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    @overload
    def docker(
        self, *args: str, check: bool = True, text: Literal[True], **kw: Any
    ) -> subprocess.CompletedProcess[str]: ...
    @overload
    def docker(
        self, *args: str, check: bool = True, text: Literal[False] = False, **kw: Any
    ) -> subprocess.CompletedProcess[bytes]: ...
    def docker(self, *args: str, check: bool = True, text: bool = False, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """The docker CLI against this daemon; its output as text with ``text=True``, else bytes."""
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, check=check, timeout=300, text=text, **kw
        )

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=timeout)
        unmount_below(self.sock_dir)  # dockerd leaves its netns bind mount (exec-root/netns/default)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def running(root: Path) -> Iterator[Dockerd]:
    """A fixture's body: a private Engine in ``root``, stopped at the end; when it cannot
    start, the test is skipped, or fails under CI=true (tests/support/ci.py)."""
    from .ci import unavailable

    engine = Dockerd(root)
    try:
        engine.start()
    except DockerdError as exc:
        unavailable("dockerd", str(exc))
    try:
        yield engine
    finally:
        engine.stop()


def loaded(engine: Dockerd) -> dict[str, str]:
    """``{repository:tag: image ID}`` of every tagged image in the Engine."""
    out = engine.docker("images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}", text=True)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


def remove_images(engine: Dockerd) -> None:
    """Remove every image from the Engine."""
    listed = engine.docker("images", "-q", "--no-trunc", text=True).stdout.split()
    if listed:
        engine.docker("rmi", "-f", *sorted(set(listed)), check=False)


def load_events(engine: Dockerd, since: float) -> int:
    """Images the Engine itself says it loaded since ``since`` (its event stream)."""
    import docker  # the SDK, only here: the rest of this module needs nothing but the CLI

    client = docker.DockerClient(base_url=engine.url)
    try:
        # fractional seconds ("seconds.nanoseconds"): the previous test's loads may be
        # less than a second older than this test's start
        events = client.events(
            since=f"{since:.9f}",
            until=f"{time.time() + 0.5:.9f}",
            decode=True,
            filters={"type": "image", "event": "load"},
        )
        return sum(1 for _ in events)
    finally:
        client.close()
