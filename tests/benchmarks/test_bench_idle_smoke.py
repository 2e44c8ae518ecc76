"""``make bench-idle`` works: the fleet (two agent processes, the controller, the real API
server) left idle for a short window reports every figure per role. Timings and rates are
never asserted; that each figure is there is."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..support.fleetbench import run_fleet_bench


@pytest.mark.docker
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_idle_smoke_reports_every_figure(tmp_path: Path):
    r, printed = run_fleet_bench("bench_idle.py", ["--seconds", "10", "--count", "2"], tmp_path)

    assert r["count"] == 2 and r["agents"] == 2 and r["window_s"] >= 10
    assert sorted(r["roles"]) == ["agent edge-1", "agent edge-2", "controller"]
    for name, role in r["roles"].items():
        assert role["requests_per_min"] >= 0 and isinstance(role["requests"], dict), name
        assert role["cpu_s"] >= 0 and role["cpu_pct"] >= 0, name
        assert 10 < role["rss_mib"] < 4096, name  # a live Python process's VmRSS
        assert isinstance(role["watches_started"], dict), name
    assert set(r["others"]) == {"apiserver", "etcd", "dockerd"}
    targets = r["targets"]
    assert len(targets) == 9 and all(isinstance(t["met"], bool) for t in targets), targets

    text = printed
    for phrase in ("idle fleet", "requests/min", "CPU % core", "RSS MiB", "watches started", "targets:"):
        assert phrase in text, phrase
