"""The containerd adapter against a real containerd: sid's 2.x (pinning honoured) and, where
cheap, bookworm's 1.6 (pinning ignored). What ctr does with a stream, and what it leaves."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import time
from datetime import UTC, datetime, timedelta

import pytest

from imageunlock.engine.crypto import read_chunks
from imageunlock.engine.refs import normalize_ref
from imageunlock.engine.runtimes.containerd import PINNED_LABEL, ContainerdRuntime
from imageunlock.errors import ArchiveRejectedError, ConfigurationError, RuntimeUnavailableError

from ..support import tamper
from ..support.containerd import Containerd, Cri, sid_build
from ..support.wait import wait_for

pytestmark = pytest.mark.containerd
CHUNK = 64 * 1024


class Cut(Exception):
    pass


@pytest.fixture(params=["sid", "bookworm"])
def daemon(request: pytest.FixtureRequest) -> Containerd:
    found: Containerd = request.getfixturevalue("containerd" if request.param == "sid" else "containerd_bookworm")
    found.reset()
    return found


@pytest.fixture
def cri(daemon: Containerd):
    proto = (daemon.build if daemon.build.cri_proto else sid_build()).cri_proto
    client = Cri(daemon.socket, proto)
    yield client
    client.close()


def runtime_for(daemon: Containerd) -> ContainerdRuntime:
    return ContainerdRuntime(str(daemon.socket), ctr=daemon.build.ctr)


def chunks(data: bytes):
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]


def test_ctr_imports_at_the_end_marker_without_waiting_for_its_input_to_end(daemon, archives):
    """The premise of the adapter's hold-back and kill: give ctr a complete tar and keep its
    input open, and it imports all the same. A stream that fails after the end marker has
    passed would be too late."""
    args = [daemon.build.ctr, "-a", str(daemon.socket), "-n", "k8s.io", "images", "import", "--all-platforms"]
    args += ["--local"] if daemon.build.version >= (2, 0, 0) else []
    proc = subprocess.Popen([*args, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(archives.plaintext.read_bytes())
        proc.stdin.flush()
        wait_for(lambda: len(daemon.images()) == len(archives.refs), 30, "ctr to import with its input still open")
        assert proc.wait(30) == 0  # and it finished: the rest of its input was never needed
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()


def _all_but_the_end_marker(data: bytes):
    yield data[:-1024]
    raise Cut()


def _half(data: bytes):
    yield data[: len(data) // 2]
    raise Cut()


def _complete_then_padding_then_failure(data: bytes):
    """The whole tar, end marker included, 256 KiB of zero padding (allowed after it), and
    only then the failure: a check of the whole archive (refs, archiveSha256) fails last."""
    yield from chunks(data)
    for _ in range(4):
        yield bytes(CHUNK)
    raise Cut()


@pytest.mark.parametrize("stream", [_all_but_the_end_marker, _half, _complete_then_padding_then_failure])
def test_a_stream_that_raises_imports_nothing(daemon, cri, archives, stream):
    data = archives.plaintext.read_bytes()
    with pytest.raises(Cut):
        runtime_for(daemon).load(stream(data), archives.refs)
    assert daemon.images() == {}
    assert [i for i in cri.list_images() if any("azaion" in t for t in i.repo_tags)] == []
    # and nothing is wedged: the same runtime then loads the archive
    runtime = runtime_for(daemon)
    with open(archives.plaintext, "rb") as f:
        assert sorted(runtime.load(read_chunks(f), archives.refs)) == sorted(normalize_ref(r) for r in archives.refs)
    assert runtime.image_ids(archives.refs) == archives.ids


def _slow_failure_after_padding(data: bytes, daemon: Containerd, seen: list):
    """As above, with a slow last check (a large archive's digest): for three seconds, long
    enough for ctr to import had it seen the end marker (the premise test: it does), the
    stream looks at what containerd holds before it fails."""
    yield from chunks(data)
    for _ in range(4):
        yield bytes(CHUNK)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen.append(daemon.images())
        time.sleep(0.2)
    raise Cut()


def test_ctr_never_sees_the_end_marker_before_the_stream_has_passed_its_checks(daemon, archives):
    seen: list = []
    with pytest.raises(Cut):
        runtime_for(daemon).load(
            _slow_failure_after_padding(archives.plaintext.read_bytes(), daemon, seen), archives.refs
        )
    assert seen and not any(seen), "ctr imported while the stream was still being checked"
    assert daemon.images() == {}


def test_should_ctr_finish_early_all_the_same_a_failing_stream_removes_what_it_imported(daemon, archives, monkeypatch):
    """The second line of defence: without the hold-back (as if the stream's checks and ctr
    disagreed about where the tar ends), ctr imports at the end marker and exits; the rest of
    the stream is still run through its checks, and when they fail the images go again."""
    from imageunlock.engine.runtimes import containerd as adapter

    monkeypatch.setattr(adapter._Pipe, "feed", lambda self, chunk: self._write(chunk))
    seen: list = []
    with pytest.raises(Cut):
        runtime_for(daemon).load(
            _slow_failure_after_padding(archives.plaintext.read_bytes(), daemon, seen), archives.refs
        )
    assert any(seen), "the premise: without the hold-back, ctr imports before the stream fails"
    assert daemon.images() == {}


def _member_digests(plaintext) -> set[str]:
    with tarfile.open(plaintext) as tar:
        return {"sha256:" + hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}


def test_an_interrupted_import_leaves_only_leased_blobs_that_gc_removes(daemon, archives):
    """What a failed unlock leaves in containerd: no image, no snapshot; only blobs of the
    archive's members that ctr had written, held by ctr's own lease, which expires after
    24 hours. Without the lease (expired, or removed now) the garbage collector deletes them."""
    data = archives.plaintext.read_bytes()

    def half_then_fail():
        yield data[: len(data) // 2]
        wait_for(daemon.content, 30, "ctr to write a blob")  # ctr has read the first members
        raise Cut()

    started = datetime.now(UTC)
    with pytest.raises(Cut):
        runtime_for(daemon).load(half_then_fail(), archives.refs)
    assert daemon.images() == {}
    assert daemon.ctr("snapshots", "ls").stdout.splitlines()[1:] == []
    left = daemon.content()
    assert left and set(left) <= _member_digests(archives.plaintext)  # plaintext blobs, in containerd's store
    [(lease, labels)] = daemon.leases().items()
    expires = datetime.fromisoformat(labels.removeprefix("containerd.io/gc.expire=").replace("Z", "+00:00"))
    assert timedelta(hours=23, minutes=59) < expires - started < timedelta(hours=24, minutes=1)
    daemon.ctr("leases", "rm", "--sync", lease)
    assert daemon.content() == []
    assert daemon.ctr("content", "active").stdout.splitlines()[1:] == []


def test_load_pins_every_image_and_ids_are_the_archives(daemon, cri, archives):
    runtime = runtime_for(daemon)
    with open(archives.plaintext, "rb") as f:
        names = runtime.load(read_chunks(f), archives.refs)
    assert sorted(names) == sorted(normalize_ref(r) for r in archives.refs)
    assert runtime.image_ids(archives.refs) == archives.ids
    assert all(PINNED_LABEL in daemon.images()[name]["labels"] for name in names)
    for ref in archives.refs:
        seen = cri.image_status(ref)  # what kubelet sees
        assert seen is not None and seen.id == archives.ids[ref] and normalize_ref(ref) in seen.repo_tags
        # Pinning is honoured from containerd 1.7.3: sid's reports it, bookworm's 1.6 does not.
        assert seen.pinned is (daemon.build.version >= (1, 7, 3)), (daemon.build, ref)
    absent = "azaion/not-loaded:1.0"
    first = archives.refs[0]
    assert runtime.image_ids([absent, first]) == {absent: None, first: archives.ids[first]}


def test_refused_layer_is_permanent_and_leaves_no_pinned_record(daemon, archives, tmp_path):
    """ctr creates every image record, then unpacks: a layer that is no tar fails the unpack
    with the records made (and, with ctr 2, pinned). The adapter removes what it created."""
    from imageunlock.engine.crypto import decrypt_stream

    hostile = tamper.rewrite(archives.plaintext, tmp_path / "hostile.enc", archives.fragment, tamper.layer_not_a_tar)
    with open(hostile, "rb") as f:
        plain = b"".join(decrypt_stream(f, archives.fragment))
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        broken = normalize_ref(json.load(tar.extractfile("manifest.json"))[0]["RepoTags"][0])
    with pytest.raises(ArchiveRejectedError, match="rebuild it"):
        runtime_for(daemon).load(chunks(plain), archives.refs)
    left = daemon.images()
    assert broken not in left and not any(PINNED_LABEL in image["labels"] for image in left.values()), left


def test_unreachable_containerd_is_transient(containerd, tmp_path):
    absent = ContainerdRuntime(str(tmp_path / "nope.sock"), ctr=containerd.build.ctr)
    for call in (
        absent.ping,
        lambda: absent.image_ids(["azaion/x:1"]),
        lambda: absent.load(iter([b"x"]), ["azaion/x:1"]),
    ):
        with pytest.raises(RuntimeUnavailableError, match="not reachable"):
            call()
    refused = tmp_path / "refused.sock"
    with socket.socket(socket.AF_UNIX) as bound:  # a socket nobody accepts on: a dead daemon's
        bound.bind(str(refused))
        with pytest.raises(RuntimeUnavailableError, match="connection refused"):
            ContainerdRuntime(str(refused), ctr=containerd.build.ctr).ping()
    with pytest.raises(ConfigurationError, match="not on PATH"):
        ContainerdRuntime(str(containerd.socket), ctr=str(tmp_path / "no-ctr")).ping()
