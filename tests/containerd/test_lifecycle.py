"""Image lifecycle on containerd (issue 20, runtime layer), against a real containerd: sid's
2.x (its CRI honours the pin) and bookworm's 1.6 (labels set after the import; the CRI ignores
the pin). Ownership as a label on the image record, ``unpin``, ``remove`` by name keeping what
containers use, and a full root (a small tmpfs) that leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imageunlock.engine.crypto import read_chunks
from imageunlock.engine.models import OwnershipRecord
from imageunlock.engine.refs import normalize_ref
from imageunlock.engine.runtimes.containerd import OWNER_KEY, PINNED_LABEL, REF_KEY, ContainerdRuntime
from imageunlock.errors import InsufficientStorageError

from ..support import savetar
from ..support.ci import unavailable
from ..support.containerd import Containerd, ContainerdError, Cri, bookworm_build, sid_build
from ..support.disk import small_tmpfs, used_bytes

pytestmark = pytest.mark.containerd
OWNER = "edge/azaion-images"


@pytest.fixture(params=["sid", "bookworm"])
def daemon(request: pytest.FixtureRequest) -> Containerd:
    found: Containerd = request.getfixturevalue("containerd" if request.param == "sid" else "containerd_bookworm")
    for container in found.ctr("containers", "ls", "-q").stdout.split():
        found.ctr("containers", "rm", container)
    found.reset()
    return found


@pytest.fixture
def cri(daemon: Containerd):
    client = Cri(daemon.socket, (daemon.build if daemon.build.cri_proto else sid_build()).cri_proto)
    yield client
    client.close()


def _runtime(daemon: Containerd) -> ContainerdRuntime:
    return ContainerdRuntime(str(daemon.socket), ctr=daemon.build.ctr)


def _load(runtime: ContainerdRuntime, archives, owner: str | None = OWNER) -> list[str]:
    with open(archives.plaintext, "rb") as f:
        return runtime.load(read_chunks(f), archives.refs, owner=owner)


def test_a_load_labels_its_owner_with_the_pin_and_a_new_process_finds_it(daemon, archives):
    _load(_runtime(daemon), archives)
    held = daemon.images()
    for ref in archives.refs:
        labels = held[normalize_ref(ref)]["labels"]
        assert PINNED_LABEL in labels and f"{OWNER_KEY}={OWNER}" in labels, labels
        assert f"{REF_KEY}={normalize_ref(ref)}" in labels, labels
    names = sorted(normalize_ref(ref) for ref in archives.refs)
    assert _runtime(daemon).owned_refs() == [OwnershipRecord(name, OWNER) for name in names]


def test_an_image_loaded_by_someone_else_is_not_owned(daemon, archives):
    daemon.ctr("images", "import", "--all-platforms", str(archives.plaintext))  # the admin's own import
    assert _runtime(daemon).owned_refs() == []
    _load(_runtime(daemon), archives, owner=None)  # the CLI without an owner: pinned, not owned
    assert _runtime(daemon).owned_refs() == []


def test_a_name_imported_again_since_is_no_longer_owned(daemon, tmp_path):
    """A later ``ctr import`` (or CRI pull) of the same name points the record at other
    content; containerd 1.6 keeps our labels on it (2.x replaces them): the digest label no
    longer matches the record's target, so it is not ours."""
    ref = "azaion/reimported:1.0"
    ours = savetar.build([ref], seed=1)
    runtime = _runtime(daemon)
    runtime.load((ours[i : i + 65536] for i in range(0, len(ours), 65536)), [ref], owner=OWNER)
    assert runtime.owned_refs() == [OwnershipRecord(normalize_ref(ref), OWNER)]
    theirs = tmp_path / "theirs.tar"
    theirs.write_bytes(savetar.build([ref], seed=2))
    daemon.ctr("images", "import", "--all-platforms", str(theirs))
    assert runtime.owned_refs() == []


