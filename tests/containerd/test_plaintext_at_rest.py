"""Where containerd puts the plaintext of an unlock, and what a SIGKILL mid-import leaves.

sid's containerd (2.x, the tests' harness), ``imageunlock unlock --runtime containerd`` as a
user runs it, a ~56 MiB archive, the content store polled every 20 ms (tests/support/disk.py).
These are the facts README ("Plaintext on the node") and SECURITY.md ("Where plaintext
exists") state:

* containerd's content store IS its image store: each member of the archive becomes a blob
  as the archive has it (``docker save`` layers: uncompressed tars), written through the
  ingest dir one blob at a time, then unpacked into snapshots. No copy of the whole archive
  is ever made: the ingest dir never holds more than the largest member.
* A SIGKILL of the unlocking process mid-import — alone (``ctr`` then reads the end of its
  input mid-member and fails) or with its ``ctr`` (a container's kill) — creates no image;
  what stays is measured below and stated in the docs.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ..support.cli import CREDENTIALS_ENV, read_until, start_cli
from ..support.containerd import Containerd
from ..support.disk import DirWatch, tree_bytes
from ..support.images import ArchiveSet
from ..support.resource_api import FakeResourceApi

pytestmark = pytest.mark.containerd


def _unlock_args(archives: ArchiveSet, api: FakeResourceApi, daemon: Containerd) -> list[str]:
    return [
        "unlock", "--archive", str(archives.openssl_archive), "--version", archives.version, "--api-url", api.url,
        "--runtime", "containerd", "--containerd-address", str(daemon.socket),
    ]  # fmt: skip


def _members(plaintext: Path) -> dict[str, tuple[str, int]]:
    """``{member name: (sha256 digest, size)}`` of the archive's regular files."""
    found = {}
    with tarfile.open(plaintext) as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()
                found[member.name] = ("sha256:" + hashlib.sha256(data).hexdigest(), member.size)
    return found


def _blobs(daemon: Containerd) -> set[str]:
    directory = daemon.content_dir / "blobs" / "sha256"
    return {"sha256:" + name for name in os.listdir(directory)} if directory.exists() else set()


def test_the_content_store_holds_the_archives_members_as_blobs_and_no_copy_of_the_archive(
    clean_containerd, big_archives, big_api, tmp_path
):
    daemon = clean_containerd
    members = _members(big_archives.plaintext)
    layers = {digest for name, (digest, _) in members.items() if name.endswith("layer.tar")}
    largest = max(size for _, size in members.values())
    tar_bytes = big_archives.plaintext.stat().st_size
    with DirWatch([daemon.ingest_dir, daemon.content_dir]) as watch:
        proc = start_cli(
            *_unlock_args(big_archives, big_api, daemon), env={**CREDENTIALS_ENV, **daemon.env()}, state_home=tmp_path
        )
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    ingest = watch[daemon.ingest_dir]
    # one blob at a time (its data and a few bookkeeping files of bytes), never the archive
    assert 0 < ingest.peak_bytes <= largest + 4096 < tar_bytes / 5, (ingest.peak_bytes, largest)
    assert os.listdir(daemon.ingest_dir) == []
    # the image store: every layer as the archive has it (here uncompressed tars), plus snapshots
    assert layers <= _blobs(daemon)
    assert tree_bytes(daemon.content_dir) >= 0.9 * tar_bytes
    assert daemon.ctr("snapshots", "ls").stdout.splitlines()[1:]
    root = os.stat(daemon.workdir / "root")  # containerd makes its root root-only: all below it is
    assert (root.st_mode & 0o777, root.st_uid) == (0o700, 0), oct(root.st_mode)
    print(
        f"\ncontainerd: ingest peak {ingest.peak_bytes:,} (largest member {largest:,}, tar {tar_bytes:,}); "
        f"content {tree_bytes(daemon.content_dir):,}; snapshots "
        f"{tree_bytes(daemon.workdir / 'root' / 'io.containerd.snapshotter.v1.overlayfs'):,}; "
        f"dirs {[i.describe() for i in watch[daemon.content_dir].dirs.values()]}"
    )


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("kill", ["process", "group"])
def test_sigkill_mid_import_creates_no_image(clean_containerd, big_archives, big_api, tmp_path, kill):
    """``process``: kill -9 of the CLI alone (its ``ctr`` lives on and reads the end of its
    input mid-member); ``group``: the CLI and its ``ctr`` together, as a container's kill."""
    daemon = clean_containerd
    members = _members(big_archives.plaintext)
    env = {**CREDENTIALS_ENV, **daemon.env()}
    proc = start_cli(*_unlock_args(big_archives, big_api, daemon), env=env, state_home=tmp_path)
    ctr: list[int] = []
    try:
        read_until(proc, lambda line: "Loading: 30%" in line or "Loading: 40%" in line, timeout=120)
        ctr = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGSTOP) if kill == "group" else os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _blobs(daemon) and time.monotonic() < deadline:
            time.sleep(0.02)
        mid = (sorted(_blobs(daemon)), os.listdir(daemon.ingest_dir) if daemon.ingest_dir.exists() else [])
        if kill == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ctr) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctr and not any(_alive(pid) for pid in ctr), "ctr ended"
    assert mid[0], "containerd had committed blobs of the archive when the process was killed"
    largest = max(size for _, size in members.values())
    if kill == "process":  # ctr failed on its own: give it and the garbage collector a moment
        deadline = time.monotonic() + 10
        while (_blobs(daemon) or daemon.leases()) and time.monotonic() < deadline:
            time.sleep(0.1)
    leases = daemon.leases()
    left = _blobs(daemon)
    if kill == "group" or leases:
        # ctr died before it could release its lease (killed with the CLI; or, alone, by the
        # SIGPIPE of writing its error to the dead CLI): the lease (24 h) holds the blobs it
        # had committed and its unfinished ingest until it expires and the collector runs.
        [(lease, labels)] = leases.items()
        expires = datetime.fromisoformat(labels.removeprefix("containerd.io/gc.expire=").replace("Z", "+00:00"))
        assert timedelta(hours=23, minutes=58) < expires - datetime.now(UTC) <= timedelta(hours=24), labels
        assert left and left <= {digest for digest, _ in members.values()}  # the archive's own members
        assert tree_bytes(daemon.ingest_dir) <= largest + 4096  # at most one unfinished blob
        print(
            f"\nkill {kill}: left {len(left)} blobs ({tree_bytes(daemon.content_dir / 'blobs'):,} bytes), "
            f"ingest {tree_bytes(daemon.ingest_dir):,} bytes, lease {labels}"
        )
        daemon.ctr("leases", "rm", "--sync", lease)
        assert _blobs(daemon) == set() and daemon.ctr("content", "active").stdout.splitlines()[1:] == []
    else:
        # ctr read the end of its input mid-member, failed and released its lease on the way
        # out: the garbage collector deleted every blob of the import at once.
        assert left == set()
        print(f"\nkill {kill}: ctr released its lease; no blob left")
    assert daemon.images() == {}  # no image record: nothing kubelet could see
    assert daemon.ctr("snapshots", "ls").stdout.splitlines()[1:] == []
    assert tree_bytes(daemon.ingest_dir) == 0
