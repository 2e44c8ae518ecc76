"""Opening the archive: confined to the allowed roots, regular files only, one unlock at a time.

Every test runs twice: through openat2(2) (skipped where the kernel lacks it) and through
the portable component-by-component fallback; both must behave the same.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from imageunlock import archive
from imageunlock.archive import check_sha256, open_archive
from imageunlock.errors import ArchiveNotFoundError, BusyError, ConfigurationError, DigestMismatchError

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


def test_same_archive_is_never_opened_for_unlock_twice(root):
    path = str(root / "images.enc")
    with open_archive(path, [str(root)]):
        with pytest.raises(BusyError) as info:
            open_archive(path, [str(root)], lock_timeout=0.3).__enter__()
        assert info.value.transient
    with open_archive(path, [str(root)]):  # released afterwards
        pass


def test_sha256_check(root):
    good = hashlib.sha256(b"x" * 100).hexdigest()
    with open_archive(str(root / "images.enc"), [str(root)]) as (handle, _):
        check_sha256(handle, good.upper())
        assert handle.read(1) == b"x"  # rewound
        with pytest.raises(DigestMismatchError, match="nothing was loaded"):
            check_sha256(handle, "0" * 64)
