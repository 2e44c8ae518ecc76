"""``make bench`` works: the benchmark runs end to end on a tiny archive and reports every figure.

Smoke mode (a 7 MiB archive, 2 rounds) on the real parts the full run uses: a private dockerd
(its data root on tmpfs when run as root, to exercise that option too), openssl, the CLI.
Timings are never asserted: only that each figure is there.
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

REPO = Path(__file__).resolve().parents[2]
STEPS = ("enc-d", "dgst", "a", "b", "c")
PIPELINES = ("a", "b", "c")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_smoke_reports_every_figure(tmp_path: Path):
    for tool in ("dockerd", "docker", "openssl"):
        if shutil.which(tool) is None:
            unavailable(tool, "not installed")
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
    assert summary["engines"]["docker"]["data root"] == ("tmpfs" if tmpfs else "disk")

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

    floor = summary["floor"]["docker"]
    assert floor["parts"] == ["enc-d", "dgst", "a"]
    assert floor["cpu_s"]["median"] > 0
    for key in ("b", "c"):
        assert summary["steps"][key]["cpu_over_floor"]["median"] > 0
    assert summary["steps"]["b"]["wall_over_send"] > 0
    targets = {t["target"]: t for t in summary["targets"]}
    assert len(targets) == 3 and all(name.startswith("(b) ") for name in targets)
    assert all(isinstance(t["met"], bool) and t["value"] is not None for t in targets.values())

    text = proc.stdout
    for phrase in ("AES instructions", "SHA-256 instructions", "floor (docker) =", "own CPU / floor", "targets:"):
        assert phrase in text, phrase
    assert not list(tmp_path.glob("iu-bench-*")), "the work dir is removed"
