"""Where the Docker Engine puts the plaintext of an unlock, for how long, and who can read it.

Measured on a real dockerd with ``imageunlock unlock`` (the CLI, as a user runs it) and a
~56 MiB archive, polling the Engine's directories every 20 ms (tests/support/disk.py). These
are the facts README ("Plaintext on the node") and SECURITY.md ("Where plaintext exists")
state; if the Engine changes its behaviour, these tests say so.

* By default the Engine unpacks the **whole** load body into ``<data-root>/tmp/docker-import-*``
  (on the data root's disk, root-only dirs) before it imports anything, and deletes it after.
* With ``DOCKER_TMPDIR`` on a tmpfs, that copy is in RAM: nothing of the import appears under
  the data root's ``tmp``; the layers still go to the storage driver (the images themselves).
* A SIGKILL of the unlocking process mid-load: the upload ends short, the Engine deletes its
  ``docker-import-*`` copy at once and creates no image and no layer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..support.ci import unavailable
from ..support.cli import CREDENTIALS_ENV, start_cli
from ..support.cli import read_until as read_progress
from ..support.disk import DirWatch, block_device, tree_bytes
from ..support.dockerd import Dockerd, DockerdError, load_events, loaded
from ..support.images import ArchiveSet
from ..support.resource_api import FakeResourceApi

pytestmark = pytest.mark.docker

IMPORT_PREFIX = "docker-import-"  # moby's os.MkdirTemp("", "docker-import-") for every load
GONE_WITHIN_S = 10.0  # the Engine's copy is gone this soon after the upload is cut (measured: < 1 s)


def _unlock_args(archives: ArchiveSet, api: FakeResourceApi, engine: Dockerd) -> list[str]:
    return [
        "unlock", "--archive", str(archives.openssl_archive), "--version", archives.version,
        "--api-url", api.url, "--docker-host", engine.url,
    ]  # fmt: skip


def _unlock_watched(
    archives: ArchiveSet, api: FakeResourceApi, engine: Dockerd, watched: list[Path], state: Path
) -> tuple[DirWatch, int]:
    """Run the CLI's unlock to its end while polling ``watched``; (the watch, its exit code)."""
    with DirWatch(watched) as watch:
        proc = start_cli(*_unlock_args(archives, api, engine), env=CREDENTIALS_ENV, state_home=state)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    return watch, proc.returncode


def _engine_writes(engine: Dockerd) -> int:
    """write_bytes of dockerd (and its reaped children: the untar runs in one) so far."""
    assert engine.proc is not None
    with open(f"/proc/{engine.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def test_by_default_the_engine_copies_the_whole_load_body_to_its_data_root(
    clean_docker, big_archives, big_api, tmp_path
):
    tar_bytes = big_archives.plaintext.stat().st_size
    temp = clean_docker.temp_dir
    assert temp == clean_docker.data_root / "tmp"
    before = _engine_writes(clean_docker)
    watch, _ = _unlock_watched(big_archives, big_api, clean_docker, [temp], tmp_path)
    written = _engine_writes(clean_docker) - before
    assert loaded(clean_docker) == big_archives.ids
    seen = watch[temp]
    imports = sorted(n for n in seen.names if n.startswith(IMPORT_PREFIX))
    assert imports, f"no {IMPORT_PREFIX}* seen in {temp} ({watch.samples} samples)"
    # the whole body, unpacked: every member of the archive at its full size, on the data root's disk
    assert seen.peak_bytes >= 0.95 * tar_bytes, (seen.peak_bytes, tar_bytes)
    assert block_device(temp) is not None, "the data root's tmp is on a block device"
    # and the Engine wrote it: the copy plus the layers, about twice the tar
    assert written >= 1.5 * tar_bytes, (written, tar_bytes)
    # who can read it: root, alone
    modes = {Path(path).name: info for path, info in seen.dirs.items()}
    assert modes["tmp"].mode == 0o700 and modes["tmp"].uid == 0, modes["tmp"]
    for name in imports:
        assert modes[name].mode == 0o700 and modes[name].uid == 0, modes[name]
    # gone at the end of the load: only the images remain (their layers, in the storage driver)
    assert os.listdir(temp) == []
    print(
        f"\ndefault temp dir: peak {seen.peak_bytes:,} bytes of a {tar_bytes:,}-byte tar at {seen.peak_at:.2f}s; "
        f"dockerd wrote {written:,} bytes; modes {[i.describe() for i in seen.dirs.values()]}"
    )


