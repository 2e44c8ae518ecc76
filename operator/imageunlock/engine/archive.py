"""Adapter: opening the encrypted archive on the node's file system, safely.

The operator reads whatever path an ImageUnlock names, so the path is confined to an
allow-list of roots (``IMAGEUNLOCK_ARCHIVE_ROOT``). The root is picked lexically (the
configured root that is a whole-segment prefix of the normalised path; ``..`` is refused)
and the file is then opened *beneath* it: with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)`` where the kernel has it, else one component at a time with
``O_NOFOLLOW`` relative to the previous directory's descriptor. Checking and opening are
one step, so nothing can be swapped in between. The root itself is operator configuration
and is opened by its real path.

Consequence: **symbolic links below the archive root are not followed**, not even ones
that stay inside it. The provisioning process must write the archive file itself.

The walk never crosses a mount point below the root (``RESOLVE_NO_XDEV``; the fallback
compares devices), and the file must be a regular file with a single link (a hard link
would give a file from elsewhere on the same file system a name under the root) opened
without blocking on a FIFO — all before a single byte is read. The open file is also the
per-archive lock (:func:`lock_archive`): an exclusive ``flock`` on it, so the same archive
is never unlocked twice at once, by two resources or two processes. Opening and hashing
take no lock, so checking ``archiveSha256`` never holds up an unlock; a file's digest is
remembered by its identity (device, inode, size, mtime, ctime), so a repeated check of an
unchanged file reads nothing. With no roots at all (the command-line tool, run by the
archive's owner) the path is opened as given.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import platform
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from imageunlock.errors import ArchiveNotFoundError, BusyError, ConfigurationError, DigestMismatchError

HASH_CHUNK = 1 << 20

# Use openat2(2) when the kernel has it; tests set this to False to exercise the fallback.
USE_OPENAT2 = True

_SYS_OPENAT2 = 437  # the same on x86_64 and aarch64
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _pick_root(path: str, roots: Sequence[str]) -> tuple[str, list[str]]:
    """``(root, components below it)``: the longest configured root the path lies under."""
    shown = ", ".join(roots)
    parts = _split(path)
    if ".." in parts:
        raise ConfigurationError(
            f"archive path {path!r} is refused: '..' components could lead outside the allowed "
            f"archive roots {shown} (operator setting IMAGEUNLOCK_ARCHIVE_ROOT)"
        )
    candidates = [r for r in roots if parts[: len(_split(r))] == _split(r)]
    if not candidates:
        raise ConfigurationError(
            f"archive path {path!r} is outside the allowed archive roots {shown} "
            "(operator setting IMAGEUNLOCK_ARCHIVE_ROOT)"
        )
    root = max(candidates, key=lambda r: len(_split(r)))
    return root, parts[len(_split(root)) :]


def _openat2(dir_fd: int, parts: list[str]) -> int | None:
    """The file opened beneath ``dir_fd`` without following any symlink; None if no openat2."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = _OpenHow(_FILE_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_XDEV)
    name = os.fsencode("/".join(parts) or ".")
    fd = libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(name),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter that refuses it
        return None
    raise OSError(err, os.strerror(err))


def _walk(dir_fd: int, parts: list[str]) -> int:
    """The same as ``_openat2``, portably: one ``O_NOFOLLOW`` open per component, each on
    the root's device."""
    device = os.fstat(dir_fd).st_dev
    fd = dir_fd
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:  # what O_DIRECTORY|O_NOFOLLOW says for a symlink
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = next_fd
            _same_device(fd, device)
        found = os.open(parts[-1] if parts else ".", _FILE_FLAGS, dir_fd=fd)
        try:
            _same_device(found, device)
        except OSError:
            os.close(found)
            raise
        return found
    finally:
        if fd != dir_fd:
            os.close(fd)


def _same_device(fd: int, device: int) -> None:
    if os.fstat(fd).st_dev != device:  # a mount point below the root
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


def _open_beneath(root: str, parts: list[str]) -> int:
    root_fd = os.open(os.path.realpath(root), _DIR_FLAGS)
    try:
        fd = _openat2(root_fd, parts) if USE_OPENAT2 else None
        return fd if fd is not None else _walk(root_fd, parts)
    finally:
        os.close(root_fd)


def check_path(path: str, roots: Sequence[str]) -> tuple[str, list[str]] | None:
    """Refuse a path no open would accept, reading nothing: ``(root, components below it)``,
    or None with no roots (the path is taken as given)."""
    if not os.path.isabs(path):
        raise ConfigurationError(f"archive path must be absolute, got {path!r}")
    if "\0" in path:
        raise ConfigurationError("archive path contains a NUL byte")
    return _pick_root(path, roots) if roots else None


