"""Opening the archive: confined to the allowed roots, regular files only, one unlock at a time."""

from __future__ import annotations

import hashlib
import os

import pytest

from imageunlock.archive import check_sha256, open_archive, resolve_archive_path
from imageunlock.errors import ArchiveNotFoundError, BusyError, ConfigurationError, DigestMismatchError


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "archives"
    r.mkdir()
    (r / "images.enc").write_bytes(b"x" * 100)
    return r


def test_regular_file_under_root_opens(root):
    with open_archive(str(root / "images.enc"), [str(root)]) as (handle, size):
        assert size == 100 and handle.read(10) == b"x" * 10


@pytest.mark.parametrize("path", ["images.enc", "relative/path"])
def test_relative_paths_are_refused(root, path):
    with pytest.raises(ConfigurationError, match="absolute"):
        resolve_archive_path(path, [str(root)])


def test_dotdot_escape_is_refused(root, tmp_path):
    (tmp_path / "secret").write_text("s")
    with pytest.raises(ConfigurationError, match="outside the allowed archive roots"):
        open_archive(str(root / ".." / "secret"), [str(root)]).__enter__()


def test_symlink_escaping_the_root_is_refused(root, tmp_path):
    (tmp_path / "outside.enc").write_bytes(b"y")
    (root / "link.enc").symlink_to(tmp_path / "outside.enc")
    with pytest.raises(ConfigurationError, match="resolves to"):
        open_archive(str(root / "link.enc"), [str(root)]).__enter__()


def test_symlink_inside_the_root_is_fine(root):
    (root / "current.enc").symlink_to(root / "images.enc")
    with open_archive(str(root / "current.enc"), [str(root)]) as (_, size):
        assert size == 100


def test_sibling_prefix_is_not_inside_the_root(root, tmp_path):
    sibling = tmp_path / "archives-evil"
    sibling.mkdir()
    (sibling / "a.enc").write_bytes(b"z")
    with pytest.raises(ConfigurationError):
        resolve_archive_path(str(sibling / "a.enc"), [str(root)])


def test_directory_fifo_and_device_are_refused_before_reading(root):
    os.mkfifo(root / "fifo")  # opening a FIFO for reading would block without O_NONBLOCK
    with pytest.raises(ConfigurationError, match="directory"):
        open_archive(str(root), [str(root.parent)]).__enter__()
    with pytest.raises(ConfigurationError, match="not a regular file"):
        open_archive(str(root / "fifo"), [str(root)]).__enter__()
    with pytest.raises(ConfigurationError, match="not a regular file"):
        open_archive("/dev/zero", ["/dev"]).__enter__()


def test_missing_archive(root):
    with pytest.raises(ArchiveNotFoundError):
        open_archive(str(root / "nope.enc"), [str(root)]).__enter__()


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
