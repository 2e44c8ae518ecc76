"""The node-wide import lock: one import per runtime socket, across threads and processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from imageunlock import importlock
from imageunlock.errors import ConfigurationError, RuntimeBusyError


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
                from imageunlock import importlock
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


def test_a_symlinked_lock_file_is_refused(sock, tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    target = tmp_path / "victim"
    target.write_text("keep")
    (locks / importlock.lock_name("containerd", str(sock))).symlink_to(target)
    with (
        pytest.raises(ConfigurationError, match="symlink"),
        importlock.exclusive_import("containerd", str(sock), 0, str(locks)),
    ):
        pass
    assert target.read_text() == "keep"


def test_an_unusable_lock_directory_says_which_setting_to_change(sock, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with (
        pytest.raises(ConfigurationError, match=importlock.LOCK_DIR_ENV),
        importlock.exclusive_import("containerd", str(sock), 0, str(blocker / "locks")),
    ):
        pass
