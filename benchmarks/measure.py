"""Measuring one command: wall time, own CPU, peak RSS and disk writes, from the kernel.

Every measured command is forked by a small launcher and reaped with ``os.wait4``, so its
figures come from its rusage: ``ru_utime + ru_stime`` (own CPU: the process and the children
it reaped, never a daemon it talks to), ``ru_maxrss`` (peak RSS) and ``ru_oublock`` x 512 (the
bytes it caused to be written to storage: the kernel's per-task I/O accounting, counted when
pages are dirtied, so a file deleted before write-back still counts). A daemon's share (the
Engine's) is read apart, from ``/proc/<pid>/stat`` and ``/proc/<pid>/io`` deltas.

CPU time is steady from run to run on a shared machine; wall time is not (it waits on the
other tenants and on the Engine): the report says which is which.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The measured command is forked by this small launcher (``python -S -I``, a few MiB), not by
# the benchmark itself: a child's ru_maxrss includes the RSS of the process it was forked from
# (the kernel keeps the pre-exec mm's high-water mark), which for the benchmark is ~40 MiB and
# would hide the real peak. ``rss_floor()`` reports the floor this leaves.
LAUNCHER = r"""
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    f.write(f"{wall!r} {status} {ru.ru_maxrss} {ru.ru_oublock} {ru.ru_utime!r} {ru.ru_stime!r}\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class Usage:
    wall: float  # seconds, fork to reap
    returncode: int
    maxrss_kib: int = 0
    oublock: int = 0  # 512-byte units
    user: float = 0.0  # seconds, the process and its reaped descendants
    sys: float = 0.0

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def rss_mib(self) -> float:
        return self.maxrss_kib / 1024  # ru_maxrss is in KiB on Linux

    @property
    def write_bytes(self) -> int:
        return self.oublock * 512


def run_measured(argv: list[str], *, env: dict[str, str], log: Path, timeout: float) -> Usage:
    """Run ``argv`` under the launcher, output to ``log``; its wall time, exit code and rusage.
    Bounded by ``timeout``: then its whole process group is SIGKILLed."""
    result = log.with_suffix(".rusage")
    result.unlink(missing_ok=True)
    launcher = [sys.executable, "-S", "-I", "-c", LAUNCHER, str(result), *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            launcher, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:  # the group exists while its unreaped leader does: no PID-reuse race
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)  # returns at once: exited or SIGKILLed
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the measured group down too
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
            raise
        finally:
            os.close(pidfd)
    if not ready:
        with open(log, "ab") as out:
            out.write(f"\n[bench] killed after {timeout:.0f}s\n".encode())
        return Usage(timeout, -9)
    try:
        wall, status, maxrss, oublock, user, sys_ = result.read_text().split()
    except (OSError, ValueError):
        return Usage(0.0, proc.returncode or 1)
    return Usage(
        float(wall), os.waitstatus_to_exitcode(int(status)), int(maxrss), int(oublock), float(user), float(sys_)
    )


def rss_floor(env: dict[str, str], workdir: Path) -> float:
    """ru_maxrss (MiB) the launcher reports for ``true``: the least any measured run can show."""
    return run_measured(["true"], env=env, log=workdir / "rss-floor.log", timeout=60).rss_mib


# ----------------------------------------------------------------------------------------
# a daemon's share, read apart
# ----------------------------------------------------------------------------------------


def proc_cpu(pid: int | None) -> float | None:
    """user + system seconds of a live process (all its threads) from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_write_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------
# the host
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cpus: int
    aes: bool  # AES instructions (x86 "aes", ARM "aes")
    sha: bool  # SHA-256 instructions (x86 "sha_ni", ARM "sha2")
    flags: tuple[str, ...]  # the flags that said so

    def describe(self) -> str:
        def say(name: str, present: bool, wanted: tuple[str, ...]) -> str:
            found = [flag for flag in self.flags if flag in wanted]
            return f"{name} {'yes (' + ', '.join(found) + ')' if present else 'NO'}"

        return (
            f"{self.model}, {self.cpus} CPU(s); "
            f"{say('AES instructions', self.aes, _AES_FLAGS)}, {say('SHA-256 instructions', self.sha, _SHA_FLAGS)}"
        )


_AES_FLAGS = ("aes",)
_SHA_FLAGS = ("sha_ni", "sha2", "sha")


def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """What /proc/cpuinfo says about the first CPU: its model, and whether it has AES and SHA
    instructions (the ``flags`` line on x86, ``Features`` on ARM)."""
    model, flags = "unknown CPU", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model == "unknown CPU":
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return CpuInfo(
        model=model,
        cpus=os.cpu_count() or 1,
        aes=any(flag in flags for flag in _AES_FLAGS),
        sha=any(flag in flags for flag in _SHA_FLAGS),
        flags=tuple(sorted(flag for flag in flags if flag in _AES_FLAGS + _SHA_FLAGS)),
    )


# ----------------------------------------------------------------------------------------
# figures over rounds
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how much the figure moved from round to round."""
        return 100.0 * (self.high - self.low) / self.median if self.median else 0.0

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        return {
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
            "spread_pct": round(self.spread_pct, 1),
        }
