"""The installed ``imageunlock`` console script, run as a user runs it, and what it prints."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .resource_api import TEST_EMAIL, TEST_PASSWORD

# The credentials of the tests' resource API, as a user passes them to ``imageunlock unlock``.
CREDENTIALS_ENV = {"IMAGEUNLOCK_EMAIL": TEST_EMAIL, "IMAGEUNLOCK_PASSWORD": TEST_PASSWORD}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``imageunlock`` console script as a user would. Unless ``env`` names
    an ``XDG_STATE_HOME``, each run has a fresh, empty one (no verified IDs from other runs)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEUNLOCK_")}
    full_env.update(env or {})
    script = Path(sys.executable).with_name("imageunlock")
    with tempfile.TemporaryDirectory(prefix="iu-state-") as state:
        if "XDG_STATE_HOME" not in (env or {}):
            full_env["XDG_STATE_HOME"] = state
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The ``imageunlock: error:`` lines (a failure is meant to print exactly one)."""
    return [line for line in stderr.splitlines() if line.startswith("imageunlock: error:")]


def start_cli(*args: str, env: dict[str, str], state_home: Path) -> subprocess.Popen[bytes]:
    """Start the console script in its own process group (so a test can kill it alone, or it
    with the ``ctr`` it runs, as a container's kill would), its stderr piped for the progress
    lines (:func:`read_until`)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEUNLOCK_")}
    full_env.update({"XDG_STATE_HOME": str(state_home), **env})
    script = Path(sys.executable).with_name("imageunlock")
    return subprocess.Popen(
        [str(script), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env, start_new_session=True
    )


def read_until(proc: subprocess.Popen[bytes], wanted: Callable[[str], bool], timeout: float) -> list[str]:
    """stderr lines of ``proc`` (unbuffered reads of the pipe) up to and including the first
    one ``wanted`` accepts; AssertionError, with what it printed, when it ends or ``timeout``
    passes first."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:  # bounded by the deadline
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            seen.append(line.decode(errors="replace"))
            if wanted(seen[-1]):
                return seen
    raise AssertionError(f"no such line within {timeout}s; it printed: {seen}")
