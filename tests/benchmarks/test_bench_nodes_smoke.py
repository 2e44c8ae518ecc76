"""``make bench-nodes`` works: the per-node status benchmark runs end to end against the real
API server at small node counts and reports every figure. Timings are never asserted; that
no entry is lost under concurrent writers, and one watch event per change, are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_nodes_smoke_reports_every_figure(tmp_path: Path):
    out = tmp_path / "report.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "bench_nodes.py"), "--nodes", "4,12", "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = {r["nodes"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(results) == [4, 12]
    for nodes, r in results.items():
        assert r["entries_kept"] == nodes and r["lost"] == [], r
        assert r["watch_events"] == r["sampled_changes"] == nodes and r["watch_events_per_change"] == 1.0, r
        assert 0 < r["managed_fields_bytes"] < r["object_bytes"] and 0 < r["of_limit_pct"] < 100
        for key in ("first_write_s", "second_write_s"):
            assert 0 < r[key]["p50"] <= r[key]["p99"], (key, r[key])
        assert r["client_cpu_ms_per_write"] > 0 and r["server_cpu_ms_per_write"] >= 0
    assert results[12]["object_bytes"] > results[4]["object_bytes"]
    assert "per-node status at scale" in proc.stdout and "ev/change" in proc.stdout
