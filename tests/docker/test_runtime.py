"""The Docker adapter (``imageunlock.engine.runtimes.docker``) against the real Engine."""

from __future__ import annotations

import pytest

from imageunlock.engine.crypto import read_chunks
from imageunlock.engine.runtimes.docker import DockerRuntime

from ..support.dockerd import loaded

pytestmark = pytest.mark.docker


class Cut(Exception):
    pass


def test_engine_loads_nothing_from_an_upload_cut_short(clean_docker, archives):
    """The premise of all-or-nothing loads: the Engine unpacks the whole body first."""
    data = archives.plaintext.read_bytes()

    def all_but_the_end():
        yield data[: len(data) - 1024]  # everything except the end-of-archive marker
        raise Cut()

    runtime = DockerRuntime(clean_docker.url)
    with pytest.raises(Cut):
        runtime.load(all_but_the_end())
    assert loaded(clean_docker) == {}
    # and the same Engine then loads the full stream fine: the cut left nothing wedged
    with open(archives.plaintext, "rb") as f:
        names = runtime.load(read_chunks(f))
    assert sorted(names) == sorted(archives.refs)
    assert loaded(clean_docker) == archives.ids
