"""``imageunlock operator`` as a child process of the test, as the e2e tests run it (one per
test, so a test can SIGKILL it mid-load and start it again), and the archives it may read.

The fixture that starts it with the test's cluster, Engine and resource API is
``start_operator`` in tests/e2e/conftest.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .net import free_port, healthz
from .processes import stop_group
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
            self.proc = subprocess.Popen(
                [str(script), "operator"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_for(self.healthy, timeout, "the operator's liveness endpoint")
        except BaseException:
            self.stop()  # not left running (and holding its ports) when it never came up
            raise
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log()[-3000:]}")
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
