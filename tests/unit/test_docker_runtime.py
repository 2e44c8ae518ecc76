"""How the Docker adapter classifies an Engine refusal of a load (no Engine needed)."""

from __future__ import annotations

import pytest

from imageunlock.engine.runtimes.docker import _refusal
from imageunlock.errors import ArchiveRejectedError, InsufficientStorageError, LoadError


@pytest.mark.parametrize(
    "text",
    [
        "write /var/lib/docker/tmp/docker-import-1/layer.tar: no space left on device",
        "failed to register layer: input/output error",
    ],
)
def test_node_trouble_is_transient(text):
    error = _refusal(text)
    assert isinstance(error, LoadError) and error.transient


def test_a_full_disk_is_insufficient_storage_with_the_engines_words():
    text = "Error processing tar file(exit status 1): write /d1c8/layer.tar: no space left on device"
    error = _refusal(text, fed=5 << 20)
    assert isinstance(error, InsufficientStorageError) and error.transient
    assert text in error.message and error.archive_bytes == 5 << 20


def test_no_space_inside_a_path_from_the_archive_is_not_a_full_disk():
    error = _refusal("open /tmp/docker-import-1/no space left/x.json: no such file or directory")
    assert not isinstance(error, InsufficientStorageError)


@pytest.mark.parametrize(
    "text",
    [
        "archive/tar: invalid tar header",
        "unexpected EOF",
        # review: a path from the archive must not steer the verdict
        "open /var/lib/docker/tmp/docker-import-1/x/no space left/fc95.json: no such file or directory",
        "open /tmp/docker-import-2/a/input/output error/json: no such file or directory",
    ],
)
def test_content_the_engine_refuses_is_permanent(text):
    error = _refusal(text)
    assert isinstance(error, ArchiveRejectedError) and not error.transient
    assert "rebuild it" in error.message