def _open(path: str, roots: Sequence[str]) -> int:
    """The archive's descriptor, opened beneath its root; errors name only ``path`` and roots."""
    picked = check_path(path, roots)
    if picked is None:
        return os.open(path, _FILE_FLAGS & ~os.O_NOFOLLOW)
    root, parts = picked
    try:
        return _open_beneath(root, parts)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ConfigurationError(
                f"archive path {path!r} is refused: it crosses a mount point below the archive root "
                f"{root} (operator setting IMAGEUNLOCK_ARCHIVE_ROOT); put the archive on the root's "
                "own file system"
            ) from None
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"archive path {path!r} is refused: symlinks below the archive root are not "
                f"followed, as they could lead outside the allowed archive roots {', '.join(roots)} "
                "(operator setting IMAGEUNLOCK_ARCHIVE_ROOT); have the provisioning process write "
                "the file itself"
            ) from None
        raise


@contextmanager
def open_archive(path: str, roots: Sequence[str]) -> Iterator[tuple[BinaryIO, int]]:
    """Open and check the archive (no lock: :func:`lock_archive`); yield ``(file, size)``."""
    try:
        fd = _open(path, roots)
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
        if roots and info.st_nlink > 1:
            raise ConfigurationError(
                f"archive {path!r} is refused: it has {info.st_nlink} hard links, and a hard link can "
                "give a file from elsewhere a name below the archive root; write the archive file "
                "itself (no hard links)"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as handle:
            yield handle, info.st_size
    finally:
        os.close(fd)  # also releases a flock taken by lock_archive


@contextmanager
def lock_archive(handle: BinaryIO, path: str, timeout: float = 0.0) -> Iterator[None]:
    """Hold the per-archive lock (an exclusive ``flock`` on the open file) for an unlock."""
    fd = handle.fileno()
    _lock(fd, path, timeout)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def identity(handle: BinaryIO) -> tuple[object, ...]:
    """The open file's identity, in :func:`signature`'s form."""
    info = os.fstat(handle.fileno())
    return (*_identity(info), info.st_nlink)


def signature(path: str, roots: Sequence[str]) -> tuple[object, ...]:
    """What identifies the archive file's content without reading it (device, inode, size,
    mtime, ctime, links), looked up beneath the roots like an open; a new file, a rewrite or
    a removal changes it. Any failure is part of the signature, never an error."""
    try:
        fd = _open(path, roots)
    except (OSError, ConfigurationError) as exc:
        return ("unavailable", getattr(exc, "errno", None) or type(exc).__name__)
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return (*_identity(info), info.st_nlink)


def flock_until(fd: int, deadline: float, on_wait: Callable[[], None] | None = None) -> bool:
    """Take an exclusive ``flock`` on ``fd``, polling until ``deadline`` (monotonic); False
    when it was not to be had by then. ``on_wait`` is called once, when it has to wait."""
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _lock(fd: int, path: str, timeout: float) -> None:
    if not flock_until(fd, time.monotonic() + timeout):
        raise BusyError(f"archive {path!r} is being unlocked by another task")


# A file's SHA-256 by its identity: a repeated check of an unchanged file reads nothing.
# A cached digest only decides whether to go on; the decrypting pass hashes what it reads
# again (HashingReader), so a file changed behind an unchanged identity still loads nothing.
_DIGESTS: OrderedDict[tuple[int, ...], str] = OrderedDict()
_DIGESTS_KEPT = 64
_DIGESTS_LOCK = threading.Lock()


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def check_sha256(handle: BinaryIO, expected: str, on_progress: Callable[[int], None] | None = None) -> None:
    """Compare the whole archive's SHA-256 with ``spec.archiveSha256``; rewinds afterwards.
    Takes no lock (other readers go on), and hashes an unchanged file only once."""
    before = _identity(os.fstat(handle.fileno()))
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(before)
    if known is None:
        digest = hashlib.sha256()
        done = 0
        handle.seek(0)
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
            done += len(block)
            if on_progress is not None:
                on_progress(done)
        handle.seek(0)
        known = digest.hexdigest()
        if _identity(os.fstat(handle.fileno())) == before:  # not written to while we read
            with _DIGESTS_LOCK:
                _DIGESTS[before] = known
                while len(_DIGESTS) > _DIGESTS_KEPT:
                    _DIGESTS.popitem(last=False)
    _compare(known, expected)


class HashingReader:
    """Reads ``handle`` and hashes every byte read: the decrypting pass itself proves the
    bytes it decrypted are the ones ``spec.archiveSha256`` names (the file could be rewritten
    between an earlier check and this pass)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        return data

    def check(self, expected: str) -> None:
        """Raise DigestMismatchError unless everything read so far hashes to ``expected``."""
        _compare(self._digest.hexdigest(), expected)


def _compare(actual: str, expected: str) -> None:
    # The actual digest is not echoed: it would tell whoever reads the status the hash of a
    # file they may not read.
    if actual != expected.lower():
        raise DigestMismatchError(
            f"archive SHA-256 does not match spec.archiveSha256 ({expected.lower()}); nothing was "
            "loaded: replace the archive or correct the digest"
        )