@pytest.fixture
def engine_tmp_on_tmpfs(tmp_path: Path):
    """A private dockerd, data root on disk, ``DOCKER_TMPDIR`` on a tmpfs this fixture mounts."""
    mount = tmp_path / "engine-tmp"
    mount.mkdir()
    if os.geteuid() != 0:
        unavailable("a tmpfs for DOCKER_TMPDIR", "mounting needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0700,size=1g", "iu-engine-tmp", str(mount)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        unavailable("a tmpfs for DOCKER_TMPDIR", done.stderr.strip())
    engine = Dockerd(tmp_path / "dockerd", env={"DOCKER_TMPDIR": str(mount)})
    try:
        try:
            engine.start()
        except DockerdError as exc:
            unavailable("dockerd with DOCKER_TMPDIR", str(exc))
        yield engine
    finally:
        engine.stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


def test_with_docker_tmpdir_on_tmpfs_the_load_body_never_reaches_the_data_root(
    engine_tmp_on_tmpfs, big_archives, big_api, tmp_path
):
    engine = engine_tmp_on_tmpfs
    tar_bytes = big_archives.plaintext.stat().st_size
    mount = engine.temp_dir
    assert block_device(mount) is None and block_device(engine.data_root) is not None  # RAM vs. disk
    disk_tmp = engine.data_root / "tmp"
    before = _engine_writes(engine)
    watch, _ = _unlock_watched(big_archives, big_api, engine, [mount, disk_tmp], tmp_path)
    written = _engine_writes(engine) - before
    assert loaded(engine) == big_archives.ids
    on_tmpfs, on_disk = watch[mount], watch[disk_tmp]
    assert any(n.startswith(IMPORT_PREFIX) for n in on_tmpfs.names), on_tmpfs.names
    assert on_tmpfs.peak_bytes >= 0.95 * tar_bytes, (on_tmpfs.peak_bytes, tar_bytes)  # the whole copy, in RAM
    assert on_disk.peak_bytes == 0 and not any(n.startswith(IMPORT_PREFIX) for n in on_disk.names), on_disk
    assert tree_bytes(disk_tmp) == 0 and os.listdir(mount) == []  # and nothing stays, anywhere
    # what the Engine still wrote to disk: the layers (the images), not a second copy of the tar
    assert written < 1.5 * tar_bytes, (written, tar_bytes)
    print(
        f"\nDOCKER_TMPDIR on tmpfs: peak {on_tmpfs.peak_bytes:,} bytes there, {on_disk.peak_bytes} under "
        f"<data-root>/tmp; dockerd wrote {written:,} bytes for a {tar_bytes:,}-byte tar"
    )


def test_sigkill_mid_load_leaves_no_copy_no_image_no_layer(clean_docker, big_archives, big_api, tmp_path):
    """kill -9 of the unlocking process once it is Loading: what remains, and where."""
    temp = clean_docker.temp_dir
    layers = clean_docker.data_root / "vfs" / "dir"
    layers_before = set(os.listdir(layers)) if layers.exists() else set()
    since = time.time()
    with DirWatch([temp]) as watch:
        proc = start_cli(*_unlock_args(big_archives, big_api, clean_docker), env=CREDENTIALS_ENV, state_home=tmp_path)
        try:
            read_progress(proc, lambda line: "Loading: 30%" in line or "Loading: 40%" in line, timeout=120)
            os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-upload: look at the Engine, then kill
            deadline = time.monotonic() + 10
            while tree_bytes(temp) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            mid_load = tree_bytes(temp)
            names = [n for n in os.listdir(temp) if n.startswith(IMPORT_PREFIX)]
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        deadline = killed + 30
        while os.listdir(temp) and time.monotonic() < deadline:
            time.sleep(0.01)
        gone_after = time.monotonic() - killed
    assert proc.returncode == -signal.SIGKILL
    assert names and mid_load > 0, "the Engine had begun unpacking the body when the process was killed"
    assert os.listdir(temp) == [], f"left in {temp}: {os.listdir(temp)}"
    assert gone_after < GONE_WITHIN_S, gone_after
    assert loaded(clean_docker) == {} and load_events(clean_docker, since) == 0
    assert clean_docker.docker("images", "-a", "-q", text=True).stdout.split() == []
    assert (set(os.listdir(layers)) if layers.exists() else set()) == layers_before, "a layer was made"
    print(
        f"\nSIGKILL mid-load: {mid_load:,} bytes in {names} when killed; emptied {gone_after:.3f}s after; "
        f"peak {watch[temp].peak_bytes:,}"
    )
