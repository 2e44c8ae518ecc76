"""Adapter: one import at a time into a container runtime on this node.

Two imports into one containerd at once can harm each other: a failed import removes the
image records it created, and while another import runs the two cannot be told apart by
looking at the records alone. So every import — the agent's workers and a command-line run
alike — first takes an exclusive ``flock`` on a lock file named after the runtime's socket
*identity* (device and inode: the same socket reached by two paths, e.g. the host's and a
container's bind mount, is one lock). The lock files live in ``IMAGEUNLOCK_LOCK_DIR``
(default ``/run/imageunlock``: a tmpfs, so a reboot leaves no stale file; a lock held by a
process dies with it, even after SIGKILL). The DaemonSet mounts that host directory, so an
agent and a CLI run on the host see one lock; the agent's user must be able to create files
there (``systemd-tmpfiles``: ``d /run/imageunlock 0755 10001 10001 -``) or the lock files
must exist. Where the directory cannot be used, imports still take turns within this process
(a warning says the lock is not shared with other processes): never a stall.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from imageunlock.engine.archive import flock_until
from imageunlock.errors import ConfigurationError, RuntimeBusyError

log = logging.getLogger(__name__)

DEFAULT_LOCK_DIR = "/run/imageunlock"
LOCK_DIR_ENV = "IMAGEUNLOCK_LOCK_DIR"


def lock_dir() -> str:
    return os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR


def lock_name(runtime: str, endpoint: str) -> str:
    """The lock file's name for a runtime reached at ``endpoint`` (a socket path or a URL):
    a Unix socket by its identity, anything else by its text."""
    path = endpoint.removeprefix("unix://")
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        key = f"address:{endpoint}"
    else:
        key = f"inode:{info.st_dev}:{info.st_ino}" if stat.S_ISSOCK(info.st_mode) else f"address:{endpoint}"
    return f"{runtime}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


def _open(directory: str, name: str) -> int:
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(
            f"the import lock directory {directory!r} cannot be used ({exc.strerror}): "
            f"set {LOCK_DIR_ENV} to a directory every importer on this node can reach"
        ) from None
    try:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(name, flags | os.O_RDWR | os.O_CREAT, 0o644, dir_fd=dir_fd)
        except PermissionError:  # another user's lock file: reading is enough for flock
            return os.open(name, flags | os.O_RDONLY, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(f"the import lock {directory}/{name} is a symlink: refused") from None
        raise ConfigurationError(
            f"the import lock {directory}/{name} cannot be opened ({exc.strerror}): set {LOCK_DIR_ENV}"
        ) from None
    finally:
        os.close(dir_fd)


_local: dict[str, threading.Lock] = {}  # lock name -> this process's lock (the fallback)
_local_guard = threading.Lock()
_warned: set[str] = set()


@contextmanager
def exclusive_import(runtime: str, endpoint: str, timeout: float, directory: str | None = None) -> Iterator[None]:
    """Hold the node-wide import lock of this runtime; wait at most ``timeout`` seconds for
    it (then a transient RuntimeBusyError: the caller retries later)."""
    where = directory or lock_dir()
    name = lock_name(runtime, endpoint)
    with _local_guard:
        local = _local.setdefault(name, threading.Lock())
    deadline = time.monotonic() + timeout
    if not local.acquire(timeout=max(timeout, 0.0)):  # this process's own importers first
        raise _busy(runtime, endpoint, timeout)
    try:
        try:
            fd = _open(where, name)
        except ConfigurationError as exc:
            if where not in _warned:
                _warned.add(where)
                log.warning("%s; imports take turns within this process only", exc.message)
            yield
            return
        try:
            if not flock_until(
                fd, deadline, lambda: log.info("another import into %s at %s is running: waiting", runtime, endpoint)
            ):
                raise _busy(runtime, endpoint, timeout)
            yield
        finally:
            os.close(fd)  # releases the lock
    finally:
        local.release()


def _busy(runtime: str, endpoint: str, timeout: float) -> RuntimeBusyError:
    return RuntimeBusyError(
        f"another import into {runtime} at {endpoint} is still running after {timeout:.0f}s; retrying later"
    )
