"""Two imports into one containerd on a node (issue 18, item 1): a failed import undoes only
what it created, and imports take turns (the node's import lock), in either order. Against
a real containerd: sid's 2.x and bookworm's 1.6."""

from __future__ import annotations

import threading

import pytest

from imageunlock.engine.crypto import read_chunks
from imageunlock.engine.refs import normalize_ref
from imageunlock.engine.runtimes.containerd import PINNED_LABEL, ContainerdRuntime
from imageunlock.errors import ArchiveRejectedError

from ..support import savetar, tamper
from ..support.containerd import Containerd

pytestmark = pytest.mark.containerd
CHUNK = 64 * 1024
INTRUDER = "azaion/intruder:9.9"  # B: another ImageUnlock's (or CLI run's) archive


@pytest.fixture(params=["sid", "bookworm"])
def daemon(request: pytest.FixtureRequest) -> Containerd:
    found: Containerd = request.getfixturevalue("containerd" if request.param == "sid" else "containerd_bookworm")
    found.reset()
    return found


def _runtime(daemon: Containerd) -> ContainerdRuntime:
    return ContainerdRuntime(str(daemon.socket), ctr=daemon.build.ctr)


def _broken() -> bytes:
    """B: every digest right, the first layer no tar: the stream checks pass, ctr creates
    B's record (pinned, with ctr 2) and then fails to unpack it."""
    return tamper.rewrite_plain(savetar.build([INTRUDER], layer_bytes=200_000), tamper.layer_not_a_tar)


def _a_is_intact(daemon: Containerd, archives) -> None:
    runtime = _runtime(daemon)
    assert runtime.image_ids(archives.refs) == archives.ids
    held = daemon.images()
    for ref in archives.refs:
        assert PINNED_LABEL in held[normalize_ref(ref)]["labels"], (ref, held)
    assert normalize_ref(INTRUDER) not in held, "B's broken record stayed"


def test_a_failing_import_that_started_first_leaves_the_other_imports_images(daemon, archives):
    """B starts streaming; A (sound) is started while B streams; B then fails. A must keep
    its verified, pinned images. (Before the fix, A completed while B streamed, and B's undo
    removed every pinned record that changed meanwhile: A's.)"""
    broken = _broken()
    half = len(broken) // 2
    b_streaming, a_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def b_stream():
        for i in range(0, half, CHUNK):
            yield broken[i : min(i + CHUNK, half)]
        b_streaming.set()
        a_done.wait(8)  # A may run now; with the import lock it waits for B instead
        for i in range(half, len(broken), CHUNK):
            yield broken[i : i + CHUNK]

    def run_b():
        try:
            _runtime(daemon).load(b_stream(), [INTRUDER])
        except BaseException as exc:
            errors.append(exc)

    b = threading.Thread(target=run_b)
    b.start()
    try:
        assert b_streaming.wait(30), "B never started streaming"
        with open(archives.plaintext, "rb") as f:
            names = _runtime(daemon).load(read_chunks(f), archives.refs)
        a_done.set()
    finally:
        a_done.set()
        b.join(60)
    assert sorted(names) == sorted(normalize_ref(r) for r in archives.refs)
    assert len(errors) == 1 and isinstance(errors[0], ArchiveRejectedError), errors
    _a_is_intact(daemon, archives)


def test_a_failing_import_after_another_completed_leaves_its_images(daemon, archives):
    with open(archives.plaintext, "rb") as f:
        _runtime(daemon).load(read_chunks(f), archives.refs)
    broken = _broken()
    with pytest.raises(ArchiveRejectedError):
        _runtime(daemon).load((broken[i : i + CHUNK] for i in range(0, len(broken), CHUNK)), [INTRUDER])
    _a_is_intact(daemon, archives)
