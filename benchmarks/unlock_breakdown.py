"""Where an unlock's own CPU goes: its Python process apart from every ``ctr`` it runs.

    .venv/bin/python benchmarks/unlock_breakdown.py --size-mib 256 --rounds 3 --tmpfs

The bench (``bench_unlock.py``) reports an unlock's own CPU as one figure: the rusage of the
``imageunlock`` process and every child it reaped. This splits that figure, on the same real
parts (a private dockerd builds the archive; a private containerd, Debian sid's 2.x, takes
the import): the unlock runs with a ``ctr`` wrapper first on PATH that records each ctr it
starts (``/usr/bin/time``: ctr's own rusage and wall, its subcommand), so own CPU = the Python
process (login, key, decrypt, hash, writing the pipe, start-up) + ``ctr images import`` + the
other ctr calls (version, the records before, pinning labels, the image IDs after). It also
times the Python start-up alone (``imageunlock --version``). Each import starts from an empty
store and is checked for the archive's image IDs. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.workload import ContainerdEngine, Engine, build_archive, human  # noqa: E402

VERSION = "9.9.9-bench"
EMAIL = "bench@example.test"
# ctr gets no environment of ours (engine/runtimes/containerd.py child_env): the wrapper has
# its log and the real ctr written into it.
WRAPPER = '#!/bin/sh\nexec /usr/bin/time -a -o {log} -f "%e %U %S $1 $2 $3 $4 $5 $6 $7" {ctr} "$@"\n'


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true", help="the runtimes' data roots on tmpfs (root)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the large files go")
    args = parser.parse_args(argv)
    if shutil.which("time") is None and not Path("/usr/bin/time").exists():
        print("breakdown: /usr/bin/time is needed (Debian's time package)", file=sys.stderr)
        return 2
    from imageunlock.defaults import DEFAULT_IMAGES
    from tests.support.resource_api import FakeResourceApi

    workdir = Path(tempfile.mkdtemp(prefix="iu-breakdown-", dir=args.workdir))
    docker = Engine(workdir / "docker", tmpfs=args.tmpfs)
    containerd = ContainerdEngine(workdir / "containerd", tmpfs=args.tmpfs)
    api = None
    try:  # stopped in `finally` even when a start fails half-way (a tmpfs mounted, no daemon)
        docker.start()
        containerd.start()
        names = list(DEFAULT_IMAGES)
        refs = [f"{n}:{VERSION}" for n in names]
        fragment = secrets.token_bytes(32)
        archive = build_archive(docker, workdir, refs, args.size_mib * (1 << 20) // len(names), fragment)
        password = "pw-" + secrets.token_hex(12)
        api = FakeResourceApi(EMAIL, password, fragment).start()
        wrap = workdir / "wrap"
        wrap.mkdir()
        log = workdir / "ctr.log"
        (wrap / "ctr").write_text(WRAPPER.format(log=shlex.quote(str(log)), ctr=shlex.quote(containerd.ctr)))
        (wrap / "ctr").chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEUNLOCK_", "DOCKER_", "IU_"))}
        env.update(IMAGEUNLOCK_EMAIL=EMAIL, IMAGEUNLOCK_PASSWORD=password, XDG_STATE_HOME=str(workdir / "state"))
        env.update(PATH=f"{wrap}:{env.get('PATH', '/usr/bin:/bin')}")
        cli = str(Path(sys.executable).with_name("imageunlock"))
        argv_unlock = [
            cli, "unlock", "--runtime", "containerd", "--archive", str(archive.archive), "--version", VERSION,
            "--api-url", api.url, "--containerd-address", containerd.url, "--containerd-namespace", "k8s.io",
        ]  # fmt: skip
        print(f"breakdown: archive {human(archive.size)}, containerd {containerd.describe()['engine']}", flush=True)
        rows: dict[str, list[float]] = defaultdict(list)
        for rnd in range(1, args.rounds + 1):
            start = run_measured([cli, "--version"], env=env, log=workdir / "version.log", timeout=120)
            rows["python start-up (imageunlock --version)"].append(start.cpu)
            containerd.reset()
            log.write_text("")
            usage = run_measured(argv_unlock, env=env, log=workdir / f"unlock-{rnd}.log", timeout=1800)
            if usage.returncode != 0 or containerd.image_ids(refs) != archive.ids:
                print((workdir / f"unlock-{rnd}.log").read_text()[-2000:], file=sys.stderr)
                return 1
            calls = [line.split() for line in log.read_text().splitlines() if line and line[0].isdigit()]
            imports = [c for c in calls if "import" in c[3:]]
            others = [c for c in calls if "import" not in c[3:]]

            def cpu(rows_: list[list[str]], field: int | None = None) -> float:
                return sum(float(c[1]) + float(c[2]) if field is None else float(c[field]) for c in rows_)

            rows["own CPU, all (the bench's figure)"].append(usage.cpu)
            rows["  python process (own CPU - every ctr)"].append(usage.cpu - cpu(imports) - cpu(others))
            rows["    user"].append(usage.user - cpu(imports, 1) - cpu(others, 1))
            rows["    sys"].append(usage.sys - cpu(imports, 2) - cpu(others, 2))
            rows["  ctr images import --local --all-platforms (from our pipe)"].append(cpu(imports))
            rows["    user "].append(cpu(imports, 1))
            rows["    sys "].append(cpu(imports, 2))
            rows["  other ctr runs: version, images ls, images label, content get"].append(cpu(others))
            rows["  number of other ctr runs"].append(len(others))
            rows["wall, all"].append(usage.wall)
            rows["  ctr images import wall"].append(cpu(imports, 0))
            rows["  other ctr runs wall (one after another)"].append(cpu(others, 0))
            kinds = sorted(
                {" ".join(w for w in c[3:] if not w.startswith(("-", "sha256:")) and "/" not in w) for c in others}
            )
            print(f"breakdown: round {rnd}: own CPU {usage.cpu:.2f}s, {len(calls)} ctr run(s): {kinds}", flush=True)
        print(f"\nunlock --runtime containerd, {human(archive.size)}, medians of {args.rounds} round(s) (min-max):")
        for label, values in rows.items():
            unit, digits = ("", 0) if label.strip().startswith("number") else (" s", 2)
            median, low, high = statistics.median(values), min(values), max(values)
            print(f"  {label:<62} {median:6.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})")
        return 0
    finally:
        if api is not None:
            api.stop()
        for engine in (containerd, docker):
            engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