def test_unpin_lets_kubelet_collect_and_keeps_the_owner(daemon, cri, archives):
    runtime = _runtime(daemon)
    _load(runtime, archives)
    first, *rest = archives.refs
    assert runtime.unpin([first]) == [normalize_ref(first)]
    labels = daemon.images()[normalize_ref(first)]["labels"]
    assert "io.cri-containerd.pinned" not in labels and f"{OWNER_KEY}={OWNER}" in labels
    assert cri.image_status(first).pinned is False
    # the others stay pinned (where the CRI honours it: 1.7.3 on)
    assert all(cri.image_status(ref).pinned is (daemon.build.version >= (1, 7, 3)) for ref in rest)
    assert runtime.unpin([first]) == []  # nothing left to unpin
    assert first in [r.ref.removeprefix("docker.io/") for r in runtime.owned_refs()]
    # a rollback that finds it still there pins it again
    assert runtime.pin([first]) == [normalize_ref(first)]
    assert PINNED_LABEL in daemon.images()[normalize_ref(first)]["labels"]
    assert runtime.pin([first]) == []


def test_remove_keeps_what_a_container_uses_and_what_another_name_holds(daemon, cri, archives):
    runtime = _runtime(daemon)
    _load(runtime, archives)
    tagged, used, plain, *rest = archives.refs
    other = "docker.io/someone/else:1"
    daemon.ctr("images", "tag", normalize_ref(tagged), other)  # another name of the same image (labels copied)
    assert other not in [r.ref for r in runtime.owned_refs()]  # someone's copy is not ours
    daemon.ctr("containers", "create", normalize_ref(used), "stopped-user", "/bin/true")  # never started
    removed, kept = runtime.remove([tagged, used, plain, "azaion/never-loaded:1"])
    assert (removed, kept) == ([tagged, plain, "azaion/never-loaded:1"], [used])
    left = daemon.ctr("images", "ls", "-q").stdout.split()
    assert other in left and normalize_ref(used) in left
    assert normalize_ref(tagged) not in left and normalize_ref(plain) not in left
    # the last name of ``plain`` gone, so is the CRI's own record of it: nothing holds its content
    assert archives.ids[plain] not in left and cri.image_status(archives.ids[plain]) is None
    assert cri.image_status(other).id == archives.ids[tagged]
    assert sorted(r.ref for r in runtime.owned_refs()) == sorted(normalize_ref(r) for r in [used, *rest])
    daemon.ctr("containers", "rm", "stopped-user")
    assert runtime.remove([used]) == ([used], [])
    assert normalize_ref(used) not in daemon.images()


@pytest.fixture(scope="module", params=["sid", "bookworm"])
def full_containerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd whose root (content store, snapshots, metadata) is an 8 MiB tmpfs."""
    workdir = tmp_path_factory.mktemp(f"containerd-full-{request.param}")
    try:
        build = sid_build() if request.param == "sid" else bookworm_build()
        with small_tmpfs(workdir / "root", "8m"):
            daemon = Containerd(workdir, build)
            try:
                daemon.start()
            except ContainerdError as exc:
                unavailable(f"containerd ({request.param}) on a tmpfs", str(exc))
            try:
                yield daemon
            finally:
                daemon.stop()
    except (ContainerdError, OSError) as exc:
        unavailable(f"containerd ({request.param}) on a tmpfs", str(exc))


def test_a_full_root_is_insufficient_storage_and_leaves_nothing(full_containerd):
    data = savetar.build(["azaion/too-big:1.0"], layer_bytes=6 << 20)  # ~12 MiB: more than the tmpfs
    root = full_containerd.workdir / "root"
    before = used_bytes(root)
    runtime = ContainerdRuntime(str(full_containerd.socket), ctr=full_containerd.build.ctr)
    with pytest.raises(InsufficientStorageError) as caught:
        runtime.load((data[i : i + 65536] for i in range(0, len(data), 65536)), ["azaion/too-big:1.0"], owner=OWNER)
    assert "no space left on device" in caught.value.words and caught.value.archive_bytes > 0
    assert full_containerd.images() == {} and runtime.owned_refs() == []
    assert full_containerd.content() == [] and full_containerd.leases() == {}
    assert full_containerd.ctr("content", "active").stdout.splitlines()[1:] == []
    assert used_bytes(root) <= before + (512 << 10), "the failed import left data behind"
