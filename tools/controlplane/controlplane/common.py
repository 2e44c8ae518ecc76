"""What the build and the running plane share: where the sources and the cache are, the
error type, logging, bounded subprocess runs and the build lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

# The project directory tools/controlplane/: the Go sources and the package list are read
# from there, not from the installed package (install it editable: scripts/setup.sh does).
SOURCE_DIR = Path(__file__).resolve().parent.parent
GO_SOURCES = SOURCE_DIR / "main"
PACKAGES_FILE = SOURCE_DIR / "packages.txt"


class ControlPlaneError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imageunlock" / "controlplane"


def run(cmd, *, timeout, cwd=None, env=None, quiet=True) -> subprocess.CompletedProcess:
    """Run a command with a time bound; raise with its output on failure."""
    try:
        res = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            timeout=timeout,
            text=True,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
        )
    except subprocess.TimeoutExpired as e:
        raise ControlPlaneError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}") from e
    if res.returncode != 0:
        raise ControlPlaneError(
            f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n{(res.stdout or '')[-4000:]}"
        )
    return res


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 1800):
    """Exclusive lock so concurrent builds (parallel CI jobs, xdist) do not clash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"could not take {path} within {timeout}s") from None
                if not announced:
                    log(f"waiting for another build holding {path}")
                    announced = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
