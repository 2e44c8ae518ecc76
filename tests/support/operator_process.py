"""``imageunlock agent`` and ``imageunlock controller`` as child processes of the test, as the
e2e tests run them (one agent per simulated node, per test, so a test can SIGKILL it mid-load
and start it again), and the archives an agent may read.

The fixtures that start them with the test's cluster, runtime and resource API are
``start_operator`` (the controller and one agent) and ``start_agent`` in tests/e2e/conftest.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .net import free_port, healthz
from .processes import stop_group, with_own_disk
from .wait import wait_for


class OperatorProcess:
    """``imageunlock ROLE`` (agent or controller) with the environment ``env``; its log in ``workdir``."""

    def __init__(
        self, workdir: Path, env: dict[str, str], role: str = "agent", disk: tuple[Path, Path] | None = None
    ) -> None:
        self.workdir = workdir
        self.env = env
        self.role = role
        # (own, seen_at): the process sees directory ``own`` at ``seen_at`` (a private mount
        # namespace): a simulated node with a disk of its own at the shared archive path
        self.disk = disk
        self.log_path = workdir / f"{role}.log"
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.port = free_port()
        env = {**self.env, "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{self.port}/healthz", "TMPDIR": str(self.tmpdir)}
        script = Path(sys.executable).with_name("imageunlock")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*(with_own_disk(*self.disk) if self.disk else []), str(script), self.role],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_for(self.healthy, timeout, f"the {self.role}'s liveness endpoint")
        except BaseException:
            self.stop()  # not left running (and holding its ports) when it never came up
            raise
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.role} exited:\n{self.log()[-3000:]}")
        return healthz(self.port) is not None

    def probe(self) -> dict[str, Any]:
        """kopf's probe results from the liveness endpoint (``{"runtime": "reachable"}``)."""
        answer = healthz(self.port, timeout=5)
        assert answer is not None, f"the liveness endpoint did not answer 200:\n{self.log()[-3000:]}"
        return answer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, sig, timeout)


def place(archive: Path, root: Path, name: str = "images.enc") -> str:
    """Copy ``archive`` into the operator's archive root ``root``; the path a spec names."""
    target = root / name
    shutil.copyfile(archive, target)
    return str(target)
