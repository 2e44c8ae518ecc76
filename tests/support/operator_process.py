"""``imageunlock operator`` as a child process of the test, as the e2e tests run it (one per
test, so a test can SIGKILL it mid-load and start it again), and the archives it may read.

The fixture that starts it with the test's cluster, Engine and resource API is
``start_operator`` in tests/e2e/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from .net import free_port
from .wait import wait_for


class OperatorProcess:
    """``imageunlock operator`` with the environment ``env``; its log in ``workdir``."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / "operator.log"
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.port = free_port()
        env = {**self.env, "IMAGEUNLOCK_LIVENESS": f"http://127.0.0.1:{self.port}/healthz", "TMPDIR": str(self.tmpdir)}
        script = Path(sys.executable).with_name("imageunlock")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(script), "operator"], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        wait_for(self.healthy, timeout, "the operator's liveness endpoint")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def probe(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
            return response.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def place(archive: Path, root: Path, name: str = "images.enc") -> str:
    """Copy ``archive`` into the operator's archive root ``root``; the path a spec names."""
    target = root / name
    shutil.copyfile(archive, target)
    return str(target)
