"""Benchmark: the unlock's own CPU against the hardware floor, and every pipeline's wall time.

    make bench                                        # 1050 MiB archive, 7 rounds: ~10 min
    IU_BENCH_SIZE_MIB=256 IU_BENCH_ROUNDS=9 make bench
    IU_BENCH_TMPFS=1 make bench                       # the Engine's data root on tmpfs
    IU_BENCH_ENGINE_TMP_TMPFS=1 make bench            # only Docker's DOCKER_TMPDIR on tmpfs
    .venv/bin/python benchmarks/bench_unlock.py --smoke --json report.json   # < 1 min

Brings up real parts only (``workload``): a private dockerd, a ``docker save`` archive of the
7 default images (random payload, ``--size-mib`` in all) encrypted with ``openssl enc``, and
the loopback resource API serving the key fragment. Then ``--rounds`` interleaved rounds of:

  floor parts  ``openssl enc -d`` of the archive body, ``openssl dgst -sha256`` of the plaintext
  (a)          ``docker load -i plaintext.tar``: the docker CLI sending the plaintext (the
               floor's last part: floor = enc -d + dgst + (a), the same bytes, the same round)
  (b)          ``imageunlock unlock``: the product (stream decrypt, verify, upload)
  (c)          the seeds' pipeline (``seeds.py``): decrypt to disk, ``docker load -i``, delete
  (f)          naive: ``openssl enc -d ... -in body | docker load``: the stream a user would
               write instead (no login, no hash, no checks): (b)'s wall-time anchor
  (d)          ``ctr -a SOCK -n k8s.io images import --local --all-platforms - < plaintext.tar``:
               ctr's client-side import (the mode the product runs) sending the plaintext to a
               private containerd (the tests' harness, Debian sid's 2.x build): containerd's
               floor's last part (floor = enc -d + dgst + (d))
  (e)          ``imageunlock unlock --runtime containerd --containerd-address SOCK
               --containerd-namespace k8s.io``
  (g)          naive: ``openssl enc -d ... | ctr ... images import --local --all-platforms -``:
               (e)'s wall-time anchor

each load starting with no images in the Engine (containerd: ``images rm --sync`` of every
k8s.io record and its leases, so the content is garbage-collected and every round imports for
real), and checked to have loaded the archive's image IDs (containerd: the config digests).
``measure`` takes each command's figures from the kernel (rusage); ``report``
prints them: own CPU (steady) and the ratio own CPU / floor, wall median and spread (noisy),
peak RSS, disk writes, the Engine's share apart, and whether the CPU has AES and SHA
instructions; and disk system-wide (``measure_one``): own and runtime writes, what reached the
block device, the peak bytes in the runtime's temp dir (Docker's docker-import-* copy of the
whole load body, containerd's ingest dir) and in the pipeline's scratch dir, the image store
after. It never asserts timings: the exit status is non-zero only when something failed.

A runtime joins by adding its Engine to ``ENGINES`` (start, url, pid, reset, image_ids, stop:
see ``workload.Engine`` and ``workload.ContainerdEngine``) and its steps to ``PIPELINES``: a
SEND step (its own CLI importing the plaintext: its floor's last part), an UNLOCK step and a
NAIVE step (``openssl enc -d`` piped into its CLI: the UNLOCK's wall is reported over it,
round by round).

Options also come from the environment: IU_BENCH_SIZE_MIB, IU_BENCH_ROUNDS, IU_BENCH_TMPFS=1,
IU_BENCH_ENGINE_TMP_TMPFS=1, IU_BENCH_SMOKE=1, IU_BENCH_PIPELINES=a,b, IU_BENCH_JSON=path, IU_BENCH_TMP=dir.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import seeds  # noqa: E402
from benchmarks.measure import cpu_info, proc_cpu, proc_write_bytes, rss_floor, run_measured  # noqa: E402
from benchmarks.report import BASELINE, FLOOR, NAIVE, SEND, UNLOCK, Run, Step, render, summarize  # noqa: E402
from benchmarks.workload import MIB, Archive, ContainerdEngine, Engine, build_archive, human  # noqa: E402
from tests.support.disk import DirInfo, DirWatch, block_device, device_write_bytes, tree_bytes  # noqa: E402

VERSION = "9.9.9-bench"
EMAIL = "bench@example.test"
DEFAULTS = {"size_mib": 1050, "rounds": 7}  # 7 x 150 MiB: a 1.03 GiB archive
SMOKE = {"size_mib": 7, "rounds": 2}  # tiny: proves the benchmark runs, in well under a minute
SCRATCH = "scratch"  # below the work dir: where a pipeline writes its own files (the seeds' tar)
POLL_INTERVAL = 0.05  # s between two looks at the runtime's temp dir and the scratch dir


@dataclass(frozen=True)
class Context:
    """What a pipeline's command line is made from."""

    archive: Archive
    engines: dict[str, Any]  # runtime: Engine | ContainerdEngine
    api_url: str
    names: list[str]
    workdir: Path
    python: str
    cli: str  # the installed ``imageunlock`` console script


