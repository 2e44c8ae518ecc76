"""Adapter: opening the encrypted archive on the node's file system, safely.

The operator reads whatever path an ImageUnlock names, so the path is confined to an
allow-list of roots (``IMAGEUNLOCK_ARCHIVE_ROOT``): it is resolved (symlinks included) and
must stay under a root, must be a regular file, and is opened without following a final
symlink and without blocking on a FIFO — all before a single byte is read.

The open file is also the per-archive lock: an exclusive ``flock`` on it, so the same
archive is never unlocked twice at once, by two resources or two processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from .errors import ArchiveNotFoundError, BusyError, ConfigurationError, DigestMismatchError

HASH_CHUNK = 1 << 20


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_archive_path(path: str, roots: Sequence[str]) -> str:
    """The real path of ``path`` if it lies under one of ``roots``; else a clear error."""
    if not os.path.isabs(path):
        raise ConfigurationError(f"archive path must be absolute, got {path!r}")
    if "\0" in path:
        raise ConfigurationError("archive path contains a NUL byte")
    real = os.path.realpath(path)
    if roots:
        real_roots = [os.path.realpath(r) for r in roots]
        if not any(_under(real, r) for r in real_roots):
            raise ConfigurationError(
                f"archive path {path!r} resolves to {real!r}, outside the allowed "
                f"archive roots {', '.join(real_roots)} (operator setting IMAGEUNLOCK_ARCHIVE_ROOT)"
            )
    return real


@contextmanager
def open_archive(
    path: str, roots: Sequence[str], *, lock_timeout: float = 0.0
) -> Iterator[tuple[BinaryIO, int]]:
    """Open, check and lock the archive; yield ``(file, size)``."""
    real = resolve_archive_path(path, roots)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArchiveNotFoundError(f"archive {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigurationError(f"archive path {path!r} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigurationError(f"archive {path!r} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigurationError(f"archive path {path!r} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"archive path {path!r} is not a regular file")
        os.set_blocking(fd, True)
        _lock(fd, path, lock_timeout)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as handle:
            yield handle, info.st_size  # type: ignore[misc]
    finally:
        os.close(fd)  # also releases the flock


def _lock(fd: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BusyError(f"archive {path!r} is being unlocked by another task") from None
            time.sleep(0.2)


def check_sha256(
    handle: BinaryIO, expected: str, on_progress: Callable[[int], None] | None = None
) -> None:
    """Hash the whole archive and compare with ``spec.archiveSha256``; rewinds afterwards."""
    digest = hashlib.sha256()
    done = 0
    handle.seek(0)
    while block := handle.read(HASH_CHUNK):
        digest.update(block)
        done += len(block)
        if on_progress is not None:
            on_progress(done)
    handle.seek(0)
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise DigestMismatchError(
            f"archive SHA-256 is {actual}, expected {expected.lower()} (spec.archiveSha256); "
            "nothing was loaded — replace the archive or correct the digest"
        )

