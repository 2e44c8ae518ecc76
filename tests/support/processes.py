"""Daemons the tests start (dockerd, containerd, the operator): each in its own session, so
that it and its children are stopped together by process group, never by name; and the
mounts a daemon leaves behind, undone before its directories go."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a daemon's log ("" when there is none yet)."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def await_answer(
    proc: subprocess.Popen[bytes],
    answers: Callable[[], bool],
    timeout: float,
    name: str,
    log_path: Path,
    error: type[Exception],
) -> None:
    """Poll ``answers`` until it is true; raise ``error`` (with the log's tail) when ``proc``
    exits first or after ``timeout`` seconds (then the caller stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{name} exited with {proc.returncode}:\n{log_tail(log_path)}")
        if answers():
            return
        time.sleep(0.1)
    raise error(f"{name} did not answer within {timeout}s:\n{log_tail(log_path)}")


def stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session=True``),
    and SIGKILL it when it has not exited after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def unmount_below(directory: Path) -> None:
    """Unmount whatever a daemon left mounted below ``directory`` (dockerd's netns bind mount,
    containerd's overlay snapshots and tmpmounts), deepest first: a mount point cannot go
    while something is mounted below it, nor a mounted directory be removed."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
        if subprocess.run(["umount", point], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def with_own_disk(own: Path, seen_at: Path) -> list[str]:
    """A command prefix: the command then sees directory ``own`` at ``seen_at`` (a bind mount
    in a private mount namespace; needs root) — a simulated node's disk of its own at a path
    every node shares. ``exec`` keeps the PID, so stopping by PID still stops the command."""
    mount = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "own-disk", str(own), str(seen_at)]
