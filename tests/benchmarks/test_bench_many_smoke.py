"""``make bench-many`` works: many satisfied ImageUnlocks on two agent processes and the
controller, against the real API server, at a tiny count, report every figure. Timings are
never asserted; that every one became Ready, and that each figure is there, are."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.fleetbench import run_fleet_bench


@pytest.mark.docker
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_many_smoke_reports_every_figure(tmp_path: Path):
    summary, printed = run_fleet_bench("bench_many.py", ["--counts", "5"], tmp_path)

    assert summary["seed_s"] > 0
    [r] = summary["results"]
    assert r["resources"] == 5 and r["agents"] == 2 and r["all_ready"] and r["ready_count"] == 5
    assert 0 < r["ready_latency_s"]["p50"] <= r["ready_latency_s"]["p99"] <= r["ready_s"]
    assert sorted(r["roles"]) == ["agent edge-1", "agent edge-2", "controller"]
    for name, role in r["roles"].items():
        assert role["requests_total"] > 0 and role["requests"], name  # read from the audit log
        assert role["writes"] > 0 and role["writes_per_resource"] == round(role["writes"] / 5, 3), name
        assert role["cpu_s"] > 0 and role["cpu_ms_per_resource"] > 0, name
        assert role["events_created"] >= 0 and role["watches"] >= 0, name
    assert r["roles"]["agent edge-1"]["requests"].get("patch imageunlocks/status", 0) > 0
    assert set(r["others"]) == {"apiserver", "etcd", "dockerd"}
    assert r["resource_api"] == {"login": r["resource_api"]["login"], "key": r["resource_api"]["key"]}
    targets = {t["target"]: t for t in r["targets"]}
    assert len(targets) == 2 and all(isinstance(t["met"], bool) for t in targets.values()), targets

    text = printed
    for phrase in ("many satisfied ImageUnlocks", "N=5 on 2 agents", "writes/res", "CPU ms/res", "targets:"):
        assert phrase in text, phrase
    assert "requests by verb and resource" in text and "key request(s)" in text
