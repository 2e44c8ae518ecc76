"""Running one of the fleet benches (benchmarks/fleet.py: bench-many, bench-idle) for a smoke
test: its JSON report, or the test skipped (failed under CI) when a part could not come up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .ci import unavailable

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = 3  # benchmarks/fleet.py: a part of the fleet did not come up


def run_fleet_bench(script: str, args: list[str], tmp_path: Path, timeout: float = 150) -> tuple[Any, str]:
    """The bench's JSON report and what it printed."""
    if shutil.which("dockerd") is None:
        unavailable("dockerd", "not installed")
    out = tmp_path / "report.json"
    argv = [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode == UNAVAILABLE:
        unavailable("the bench's fleet", proc.stderr[-2000:])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout
