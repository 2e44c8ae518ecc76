"""The installed ``imageunlock`` console script, run as a user runs it, and what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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
