"""Benchmark: ``imageunlock unlock`` against a plain ``docker load`` and the seeds' pipeline.

    .venv/bin/python benchmarks/bench_unlock.py [--rounds N] [--size-mib M] [--workdir DIR]

Brings up real parts only: a private dockerd (``tests.support.dockerd``, vfs, own socket), a
``docker save`` archive of the 7 default images (each ``M/7`` MiB of random payload, 1050 MiB
in all by default), encrypted with ``openssl enc -aes-256-cbc``, and the loopback resource
API (``tests.support.resource_api``) serving the key fragment. Then, interleaved, ``--rounds``
times each, with every image removed from the Engine before each measured run:

  (a) ``docker -H <sock> load -i plaintext.tar``            the floor: no decryption at all
  (b) ``imageunlock unlock --archive archive.enc ...``      the product (stream decrypt → Engine)
  (c) the seeds' Loader pipeline (``seeds_pipeline`` below, run as a child process): login,
      fetch fragment, decrypt to a plaintext tar on disk, ``docker load -i`` it, delete it,
      ``docker image inspect`` the 7 images

Every measured command is forked by a small launcher and reaped with ``os.wait4``, so its own
peak RSS (``ru_maxrss``) and the bytes it caused to be written to storage (``ru_oublock`` × 512,
the kernel's per-task I/O accounting, counted when pages are dirtied, so a file deleted before
write-back still counts) come from the kernel. Those figures cover the process and its reaped
descendants, not dockerd, which writes the loaded layers in every variant (shown apart).

It PRINTS figures and never asserts timings: the exit status is 0 whether or not targets are
met, and non-zero only when something failed to run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1 << 20
CHUNK = 64 * 1024  # the seeds' decrypt chunk
GEN_CHUNK = 1 * MIB  # random payload generation / streaming into `docker import`
VERSION = "9.9.9-bench"
EMAIL = "bench@example.test"
TARGET_RATIO = 1.05
TARGET_RSS_MIB = 150.0
TARGET_WRITE_PCT = 1.0


# ----------------------------------------------------------------------------------------
# (c) the seeds' pipeline, as the old Loader's binary_split module did it
# ----------------------------------------------------------------------------------------


def seeds_pipeline(archive: str, api_url: str, docker_host: str, version: str, images: list[str], out: str) -> None:
    """login → key fragment → decrypt to ``out`` (64 KiB chunks) → ``docker load -i`` → delete → inspect."""
    import hashlib

    import requests
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    email, password = os.environ["IMAGEUNLOCK_EMAIL"], os.environ["IMAGEUNLOCK_PASSWORD"]
    login = requests.post(f"{api_url}/login", json={"email": email, "password": password}, timeout=30)
    login.raise_for_status()
    token = login.json()["token"]
    response = requests.get(
        f"{api_url}/binary-split/key-fragment", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    key = hashlib.sha256(response.content).digest()

    # decrypt_archive(encrypted_path, key_fragment, output_path)
    with open(archive, "rb") as src, open(out, "wb") as dst:
        iv = src.read(16)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        while chunk := src.read(CHUNK):
            dst.write(unpadder.update(decryptor.update(chunk)))
        dst.write(unpadder.update(decryptor.finalize()) + unpadder.finalize())
    try:
        # docker_load(tar_path)
        subprocess.run(["docker", "-H", docker_host, "load", "-i", out], check=True, stdout=subprocess.DEVNULL, timeout=3600)
    finally:
        try:
            os.remove(out)
        except OSError as exc:
            print(f"seeds_pipeline: could not remove {out}: {exc}", file=sys.stderr)
    # check_images_loaded(version)
    for name in images:
        subprocess.run(
            ["docker", "-H", docker_host, "image", "inspect", f"{name}:{version}"],
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )


def _seeds_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_unlock.py seeds-pipeline")
    parser.add_argument("--archive", required=True)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--docker-host", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--image", action="append", required=True)
    args = parser.parse_args(argv)
    seeds_pipeline(args.archive, args.api_url, args.docker_host, args.version, args.image, args.out)
    return 0


# ----------------------------------------------------------------------------------------
# measuring a child process
# ----------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    round: int
    wall: float
    maxrss_mib: float
    oublock_bytes: int
    dockerd_write_bytes: int | None
    cpu: float
    dockerd_cpu: float | None
    returncode: int
    log: Path


# The measured command is forked by this small launcher (``python -S -I``, a few MiB), not by
# the benchmark itself: a child's ru_maxrss includes the RSS of the process it was forked from
# (the kernel keeps the pre-exec mm's high-water mark), which for this script is ~40 MiB and
# would hide the real peak. The launcher reports the floor this leaves (see rss_floor()).
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
    f.write(f"{wall!r} {status} {ru.ru_maxrss} {ru.ru_oublock} {ru.ru_utime + ru.ru_stime!r}\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Usage:
    wall: float
    returncode: int
    maxrss_kib: int
    oublock: int
    cpu: float = 0.0  # user + system seconds of the process and its reaped descendants


def run_measured(argv: list[str], *, env: dict[str, str], log: Path, timeout: float) -> Usage:
    """Run ``argv`` under the launcher; its wall time (fork to reap), exit code and rusage
    (``os.wait4``). Bounded by ``timeout``: then the whole process group is SIGKILLed."""
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
        return Usage(timeout, -9, 0, 0)
    try:
        wall, status, maxrss, oublock, cpu = result.read_text().split()
    except (OSError, ValueError):
        return Usage(0.0, proc.returncode or 1, 0, 0)
    return Usage(float(wall), os.waitstatus_to_exitcode(int(status)), int(maxrss), int(oublock), float(cpu))


def rss_floor(env: dict[str, str], workdir: Path) -> float:
    """ru_maxrss (MiB) the launcher reports for ``true``: the least any measured run can show."""
    usage = run_measured(["true"], env=env, log=workdir / "floor.log", timeout=60)
    return usage.maxrss_kib / 1024


def proc_cpu(pid: int) -> float | None:
    """user + system seconds of a live process (all its threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_write_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------
# setup: images, archive, resource API
# ----------------------------------------------------------------------------------------


def import_streamed(engine, ref: str, payload_bytes: int, logdir: Path) -> str:  # noqa: ANN001
    """``docker import -`` a rootfs tar generated on the fly: an identity file + ``payload_bytes``
    of os.urandom output, written straight into the CLI's stdin 1 MiB at a time."""
    import tarfile

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        return info.tobuf(tarfile.PAX_FORMAT)

    def pad(size: int) -> bytes:
        return bytes(-size % 512)

    out_path, err_path = logdir / "import.out", logdir / "import.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            ["docker", "-H", engine.url, "import", "-", ref], stdin=subprocess.PIPE, stdout=out, stderr=err
        )
        try:
            identity = (ref + "\n").encode()
            proc.stdin.write(header("etc/image-name", len(identity)) + identity + pad(len(identity)))
            proc.stdin.write(header("opt/payload.bin", payload_bytes))
            left = payload_bytes
            while left > 0:  # bounded: left shrinks by >= 1 each turn
                n = min(GEN_CHUNK, left)
                proc.stdin.write(os.urandom(n))
                left -= n
            proc.stdin.write(pad(payload_bytes) + bytes(2 * 512))
            proc.stdin.close()
            proc.wait(600)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"docker import {ref} failed: {err_path.read_text(errors='replace').strip()}")
    return out_path.read_text().strip()


