"""Where bytes land on disk while a runtime imports: directory polling, file modes, and the
block device's own write counter. Shared by the tests (tests/docker, tests/containerd) and
the benchmark (benchmarks/bench_unlock.py), so the figures the docs quote and the facts the
tests assert are taken the same way.

* :class:`DirWatch` polls directories (every ``interval`` s, on a thread) and keeps, per
  directory, the peak of the bytes present (the sum of the sizes of the regular files below
  it), every entry name seen directly below it, and the mode and owner of the directories
  seen. Polling can miss a file that lives for less than one interval, never a large one:
  writing hundreds of MiB takes far longer than the interval.
* :func:`block_device` names the block device a path lives on (``None`` on tmpfs and other
  file systems without one), :func:`device_write_bytes` reads its sectors-written counter
  from ``/proc/diskstats``: what really reached the device, from every process on the host.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's own size


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below ``path`` (apparent sizes; 0 when it does not exist).
    Files that vanish while it walks are skipped: the runtime is busy there."""
    total = 0
    stack = [str(path)]
    while stack:  # bounded by the tree: each directory is visited once
        top = stack.pop()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class DirInfo:
    """A directory's mode (permission bits) and owner, as seen while it existed."""

    path: str
    mode: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"{self.path} {self.mode:04o} uid {self.uid} gid {self.gid}"


@dataclass
class Watched:
    path: Path
    peak_bytes: int = 0
    peak_at: float | None = None  # seconds after the watch started
    names: set[str] = field(default_factory=set)  # entries seen directly below ``path``
    dirs: dict[str, DirInfo] = field(default_factory=dict)  # ``path`` and its direct subdirectories


class DirWatch:
    """Poll ``paths`` until :meth:`stop`; ``with DirWatch([...]) as watch:`` does both."""

    def __init__(self, paths: list[Path], interval: float = 0.02) -> None:
        self.watched = {Path(p): Watched(Path(p)) for p in paths}
        self.interval = interval
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dir-watch", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> DirWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DirWatch:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> DirWatch:
        self._stop.set()
        self._thread.join(30)
        self.sample()  # the state at the end counts too
        return self

    def __getitem__(self, path: Path) -> Watched:
        return self.watched[Path(path)]

    def _run(self) -> None:
        while not self._stop.is_set():  # ends with stop(); each sample is a bounded walk
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        self.samples += 1
        now = time.monotonic() - self._start
        for watched in self.watched.values():
            size = tree_bytes(watched.path)
            if size > watched.peak_bytes:
                watched.peak_bytes, watched.peak_at = size, now
            try:
                with os.scandir(watched.path) as entries:
                    below = [(e.name, e.path) for e in entries]
            except OSError:
                continue
            for name, path in [(watched.path.name, str(watched.path)), *below]:
                if path != str(watched.path):
                    watched.names.add(name)
                if path in watched.dirs:
                    continue
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    watched.dirs[path] = DirInfo(path, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)


def block_device(path: Path) -> str | None:
    """The block device (``/proc/diskstats`` name) holding ``path``; ``None`` for tmpfs and
    other file systems with no device (major number 0), or when it cannot be told."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:  # bounded: climbs to /
        probe = probe.parent
    dev = os.stat(probe).st_dev
    if os.major(dev) == 0:
        return None
    link = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return Path(os.path.realpath(link)).name if link.exists() else None


def device_write_bytes(devices: set[str] | frozenset[str]) -> dict[str, int]:
    """``{device: bytes written to it since boot}`` (sectors written x 512, /proc/diskstats)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 10 and fields[2] in devices:
                    found[fields[2]] = int(fields[9]) * SECTOR
    except OSError:
        pass
    return found


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``, e.g. ``8m``) mounted at ``path`` (created if
    absent; needs root), unmounted at the end: a daemon's data root that fills up."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode:
        raise OSError(f"mount tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        with open("/proc/self/mounts") as mounts:
            mounted = any(line.split()[1] == str(path) for line in mounts)
        if mounted and subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def used_bytes(path: Path) -> int:
    """Bytes in use on the file system holding ``path`` (``statvfs``, as ``df`` counts)."""
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize
