"""The layering contract (pyproject.toml, [tool.importlinter]) holds, and it bites: a core
module that imports an adapter, the service that imports a runtime, or the agent or the
controller that imports an adapter instead of going through a registry, breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "operator")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "operator" / "imageunlock",
        tmp_path / "operator" / "imageunlock",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


def test_the_contract_holds_for_the_package():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("kube/conditions.py", "from imageunlock.kube import client", "core is pure"),
        ("kube/spec.py", "import requests", "core is pure"),
        ("engine/runtimes/docker.py", "from imageunlock.agent import reconciler", "layers by role"),
        ("kube/nodes.py", "from imageunlock.app import config", "layers by role"),
        ("agent/node.py", "from imageunlock.controller import summary", "layers by role"),
        ("engine/archive.py", "from imageunlock.engine import service", "the engine"),
        ("engine/crypto.py", "from imageunlock.engine import archive", "the engine"),
        ("engine/service.py", "from imageunlock.engine.runtimes import docker", "the unlock service knows no"),
        ("engine/runtimes/containerd.py", "import kopf", "adapters know no framework"),
        ("agent/handlers.py", "from imageunlock.engine.runtimes import docker", "orchestration knows ports"),
        ("controller/summary.py", "from imageunlock.engine.keys import resource_api", "orchestration knows ports"),
    ],
)
def test_the_contract_fails_when_a_layer_is_crossed(copy, module, line, contract):
    path = copy / "operator" / "imageunlock" / module
    source = path.read_text()
    marker = "from __future__ import annotations\n"
    path.write_text(source.replace(marker, marker + line + "  # noqa\n", 1))
    result = lint_imports(copy)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
