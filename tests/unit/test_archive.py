"""Opening the archive: confined to the allowed roots, regular files only, one unlock at a time.

Every test runs twice: through openat2(2) (skipped where the kernel lacks it) and through
the portable component-by-component fallback; both must behave the same.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from imageunlock.engine import archive
from imageunlock.engine.archive import check_sha256, lock_archive, open_archive
from imageunlock.errors import ArchiveNotFoundError, BusyError, ConfigurationError, DigestMismatchError

from ..support.ci import unavailable

NO_SYMLINKS = "symlinks below the archive root are not followed"


def _kernel_has_openat2() -> bool:
    root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = archive._openat2(root_fd, [])
    finally:
        os.close(root_fd)
    if fd is None:
        return False
    os.close(fd)
    return True


def _fallback_must_not_run(*args):
    raise AssertionError("the openat2 test took the fallback path")


@pytest.fixture(autouse=True, params=["openat2", "fallback"])
def implementation(request, monkeypatch):
    if request.param == "openat2":
        if not _kernel_has_openat2():
            pytest.skip("this kernel has no openat2(2)")
        monkeypatch.setattr(archive, "_walk", _fallback_must_not_run)
    else:
        monkeypatch.setattr(archive, "USE_OPENAT2", False)
    return request.param


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "archives"
    r.mkdir()
    (r / "images.enc").write_bytes(b"x" * 100)
    return r


def refused(path, roots) -> str:
    with pytest.raises(ConfigurationError) as info:
        open_archive(path, roots).__enter__()
    return info.value.message


def test_regular_file_under_root_opens(root):
    with open_archive(str(root / "images.enc"), [str(root)]) as (handle, size):
        assert size == 100 and handle.read(10) == b"x" * 10


def test_file_in_a_subdirectory_opens(root):
    (root / "v2").mkdir()
    (root / "v2" / "images.enc").write_bytes(b"y" * 7)
    with open_archive(str(root / "v2" / "images.enc"), [str(root)]) as (handle, size):
        assert size == 7 and handle.read() == b"y" * 7


def test_a_root_that_is_itself_a_symlink_is_fine(root, tmp_path):
    """The root is operator configuration: trusted, and opened by its real path."""
    link = tmp_path / "root-link"
    link.symlink_to(root)
    with open_archive(str(link / "images.enc"), [str(link)]) as (_, size):
        assert size == 100


@pytest.mark.parametrize("roots", [["/"], []])
@pytest.mark.parametrize("path", ["images.enc", "relative/path"])
def test_relative_paths_are_refused(path, roots):
    assert "absolute" in refused(path, roots)


def test_dotdot_escape_is_refused(root, tmp_path):
    (tmp_path / "secret").write_text("s")
    message = refused(str(root / ".." / "secret"), [str(root)])
    assert "outside the allowed archive roots" in message
    assert str(tmp_path / "secret") not in message


def test_symlink_escaping_the_root_is_refused(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "outside.enc").write_bytes(b"y")
    (root / "link.enc").symlink_to(elsewhere / "outside.enc")
    message = refused(str(root / "link.enc"), [str(root)])
    assert NO_SYMLINKS in message and "outside the allowed archive roots" in message
    assert str(elsewhere) not in message


@pytest.mark.parametrize(
    "link, path",
    [
        ("current.enc", "current.enc"),  # the file itself
        ("current", "current/images.enc"),  # a directory on the way
    ],
)
def test_symlink_inside_the_root_is_refused_too(root, link, path):
    (root / "v1").mkdir()
    (root / "v1" / "images.enc").write_bytes(b"z")
    (root / "current.enc").symlink_to(root / "images.enc")
    (root / "current").symlink_to(root / "v1")
    message = refused(str(root / path), [str(root)])
    assert NO_SYMLINKS in message and "write the file itself" in message


def test_directory_swapped_for_a_symlink_after_the_check_is_not_followed(root, tmp_path, monkeypatch):
    """The race: a directory below the root becomes a symlink to elsewhere just before the open."""
    (root / "sub").mkdir()
    (root / "sub" / "images.enc").write_bytes(b"inside")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "images.enc").write_bytes(b"SECRET")
    real_open, swapped, read = os.open, [], []

    def racing_open(*args, **kwargs):
        if not swapped:  # the first open made after the path was checked
            swapped.append(True)
            os.rename(root / "sub", tmp_path / "sub-moved")
            (root / "sub").symlink_to(elsewhere, target_is_directory=True)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    with (
        pytest.raises(ConfigurationError, match=NO_SYMLINKS) as info,
        open_archive(str(root / "sub" / "images.enc"), [str(root)]) as (handle, _),
    ):
        read.append(handle.read())
    monkeypatch.undo()
    assert swapped and read == []
    assert str(elsewhere) not in info.value.message


def test_a_kernel_without_openat2_means_the_fallback(root, monkeypatch):
    monkeypatch.setattr(archive, "_SYS_OPENAT2", 100_000)  # no such system call: ENOSYS
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert archive._openat2(root_fd, ["images.enc"]) is None
    finally:
        os.close(root_fd)


def test_sibling_prefix_is_not_inside_the_root(root, tmp_path):
    sibling = tmp_path / "archives-evil"
    sibling.mkdir()
    (sibling / "a.enc").write_bytes(b"z")
    assert "outside the allowed archive roots" in refused(str(sibling / "a.enc"), [str(root)])


def test_the_root_is_picked_among_several(root, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.enc").write_bytes(b"o")
    roots = [str(root), str(other)]
    with open_archive(str(other / "o.enc"), roots) as (handle, _):
        assert handle.read() == b"o"
    message = refused(str(tmp_path / "third" / "t.enc"), roots)
    assert str(root) in message and str(other) in message


def test_directory_fifo_and_device_are_refused_before_reading(root):
    os.mkfifo(root / "fifo")  # opening a FIFO for reading would block without O_NONBLOCK
    assert "directory" in refused(str(root), [str(root.parent)])
    assert "directory" in refused(str(root), [str(root)])
    assert "not a regular file" in refused(str(root / "fifo"), [str(root)])
    assert "not a regular file" in refused("/dev/zero", ["/dev"])


def test_missing_archive(root):
    for path in (root / "nope.enc", root / "nodir" / "nope.enc"):
        with pytest.raises(ArchiveNotFoundError):
            open_archive(str(path), [str(root)]).__enter__()


def test_same_archive_is_never_unlocked_twice(root):
    path = str(root / "images.enc")
    with (
        open_archive(path, [str(root)]) as (first, _),
        lock_archive(first, path),
        open_archive(path, [str(root)]) as (second, _),
    ):
        with pytest.raises(BusyError) as info, lock_archive(second, path, timeout=0.3):
            pass
        assert info.value.transient
    with open_archive(path, [str(root)]) as (handle, _), lock_archive(handle, path):
        pass  # released afterwards


def test_checking_the_digest_takes_no_lock(root):
    """Issue 18, item 2: a wrong archiveSha256 on someone else's archive must not hold up
    their unlock: hashing runs beside a held archive lock, and holds none itself."""
    path = str(root / "images.enc")
    good = hashlib.sha256(b"x" * 100).hexdigest()
    with (
        open_archive(path, [str(root)]) as (victim, _),
        lock_archive(victim, path),
        open_archive(path, [str(root)]) as (handle, _),
    ):
        with pytest.raises(DigestMismatchError):
            check_sha256(handle, "0" * 64)
        check_sha256(handle, good)


def test_an_unchanged_file_is_hashed_once(root, monkeypatch):
    path = root / "images.enc"
    path.write_bytes(b"y" * 5000)
    good = hashlib.sha256(b"y" * 5000).hexdigest()
    reads: list[int] = []
    with open_archive(str(path), [str(root)]) as (handle, _):
        real = handle.read
        monkeypatch.setattr(handle, "read", lambda n=-1: reads.append(n) or real(n), raising=False)
        with pytest.raises(DigestMismatchError):
            check_sha256(handle, "1" * 64)
        first = len(reads)
        assert first > 0
        for _ in range(3):  # a repeated wrong guess (a re-check request) reads nothing
            with pytest.raises(DigestMismatchError):
                check_sha256(handle, "1" * 64)
        check_sha256(handle, good)
        assert len(reads) == first
    path.write_bytes(b"z" * 5000)  # a rewrite changes the identity: hashed again
    with open_archive(str(path), [str(root)]) as (handle, _), pytest.raises(DigestMismatchError):
        check_sha256(handle, good)


def test_a_file_with_another_hard_link_is_refused(root, tmp_path):
    """Issue 18, item 5: a hard link gives a file from elsewhere on the file system a name
    below the root (symlinks are refused; a hard link must be too)."""
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"s" * 10)
    os.link(outside, root / "linked.enc")
    message = refused(str(root / "linked.enc"), [str(root)])
    assert "2 hard links" in message
    os.link(root / "images.enc", tmp_path / "second-name")  # the root's own file, given a second name
    assert "hard links" in refused(str(root / "images.enc"), [str(root)])


def test_a_mount_point_below_the_root_is_not_crossed(root, tmp_path):
    """Issue 18, item 5: another file system mounted below the root (a bind mount of a
    directory from elsewhere) is refused, by openat2's RESOLVE_NO_XDEV and by the fallback."""
    if os.geteuid() != 0:
        unavailable("a mount below the archive root", "needs root")
    (root / "mnt").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "images.enc").write_bytes(b"e" * 10)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "mnt")], capture_output=True)
    if done.returncode != 0:
        unavailable("a tmpfs mount below the archive root", done.stderr.decode())
    try:
        (root / "mnt" / "images.enc").write_bytes(b"m" * 10)
        assert "crosses a mount point" in refused(str(root / "mnt" / "images.enc"), [str(root)])
    finally:
        subprocess.run(["umount", str(root / "mnt")], check=True)
    with open_archive(str(root / "images.enc"), [str(root)]):
        pass  # the root's own file still opens


def test_sha256_check(root):
    good = hashlib.sha256(b"x" * 100).hexdigest()
    with open_archive(str(root / "images.enc"), [str(root)]) as (handle, _):
        check_sha256(handle, good.upper())
        assert handle.read(1) == b"x"  # rewound
        with pytest.raises(DigestMismatchError, match="nothing was loaded"):
            check_sha256(handle, "0" * 64)