def remove_images(engine) -> None:  # noqa: ANN001
    listed = engine.docker("images", "-q", "--no-trunc", text=True).stdout.split()
    if listed:
        engine.docker("rmi", "-f", *sorted(set(listed)), check=False)
    left = engine.docker("images", "-q", "--no-trunc", text=True).stdout.split()
    if left:
        raise RuntimeError(f"could not remove images from the Engine: {left}")


def images_present(engine, refs: list[str]) -> dict[str, str | None]:  # noqa: ANN001
    ids: dict[str, str | None] = {}
    for ref in refs:
        out = engine.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False, text=True)
        ids[ref] = out.stdout.strip() if out.returncode == 0 else None
    return ids


def human(n: float) -> str:
    return f"{n / MIB:,.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):,.2f} GiB"


# ----------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    floor_mib: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    runs: list[Run] = field(default_factory=list)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of a, b, c (default 3)")
    parser.add_argument(
        "--size-mib", type=int, default=1050,
        help="total random payload of the 7 images in MiB (default 1050 = 7 x 150; the archive is a bit larger)",
    )
    parser.add_argument(
        "--workdir", default=os.environ.get("IU_BENCH_TMP") or tempfile.gettempdir(),
        help="where the temporary directory with the large files goes (default: $IU_BENCH_TMP or the system temp dir)",
    )
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one measured run may take")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mib < 7:
        parser.error("--rounds must be >= 1 and --size-mib >= 7")

    from imageunlock.service import DEFAULT_IMAGES

    # Rough peak on disk: plaintext + archive + seeds' plaintext copy + dockerd's unpack + vfs.
    need = 6 * args.size_mib * MIB + (1 << 30)
    base = Path(args.workdir)
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"bench: {base} has {human(free)} free, needs about {human(need)}; use --workdir", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="iu-bench-", dir=base))
    engine = None
    api = None
    exit_code = 1
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t_total = time.monotonic()
    try:
        from tests.support.dockerd import Dockerd
        from tests.support.images import openssl_encrypt
        from tests.support.resource_api import FakeResourceApi

        names = list(DEFAULT_IMAGES)
        refs = [f"{n}:{VERSION}" for n in names]
        per_image = args.size_mib * MIB // len(names)
        print(f"bench: work dir {workdir} ({human(free)} free before)", flush=True)

        t0 = time.monotonic()
        engine = Dockerd(workdir / "dockerd").start()
        server_version = engine.docker("version", "--format", "{{.Server.Version}}", text=True).stdout.strip()
        print(f"bench: private dockerd {server_version} (pid {engine.proc.pid}) at {engine.url}", flush=True)

        ids = {}
        for ref in refs:
            ids[ref] = import_streamed(engine, ref, per_image, workdir)
            print(f"bench: imported {ref} ({human(per_image)} random payload)", flush=True)
        plaintext = workdir / "plaintext.tar"
        engine.docker("save", "-o", str(plaintext), *refs)
        remove_images(engine)
        fragment = secrets.token_bytes(32)
        archive = openssl_encrypt(plaintext, workdir / "archive.enc", fragment, os.urandom(16))
        archive_size = archive.stat().st_size
        print(
            f"bench: plaintext.tar {human(plaintext.stat().st_size)}, archive.enc {human(archive_size)} "
            f"({archive_size:,} bytes), built in {time.monotonic() - t0:.1f}s",
            flush=True,
        )

        password = "pw-" + secrets.token_hex(12)
        api = FakeResourceApi(EMAIL, password, fragment).start()
        print(f"bench: resource API at {api.url}", flush=True)

        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "DOCKER_"))}
        env.update(IMAGEUNLOCK_EMAIL=EMAIL, IMAGEUNLOCK_PASSWORD=password)
        cli = Path(sys.executable).with_name("imageunlock")
        commands = {
            "a": ["docker", "-H", engine.url, "load", "-i", str(plaintext)],
            "b": [
                str(cli), "unlock", "--archive", str(archive), "--version", VERSION,
                "--api-url", api.url, "--docker-host", engine.url,
            ],
            "c": [
                sys.executable, str(Path(__file__).resolve()), "seeds-pipeline",
                "--archive", str(archive), "--api-url", api.url, "--docker-host", engine.url,
                "--version", VERSION, "--out", str(workdir / "seeds-decrypted.tar"),
                *[arg for name in names for arg in ("--image", name)],
            ],
        }

        bench = Bench(args, workdir, floor_mib=rss_floor(env, workdir))
        bench.load_before = os.getloadavg()
        failed: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            for label in ("a", "b", "c"):
                remove_images(engine)
                os.sync()  # earlier runs' write-back must not land inside this measurement
                before = proc_write_bytes(engine.proc.pid)
                cpu_before = proc_cpu(engine.proc.pid)
                log = workdir / f"run-{rnd}-{label}.log"
                usage = run_measured(commands[label], env=env, log=log, timeout=args.run_timeout)
                after = proc_write_bytes(engine.proc.pid)
                cpu_after = proc_cpu(engine.proc.pid)
                rc, wall = usage.returncode, usage.wall
                run = Run(
                    label=label, round=rnd, wall=wall,
                    maxrss_mib=usage.maxrss_kib / 1024,  # KiB on Linux
                    oublock_bytes=usage.oublock * 512,
                    dockerd_write_bytes=(after - before) if before is not None and after is not None else None,
                    cpu=usage.cpu,
                    dockerd_cpu=(cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None,
                    returncode=rc, log=log,
                )
                if rc == 0:
                    present = images_present(engine, refs)
                    if present != ids:
                        rc = run.returncode = 1
                        with open(log, "a") as f:
                            f.write(f"\n[bench] images after the run: {present}\n[bench] expected: {ids}\n")
                bench.runs.append(run)
                status = "ok" if rc == 0 else f"FAILED (exit {rc})"
                print(
                    f"bench: round {rnd} ({label}) {wall:7.2f}s  cpu {run.cpu:6.2f}s  "
                    f"dockerd cpu {run.dockerd_cpu if run.dockerd_cpu is not None else float('nan'):6.2f}s  "
                    f"rss {run.maxrss_mib:6.1f} MiB  wrote {human(run.oublock_bytes)}  {status}",
                    flush=True,
                )
                if rc != 0:
                    failed.append(run)
                    print(f"--- {log.name} (tail) ---", file=sys.stderr)
                    print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            if failed:
                break

        report(bench, archive_size, per_image, len(names), server_version)
        exit_code = 1 if failed else 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        exit_code = 130
    except Exception as exc:  # noqa: BLE001 - report, then clean up
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if engine is not None:
            print(engine.tail(), file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        if api is not None:
            api.stop()
        if engine is not None:
            engine.stop()  # by PID (its process group), then its socket dir
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            print(f"bench: could not fully remove {workdir}", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous_term)
        print(f"bench: total {time.monotonic() - t_total:.1f}s, cleaned up {workdir}", file=sys.stderr)
    return exit_code


def _median_or_none(values: list) -> float | None:
    return statistics.median(values) if values and all(v is not None for v in values) else None


def report(bench: Bench, archive_size: int, per_image: int, n_images: int, server_version: str) -> None:
    ok = [r for r in bench.runs if r.returncode == 0]
    by = {label: [r for r in ok if r.label == label] for label in "abc"}
    if not all(by.values()):
        print("\nbench: not every variant completed a run; no summary", flush=True)
        return
    med = {k: statistics.median(r.wall for r in v) for k, v in by.items()}
    low = {k: min(r.wall for r in v) for k, v in by.items()}
    rss = {k: max(r.maxrss_mib for r in v) for k, v in by.items()}
    wrote = {k: max(r.oublock_bytes for r in v) for k, v in by.items()}
    dwrote = {k: _median_or_none([r.dockerd_write_bytes for r in v]) for k, v in by.items()}
    cpu = {k: statistics.median(r.cpu for r in v) for k, v in by.items()}
    dcpu = {k: _median_or_none([r.dockerd_cpu for r in v]) for k, v in by.items()}
    names = {
        "a": "(a) docker load -i plaintext.tar",
        "b": "(b) imageunlock unlock (stream)",
        "c": "(c) seeds: decrypt to disk + load",
    }
    rounds = len(by["a"])
    lines = [
        "",
        f"ImageUnlock benchmark: {n_images} images x {human(per_image)} payload, archive {human(archive_size)} "
        f"({archive_size:,} bytes)",
        f"{rounds} interleaved round(s) of a, b, c; dockerd {server_version} (vfs); {os.cpu_count()} CPU(s); "
        f"host load average (1 min) {bench.load_before[0]:.2f} before the runs, {os.getloadavg()[0]:.2f} after",
        "",
        f"{'variant':<35} {'median s':>8} {'min s':>7} {'CPU s':>6} {'dockerd CPU s':>13} "
        f"{'peak RSS':>10} {'own disk writes':>15} {'dockerd writes':>14}",
    ]
    for k in "abc":
        dw = human(dwrote[k]) if dwrote[k] is not None else "n/a"
        dc = f"{dcpu[k]:.2f}" if dcpu[k] is not None else "n/a"
        lines.append(
            f"{names[k]:<35} {med[k]:>8.2f} {low[k]:>7.2f} {cpu[k]:>6.2f} {dc:>13} "
            f"{rss[k]:>6.1f} MiB {human(wrote[k]):>15} {dw:>14}"
        )
    ratio_b = med["b"] / med["a"]
    ratio_c = med["c"] / med["a"]
    rss_b = rss["b"]
    pct_b = 100.0 * wrote["b"] / archive_size

    def verdict(ok_: bool) -> str:
        return "met" if ok_ else "NOT MET"

    lines += [
        "",
        f"ratio b/a (medians)  {ratio_b:6.3f}",
        f"ratio c/a (medians)  {ratio_c:6.3f}",
        f"peak RSS of (b)      {rss_b:6.1f} MiB   (ru_maxrss from os.wait4, max over runs; "
        f"floor of this measure {bench.floor_mib:.1f} MiB)",
        f"disk writes of (b)   {wrote['b']:,} bytes = {pct_b:.3f} % of the archive   "
        "(ru_oublock x 512 from os.wait4, max over runs)",
        "",
        "targets:",
        f"  b/a <= {TARGET_RATIO:.2f}                      {ratio_b:6.3f}       {verdict(ratio_b <= TARGET_RATIO)}",
        f"  peak RSS of (b) <= {TARGET_RSS_MIB:.0f} MiB         {rss_b:6.1f} MiB   {verdict(rss_b <= TARGET_RSS_MIB)}",
        f"  disk writes of (b) <= {TARGET_WRITE_PCT:.0f} % archive   {pct_b:6.3f} %     {verdict(pct_b <= TARGET_WRITE_PCT)}",
        "",
        "notes: wall time = fork to reap of the measured process (its start-up included), taken by a small",
        "launcher that forks it and reaps it with os.wait4 (so the benchmark's own RSS is not inherited); every",
        "run starts with no images in the Engine and after os.sync(); inputs are read from the page cache.",
        "'own disk writes' = the measured process's ru_oublock x 512 (kernel task I/O accounting: bytes it",
        "dirtied for storage, deleted files included); 'CPU s' = its ru_utime + ru_stime (medians); 'dockerd",
        "CPU s' and 'dockerd writes' = deltas of dockerd's /proc/<pid>/stat and /proc/<pid>/io over the run.",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "seeds-pipeline":
        sys.exit(_seeds_child(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
