"""``make bench`` works: the benchmark runs end to end on a tiny archive and reports every figure.

Smoke mode (a 7 MiB archive, 2 rounds) on the real parts the full run uses: a private dockerd
and a private containerd (Debian sid's, the tests' harness; their data roots on tmpfs when run
as root, to exercise that option too), openssl, ctr, the CLI. Both runtimes' steps run: docker
(a, b, c, f: the naive ``openssl enc -d | docker load``) and containerd (d: ``ctr images import
--local --all-platforms``, e: ``imageunlock unlock --runtime containerd``, g: the naive
``openssl enc -d | ctr images import --local``). Timings are never asserted: only that each
figure is there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..support.ci import unavailable
from ..support.containerd import ContainerdError, sid_build

REPO = Path(__file__).resolve().parents[2]
STEPS = ("enc-d", "dgst", "a", "b", "c", "f", "d", "e", "g")
PIPELINES = ("a", "b", "c", "f", "d", "e", "g")
UNLOCKS = ("b", "e")  # held to the targets
NAIVE = {"b": "f", "e": "g"}  # each unlock's wall-time anchor: the naive pipeline on its runtime


@pytest.mark.docker
@pytest.mark.containerd
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_smoke_reports_every_figure(tmp_path: Path):
    for tool in ("dockerd", "docker", "openssl"):
        if shutil.which(tool) is None:
            unavailable(tool, "not installed")
    try:
        sid_build()  # cached after the first fetch: the benchmark's containerd is the tests' sid build
    except (ContainerdError, OSError) as exc:
        unavailable("containerd (sid)", str(exc))
    out = tmp_path / "report.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "bench_unlock.py"), "--smoke", "--json", str(out)]
    argv += ["--workdir", str(tmp_path)]
    tmpfs = os.geteuid() == 0
    if tmpfs:
        argv.append("--tmpfs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IU_BENCH_")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())

    assert summary["smoke"] is True and summary["rounds"] == 2
    assert summary["archive"]["bytes"] > 7 << 20 and summary["archive"]["images"] == 7
    host = summary["host"]
    assert isinstance(host["aes"], bool) and isinstance(host["sha"], bool) and isinstance(host["cpu_flags"], list)
    assert host["cpus"] >= 1
    for runtime in ("docker", "containerd"):
        assert summary["engines"][runtime]["data root"] == ("tmpfs" if tmpfs else "disk"), runtime
    assert summary["engines"]["containerd"]["engine"].startswith("containerd ")

    for key in STEPS:
        step = summary["steps"][key]
        assert step["runs"] == 2, key
        for figure in ("cpu_s", "wall_s"):
            spread = step[figure]
            assert spread["min"] <= spread["median"] <= spread["max"], (key, figure)
            assert spread["spread_pct"] >= 0
        assert step["user_s"] >= 0 and step["sys_s"] >= 0
        assert step["peak_rss_mib"] > 0
        assert step["disk_write_bytes"] >= 0 and step["disk_write_pct"] >= 0
    for key in PIPELINES:  # the Engine's share, apart
        assert summary["steps"][key]["engine_cpu_s"] is not None
        assert summary["steps"][key]["engine_write_bytes"] is not None
    for key in PIPELINES:  # disk, system-wide: ours, the runtime's, the device's, what sat in temp dirs
        disk = summary["steps"][key]["disk"]
        assert disk["own_write_bytes"] >= 0 and disk["engine_write_bytes"] is not None, key
        assert disk["system_write_bytes"] >= disk["own_write_bytes"] and disk["system_write_pct"] >= 0, key
        if disk["devices"]:  # the work dir is on disk; with --tmpfs the data roots are not
            device = disk["device_write_bytes"]
            assert 0 <= device["min"] <= device["median"] <= device["max"], key
        assert disk["temp_peak_bytes"] > 0, f"({key}): nothing seen in the runtime's temp dir"
        assert disk["temp_dirs"] and all(" uid " in entry for entry in disk["temp_dirs"]), key
        assert disk["store_bytes"] > 0, key
    assert summary["steps"]["c"]["disk"]["scratch_peak_bytes"] > 0  # the seeds' decrypted tar
    assert summary["steps"]["b"]["disk"]["scratch_peak_bytes"] == 0

    for runtime, send in (("docker", "a"), ("containerd", "d")):  # each runtime's floor ends in its own CLI
        floor = summary["floor"][runtime]
        assert floor["parts"] == ["enc-d", "dgst", send], runtime
        assert floor["cpu_s"]["median"] > 0, runtime
    for key in ("b", "c", "e", "f", "g"):
        assert summary["steps"][key]["cpu_over_floor"]["median"] > 0, key
    for key in UNLOCKS:
        figures = summary["steps"][key]
        assert figures["wall_over_send"] > 0, key
        assert figures["naive"] == NAIVE[key], key  # our wall over theirs, per round of the same run
        for ratio in ("wall_over_naive", "cpu_over_naive"):
            assert 0 < figures[ratio]["min"] <= figures[ratio]["median"] <= figures[ratio]["max"], (key, ratio)
    assert summary["steps"]["d"]["role"] == "send" and summary["steps"]["d"]["runtime"] == "containerd"
    assert "--local --all-platforms" in summary["steps"]["d"]["title"]  # the floor: the product's import mode
    assert summary["steps"]["e"]["role"] == "unlock" and summary["steps"]["e"]["runtime"] == "containerd"
    for key, runtime in (("f", "docker"), ("g", "containerd")):
        assert summary["steps"][key]["role"] == "naive" and summary["steps"][key]["runtime"] == runtime, key
    targets = {t["target"]: t for t in summary["targets"]}
    assert len(targets) == 8, sorted(targets)
    for key in UNLOCKS:
        assert f"({key}) wall / ({NAIVE[key]}) naive wall <= 1.00" in targets, sorted(targets)
    assert sorted({name[:4] for name in targets}) == ["(b) ", "(e) "]
    assert all(isinstance(t["met"], bool) and t["value"] is not None for t in targets.values())

    text = proc.stdout
    phrases = ("AES instructions", "SHA-256 instructions", "floor (docker) =", "floor (containerd) =")
    phrases += ("Disk, system-wide", "docker temp dir (mode, owner)", "containerd temp dir (mode, owner)")
    phrases += ("(f) naive: openssl enc -d | docker load", "(g) naive: openssl enc -d | ctr import --local")
    phrases += ("(b) wall / (f) naive wall, same rounds:", "(e) wall / (g) naive wall, same rounds:")
    phrases += ("own CPU / naive's:",)
    for phrase in (*phrases, "own CPU / floor", "(e) imageunlock unlock --runtime containerd", "targets:"):
        assert phrase in text, phrase
    assert not list(tmp_path.glob("iu-bench-*")), "the work dir is removed"


@pytest.mark.docker
@pytest.mark.containerd
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unlock_breakdown_splits_own_cpu_by_process(tmp_path: Path):
    """``benchmarks/unlock_breakdown.py`` (README's "where the time goes") still runs and prints
    each share: the Python process, the ctr import, the other ctr runs. Figures not asserted."""
    for tool in ("dockerd", "docker", "openssl"):
        if shutil.which(tool) is None:
            unavailable(tool, "not installed")
    if not Path("/usr/bin/time").exists():
        unavailable("/usr/bin/time", "not installed")
    try:
        sid_build()
    except (ContainerdError, OSError) as exc:
        unavailable("containerd (sid)", str(exc))
    argv = [sys.executable, str(REPO / "benchmarks" / "unlock_breakdown.py"), "--size-mib", "7", "--rounds", "1"]
    argv += ["--workdir", str(tmp_path)]
    if os.geteuid() == 0:
        argv.append("--tmpfs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IU_")}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for row in (
        "python start-up (imageunlock --version)",
        "own CPU, all (the bench's figure)",
        "python process (own CPU - every ctr)",
        "ctr images import --local --all-platforms (from our pipe)",
        "other ctr runs: version, images ls, images label, content get",
        "number of other ctr runs",
    ):
        assert row in proc.stdout, row
    assert not list(tmp_path.glob("iu-breakdown-*")), "the work dir is removed"
