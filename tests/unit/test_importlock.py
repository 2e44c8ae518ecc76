"""The node-wide import lock: one import per runtime socket, across threads and processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from imageunlock.engine.runtimes import importlock
from imageunlock.errors import RuntimeBusyError


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "containerd.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))
        yield path


def test_one_socket_reached_by_two_paths_is_one_lock(sock, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.link(sock, other / "same.sock")  # a second name for the same socket (a bind mount's effect)
    assert importlock.lock_name("containerd", str(sock)) == importlock.lock_name(
        "containerd", f"unix://{other / 'same.sock'}"
    )
    assert importlock.lock_name("containerd", str(sock)) != importlock.lock_name("docker", str(sock))
    assert importlock.lock_name("docker", "tcp://127.0.0.1:2375") != importlock.lock_name("docker", str(sock))


def test_a_second_importer_waits_then_gives_up_with_a_transient_error(sock, tmp_path):
    with importlock.exclusive_import("containerd", str(sock), 1, str(tmp_path / "locks")):
        started = time.monotonic()
        with (
            pytest.raises(RuntimeBusyError, match="another import into containerd") as caught,
            importlock.exclusive_import("containerd", str(sock), 0.5, str(tmp_path / "locks")),
        ):
            pass
        assert time.monotonic() - started >= 0.5
        assert caught.value.transient
    with importlock.exclusive_import("containerd", str(sock), 0, str(tmp_path / "locks")):
        pass  # released: free again at once


def test_another_process_holding_the_lock_is_honoured(sock, tmp_path):
    locks = tmp_path / "locks"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from imageunlock.engine.runtimes import importlock
                with importlock.exclusive_import("containerd", {str(sock)!r}, 5, {str(locks)!r}):
                    print("held", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeBusyError), importlock.exclusive_import("containerd", str(sock), 0.3, str(locks)):
            pass
    finally:
        holder.stdin.close()
        holder.wait(10)
    with importlock.exclusive_import("containerd", str(sock), 5, str(locks)):
        pass  # the holder exited: its lock went with it


def test_a_symlinked_lock_file_is_not_followed(sock, tmp_path, caplog):
    locks = tmp_path / "locks"
    locks.mkdir()
    target = tmp_path / "victim"
    target.write_text("keep")
    (locks / importlock.lock_name("containerd", str(sock))).symlink_to(target)
    with importlock.exclusive_import("containerd", str(sock), 0, str(locks)):
        pass
    assert target.read_text() == "keep"
    assert "symlink" in caplog.text


def test_an_unusable_lock_directory_never_stalls_imports_and_says_what_to_change(sock, tmp_path, caplog):
    """Review of issue 18 (medium): in the shipped DaemonSet (read-only root file system, a
    non-root user) /run/imageunlock could not be created, and every import stalled with
    InvalidConfiguration. Now imports go on, taking turns within the process, with a warning."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    unusable = str(blocker / "locks")
    order: list[str] = []

    def importer(name: str) -> None:
        with importlock.exclusive_import("containerd", str(sock), 5, unusable):
            order.append(f"{name}-in")
            time.sleep(0.2)
            order.append(f"{name}-out")

    threads = [threading.Thread(target=importer, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(order) == ["a-in", "a-out", "b-in", "b-out"]
    assert order[0][0] == order[1][0], order  # one importer at a time, in and out
    assert importlock.LOCK_DIR_ENV in caplog.text
