"""How the Docker adapter classifies an Engine refusal of a load (no Engine needed)."""

from __future__ import annotations

import pytest

from imageunlock.engine.runtimes.docker import _refusal
from imageunlock.errors import ArchiveRejectedError, LoadError


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