@dataclass(frozen=True)
class Pipeline:
    step: Step
    argv: Callable[[Context], list[str]]


def _unlock(ctx: Context) -> list[str]:
    return [
        ctx.cli, "unlock", "--runtime", "docker", "--archive", str(ctx.archive.archive), "--version", VERSION,
        "--api-url", ctx.api_url, "--docker-host", ctx.engines["docker"].url,
    ]  # fmt: skip


def _unlock_containerd(ctx: Context) -> list[str]:
    engine = ctx.engines["containerd"]
    return [
        ctx.cli, "unlock", "--runtime", "containerd", "--archive", str(ctx.archive.archive), "--version", VERSION,
        "--api-url", ctx.api_url, "--containerd-address", engine.url,
        "--containerd-namespace", ContainerdEngine.NAMESPACE,
    ]  # fmt: skip


def _ctr_import(ctx: Context) -> list[str]:
    """``ctr -a SOCK -n k8s.io images import --local --all-platforms -`` reading the plaintext on
    its stdin: the client-side import, the mode the product runs (plain ``import -`` hands the
    stream to containerd's transfer service, which costs ctr ~3 x as much CPU: a weak floor).
    The shell only redirects and ``exec``s: the measured process is ctr (its own CPU, never
    containerd's)."""
    engine = ctx.engines["containerd"]
    script = 'exec "$0" -a "$1" -n "$2" images import --local --all-platforms - < "$3"'
    return ["sh", "-c", script, engine.ctr, engine.url, ContainerdEngine.NAMESPACE, str(ctx.archive.plaintext)]


# The naive streaming pipelines a user would write instead: ``openssl enc -d`` of the archive
# body piped into the runtime's CLI. No login, no key fetch, no IV split (the body is given
# with the IV apart), no hash, no check of what the archive names: the least a stream can do,
# so a wall-time anchor. bash waits for both ends and fails with either (pipefail); its rusage
# is openssl's + the CLI's (bash's own is ~1 ms).
_NAIVE = 'set -o pipefail; openssl enc -d -aes-256-cbc -K "$1" -iv "$2" -in "$3" | '


def _naive_docker(ctx: Context) -> list[str]:
    script = _NAIVE + 'docker -H "$4" load'
    a = ctx.archive
    return ["bash", "-c", script, "naive", a.key_hex, a.iv_hex, str(a.body), ctx.engines["docker"].url]


def _naive_ctr(ctx: Context) -> list[str]:
    engine, a = ctx.engines["containerd"], ctx.archive
    script = _NAIVE + '"$4" -a "$5" -n "$6" images import --local --all-platforms -'
    args = [a.key_hex, a.iv_hex, str(a.body), engine.ctr, engine.url, ContainerdEngine.NAMESPACE]
    return ["bash", "-c", script, "naive", *args]


def _seeds(ctx: Context) -> list[str]:
    out = str(ctx.workdir / SCRATCH / "seeds-decrypted.tar")
    url = ctx.engines["docker"].url
    return seeds.command(ctx.python, str(ctx.archive.archive), ctx.api_url, url, VERSION, out, ctx.names)


def _openssl_decrypt(ctx: Context) -> list[str]:
    key, iv, body = ctx.archive.key_hex, ctx.archive.iv_hex, str(ctx.archive.body)
    return ["openssl", "enc", "-d", "-aes-256-cbc", "-K", key, "-iv", iv, "-in", body, "-out", os.devnull]


FLOOR_PARTS: tuple[Pipeline, ...] = (
    Pipeline(Step("enc-d", "openssl enc -d (archive body)", FLOOR), _openssl_decrypt),
    Pipeline(
        Step("dgst", "openssl dgst -sha256 (plaintext)", FLOOR),
        lambda c: ["openssl", "dgst", "-sha256", str(c.archive.plaintext)],
    ),
)

