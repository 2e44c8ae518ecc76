"""Image lifecycle on the Docker Engine (issue 20, runtime layer), against the real Engine:
ownership recorded in the node-local file, ``unpin`` a no-op, ``remove`` by ref keeping what
containers use, and a full data root (a small tmpfs) that loads nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imageunlock.engine.crypto import read_chunks
from imageunlock.engine.models import OwnershipRecord
from imageunlock.engine.runtimes.docker import DockerRuntime
from imageunlock.errors import InsufficientStorageError

from ..support import savetar
from ..support.ci import unavailable
from ..support.disk import small_tmpfs, used_bytes
from ..support.dockerd import Dockerd, DockerdError, loaded

pytestmark = pytest.mark.docker
OWNER = "edge/azaion-images"


def _load(runtime: DockerRuntime, archives, owner: str | None = OWNER) -> list[str]:
    with open(archives.plaintext, "rb") as f:
        return runtime.load(read_chunks(f), archives.refs, owner=owner)


def test_a_load_records_its_owner_and_a_new_process_finds_it(clean_docker, archives, tmp_path):
    _load(DockerRuntime(clean_docker.url, state_dir=str(tmp_path)), archives)
    restarted = DockerRuntime(clean_docker.url, state_dir=str(tmp_path))  # the agent after a restart
    assert restarted.owned_refs() == [OwnershipRecord(ref, OWNER) for ref in sorted(archives.refs)]
    # a ref someone moved to another image since is not ours any more
    first, second = sorted(archives.refs)[:2]
    clean_docker.docker("tag", second, first)
    assert first not in [r.ref for r in restarted.owned_refs()]


def test_a_load_without_an_owner_owns_nothing(clean_docker, archives, tmp_path):
    runtime = DockerRuntime(clean_docker.url, state_dir=str(tmp_path))
    _load(runtime, archives, owner=None)
    assert runtime.owned_refs() == []


def test_unpin_does_nothing_on_docker(clean_docker, archives, tmp_path):
    runtime = DockerRuntime(clean_docker.url, state_dir=str(tmp_path))
    _load(runtime, archives)
    assert runtime.unpin(archives.refs) == []
    assert runtime.pin(archives.refs) == []
    assert loaded(clean_docker) == archives.ids


def test_remove_keeps_what_a_container_uses_and_what_another_tag_names(clean_docker, archives, tmp_path):
    runtime = DockerRuntime(clean_docker.url, state_dir=str(tmp_path))
    _load(runtime, archives)
    tagged, used, plain, *rest = sorted(archives.refs)
    clean_docker.docker("tag", tagged, "someone/else:1")  # another name of the same image
    clean_docker.docker("tag", used, "someone/else:2")  # the Engine would untag ``used`` despite its user
    clean_docker.docker("create", "--name", "stopped-user", used, "/bin/true")  # created, never started
    try:
        removed, kept = runtime.remove([tagged, used, plain, "azaion/never-loaded:1"])
        assert (removed, kept) == ([tagged, plain, "azaion/never-loaded:1"], [used])
        left = loaded(clean_docker)
        assert left["someone/else:1"] == archives.ids[tagged]  # only the ref went, not the image
        assert tagged not in left and plain not in left and left[used] == archives.ids[used]
        assert sorted(r.ref for r in runtime.owned_refs()) == sorted([used, *rest])
    finally:
        clean_docker.docker("rm", "-f", "stopped-user")
    assert runtime.remove([used]) == ([used], [])
    assert used not in loaded(clean_docker)


@pytest.fixture(scope="module")
def full_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private Engine whose data root is an 8 MiB tmpfs (its temp dir included)."""
    root = tmp_path_factory.mktemp("dockerd-full")
    engine = Dockerd(root)
    try:
        with small_tmpfs(engine.data_root, "8m"):
            try:
                engine.start()
            except DockerdError as exc:
                unavailable("dockerd on a tmpfs", str(exc))
            try:
                yield engine
            finally:
                engine.stop()
    except OSError as exc:
        unavailable("a tmpfs data root", str(exc))


def test_a_full_data_root_is_insufficient_storage_and_loads_nothing(full_dockerd):
    data = savetar.build(["azaion/too-big:1.0"], layer_bytes=6 << 20)  # ~12 MiB: more than the tmpfs
    before = used_bytes(full_dockerd.data_root)
    runtime = DockerRuntime(full_dockerd.url, state_dir=str(full_dockerd.root / "state"))
    with pytest.raises(InsufficientStorageError) as caught:
        runtime.load((data[i : i + 65536] for i in range(0, len(data), 65536)), ["azaion/too-big:1.0"], owner=OWNER)
    assert "no space left on device" in caught.value.words and caught.value.archive_bytes > 0
    assert caught.value.transient and caught.value.reason == "InsufficientStorage"
    assert loaded(full_dockerd) == {}
    assert not list(full_dockerd.temp_dir.glob("docker-import-*"))
    assert used_bytes(full_dockerd.data_root) <= before + (256 << 10), "the failed load left data behind"
    assert runtime.owned_refs() == []