# The pipelines, per runtime: a SEND step (the floor's last part) and the steps compared with it.
PIPELINES: tuple[Pipeline, ...] = (
    Pipeline(
        Step("a", "docker load -i plaintext.tar", SEND, "docker"),
        lambda c: ["docker", "-H", c.engines["docker"].url, "load", "-i", str(c.archive.plaintext)],
    ),
    Pipeline(Step("b", "imageunlock unlock (stream)", UNLOCK, "docker"), _unlock),
    Pipeline(Step("c", "seeds: decrypt to disk + docker load", BASELINE, "docker"), _seeds),
    Pipeline(Step("f", "naive: openssl enc -d | docker load", NAIVE, "docker"), _naive_docker),
    Pipeline(Step("d", "ctr import --local --all-platforms -", SEND, "containerd"), _ctr_import),
    Pipeline(Step("e", "imageunlock unlock --runtime containerd", UNLOCK, "containerd"), _unlock_containerd),
    Pipeline(Step("g", "naive: openssl enc -d | ctr import --local", NAIVE, "containerd"), _naive_ctr),
)

ENGINES: dict[str, Callable[[Path, argparse.Namespace], Engine | ContainerdEngine]] = {
    "docker": lambda root, args: Engine(root, tmpfs=args.tmpfs, tmpdir_tmpfs=args.engine_tmp_tmpfs),
    "containerd": lambda root, args: ContainerdEngine(root, tmpfs=args.tmpfs),
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--size-mib", type=int, default=_env_int("IU_BENCH_SIZE_MIB"),
        help="random payload of the 7 images in all, MiB; the archive is a bit larger "
        f"($IU_BENCH_SIZE_MIB; default {DEFAULTS['size_mib']}, smoke {SMOKE['size_mib']})",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=_env_int("IU_BENCH_ROUNDS"),
        help=f"interleaved rounds ($IU_BENCH_ROUNDS; default {DEFAULTS['rounds']}, smoke {SMOKE['rounds']})",
    )  # fmt: skip
    parser.add_argument(
        "--tmpfs", action="store_true", default=_env_flag("IU_BENCH_TMPFS"),
        help="put the private Engine's data root on a tmpfs (needs root), so disk noise drops out ($IU_BENCH_TMPFS=1)",
    )  # fmt: skip
    parser.add_argument(
        "--engine-tmp-tmpfs", action="store_true", default=_env_flag("IU_BENCH_ENGINE_TMP_TMPFS"),
        help="only the Docker Engine's temp dir (DOCKER_TMPDIR, where it unpacks every load) on a tmpfs, "
        "its data root on disk unless --tmpfs (needs root) ($IU_BENCH_ENGINE_TMP_TMPFS=1)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", default=_env_flag("IU_BENCH_SMOKE"),
        help="a tiny archive and 2 rounds: proves the benchmark works, figures meaningless ($IU_BENCH_SMOKE=1)",
    )  # fmt: skip
    parser.add_argument(
        "--pipelines", default=os.environ.get("IU_BENCH_PIPELINES", ""),
        help="comma-separated pipeline keys to run (default all; each runtime's SEND step is always run, "
        "it is part of the floor) ($IU_BENCH_PIPELINES)",
    )  # fmt: skip
    parser.add_argument("--json", default=os.environ.get("IU_BENCH_JSON"), help="also write the summary as JSON here")
    parser.add_argument(
        "--workdir", default=os.environ.get("IU_BENCH_TMP") or tempfile.gettempdir(),
        help="where the temporary directory with the large files goes ($IU_BENCH_TMP or the system temp dir)",
    )  # fmt: skip
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one measured run may take")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else DEFAULTS
    args.size_mib = preset["size_mib"] if args.size_mib is None else args.size_mib
    args.rounds = preset["rounds"] if args.rounds is None else args.rounds
    if args.rounds < 1 or args.size_mib < 7:
        parser.error("rounds must be >= 1 and the size >= 7 MiB")
    known = {p.step.key for p in PIPELINES}
    wanted = {key.strip() for key in args.pipelines.split(",") if key.strip()} or known
    if wanted - known:
        parser.error(f"unknown pipeline(s) {sorted(wanted - known)}; known: {sorted(known)}")
    runtimes = {p.step.runtime for p in PIPELINES if p.step.key in wanted}
    wanted |= {p.step.key for p in PIPELINES if p.step.role == SEND and p.step.runtime in runtimes}
    args.selected = [p for p in PIPELINES if p.step.key in wanted]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from imageunlock.defaults import DEFAULT_IMAGES

    # Rough peak on disk: plaintext + body + archive + the seeds' plaintext, and unless on
    # tmpfs the Engine's copy of the tar while it loads and its layers (vfs).
    size = args.size_mib * MIB
    need = (4 if args.tmpfs else 6) * size + (256 * MIB if args.smoke else 1 << 30)
    runtimes = {p.step.runtime for p in args.selected if p.step.runtime}
    if "containerd" in runtimes and not args.tmpfs:
        need += 2 * size  # containerd's content store and snapshots
    base = Path(args.workdir)
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"bench: {base} has {human(free)} free, needs about {human(need)}; use --workdir", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="iu-bench-", dir=base))
    engines: dict[str, Engine | ContainerdEngine] = {}
    api = None
    exit_code = 1
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t_total = time.monotonic()
    try:
        from tests.support.resource_api import FakeResourceApi

        names = list(DEFAULT_IMAGES)
        refs = [f"{n}:{VERSION}" for n in names]
        per_image = size // len(names)
        print(f"bench: work dir {workdir} ({human(free)} free before)", flush=True)
        t0 = time.monotonic()
        engine_info: dict[str, dict[str, str]] = {}
        for runtime in sorted(runtimes | {"docker"}):  # docker builds the archive
            engine = engines[runtime] = ENGINES[runtime](workdir / runtime, args).start()
            engine_info[runtime] = engine.describe()
            print(f"bench: private {runtime} {engine_info[runtime]} (pid {engine.pid}) at {engine.url}", flush=True)
        fragment = secrets.token_bytes(32)
        archive = build_archive(engines["docker"], workdir, refs, per_image, fragment)
        print(
            f"bench: plaintext.tar {human(archive.plaintext.stat().st_size)}, archive.enc {human(archive.size)} "
            f"({archive.size:,} bytes), built in {time.monotonic() - t0:.1f}s",
            flush=True,
        )
        password = "pw-" + secrets.token_hex(12)
        api = FakeResourceApi(EMAIL, password, fragment).start()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "DOCKER_"))}
        env.update(IMAGEUNLOCK_EMAIL=EMAIL, IMAGEUNLOCK_PASSWORD=password, XDG_STATE_HOME=str(workdir / "state"))
        if "containerd" in engines:  # `imageunlock unlock --runtime containerd` runs the `ctr` on PATH
            bin_dir = engines["containerd"].bin_dir
            env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        cli = str(Path(sys.executable).with_name("imageunlock"))
        (workdir / SCRATCH).mkdir()
        ctx = Context(archive, engines, api.url, names, workdir, sys.executable, cli)
        order = [*FLOOR_PARTS, *args.selected]
        floor_rss = rss_floor(env, workdir)
        load_before = os.getloadavg()[0]
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            for pipeline in order:
                run = measure_one(pipeline, rnd, ctx, env, refs, args.run_timeout)
                runs.append(run)
                print(
                    f"bench: round {rnd} {pipeline.step.key:>5}  cpu {run.usage.cpu:6.2f}s "
                    f"(user {run.usage.user:5.2f} sys {run.usage.sys:5.2f})  wall {run.usage.wall:7.2f}s  "
                    f"rss {run.usage.rss_mib:6.1f} MiB  wrote {human(run.usage.write_bytes)}  "
                    f"engine wrote {'-' if run.engine_write_bytes is None else human(run.engine_write_bytes)}  "
                    f"device {'-' if run.device_write_bytes is None else human(run.device_write_bytes)}  "
                    f"temp peak {'-' if run.temp_peak_bytes is None else human(run.temp_peak_bytes)}  "
                    f"{'ok' if run.ok else f'FAILED (exit {run.usage.returncode})'}",
                    flush=True,
                )
                if not run.ok:
                    print(f"--- {run.log.name} (tail) ---", file=sys.stderr)
                    print("\n".join(run.log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            if not all(run.ok for run in runs):
                break
        steps = [p.step for p in order]
        cpu = cpu_info()
        summary = summarize(
            steps=steps, runs=runs, rounds=args.rounds, archive_bytes=archive.size, images=len(names),
            payload_per_image=per_image, cpu=cpu, engines=engine_info, load_before=load_before,
            load_after=os.getloadavg()[0], rss_floor_mib=floor_rss,
        )  # fmt: skip
        summary["smoke"] = args.smoke
        print(render(summary, steps, cpu), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        exit_code = 0 if all(run.ok for run in runs) else 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        exit_code = 130
    except Exception as exc:  # report, then clean up
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for engine in engines.values():
            print(engine.tail(), file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        if api is not None:
            api.stop()
        for engine in engines.values():
            engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            print(f"bench: could not fully remove {workdir}", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous_term)
        print(f"bench: total {time.monotonic() - t_total:.1f}s, cleaned up {workdir}", file=sys.stderr)
    return exit_code


def measure_one(
    pipeline: Pipeline, rnd: int, ctx: Context, env: dict[str, str], refs: list[str], timeout: float
) -> Run:
    """One measured run: the Engine emptied first, its share read apart, the load checked after.

    Disk, system-wide: the command's own writes (rusage), the runtime daemon's (/proc/<pid>/io
    write_bytes: pages it and its reaped children dirtied on a file system with a block
    device, files deleted since included; tmpfs pages are not counted), what reached the
    block devices holding the work dir, the data root and the temp dir (/proc/diskstats, a
    sync before and after: every process on the host, so an upper bound; none on tmpfs), and,
    polled every POLL_INTERVAL s, the peak bytes present in the runtime's temp dir (Docker:
    the docker-import-* copy of the load body; containerd: the content store's ingest dir)
    and in the pipeline's own scratch dir (the seeds' plaintext tar), and the image store's
    bytes after the run (the data root without the temp dir)."""
    step = pipeline.step
    engine = ctx.engines[step.runtime] if step.runtime else None
    if engine is not None:
        engine.reset()
    scratch = ctx.workdir / SCRATCH
    watched = [scratch] + ([engine.temp_dir] if engine is not None else [])
    paths = [ctx.workdir, *([engine.data_root, engine.temp_dir] if engine is not None else [])]
    devices = frozenset(d for d in (block_device(p) for p in paths) if d is not None)
    os.sync()  # earlier runs' write-back must not land inside this measurement
    pid = engine.pid if engine is not None else None
    cpu_before, writes_before = proc_cpu(pid), proc_write_bytes(pid)
    device_before = device_write_bytes(devices)
    log = ctx.workdir / f"run-{rnd}-{step.key}.log"
    with DirWatch(watched, interval=POLL_INTERVAL) as watch:
        usage = run_measured(pipeline.argv(ctx), env=env, log=log, timeout=timeout)
    cpu_after, writes_after = proc_cpu(pid), proc_write_bytes(pid)
    os.sync()  # this run's write-back lands inside its measurement
    device_after = device_write_bytes(devices)
    device_writes = sum(device_after[d] - device_before[d] for d in device_before if d in device_after)
    temp = watch[engine.temp_dir] if engine is not None else None
    store = None
    if engine is not None:
        store = tree_bytes(engine.data_root)
        if engine.temp_dir.is_relative_to(engine.data_root):
            store -= tree_bytes(engine.temp_dir)
    ok = usage.returncode == 0
    if ok and engine is not None:
        present = engine.image_ids(refs)
        if present != ctx.archive.ids:
            ok = False
            with open(log, "a") as f:
                f.write(f"\n[bench] images after the run: {present}\n[bench] expected: {ctx.archive.ids}\n")
    return Run(
        step=step,
        round=rnd,
        usage=usage,
        engine_cpu=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        engine_write_bytes=None if writes_before is None or writes_after is None else writes_after - writes_before,
        ok=ok,
        log=log,
        devices=tuple(sorted(devices)),
        device_write_bytes=device_writes if devices else None,
        temp_peak_bytes=None if temp is None else temp.peak_bytes,
        temp_dirs=()
        if temp is None
        else tuple(dict.fromkeys(_generic(info, temp.path) for info in temp.dirs.values())),
        scratch_peak_bytes=watch[scratch].peak_bytes,
        store_bytes=store,
    )


def _generic(info: DirInfo, temp_dir: Path) -> str:
    """``path mode uid gid`` of the temp dir or of what the runtime made in it, named by kind
    (``docker-import-*``, ``<blob being written>``) so every load reads the same."""
    path = Path(info.path)
    if path != temp_dir:
        name = "docker-import-*" if path.name.startswith("docker-import-") else "<blob being written>"
        path = temp_dir / name
    return f"{path} {info.mode:04o} uid {info.uid} gid {info.gid}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
